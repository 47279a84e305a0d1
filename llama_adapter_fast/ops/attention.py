"""The public op: `gated_prefix_attention`, its input checks and its backend choice."""

from __future__ import annotations

import numbers
import os

import torch

from llama_adapter_fast.ops import custom_ops
from llama_adapter_fast.ops.reference import (
    GATE_ACTIVATIONS,
    activate_gate,
    eager_attention,
    sdpa_attention,
    zero_unread,
)

BACKENDS = ("auto", "triton", "sdpa", "eager")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 is accepted by the PyTorch backends so that the oracle can run in double precision.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_TRITON_HEAD_DIM = 256
# The most new queries per sequence the decode kernels take (a generation step has one, a
# chunk of speculative or chunked decoding a few).
MAX_DECODE_QUERIES = 16

# The package-wide choice of backward (see `set_deterministic`); the environment sets its
# start, so that command lines and torchrun workers can choose it too.
_DETERMINISTIC = {"enabled": os.environ.get("LLAMA_ADAPTER_FAST_DETERMINISTIC", "0") == "1"}


def set_deterministic(enabled: bool) -> None:
    """Choose the fused op's backward for every call that passes no `deterministic`.

    False (the default): the fused five-product backward, which sums dQ with float32 atomic
    adds; the fastest, but the order of those adds, and so the last bits of dQ and of what
    it flows into, may change from run to run. True: the two-kernel backward without
    atomics, bit-identical across runs and slower. `torch.use_deterministic_algorithms(True)`
    chooses it too, and LLAMA_ADAPTER_FAST_DETERMINISTIC=1 in the environment sets it at
    import.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_deterministic: enabled must be a bool, got {type(enabled).__name__}")
    _DETERMINISTIC["enabled"] = enabled


def deterministic_enabled() -> bool:
    """Whether the op's backward is the deterministic one when a call does not say."""
    return _DETERMINISTIC["enabled"] or torch.are_deterministic_algorithms_enabled()


def resolve_deterministic(deterministic: object) -> bool:
    """An op's `deterministic` argument: a bool, or None for the package-wide choice."""
    if deterministic is None:
        return deterministic_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    return deterministic


