"""Correctness tooling shared by the tests and the GPU check: random problems, the float64
oracle, the error measure, and launch counts that prove the Triton kernels ran.

The oracle (`oracle_attention`, `packed_oracle`) is written here from the formula of docs/design.md
and shares no code with the package: its masks, head mapping, softmax and gate activation
are its own, so a bug in `ops.reference` (which the sdpa backend and the integrations use)
cannot hide by being in both the answer and the check. `eager_attention` stays as the
low-precision baseline: what an eager implementation gets in the same dtype."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from llama_adapter_fast.kernels.configs import DETERMINISTIC_BACKWARD, FUSED_BACKWARD, FUSED_BACKWARD_MAX_HEAD_DIM
from llama_adapter_fast.kernels.utils import LAUNCH_COUNTS
from llama_adapter_fast.ops import deterministic_enabled, eager_attention, gated_prefix_attention

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
    gate_shape = tuple({"Hq": c.Hq, "B": c.B}.get(d, d) for d in c.gate_shape)
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


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/design.md's formula, literally: for each query, a softmax over the word keys it may
    see (bottom-right causal, padding) and one over the prefix, summed with act(gate)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)  # query head h reads kv head h // group
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    k, v, prefix_k, prefix_v = k[:, kv_head], v[:, kv_head], prefix_k[:, kv_head], prefix_v[:, kv_head]

    query_pos = torch.arange(T, device=q.device).view(T, 1) + (S - T)  # the last query is the last key
    key_pos = torch.arange(S, device=q.device).view(1, S)
    sees = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        sees = sees & (key_pos <= query_pos)
    if key_padding_mask is not None:
        sees = sees & key_padding_mask.view(B, 1, 1, S)

    words = torch.where(sees, torch.einsum("bhtd,bhsd->bhts", q, k) * scale, float("-inf"))
    row_max = words.amax(dim=-1, keepdim=True) if S else words.new_zeros(B, Hq, T, 1)
    weights = torch.exp(words - torch.where(torch.isfinite(row_max), row_max, 0.0))  # 0 where unseen
    total = weights.sum(dim=-1, keepdim=True)
    o_words = weights @ v / torch.where(total > 0, total, 1.0)  # a query that sees no word key gets 0

    prefix = torch.einsum("bhtd,bhpd->bhtp", q, prefix_k) * scale
    prefix = torch.exp(prefix - prefix.amax(dim=-1, keepdim=True))
    o_prefix = prefix @ prefix_v / prefix.sum(dim=-1, keepdim=True)

    if gate_activation == "tanh":
        a = torch.tanh(gate)
    elif gate_activation == "identity":
        a = gate
    else:
        raise ValueError(f"gate_activation {gate_activation!r}")
    a = a.to(o_prefix.dtype)
    a = a.reshape(B, Hq, 1, 1) if a.dim() == 2 else a.reshape(1, -1, 1, 1)  # per sample and head, or shared
    return o_words + a * o_prefix


def packed_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_k, prefix_v, gate, **kwargs) -> torch.Tensor:
    """The packed op's answer: `oracle_attention` on each sequence's own rows, by slicing."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        pk = prefix_k if prefix_k.dim() == 3 else prefix_k[i][None]
        pv = prefix_v if prefix_v.dim() == 3 else prefix_v[i][None]
        g = gate if gate.dim() < 2 else gate[i][None]
        one = [x[None].transpose(1, 2) for x in (q[q0:q1], k[k0:k1], v[k0:k1])]  # (1, H, len, D)
        outs.append(oracle_attention(*one, pk, pv, g, **kwargs)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def oracle(tensors, kwargs, grad_out, reference=oracle_attention):
    """The reference (the independent oracle unless told) in float64, the gate too."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = reference(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return out, list(grads)


def rel_error(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||x - ref|| / ||ref||, with the denominator held to at least `floor` per element (RMS).
    No floor unless a caller gives one with its reason: a floor turns a relative check of a
    small gradient into an absolute one."""
    diff = (x.double() - ref.double()).norm().item()
    denominator = max(ref.double().norm().item(), floor * max(ref.numel(), 1) ** 0.5)
    return diff / denominator if denominator > 0 else (0.0 if diff == 0 else float("inf"))


def triton_fn(*args, **kwargs):
    return gated_prefix_attention(*args, backend="triton", **kwargs)


@contextlib.contextmanager
def expect_launches(*names: str, times: int | dict[str, int] | None = None):
    """Assert that each named kernel launcher of the package ran inside the block: at least
    once, or exactly `times` times (one count for all, or one per name: layers x calls,
    where a model claims the fused path, so that one layer quietly taking another path fails)."""
    before = dict(LAUNCH_COUNTS)
    yield
    for name in names:
        ran = LAUNCH_COUNTS[name] - before.get(name, 0)
        expected = times.get(name) if isinstance(times, dict) else times
        if expected is None:
            assert ran > 0, f"Triton kernel {name!r} did not run"
        else:
            assert ran == expected, f"Triton kernel {name!r} ran {ran} times, not {expected}"


def training_kernels(deterministic: bool | None = None, head_dim: int = 64) -> tuple[str, ...]:
    """The kernels that a forward and backward launch: the forward, then the fused backward's
    two kernels or (deterministic; None: the package-wide choice; or a head dim above the
    fused kernel's) the deterministic one's."""
    if deterministic is None:
        deterministic = deterministic_enabled()
    if head_dim > FUSED_BACKWARD_MAX_HEAD_DIM:
        deterministic = True
    return ("forward", *(DETERMINISTIC_BACKWARD if deterministic else FUSED_BACKWARD))


# The kernel of each backward that loops over key blocks, its second (not launched when there
# are no keys).
KEY_BLOCK_KERNELS = (DETERMINISTIC_BACKWARD[1], FUSED_BACKWARD[1])
ERROR_NAMES = ("out",) + tuple("d" + n for n in GRAD_NAMES)


# A gradient that is zero in exact arithmetic has no relative error to take: with one
# visible key a softmax has no gradient in its score (dq and dk vanish; dprefix_k with
# P = 1), and the float32 kernels leave rounding there. Only then is the fused value
# judged on the problem's own scale: the inputs are unit normal, so a floor of 0.1 RMS.
ZERO_GRADIENT_FLOOR = 0.1


def _zero_by_the_math(ref: torch.Tensor) -> bool:
    return ref.numel() > 0 and ref.abs().max().item() < 1e-12


def errors_against_oracle(fn, tensors, kwargs, reference=oracle_attention) -> dict[str, float]:
    """Relative errors of fn's output and six gradients against the float64 oracle."""
    out, grad_out, grads = forward_backward(fn, tensors, kwargs)
    ref, ref_grads = oracle(tensors, kwargs, grad_out, reference)
    assert out.shape == ref.shape and out.dtype == tensors[0].dtype
    errors = [rel_error(out, ref)]
    for name, g, r, t in zip(GRAD_NAMES, grads, ref_grads, tensors, strict=True):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), name
        errors.append(rel_error(g, r, floor=ZERO_GRADIENT_FLOOR if _zero_by_the_math(r) else 0.0))
    return dict(zip(ERROR_NAMES, errors, strict=True))


