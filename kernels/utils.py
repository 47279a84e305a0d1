"""Helpers shared by the launchers: interpreter detection, launch counting, block sizes,
strides."""

from __future__ import annotations

import collections
import os

import torch
import triton

# Triton decides between compiling and interpreting when a kernel is decorated, so what
# matters is the environment at import time, not at call time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Autotuning can be switched off (one fixed config per head dim) to keep compilation short,
# for example in a correctness sweep over many specializations.
AUTOTUNE = not INTERPRET and os.environ.get("LLAMA_ADAPTER_FAST_AUTOTUNE", "1") != "0"

# Number of launches of each kernel of this package since the process started. Tests read it
# to prove that the Triton path ran rather than some fallback.
LAUNCH_COUNTS: collections.Counter[str] = collections.Counter()

LOG2E = 1.4426950408889634

# Integer arguments that Triton must not specialize. On a GPU it compiles another binary for
# an integer equal to 1 (made a constant) or divisible by 16 (an alignment hint): for sizes
# (T = 1 in decoding, P = 1, a group of 1, B = 1) and for the strides of the small lse and
# mask rows that only multiplies the binaries to check, and some of them spilled where the
# general one did not. The strides of the (rows, D) tiles stay specialized: their alignment
# is what lets the loads vectorize.
SIZES_AND_SMALL_STRIDES = (
    "H", "HKV", "BH", "BG", "T_MAX", "S_MAX", "P", "GROUP", "T_BUCKET",
    "stride_lb", "stride_lh", "stride_mb", "stride_ms",
)


def count_launch(name: str) -> None:
    LAUNCH_COUNTS[name] += 1


def can_run_on(device: torch.device) -> bool:
    """True when the kernels can run on tensors of this device."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; non-powers of two (80, 96) are padded and masked.
    return max(16, triton.next_power_of_2(head_dim))


def block_p(prefix_len: int) -> int:
    return min(64, max(16, triton.next_power_of_2(prefix_len)))


def t_bucket(seq_len: int) -> int:
    """Autotuning key for the query length: powers of two from 128 to 16k. Passed as a plain
    int (not a constexpr), so buckets share compiled kernels and differ only in tuning."""
    return min(16384, max(128, triton.next_power_of_2(max(seq_len, 1))))


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs run on tensor cores with three tf32 products per product (tf32x3), which
    # keeps float32-level accuracy; plain tf32 would lose the 1e-4 accuracy the contract asks.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """Strides of `t` as a kernel expects them, with zeros for an absent tensor."""
    return tuple(t.stride()) if t is not None else (0,) * ndim


def prefix_strides(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, position, dim) strides; a prefix shared by the batch has batch stride 0."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())