def check_tensor(name: str, x: object, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-d" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_options(causal, gate_activation, softmax_scale, backend) -> None:
    """The keyword options shared by the padded and the packed op."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not (0 < float(softmax_scale) < float("inf")):
            raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")


def check_like_q(q: torch.Tensor, **others: torch.Tensor) -> None:
    """Every named tensor has q's dtype and device, and q's dtype is supported."""
    for name, x in others.items():
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if q.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")


def check_key_value(k: torch.Tensor, v: torch.Tensor, Hq: int, Hkv: int, D: int,
                    names: tuple[str, str] = ("k", "v")) -> None:
    """k and v agree with q: the head dim last, the same shape, kv heads that divide q's.
    `names` are the arguments' names in the messages (k_cache and v_cache for decoding)."""
    k_name, v_name = names
    if k.shape[-1] != D:
        raise ValueError(f"{k_name} must have q's head dim {D}, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads of q ({Hq}) must be a multiple of the kv heads of {k_name} "
                         f"({Hkv})")
    if D == 0:
        raise ValueError("q must have a head dim of at least 1")


def check_prefix(prefix_k, prefix_v, n_seqs: int, Hkv: int, D: int, batch_name: str = "B") -> None:
    if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D or (prefix_k.dim() == 4 and prefix_k.shape[0] != n_seqs):
        want = f"({Hkv}, P, {D}) or ({n_seqs}, {Hkv}, P, {D}) (one per {batch_name})"
        raise ValueError(f"prefix_k must have shape {want}, got {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if prefix_k.shape[-2] == 0:
        raise ValueError("prefix_k must hold at least one prefix token (P >= 1), got P = 0")


def check_gate(gate: object, Hq: int, device: torch.device, n_seqs: int, batch_name: str = "B") -> torch.Tensor:
    """The gate as a floating-point tensor of shape (), (1,), (Hq,) or (n_seqs, Hq) on q's device."""
    if isinstance(gate, numbers.Real) and not isinstance(gate, bool):
        gate = torch.tensor(float(gate), device=device)
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor, got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    if gate.shape not in ((), (1,), (Hq,), (n_seqs, Hq)):
        raise ValueError(f"gate must have shape (), (1,), ({Hq},) (one per query head) or ({n_seqs}, {Hq}) (one "
                         f"per {batch_name} and query head), got {tuple(gate.shape)}")
    if gate.device != device:
        raise ValueError(f"gate must be on q's device {device}, got {gate.device}")
    return gate


def _check_inputs(q, k, v, prefix_k, prefix_v, gate, causal, gate_activation, softmax_scale,
                  key_padding_mask, backend) -> torch.Tensor:
    """Raise a ValueError or TypeError naming the bad argument. Returns gate as a tensor."""
    check_options(causal, gate_activation, softmax_scale, backend)
    q = check_tensor("q", q, (4,))
    k = check_tensor("k", k, (4,))
    v = check_tensor("v", v, (4,))
    prefix_k = check_tensor("prefix_k", prefix_k, (3, 4))
    prefix_v = check_tensor("prefix_v", prefix_v, (3, 4))
    B, Hq, T, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have q's batch size {B}, got shape {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    check_key_value(k, v, Hq, Hkv, D)
    check_prefix(prefix_k, prefix_v, B, Hkv, D)
    check_like_q(q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    gate = check_gate(gate, Hq, q.device, B)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must have dtype torch.bool (True = attend), got {key_padding_mask.dtype}"
            )
        if key_padding_mask.shape != (B, S):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = ({B}, {S}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    return gate


def triton_device_problem(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device` at all, or None when they can."""
    if not custom_ops.TRITON_AVAILABLE:
        return "triton is not installed"
    if not custom_ops.can_run_on(torch.device(device)):
        return (f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before triton is imported), got a tensor on {device}")
    return None


def _triton_unavailable_reason(q: torch.Tensor, autocast: bool = False) -> str | None:
    """Why the fused kernels cannot take q, or None when they can."""
    problem = triton_device_problem(q.device)
    if problem is not None:
        return problem
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"the Triton kernels support head dims up to {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}"
    return triton_dtype_problem(q.device, q.dtype, autocast)


def triton_dtype_problem(device: torch.device, dtype: torch.dtype, autocast: bool = False) -> str | None:
    """Why the fused kernels cannot compute `dtype` on `device` correctly, or None when they can.

    Triton's interpreter (CPU tensors) has no bfloat16 arithmetic: a bfloat16 dot product
    there returns garbage, so bfloat16 is refused rather than computed wrongly."""
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels support float16, bfloat16 and float32, got {dtype}"
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        source = " (from torch.autocast)" if autocast else ""
        return (f"q is bfloat16{source} on the CPU, and Triton's interpreter has no bfloat16 arithmetic (its "
                f"results would be wrong): use backend='sdpa' or 'eager', or float16 / float32")
    return None


def resolve_backend(backend: str, q: torch.Tensor, autocast: bool = False) -> str:
    if backend == "triton":
        reason = _triton_unavailable_reason(q, autocast)
        if reason is not None:
            error = TypeError if reason == triton_dtype_problem(q.device, q.dtype, autocast) else ValueError
            raise error(f"backend='triton' cannot run: {reason}")
        return backend
    if backend == "auto":
        # CUDA tensors the kernels support take the fused path; everything else takes the
        # two-SDPA path (CPU, other accelerators, head dims over 256).
        return "triton" if q.is_cuda and _triton_unavailable_reason(q) is None else "sdpa"
    return backend


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under torch.autocast, bring the inputs to the autocast dtype (custom ops are not
    autocast-aware by themselves)."""
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def gated_prefix_attention(
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
    backend: str = "auto",
    decode: bool | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """LLaMA-Adapter's zero-initialized gated attention.

    out = softmax(s q k^T, causal/padding-masked) v + act(gate) * softmax(s q prefix_k^T) prefix_v

    Args:
        q: (B, Hq, T, D) queries, any strides (a (B, T, H, D) tensor passed as
            ``.transpose(1, 2)`` works without a copy).
        k, v: (B, Hkv, S, D) word keys and values; Hq must be a multiple of Hkv.
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch or (B, Hkv, P, D) per sample;
            the prefix is never masked.
        gate: shape () or (1,) for one gate, (Hq,) for one per query head, (B, Hq) for
            one per sample and query head (a batch mixing adapters); any float dtype.
        causal: causal masking aligned to the bottom right (query t sees keys
            j <= t + S - T), so T new queries over S >= T cached keys work.
        gate_activation: "tanh" (the paper) or "identity" (PEFT's adaption prompt).
        softmax_scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, S) bool, True where a key may be attended. A query with no
            allowed word key gets a word part of 0.
        backend: "triton" (fused kernels), "sdpa" (two scaled_dot_product_attention calls),
            "eager" (materialized scores) or "auto" (triton for CUDA tensors, else sdpa).
        decode: on the Triton path, the split-KV decode kernels (forward only) rather than
            the training forward. None (default): when T <= 16 and no input needs a
            gradient, as in generation; True: always (a ValueError where they cannot
            serve); False: never.
        deterministic: on the Triton path, the backward without atomics (bit-identical
            gradients across runs, slower) rather than the fused one; None (default): the
            package-wide choice (`set_deterministic`, or torch's deterministic mode).

    Returns:
        (B, Hq, T, D) in q's dtype. Gradients flow to every input that requires them.
    """
    gate = _check_inputs(q, k, v, prefix_k, prefix_v, gate, causal, gate_activation,
                         softmax_scale, key_padding_mask, backend)
    if decode is not None and not isinstance(decode, bool):
        raise TypeError(f"decode must be a bool or None, got {type(decode).__name__}")
    deterministic = resolve_deterministic(deterministic)
    dtype_before = q.dtype
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    backend = resolve_backend(backend, q, autocast=q.dtype != dtype_before)
    if decode is True and backend != "triton":
        raise ValueError(f"decode=True runs the Triton decode kernels, but the backend is {backend!r}")
    kwargs = dict(causal=causal, gate_activation=gate_activation, softmax_scale=softmax_scale,
                  key_padding_mask=key_padding_mask)
    if backend == "eager":
        return eager_attention(q, k, v, prefix_k, prefix_v, gate, **kwargs)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, prefix_k, prefix_v, gate, **kwargs)
    gate_act = kernel_gate(gate, gate_activation, q.shape[0], q.shape[1])
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if use_decode_kernels(q, (q, k, v, prefix_k, prefix_v, gate), decode):  # they load only the keys held
        return custom_ops.gpa_decode(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, None, None, causal,
                                     scale)
    # The training kernels load whole key blocks: padding enters them as zeros (one pass over
    # k and v, which keeps their pipelines as they are), so that whatever its memory holds,
    # NaN included, never meets a zero probability in a product. Its gradient is zero.
    k, v = zero_unread(k, key_padding_mask), zero_unread(v, key_padding_mask)
    return custom_ops.triton_attention(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, causal, scale,
                                       deterministic)


def use_decode_kernels(q: torch.Tensor, tensors: tuple, decode: bool | None) -> bool:
    """Whether the Triton path takes the decode kernels (see `gated_prefix_attention`'s
    `decode`): for decode=None when T <= 16 and no input needs a gradient."""
    if decode is False:
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if decode is True:
        if needs_grad:
            raise ValueError("decode=True computes no gradient: call the op under torch.no_grad(), or pass decode=None")
        if not 1 <= q.shape[2] <= MAX_DECODE_QUERIES:
            raise ValueError(f"decode=True takes 1 to {MAX_DECODE_QUERIES} queries per sequence, got T = {q.shape[2]}")
        return True
    return not needs_grad and 1 <= q.shape[2] <= MAX_DECODE_QUERIES


def kernel_gate(gate: torch.Tensor, gate_activation: str, num_seqs: int, num_heads: int) -> torch.Tensor:
    """act(gate) of each sequence and query head, flat (num_seqs * num_heads,) float32, as
    the kernels take it (a shared gate repeated: the kernels index it one way); autograd
    carries its gradient back through the expansion and the activation to the gate in the
    gate's own dtype."""
    act = activate_gate(gate.float(), gate_activation)
    act = act.reshape(num_seqs if act.dim() == 2 else 1, -1)
    return act.expand(num_seqs, num_heads).reshape(-1).contiguous()
