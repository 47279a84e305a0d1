"""Helpers shared by the forward and backward launchers: interpreter detection, launch
counting, block sizes and autotuning configurations."""

from __future__ import annotations

import collections
import functools
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

MAX_HEAD_DIM = 256


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
    # float32 inputs get IEEE products (tf32 would lose the 1e-4 accuracy the contract asks).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def prune_by_shared_memory(configs, named_args, **kwargs):
    """Drop configs whose tiles are too large for the head dim (shared memory and registers
    are finite): tiles of at most 128 x 128 elements, and two stages for head dim 256."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    budget = 128 * 128
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] * d <= budget and c.kwargs["BLOCK_N"] * d <= budget and (d < 256 or c.num_stages <= 2)
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


def make_configs(specs) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples. The lists are short on
    purpose: every config is compiled once per (head dim, causal, mask, dtype)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


# Forward and dQ: many queries per program, a loop over keys. dK/dV: the transpose.
FORWARD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)]
DQ_CONFIGS = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
DKDV_CONFIGS = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2)]


def fixed_blocks(head_dim_block: int) -> dict:
    """The one config used under the interpreter or with autotuning off."""
    if INTERPRET:
        # Small blocks so that small test shapes still cross block boundaries.
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    if head_dim_block >= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