def kernels_for(c: Case) -> list[str]:
    """The kernels a forward and backward of this case must launch."""
    if c.B * c.T == 0:
        return []
    return [n for n in training_kernels(head_dim=c.D) if n not in KEY_BLOCK_KERNELS or c.seq_k > 0]


def check_against_oracle(c: Case, tol: float = 2e-5, seed: int = 0) -> dict[str, float]:
    """Triton forward and all six gradients in float32 against the float64 oracle."""
    tensors, kwargs = make_inputs(c, seed)
    return _check_float32(tensors, kwargs, triton_fn, oracle_attention, kernels_for(c), tol)


def check_low_precision(c: Case, floor: float = 1e-4, seed: int = 0) -> dict[str, tuple[float, float]]:
    """FlashAttention's criterion: the Triton error at most twice the eager backend's error
    in the same dtype (both against the float64 oracle), plus a small floor."""
    tensors, kwargs = make_inputs(c, seed)
    return _check_low_precision(tensors, kwargs, triton_fn, eager_attention, oracle_attention, kernels_for(c), floor)


def _check_float32(tensors, kwargs, fused, truth, kernels, tol: float) -> dict[str, float]:
    with expect_launches(*kernels):
        errors = errors_against_oracle(fused, tensors, kwargs, truth)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors over {tol}: {bad}"
    return errors


