"""The fused Triton kernels against the float64 eager oracle: forward and all six
gradients over the features of docs/design.md (float32 inputs, IEEE products)."""

import pytest
import torch

from llama_adapter_fast.ops.testing import Case, check_against_oracle

CASES = {
    "mha_causal": Case(Hq=2, Hkv=2),
    "gqa_causal": Case(),
    "mqa_causal": Case(Hq=4, Hkv=1, T=19),
    "bidirectional": Case(causal=False),
    "bidirectional_mqa_shared": Case(Hkv=1, causal=False, shared_prefix=True),
    "shared_prefix": Case(shared_prefix=True),
    "kv_cache_chunk": Case(T=9, S=40),  # bottom-right causal alignment
    "decode_one_query": Case(T=1, S=37),
    "more_queries_than_keys": Case(T=33, S=12),  # the first T - S rows see no word key
    "no_word_keys": Case(T=7, S=0, causal=False),
    "p1": Case(P=1),
    "p70_two_prefix_blocks": Case(P=70, T=17),
    "p33": Case(P=33, causal=False, shared_prefix=True),
    "d16": Case(D=16),
    "d64": Case(D=64, T=17),
    "d80": Case(D=80, T=17),
    "d96": Case(D=96, T=17),
    "d128": Case(D=128, T=17, B=1),
    "d256": Case(D=256, T=17, B=1),
    "odd_length": Case(T=31, S=45),
    "padding_mask": Case(mask="random", T=26),
    "fully_masked_rows": Case(mask="empty_rows", T=20),
    "mask_bidirectional_shared": Case(mask="empty_rows", causal=False, shared_prefix=True),
    "mask_kv_chunk": Case(mask="random", T=6, S=35),
    "transposed_inputs": Case(transposed=True),
    "scalar_gate": Case(gate_shape=()),
    "one_gate": Case(gate_shape=(1,), shared_prefix=True),
    "identity_gate": Case(gate_activation="identity"),
    # one gate per sample and head (a batch mixing adapters), with a per-sample or a shared prefix
    "per_sample_gate": Case(gate_shape=("B", "Hq"), B=3),
    "per_sample_gate_shared_prefix": Case(gate_shape=("B", "Hq"), shared_prefix=True, mask="random", T=18),
    "softmax_scale": Case(softmax_scale=0.3),
    "batch_one": Case(B=1, Hq=3, Hkv=1, T=40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_oracle(name):
    check_against_oracle(CASES[name])


def test_gradient_with_zero_strides():
    """The gradient of out.sum() arrives expanded (stride 0); the kernels read any strides."""
    from llama_adapter_fast.ops.testing import expect_launches, make_inputs, oracle, rel_error, triton_fn, with_grad

    tensors, kwargs = make_inputs(Case(T=18))
    leaves = with_grad(tensors)
    with expect_launches("forward", "backward_prefix", "backward"):
        out = triton_fn(*leaves, **kwargs)
        out.sum().backward()
    ref, ref_grads = oracle(tensors, kwargs, torch.ones_like(out, dtype=torch.float64))
    for leaf, r in zip(leaves, ref_grads, strict=True):
        assert rel_error(leaf.grad, r) < 2e-5


@pytest.mark.parametrize("subset", [("q",), ("k", "v"), ("prefix_k", "gate"), ("gate",)])
def test_gradient_subsets(subset):
    """Only some inputs require grad: those get correct gradients, the others none."""
    from llama_adapter_fast.ops.testing import GRAD_NAMES, make_inputs, oracle, rel_error, triton_fn

    tensors, kwargs = make_inputs(Case(T=17, Hkv=1))
    leaves = [t.detach().requires_grad_(n in subset) for n, t in zip(GRAD_NAMES, tensors, strict=True)]
    out = triton_fn(*leaves, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, ref_grads = oracle(tensors, kwargs, grad_out)
    for name, leaf, r in zip(GRAD_NAMES, leaves, ref_grads, strict=True):
        if name in subset:
            assert rel_error(leaf.grad, r) < 2e-5, name
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("B,T", [(0, 9), (2, 0)])
def test_empty_inputs(B, T):
    """Empty batches and T == 0 return empty outputs, and empty gradients."""
    from llama_adapter_fast.ops.testing import make_inputs, triton_fn, with_grad

    tensors, kwargs = make_inputs(Case(B=B, T=T, S=5))
    leaves = with_grad(tensors)
    out = triton_fn(*leaves, **kwargs)
    assert out.shape == (B, 4, T, 32)
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert torch.count_nonzero(leaf.grad) == 0
