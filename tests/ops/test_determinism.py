"""The backward is a choice: the fused one (the default; dQ summed with atomic adds) or the
deterministic one (`deterministic=True`, `set_deterministic(True)` or torch's deterministic
mode), bit-identical across runs. Both against the float64 oracle, and the kernels that ran
prove which one it was."""

import os
import subprocess
import sys

import pytest
import torch

from llama_adapter_fast import deterministic_enabled, gated_prefix_attention, set_deterministic
from llama_adapter_fast import gated_prefix_attention_varlen as varlen
from llama_adapter_fast.ops.testing import (
    GRAD_NAMES,
    Case,
    errors_against_oracle,
    expect_launches,
    make_inputs,
    training_kernels,
    triton_fn,
)

pytestmark = pytest.mark.interpreter
CASE = Case(B=2, Hq=4, Hkv=2, T=37, S=45, D=80, P=3, mask="empty_rows")


def _grads(deterministic, **kwargs):
    tensors, options = make_inputs(CASE, seed=3)
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = triton_fn(*leaves, deterministic=deterministic, **options, **kwargs)
    return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]


@pytest.mark.parametrize("deterministic", [False, True])
def test_each_backward_matches_the_oracle(deterministic):
    tensors, kwargs = make_inputs(CASE)

    def fused(*args, **options):
        return triton_fn(*args, deterministic=deterministic, **options)

    with expect_launches(*training_kernels(deterministic)):
        errors = errors_against_oracle(fused, tensors, kwargs)
    assert all(e < 2e-5 for e in errors.values()), errors


def test_deterministic_backward_is_bit_identical_across_runs():
    with expect_launches("backward_dq", "backward_dkdv", times=3):
        runs = [_grads(True) for _ in range(3)]
    for other in runs[1:]:
        for name, a, b in zip(("out", *GRAD_NAMES), runs[0], other, strict=True):
            assert torch.equal(a, b), name


def test_the_package_switch_and_torchs_deterministic_mode_choose_it():
    assert not deterministic_enabled()
    set_deterministic(True)
    try:
        assert deterministic_enabled()
        with expect_launches("backward_dq", "backward_dkdv", times=1):
            _grads(None)
        with expect_launches("backward_prefix", "backward", times=1):  # the argument wins
            _grads(False)
    finally:
        set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        with expect_launches("backward_dq", "backward_dkdv", times=1):
            _grads(None)
    finally:
        torch.use_deterministic_algorithms(False)
    with expect_launches("backward_prefix", "backward", times=1):
        _grads(None)


def test_packed_op_takes_the_choice():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 21], dtype=torch.int32)
    q, k, v = (torch.randn(21, 2, 16, generator=g).requires_grad_() for _ in range(3))
    pk, pv = (torch.randn(2, 2, 3, 16, generator=g) for _ in range(2))
    gate = torch.full((2,), 0.4)
    for deterministic, kernels in ((True, ("backward_dq", "backward_dkdv")), (False, ("backward_prefix", "backward"))):
        with expect_launches(*kernels, times=1):
            out = varlen(q, k, v, cu, cu, 16, 16, pk, pv, gate, backend="triton", deterministic=deterministic)
            out.sum().backward()


def test_bad_choices_are_refused_and_change_nothing():
    tensors, kwargs = make_inputs(CASE)
    with pytest.raises(TypeError, match="deterministic must be a bool or None"):
        gated_prefix_attention(*tensors, backend="triton", deterministic="yes", **kwargs)
    with pytest.raises(TypeError, match="set_deterministic: enabled must be a bool"):
        set_deterministic(1)
    assert not deterministic_enabled()


def test_the_environment_sets_the_switch_at_import():
    code = "import llama_adapter_fast as laf; print(laf.deterministic_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "LLAMA_ADAPTER_FAST_DETERMINISTIC": value}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.stdout.strip() == expected, result.stderr[-2000:]