def _check_low_precision(tensors, kwargs, fused, baseline, truth, kernels, floor: float):
    with expect_launches(*kernels):
        fused_errors = errors_against_oracle(fused, tensors, kwargs, truth)
    eager_errors = errors_against_oracle(baseline, tensors, kwargs, truth)
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
    per_sequence_gate: bool = False  # (N, Hq): one per sequence and query head
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
    gate = (torch.rand((len(c.lens_q), c.Hq) if c.per_sequence_gate else c.Hq, generator=g) + 0.25).to(DEVICE)
    gate.view(-1)[::2] *= -1
    packing = (cumulative(c.lens_q), cumulative(lens_k), max(c.lens_q, default=0), max(lens_k, default=0))
    return [q, k, v, pk, pv, gate], dict(causal=c.causal), packing


def packed_fns(packing: tuple, backend: str = "triton"):
    """(the packed op on this packing with `backend`, the padded eager baseline run on each
    sequence, the oracle), all with the padded op's argument order (q, k, v, prefix_k,
    prefix_v, gate)."""
    from llama_adapter_fast.ops.varlen import gated_prefix_attention_varlen, varlen_reference

    cu_q, cu_k, max_q, max_k = packing

    def fused(q, k, v, pk, pv, gate, **kwargs):
        return gated_prefix_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, pk, pv, gate, backend=backend,
                                             **kwargs)

    def baseline(q, k, v, pk, pv, gate, **kwargs):
        return varlen_reference(eager_attention, q, k, v, cu_q, cu_k, pk, pv, gate, **kwargs)

    def truth(q, k, v, pk, pv, gate, **kwargs):
        return packed_oracle(q, k, v, cu_q, cu_k, pk, pv, gate, **kwargs)

    return fused, baseline, truth


def check_packed(c: PackedCase, tol: float = 2e-5, floor: float = 1e-4, seed: int = 0):
    """The packed op's forward and six gradients: against the float64 oracle (float32), or
    FlashAttention's criterion against the eager baseline in the same dtype."""
    tensors, kwargs, packing = make_packed_inputs(c, seed)
    fused, baseline, truth = packed_fns(packing)
    # No queries: nothing launches; no keys at all: the dK/dV kernel has nothing to do.
    kernels = training_kernels(head_dim=c.D) if sum(c.lens_q) > 0 else ()
    if sum(c.lens_k or c.lens_q) == 0:
        kernels = kernels[:2]
    if c.dtype == torch.float32:
        return _check_float32(tensors, kwargs, fused, truth, kernels, tol)
    return _check_low_precision(tensors, kwargs, fused, baseline, truth, kernels, floor)


# ----------------------------------------------------------------------------------------
# Decoding (gated_prefix_attention_decode)


def decode_oracle(q, k_cache, v_cache, cache_lengths, prefix_k, prefix_v, gate, cache_starts=None,
                  **kwargs) -> torch.Tensor:
    """`oracle_attention` on each sequence's own cached keys, by slicing: positions
    cache_starts[b] .. cache_lengths[b] - 1, its queries the last T of them."""
    outs = []
    for b in range(q.shape[0]):
        end = min(int(cache_lengths[b]), k_cache.shape[2])
        start = 0 if cache_starts is None else int(cache_starts[b])
        start = min(max(start, 0), end)
        pk = prefix_k if prefix_k.dim() == 3 else prefix_k[b:b + 1]
        pv = prefix_v if prefix_v.dim() == 3 else prefix_v[b:b + 1]
        g = gate if gate.dim() < 2 else gate[b:b + 1]
        outs.append(oracle_attention(q[b:b + 1], k_cache[b:b + 1, :, start:end], v_cache[b:b + 1, :, start:end],
                                     pk, pv, g, **kwargs))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
