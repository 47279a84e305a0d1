"""The packed op: the fused kernels on sequences concatenated without padding equal the
padded op run on each sequence alone, forward and every gradient, and the float64 oracle."""

import pytest
import torch

from llama_adapter_fast import gated_prefix_attention, gated_prefix_attention_varlen
from llama_adapter_fast.ops import custom_ops
from llama_adapter_fast.ops.testing import (
    DEVICE,
    GRAD_NAMES,
    PackedCase,
    check_packed,
    expect_launches,
    make_packed_inputs,
    packed_fns,
    packed_oracle,
    rel_error,
)
from llama_adapter_fast.ops.varlen import varlen_reference

OPS = torch.ops.llama_adapter_fast
KERNELS = ("forward", "backward_prefix", "backward")

CASES = {
    # The interpreter's blocks are 16 rows: boundaries inside blocks and on their edges.
    "block_edges_gqa": PackedCase((16, 5, 33, 1, 17)),
    "one_token_sequences": PackedCase((1, 1, 7, 1)),
    "one_much_longer": PackedCase((3, 70, 2), Hq=2, Hkv=1),
    "shared_prefix_mqa": PackedCase((9, 24, 12), Hkv=1, per_sequence_prefix=False),
    "bidirectional": PackedCase((13, 30, 4), causal=False),
    "kv_cache_chunks": PackedCase((3, 1, 9), lens_k=(20, 33, 9)),  # bottom-right causal per sequence
    "empty_sequence_p70": PackedCase((8, 0, 19), lens_k=(8, 0, 19), P=70),
    "d80": PackedCase((11, 20), D=80),
    "per_sequence_gates": PackedCase((9, 24, 12), per_sequence_gate=True),
    "per_sequence_gates_shared_prefix": PackedCase((5, 17), per_sequence_gate=True, per_sequence_prefix=False),
    "no_word_keys": PackedCase((3, 18), lens_k=(0, 0)),  # the prefix alone (the dK/dV kernel has no keys)
}


def _run(fn, tensors, grad_out, **kwargs):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_matches_oracle(name):
    check_packed(CASES[name])


@pytest.mark.parametrize("name", ["block_edges_gqa", "kv_cache_chunks", "empty_sequence_p70"])
def test_varlen_matches_a_loop_of_the_padded_op(name):
    """Each packed sequence gets what the padded fused op gives it alone."""
    tensors, kwargs, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(CASES[name])
    fused = packed_fns((cu_q, cu_k, max_q, max_k))[0]

    def loop(q, k, v, pk, pv, gate, **kw):
        return varlen_reference(gated_prefix_attention, q, k, v, cu_q, cu_k, pk, pv, gate, backend="triton", **kw)

    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with expect_launches(*KERNELS):
        out, grads = _run(fused, tensors, grad_out, **kwargs)
    loop_out, loop_grads = _run(loop, tensors, grad_out, **kwargs)
    for label, x, ref in zip(("out", *GRAD_NAMES), (out, *grads), (loop_out, *loop_grads), strict=True):
        assert rel_error(x, ref) < 1e-5, (label, rel_error(x, ref))


def test_float16():
    check_packed(PackedCase((16, 5, 33, 1), dtype=torch.float16))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_reference_backends(backend):
    tensors, _, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(CASES["kv_cache_chunks"])
    out = gated_prefix_attention_varlen(*tensors[:3], cu_q, cu_k, max_q, max_k, *tensors[3:], backend=backend)
    ref = packed_oracle(*[t.double() for t in tensors[:3]], cu_q, cu_k, *[t.double() for t in tensors[3:]])
    assert rel_error(out, ref) < 1e-5


def test_bf16_reference_backend():
    tensors, _, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(PackedCase((16, 5, 33, 1, 17), dtype=torch.bfloat16))
    out = gated_prefix_attention_varlen(*tensors[:3], cu_q, cu_k, max_q, max_k, *tensors[3:], backend="sdpa")
    ref = packed_oracle(*[t.double() for t in tensors[:3]], cu_q, cu_k, *[t.double() for t in tensors[3:]])
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < 2e-2


def _bad_call(**changes):
    tensors, _, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(PackedCase((5, 7)))
    args = dict(q=tensors[0], k=tensors[1], v=tensors[2], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=max_q, max_seqlen_k=max_k, prefix_k=tensors[3], prefix_v=tensors[4], gate=tensors[5])
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return gated_prefix_attention_varlen(**args, backend="triton")


