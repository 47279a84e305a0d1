"""Correctness tooling shared by the tests and the GPU check: random problems, the float64
oracle, the error measure, and launch counts that prove the Triton kernels ran."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from llama_adapter_fast.kernels.utils import LAUNCH_COUNTS
from llama_adapter_fast.ops import eager_attention, gated_prefix_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "gate")


@dataclass
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    T: int = 21
    S: int | None = None  # defaults to T
    D: int = 32
    P: int = 10
    causal: bool = True
    shared_prefix: bool = False
    gate_shape: tuple = ("Hq",)
    gate_activation: str = "tanh"
    softmax_scale: float | None = None
    mask: str | None = None  # None, "random" or "empty_rows" (some batch with no key at all)
    transposed: bool = False  # q, k, v as (B, T, H, D).transpose(1, 2)
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    @property
    def seq_k(self) -> int:
        return self.T if self.S is None else self.S


def make_inputs(c: Case, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Fresh random inputs with non-zero gates; returns (tensors, keyword arguments)."""
    g = torch.Generator().manual_seed(seed)
    S = c.seq_k

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(c.dtype).to(DEVICE)

    if c.transposed:
        q = rand(c.B, c.T, c.Hq, c.D).transpose(1, 2)
        k = rand(c.B, S, c.Hkv, c.D).transpose(1, 2)
        v = rand(c.B, S, c.Hkv, c.D).transpose(1, 2)
    else:
        q, k, v = rand(c.B, c.Hq, c.T, c.D), rand(c.B, c.Hkv, S, c.D), rand(c.B, c.Hkv, S, c.D)
    prefix_shape = (c.Hkv, c.P, c.D) if c.shared_prefix else (c.B, c.Hkv, c.P, c.D)
    pk, pv = rand(*prefix_shape), rand(*prefix_shape)
    gate_shape = tuple(c.Hq if d == "Hq" else d for d in c.gate_shape)
    gate = (torch.rand(gate_shape, generator=g) * 1.5 + 0.25).to(DEVICE)  # non-zero, both signs below
    if gate.dim() > 0 and gate.numel() > 1:
        gate[::2] = -gate[::2]
    mask = None
    if c.mask is not None:
        mask = (torch.rand(c.B, S, generator=g) > 0.35).to(DEVICE)
        if c.mask == "empty_rows" and c.B > 0:
            mask[0] = False
    kwargs = dict(causal=c.causal, gate_activation=c.gate_activation,
                  softmax_scale=c.softmax_scale, key_padding_mask=mask)
    return [q, k, v, pk, pv, gate], kwargs


def with_grad(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Leaf copies that require grad (keeping strides), optionally cast (never the gate)."""
    out = []
    for i, t in enumerate(tensors):
        t = t.detach()
        if dtype is not None and i < 5:
            t = t.to(dtype)
        out.append(t.requires_grad_())
    return out


def forward_backward(fn, tensors, kwargs, grad_out=None, dtype=None):
    """Run fn on grad-requiring copies; returns (out, grad_out, [six gradients])."""
    leaves = with_grad(tensors, dtype)
    out = fn(*leaves, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return out, grad_out, list(grads)


def oracle(tensors, kwargs, grad_out, reference=eager_attention):
    """The eager reference in float64 (gate too)."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = reference(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return out, list(grads)


def rel_error(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.1) -> float:
    """||x - ref|| / ||ref||, with a floor on the denominator of `floor` per element (RMS):
    inputs are unit normal, so a reference far below that is zero up to rounding (for
    example the prefix keys' gradient when P = 1) and is judged on the problem's scale."""
    diff = (x.double() - ref.double()).norm().item()
    return diff / max(ref.double().norm().item(), floor * max(ref.numel(), 1) ** 0.5)


def triton_fn(*args, **kwargs):
    return gated_prefix_attention(*args, backend="triton", **kwargs)


@contextlib.contextmanager
def expect_launches(*names: str):
    """Assert that each named kernel launcher of the package ran inside the block."""
    before = dict(LAUNCH_COUNTS)
    yield
    for name in names:
        assert LAUNCH_COUNTS[name] > before.get(name, 0), f"Triton kernel {name!r} did not run"


ALL_KERNELS = ("forward", "backward_dq", "backward_dkdv")
ERROR_NAMES = ("out",) + tuple("d" + n for n in GRAD_NAMES)


def errors_against_oracle(fn, tensors, kwargs, reference=eager_attention) -> dict[str, float]:
    """Relative errors of fn's output and six gradients against the float64 oracle."""
    out, grad_out, grads = forward_backward(fn, tensors, kwargs)
    ref, ref_grads = oracle(tensors, kwargs, grad_out, reference)
    assert out.shape == ref.shape and out.dtype == tensors[0].dtype
    errors = [rel_error(out, ref)]
    for name, g, r, t in zip(GRAD_NAMES, grads, ref_grads, tensors, strict=True):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), name
        errors.append(rel_error(g, r))
    return dict(zip(ERROR_NAMES, errors, strict=True))


