"""What the op means: zero gates, the paper's first training step, the concatenated form
of the original implementation, and agreement of the PyTorch backends with the oracle."""

import pytest
import torch
import torch.nn.functional as F

from llama_adapter_fast import concat_attention, eager_attention, gated_prefix_attention, sdpa_attention
from llama_adapter_fast.ops.testing import (
    GRAD_NAMES,
    Case,
    expect_launches,
    forward_backward,
    make_inputs,
    oracle,
    rel_error,
    triton_fn,
    with_grad,
)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
def test_zero_gate_is_plain_causal_attention(backend):
    tensors, kwargs = make_inputs(Case(Hkv=4, T=23))
    q, k, v, pk, pv, gate = tensors
    zero = torch.zeros_like(gate)
    with expect_launches("forward") if backend == "triton" else torch.no_grad():
        out = gated_prefix_attention(q, k, v, pk, pv, zero, backend=backend, causal=True)
    plain = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert rel_error(out, plain) < 2e-6


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
def test_first_step_at_zero_gate(backend):
    """With tanh and gate = 0 the prefix gets exactly zero gradient while the gate does not:
    the first training step moves only the gates."""
    tensors, kwargs = make_inputs(Case(T=19, shared_prefix=True))
    tensors[5] = torch.zeros_like(tensors[5])
    fn = triton_fn if backend == "triton" else lambda *a, **kw: gated_prefix_attention(*a, backend=backend, **kw)
    _, grad_out, grads = forward_backward(fn, tensors, kwargs)
    _, ref_grads = oracle(tensors, kwargs, grad_out)
    grads = dict(zip(GRAD_NAMES, grads, strict=True))
    assert torch.count_nonzero(grads["prefix_k"]) == 0
    assert torch.count_nonzero(grads["prefix_v"]) == 0
    assert torch.count_nonzero(grads["gate"]) == grads["gate"].numel()
    # The gradient that starts training, by value: d gate = sum over (b, t) of dO . O_prefix.
    assert rel_error(grads["gate"], ref_grads[5]) < 2e-5
    for name, g, r in zip(GRAD_NAMES[:3], list(grads.values())[:3], ref_grads[:3], strict=True):
        assert rel_error(g, r) < 2e-5, name


@pytest.mark.parametrize("case", [Case(), Case(mask="empty_rows", T=9, S=30, gate_activation="identity"),
                                  Case(causal=False, shared_prefix=True, gate_shape=())])
@pytest.mark.parametrize("reference", [eager_attention, concat_attention], ids=["eager", "concatenated"])
def test_the_packages_references_agree_with_the_independent_oracle(case, reference):
    """The eager two-branch form and the original code's concatenated form, in float64,
    against the oracle written apart from the package (its own masks and activation)."""
    tensors, kwargs = make_inputs(case)
    out, grad_out, grads = forward_backward(reference, tensors, kwargs, dtype=torch.float64)
    ref, ref_grads = oracle(tensors, kwargs, grad_out)
    assert rel_error(out, ref, floor=0) < 1e-12
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert rel_error(g, r, floor=0) < (1e-10 if g.dtype == torch.float64 else 1e-6), name


@pytest.mark.parametrize("case", [Case(), Case(mask="empty_rows", T=9, S=30), Case(T=30, S=11),
                                  Case(causal=False, Hkv=1, shared_prefix=True), Case(T=1, S=20)])
def test_sdpa_backend_matches_oracle(case):
    tensors, kwargs = make_inputs(case)
    out, grad_out, grads = forward_backward(sdpa_attention, tensors, kwargs, dtype=torch.float64)
    ref, ref_grads = oracle(tensors, kwargs, grad_out)
    assert rel_error(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < (1e-10 if g.dtype == torch.float64 else 1e-6)  # the gate stays float32


def test_fully_masked_rows_are_zero_not_nan():
    tensors, kwargs = make_inputs(Case(mask="empty_rows", T=12))
    q, k, v, pk, pv, gate = tensors
    for backend in ("triton", "sdpa", "eager"):
        out = gated_prefix_attention(q, k, v, pk, pv, torch.zeros_like(gate), backend=backend, **kwargs)
        assert torch.isfinite(out).all()
        assert torch.count_nonzero(out[0]) == 0, backend  # batch 0 has no key: only the gated prefix


def test_gate_gradient_keeps_gate_dtype():
    tensors, kwargs = make_inputs(Case(T=10, dtype=torch.float16))
    tensors[5] = tensors[5].to(torch.bfloat16)
    leaves = with_grad(tensors)
    triton_fn(*leaves, **kwargs).float().sum().backward()
    assert leaves[5].grad.dtype == torch.bfloat16
    assert leaves[0].grad.dtype == torch.float16


def test_auto_backend_on_cpu_is_sdpa():
    tensors, kwargs = make_inputs(Case(T=8))
    tensors = [t.cpu() for t in tensors]  # the test's device may be a GPU
    out = gated_prefix_attention(*tensors, backend="auto", **kwargs)
    assert rel_error(out, sdpa_attention(*tensors, **kwargs)) == 0.0