@pytest.mark.parametrize("changes, error, words", [
    (dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    (dict(cu_seqlens_k=lambda a: a["cu_seqlens_k"].tolist()), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=lambda a: torch.tensor([0, 8, 5, 12], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=lambda a: torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must end at the number of packed rows (12)"),
    (dict(cu_seqlens_k=lambda a: torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].to("meta")), ValueError, "cu_seqlens_q must be on q's device"),
    (dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q must be 1-d"),
    (dict(cu_seqlens_k=lambda a: torch.tensor([0, 12], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must have cu_seqlens_q's 3 entries"),
    (dict(max_seqlen_q=6), ValueError, "max_seqlen_q (6) is below the longest sequence (7)"),
    (dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    (dict(q=lambda a: a["q"][None]), ValueError, "q must be 3-d"),
    (dict(prefix_k=lambda a: a["prefix_k"][:1]), ValueError, "one per sequence"),
    (dict(v=lambda a: a["v"].half()), TypeError, "v must have q's dtype"),
    (dict(gate=lambda a: a["gate"][:3]), ValueError, "gate must have shape"),
])
def test_bad_input(changes, error, words):
    with pytest.raises(error) as info:
        _bad_call(**changes)
    assert words in str(info.value)


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck(deterministic):
    tensors, _, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(PackedCase((5, 16, 2), D=16, P=3))
    q, k, v, pk, pv, gate = tensors
    gate_act = gate.tanh().detach().repeat(cu_q.numel() - 1)  # the custom ops take one per sequence and head
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, gate_act)]
    args = (*leaves, cu_q, cu_k, max_q, max_k, True, 0.25, deterministic)
    torch.library.opcheck(OPS.gpa_varlen_forward.default, args)
    out, lse1, lse2 = custom_ops.gpa_varlen_forward(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    detached = [t.detach() for t in leaves]
    torch.library.opcheck(OPS.gpa_varlen_backward.default,
                          (grad_out, *detached, cu_q, cu_k, max_q, max_k, out.detach(), lse1, lse2, True, 0.25,
                           deterministic))


def test_compiles_with_fullgraph():
    torch._dynamo.reset()
    tensors, _, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(PackedCase((5, 16, 2), D=16, P=3))

    def fn(q, k, v, pk, pv, gate):
        return gated_prefix_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, pk, pv, gate, backend="triton")

    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref, ref_grads = _run(fn, tensors, grad_out)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with expect_launches(*KERNELS):
        out, grads = _run(compiled, tensors, grad_out)
    for x, r in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert rel_error(x, r) < 1e-6


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["kv_cache_chunks", "empty_sequence_p70", "shared_prefix_mqa", "bidirectional"])
def test_reference_backends_compile_with_fullgraph(backend, name):
    """torch.compile(fullgraph=True) of the packed op on the PyTorch backends: their loop
    over the sequences reads the lengths, so a compiled graph runs one masked attention over
    the packed row instead; forward and all six gradients as the eager call gives them."""
    torch._dynamo.reset()
    tensors, kwargs, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(CASES[name])

    def fn(q, k, v, pk, pv, gate):
        return gated_prefix_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, pk, pv, gate, backend=backend,
                                             **kwargs)

    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref, ref_grads = _run(fn, tensors, grad_out)
    out, grads = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), tensors, grad_out)
    for label, x, r in zip(("out", *GRAD_NAMES), (out, *grads), (ref, *ref_grads), strict=True):
        assert rel_error(x, r) < 1e-5, label


def test_strided_cu_seqlens_and_a_large_max_seqlen():
    """cu_seqlens may be a strided view (the kernels read them with stride 1), and
    max_seqlen may be far above the longest sequence (a max_position_embeddings): the
    grids are sized by at most the packed rows."""
    tensors, kwargs, (cu_q, cu_k, max_q, max_k) = make_packed_inputs(CASES["block_edges_gqa"])
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    compact = _run(packed_fns((cu_q, cu_k, max_q, max_k))[0], tensors, grad_out, **kwargs)

    def strided(cu):
        spaced = torch.full((2 * cu.numel(),), 10**6, dtype=torch.int32, device=cu.device)
        spaced[::2] = cu
        return spaced[::2]

    cu_q2, cu_k2 = strided(cu_q), strided(cu_k)
    assert cu_q2.stride(0) == 2 and torch.equal(cu_q2, cu_q)

    def fused(q, k, v, pk, pv, gate, **kw):
        return gated_prefix_attention_varlen(q, k, v, cu_q2, cu_k2, 2**40, 2**40, pk, pv, gate, backend="triton",
                                             **kw)

    with expect_launches(*KERNELS):
        out, grads = _run(fused, tensors, grad_out, **kwargs)
    for label, x, ref in zip(("out", *GRAD_NAMES), (out, *grads), (compact[0], *compact[1]), strict=True):
        assert torch.equal(x, ref), label