def kernels_for(c: Case) -> list[str]:
    """The kernels a forward and backward of this case must launch."""
    if c.B * c.T == 0:
        return []
    return [n for n in ALL_KERNELS if n != "backward_dkdv" or c.seq_k > 0]


def check_against_oracle(c: Case, tol: float = 2e-5, seed: int = 0) -> dict[str, float]:
    """Triton forward and all six gradients in float32 against the float64 oracle."""
    tensors, kwargs = make_inputs(c, seed)
    return _check_float32(tensors, kwargs, triton_fn, eager_attention, kernels_for(c), tol)


def check_low_precision(c: Case, floor: float = 1e-4, seed: int = 0) -> dict[str, tuple[float, float]]:
    """FlashAttention's criterion: the Triton error at most twice the eager backend's error
    in the same dtype (both against the float64 oracle), plus a small floor."""
    tensors, kwargs = make_inputs(c, seed)
    return _check_low_precision(tensors, kwargs, triton_fn, eager_attention, kernels_for(c), floor)


def _check_float32(tensors, kwargs, fused, reference, kernels, tol: float) -> dict[str, float]:
    with expect_launches(*kernels):
        errors = errors_against_oracle(fused, tensors, kwargs, reference)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors over {tol}: {bad}"
    return errors


def _check_low_precision(tensors, kwargs, fused, reference, kernels, floor: float):
    with expect_launches(*kernels):
        fused_errors = errors_against_oracle(fused, tensors, kwargs, reference)
    eager_errors = errors_against_oracle(reference, tensors, kwargs, reference)
    pairs = {k: (fused_errors[k], eager_errors[k]) for k in ERROR_NAMES}
    bad = {k: p for k, p in pairs.items() if not p[0] <= 2 * p[1] + floor}
    assert not bad, f"(triton, eager) errors over the criterion: {bad}"
    return pairs


# ----------------------------------------------------------------------------------------
# Packed sequences (gated_prefix_attention_varlen)


@dataclass
class PackedCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...] | None = None  # defaults to lens_q
    Hq: int = 4
    Hkv: int = 2
    D: int = 32
    P: int = 10
    causal: bool = True
    per_sequence_prefix: bool = True
    dtype: torch.dtype = torch.float32


def make_packed_inputs(c: PackedCase, seed: int = 0) -> tuple[list[torch.Tensor], dict, tuple]:
    """Random packed inputs with non-zero gates: (tensors, keyword arguments, (cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k))."""
    g = torch.Generator().manual_seed(seed)
    lens_k = c.lens_k or c.lens_q

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(c.dtype).to(DEVICE)

    def cumulative(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    q, k, v = rand(sum(c.lens_q), c.Hq, c.D), rand(sum(lens_k), c.Hkv, c.D), rand(sum(lens_k), c.Hkv, c.D)
    prefix = (len(c.lens_q), c.Hkv, c.P, c.D) if c.per_sequence_prefix else (c.Hkv, c.P, c.D)
    pk, pv = rand(*prefix), rand(*prefix)
    gate = (torch.rand(c.Hq, generator=g) + 0.25).to(DEVICE)
    gate[::2] = -gate[::2]
    packing = (cumulative(c.lens_q), cumulative(lens_k), max(c.lens_q, default=0), max(lens_k, default=0))
    return [q, k, v, pk, pv, gate], dict(causal=c.causal), packing


def packed_fns(packing: tuple, backend: str = "triton"):
    """(the packed op on this packing with `backend`, the padded eager reference run on each
    sequence), both with the padded op's argument order (q, k, v, prefix_k, prefix_v, gate)."""
    from llama_adapter_fast.ops.varlen import gated_prefix_attention_varlen, varlen_reference

    cu_q, cu_k, max_q, max_k = packing

    def fused(q, k, v, pk, pv, gate, **kwargs):
        return gated_prefix_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, pk, pv, gate, backend=backend,
                                             **kwargs)

    def reference(q, k, v, pk, pv, gate, **kwargs):
        return varlen_reference(eager_attention, q, k, v, cu_q, cu_k, pk, pv, gate, **kwargs)

    return fused, reference


def check_packed(c: PackedCase, tol: float = 2e-5, floor: float = 1e-4, seed: int = 0):
    """The packed op's forward and six gradients: against the float64 oracle (float32), or
    FlashAttention's criterion against the eager reference in the same dtype."""
    tensors, kwargs, packing = make_packed_inputs(c, seed)
    fused, reference = packed_fns(packing)
    # No queries: nothing launches; no keys at all: the dK/dV kernel has nothing to do.
    kernels = () if sum(c.lens_q) == 0 else ALL_KERNELS if sum(c.lens_k or c.lens_q) > 0 else ALL_KERNELS[:2]
    if c.dtype == torch.float32:
        return _check_float32(tensors, kwargs, fused, reference, kernels, tol)
    return _check_low_precision(tensors, kwargs, fused, reference, kernels, floor)
