"""The baseline's backends: torch's scaled_dot_product_attention restricted to one kernel
(flash, cuDNN, memory-efficient, math), which of them run here, and which one torch picks."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sdpa_backend(backend):
    """A context restricting SDPA to one backend; None leaves the choice to torch."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def sdpa_backends(names: Sequence[str]) -> dict[str, object]:
    """Name -> torch SDPBackend for the names this torch knows."""
    from torch.nn.attention import SDPBackend

    members = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
               "math": "MATH"}
    return {n: getattr(SDPBackend, members[n]) for n in names if hasattr(SDPBackend, members.get(n, ""))}


def available_sdpa_backends(names: Sequence[str], device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """The SDPA backends that run a small causal forward and backward on this device."""
    found = {}
    for name, backend in sdpa_backends(names).items():
        q = torch.randn(1, 2, 128, 64, device=device, dtype=dtype, requires_grad=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_backend(backend):
                    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            found[name] = backend
        except RuntimeError:
            pass
    return found


def default_sdpa_backend(B: int, Hq: int, Hkv: int, T: int, S: int, D: int, dtype: torch.dtype,
                         device: torch.device) -> str:
    """A label for the backend torch picks by itself for this causal shape (CPU rows)."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.empty(B, Hq, T, D, device=device, dtype=dtype)
        k = torch.empty(B, Hkv, S, D, device=device, dtype=dtype)
        choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=Hkv != Hq)
        return f"default:{SDPBackend(choice).name.lower().removesuffix('_attention')}"
    except Exception:  # a private function: only a label depends on it
        return "default"


def repeat_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """x with its kv heads (dimension `dim`) repeated up to `heads` query heads."""
    return x if x.shape[dim] == heads else x.repeat_interleave(heads // x.shape[dim], dim=dim)
