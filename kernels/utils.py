"""Helpers shared by the launchers: interpreter detection, launch counting, block sizes,
strides."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator

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


@dataclasses.dataclass
class KernelSettings:
    """Package-wide choices of the kernels' structure (see `kernel_settings`).

    tma: tiles through bulk tensor copies (TMA descriptors made inside the kernels). None:
        where the GPU has them (sm_90 and newer), at head dims from TMA_MIN_HEAD_DIM, and
        the tensors allow them (16-byte aligned base and row strides, unit last stride);
        under the interpreter, None means off. False: per-thread pointers everywhere. True:
        under the interpreter too, at every head dim (on a GPU the same as None).
    prefix_first: the forward computes the prefix scores once, before the word loop (False:
        the previous structure, two passes over the prefix after it), kept until a GPU has
        measured both.
    """

    tma: bool | None = None
    prefix_first: bool = True


SETTINGS = KernelSettings()


@contextlib.contextmanager
def kernel_settings(**changes) -> Iterator[KernelSettings]:
    """Change `SETTINGS` inside a block (benchmarks and tests compare the structures)."""
    unknown = [name for name in changes if not hasattr(SETTINGS, name)]
    if unknown:  # before anything changes
        raise TypeError(f"kernel_settings: unknown setting {unknown[0]!r}")
    saved = dataclasses.replace(SETTINGS)
    for name, value in changes.items():
        setattr(SETTINGS, name, value)
    try:
        yield SETTINGS
    finally:
        for field in dataclasses.fields(SETTINGS):
            setattr(SETTINGS, field.name, getattr(saved, field.name))


# The architecture that tensors off a CUDA device stand for, outside the interpreter (None:
# no GPU). The compile report sets it per architecture while it records launches, and the
# CPU tests of the GPU launch path (a stubbed driver) set it to the stub's.
ASSUMED_ARCH: list[int | None] = [None]

# Below this head dim a GPU reads tiles through pointers: rows of 32 or 64 bytes gain little
# from the copy engine, and the compile report found the descriptor binaries of head dims 16
# and 32 holding fewer CTAs per multiprocessor than the same configs through pointers.
TMA_MIN_HEAD_DIM = 64

# Launches that took the bulk-copy path, by kernel (the tests prove the path they test ran).
TMA_LAUNCH_COUNTS: collections.Counter[str] = collections.Counter()


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether every tensor can be read through a tensor descriptor: unit last stride,
    16-byte aligned base and other strides."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether a launch on these tensors takes the bulk-copy path (see KernelSettings.tma)."""
    if SETTINGS.tma is False or not tma_eligible(*tensors):
        return False
    device = tensors[0].device
    if INTERPRET:  # the algorithm, at every head dim
        return SETTINGS.tma is True
    if tensors[0].shape[-1] < TMA_MIN_HEAD_DIM:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return ASSUMED_ARCH[0] is not None and ASSUMED_ARCH[0] >= 90


class ScratchAllocator:
    """Global memory on the launch's device for the tensor descriptors that kernels make
    (Triton asks its allocator for it at each launch of such a kernel)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


def ensure_scratch_allocator(device: torch.device) -> None:
    """Set a ScratchAllocator for this device unless the caller set an allocator of their
    own. Triton keeps it in a context variable: autograd's device threads start without one,
    so this runs before every launch that needs it."""
    from triton.runtime import _allocation  # the only way to read what triton.set_allocator set

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator) or (
            isinstance(current, ScratchAllocator) and current.device != device):
        triton.set_allocator(ScratchAllocator(device))
