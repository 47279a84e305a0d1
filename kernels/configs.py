"""Launch configurations of the kernels, and the one place where a kernel is launched.

Each kernel has a short list of (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per
element size (2 bytes: float16 and bfloat16; 4 bytes: float32 through tf32x3) and head-dim
class (up to 64; 80 and 96; 128; 256). BLOCK_M counts queries and BLOCK_N keys in every kernel. The lists
were chosen with `benchmarks/compile_report.py`, which compiles every candidate for sm_90
and sm_80 with the launchers' own arguments, on launch shapes that cover Triton's
specializations, and reports shared memory, registers and spills: no 16-bit candidate
spills on sm_90, at any head dim, in any mode or shape. The first candidate that fits is
the one used when autotuning is off (chosen once per binary).

Shared memory is accounted exactly: a candidate is kept when its compiled kernel (the
binary the launch would use, for the device's architecture) fits the device's opt-in
shared memory per block. The autotuner then times the candidates that fit. Under Triton's
interpreter one small config is used, so that small test shapes still cross block
boundaries.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import triton

from .utils import AUTOTUNE, INTERPRET, TMA_LAUNCH_COUNTS, count_launch, ensure_scratch_allocator

# Shared memory a block may use (the opt-in maximum), in bytes, of the architectures the
# compile report checks.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, element size and head-dim block.
# BLOCK_M counts queries and BLOCK_N keys in every kernel.
CANDIDATES: dict[str, dict[tuple[int, int], list[tuple[int, int, int, int]]]] = {
    "forward": {
        (2, 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        # 128x128 (1 stage) spilled 44 B at head dims 80 and 96 once the prefix came first.
        (2, 96): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
        (2, 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        (2, 256): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
        (4, 64): [(64, 32, 4, 2), (128, 32, 8, 2), (64, 16, 4, 2)],
        (4, 96): [(128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        (4, 128): [(128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        (4, 256): [(32, 32, 4, 2), (32, 16, 4, 2)],
    },
    # Every dQ candidate of a key has the same BLOCK_M (see dq_block_m).
    "backward_dq": {
        (2, 64): [(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3)],
        (2, 96): [(128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)],
        (2, 128): [(128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)],
        (2, 256): [(64, 32, 8, 2), (64, 64, 8, 2)],
        (4, 64): [(64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2)],
        (4, 96): [(64, 32, 8, 2), (64, 16, 4, 2)],
        (4, 128): [(64, 32, 8, 2), (64, 16, 4, 2)],
        (4, 256): [(64, 16, 4, 2)],
    },
    "backward_dkdv": {
        (2, 64): [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2)],
        (2, 96): [(32, 128, 8, 2), (64, 64, 8, 2)],
        (2, 128): [(32, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 3), (32, 64, 8, 3)],
        (2, 256): [(16, 64, 8, 3), (32, 32, 8, 2), (16, 32, 8, 2)],
        (4, 64): [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        (4, 96): [(16, 16, 4, 2), (32, 32, 4, 2), (16, 64, 8, 2)],
        (4, 128): [(16, 16, 4, 2), (32, 32, 4, 2), (16, 64, 8, 2)],
        (4, 256): [(16, 16, 4, 2)],
    },
    # The fused backward (kernels/backward.py): its prefix kernel (row terms and everything
    # that touches the prefix: no key loop, so BLOCK_N is unused; every candidate of a key has
    # the same BLOCK_M, see dq_block_m) and its five-product kernel over key blocks. 64-row
    # query tiles let dQ = dS K run on wgmma (64 rows per warpgroup).
    "backward_prefix": {
        (2, 64): [(128, 16, 8, 1)],  # 4 warps held fewer CTAs per SM than through pointers
        (2, 96): [(128, 16, 8, 1)],  # 4 warps spill at head dims 80 to 128
        (2, 128): [(128, 16, 8, 1)],
        (4, 64): [(64, 16, 4, 1), (64, 16, 8, 1)],
        (4, 96): [(64, 16, 8, 1), (64, 16, 4, 1)],
        (4, 128): [(64, 16, 8, 1), (64, 16, 4, 1)],
    },
    # Above 128 (FUSED_BACKWARD_MAX_HEAD_DIM) every tile of the five-product kernel spilled
    # on sm_90 (its dK, dV and dQ tiles of 256 columns): the deterministic backward runs there.
    "backward": {
        (2, 64): [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
        (2, 96): [(64, 64, 8, 2), (32, 64, 8, 2)],
        (2, 128): [(64, 64, 8, 2), (32, 64, 8, 2)],
        (4, 64): [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        (4, 96): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
        (4, 128): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
    },
    # Decoding (kernels/decode.py): BLOCK_M rows are query heads of a kv group times new
    # queries; the launcher takes the smallest BLOCK_M that holds them (see decode_block_m).
    # The combine kernel's BLOCK_N counts prefix keys. Every config here compiles without
    # spills for sm_90 and sm_80 at every head dim of its class (the compile report's decode
    # modes); float32 keeps to 16 or 32 rows, where tf32x3's three-part operands still fit,
    # and multiplies in plain FMAs at head dims above 128 (decode_dot_precision).
    "decode": {
        (2, 64): [(16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
        (2, 96): [(16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
        (2, 128): [(16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
        (2, 256): [(16, 32, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
        (4, 64): [(16, 32, 4, 2), (32, 32, 8, 2)],
        (4, 96): [(16, 32, 4, 2), (16, 16, 8, 2)],
        (4, 128): [(16, 32, 4, 2)],  # 32 rows spilled with a key padding mask (tf32x3 at d128)
        (4, 256): [(16, 16, 8, 2), (32, 16, 8, 2)],
    },
    "decode_combine": {
        (2, 64): [(16, 16, 4, 1), (32, 32, 4, 1), (64, 64, 4, 1), (128, 32, 8, 1)],
        (2, 96): [(16, 32, 4, 1), (32, 32, 4, 1), (64, 64, 4, 1), (128, 32, 8, 1)],
        (2, 128): [(16, 32, 4, 1), (32, 32, 4, 1), (64, 64, 4, 1), (128, 32, 8, 1)],
        (2, 256): [(16, 32, 4, 1), (32, 32, 4, 1), (64, 16, 8, 1)],
        (4, 64): [(16, 16, 4, 2), (32, 16, 8, 2)],
        (4, 96): [(16, 32, 8, 2), (32, 16, 8, 2)],
        (4, 128): [(16, 32, 8, 2), (32, 16, 8, 2)],
        (4, 256): [(16, 16, 8, 1)],
    },
}
TRAINING_KERNELS = ("forward", "backward_prefix", "backward", "backward_dq", "backward_dkdv")
# The kernels of each backward, the one per query block first: the default (fused, dQ by
# atomic adds) and the deterministic one.
FUSED_BACKWARD = ("backward_prefix", "backward")
FUSED_BACKWARD_MAX_HEAD_DIM = 128
DETERMINISTIC_BACKWARD = ("backward_dq", "backward_dkdv")

# The one config of each kernel under Triton's interpreter: small, so that small test shapes
# cross block boundaries. The tests set the GPU's tiles here too (tests/kernels/test_gpu_tiles.py).
INTERPRETER_BLOCKS = {kernel: {"BLOCK_M": 16, "BLOCK_N": 16} for kernel in CANDIDATES}


def head_dim_class(head_dim: int) -> int:
    """64 (head dims up to 64), 96 (65 to 127: a block of 128 with masked columns, which
    costs registers), 128, or 256 (129 to 256)."""
    if head_dim <= 64:
        return 64
    if head_dim < 128:
        return 96
    return 128 if head_dim == 128 else 256


@dataclass(frozen=True)
class Candidate:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
                             num_warps=self.num_warps, num_stages=self.num_stages)

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def candidates(kernel: str, head_dim: int, elem_bytes: int) -> list[Candidate]:
    """The configs the launcher may pick for this kernel, head dim and element size, in
    order of preference."""
    return [Candidate(*s) for s in CANDIDATES[kernel][(elem_bytes, head_dim_class(head_dim))]]


def fitting(kernel: str, found: list, shared_bytes: Callable[[object], int], limit: int) -> list:
    """The configs whose compiled kernels fit `limit` bytes of shared memory, in order.
    Raises a ValueError when none does (the compile report checks that one always does on
    sm_80 and sm_90)."""
    kept = [c for c in found if shared_bytes(c) <= limit]
    if not kept:
        raise _no_fit(kernel, limit)
    return kept


def _no_fit(kernel: str, limit: int) -> ValueError:
    return ValueError(f"no configuration of the {kernel} kernel fits this GPU's {limit} bytes of shared memory "
                      f"per block: use a smaller head dim or float16/bfloat16")


def dq_block_m(head_dim: int, elem_bytes: int, kernel: str = "backward_dq") -> int:
    """The BLOCK_M of the dQ kernel (or of the fused backward's prefix kernel), shared by all
    its candidates of a head-dim class and element size: its per-block partial gradients
    are allocated before the launch."""
    if INTERPRET:
        return INTERPRETER_BLOCKS[kernel]["BLOCK_M"]
    return candidates(kernel, head_dim, elem_bytes)[0].block_m


def decode_block_m(kernel: str, rows: int, head_dim: int, elem_bytes: int) -> int:
    """A decode kernel's BLOCK_M for `rows` rows (query heads of a group x new queries):
    the smallest candidate that holds them all, else the largest (the rows then take
    several programs). Under the interpreter, its one block."""
    if INTERPRET:
        return INTERPRETER_BLOCKS[kernel]["BLOCK_M"]
    sizes = sorted({c.block_m for c in candidates(kernel, head_dim, elem_bytes)})
    return next((m for m in sizes if m >= rows), sizes[-1])


@functools.cache
def _sm_count(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["multiprocessor_count"])


# Multiprocessors the split count assumes under the interpreter (there is no device to ask).
INTERPRETER_SM_COUNT = 4


def decode_sm_count(device) -> int:
    """Multiprocessors of a CUDA device (what the decode kernels' split count is sized for)."""
    if INTERPRET:
        return INTERPRETER_SM_COUNT
    return _sm_count(device.index or 0)


@functools.cache
def device_shared_limit(index: int) -> int:
    """The opt-in shared memory per block of a CUDA device, in bytes."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def compiled_shared_bytes(fn, args: dict | tuple, meta: dict, config: dict) -> int:
    """Shared memory of the binary a launch with this config would use on the current
    device: compiles it (into the cache the launch then reads) without running it."""
    if isinstance(args, dict):
        kernel = fn.warmup(grid=(1,), **args, **meta, **config)
    else:
        kernel = fn.warmup(*args, grid=(1,), **meta, **config)
    kernel = kernel.result() if hasattr(kernel, "result") else kernel
    return int(kernel.metadata.shared)


def _as_candidate(config: triton.Config) -> Candidate:
    return Candidate(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def wanted(kernel: str, configs: list, meta: dict, elem_bytes: int) -> list:
    """The autotuner's configs that are candidates of this call (its head dim and element
    size), in order of preference."""
    order = {c: i for i, c in enumerate(candidates(kernel, meta["HEAD_DIM"], elem_bytes))}
    return sorted((c for c in configs if _as_candidate(c) in order), key=lambda c: order[_as_candidate(c)])


# The autotuner of each kernel (when autotuning is on), by kernel name.
AUTOTUNERS: dict[str, object] = {}


def autotuner(kernel: str, fn):
    """Wrap a JIT function in Triton's autotuner over every candidate of the kernel, pruned
    at each new key to those of the call's head dim and dtype whose binaries fit the
    device's shared memory."""
    if not AUTOTUNE:
        return None
    pool = list(dict.fromkeys(Candidate(*s) for specs in CANDIDATES[kernel].values() for s in specs))

    def prune(configs, named_args, **kwargs):
        # Triton passes every keyword argument of the call, the launch's own (grid, warmup)
        # among them: only the kernel's parameters go on to the compiler.
        meta = {k: v for k, v in kwargs.items() if k in fn.arg_names}
        q = named_args["Q"]
        found = wanted(kernel, configs, meta, q.element_size())
        limit = device_shared_limit(q.device.index or 0)
        return fitting(kernel, found, lambda c: compiled_shared_bytes(fn, named_args, meta, c.all_kwargs()), limit)

    tuned = triton.autotune(
        configs=[c.as_config() for c in pool],
        # The prefix tile (BLOCK_P, ONE_PREFIX_BLOCK) changes shared memory: the fit check reruns with it.
        # GROUP is a plain argument (one binary for every group size) but MHA and GQA may
        # prefer other tiles (the dK/dV loop runs over the group): each is tuned.
        # Only the kernel's own parameters: Triton 3.9 refuses a key naming any other.
        key=[name for name in ("HEAD_DIM", "BLOCK_D", "BLOCK_P", "ONE_PREFIX_BLOCK", "PREFIX_FIRST", "TMA",
                               "DQ_DESC_ADD", "CAUSAL", "HAS_MASK", "VARLEN", "T_BUCKET", "GROUP", "DOT_PRECISION")
             if name in fn.arg_names],
        prune_configs_by={"early_config_prune": prune},
    )(fn)
    AUTOTUNERS[kernel] = tuned
    return tuned


@dataclass
class Launch:
    """One kernel launch as the launcher would make it (what `capture_launches` records)."""

    kernel: str
    fn: object  # the JITFunction
    grid: Callable[[dict], tuple]
    args: tuple
    meta: dict
    block_m: int | None = None  # the launcher's own BLOCK_M (decoding), else any candidate's

    def candidates(self, elem_bytes: int) -> list[Candidate]:
        """The candidates this launch may pick from."""
        found = candidates(self.kernel, self.meta["HEAD_DIM"], elem_bytes)
        return [c for c in found if self.block_m is None or c.block_m == self.block_m]


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record the launches the launchers make inside the block instead of running them
    (outputs stay unwritten). Used to compile every config with the launcher's own
    arguments on a machine without a GPU."""
    global _captured
    saved, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = saved


def launch(kernel: str, fn, tuned, grid: Callable[[dict], tuple], args: tuple, meta: dict,
           block_m: int | None = None) -> None:
    """Launch `fn` (or its autotuner `tuned`) on a grid computed from the chosen config;
    `block_m`: the launcher's own BLOCK_M, which the candidates must have."""
    if _captured is not None:
        _captured.append(Launch(kernel, fn, grid, args, meta, block_m))
        return
    tma = meta.get("TMA", False)
    if tma and not INTERPRET:
        ensure_scratch_allocator(args[0].device)  # the descriptors made in the kernel live there
    if tuned is not None:
        tuned[grid](*args, **meta)
    else:
        cfg = (dict(INTERPRETER_BLOCKS[kernel]) if INTERPRET
               else _first_fitting(Launch(kernel, fn, grid, args, meta, block_m)))
        fn[grid(cfg)](*args, **meta, **cfg)
    count_launch(kernel)
    if tma:
        TMA_LAUNCH_COUNTS[kernel] += 1


# The fixed-config path's choice, by everything that decides which binary a launch uses
# (see _binary_key), so that a launch compiles or looks up its candidates once, not on every call.
_CHOSEN: dict[tuple, dict] = {}


def _binary_key(kernel: str, args: tuple, meta: dict) -> tuple:
    """Kernel, device, dtypes, constexprs and Triton's specialization of the arguments:
    integers equal to 1 or divisible by 16, and tensors aligned to 16 bytes, compile into
    other binaries (whose shared memory may differ)."""
    spec = []
    for a in args:
        if isinstance(a, bool):
            spec.append(a)
        elif isinstance(a, int):
            spec.append(1 if a == 1 else 16 if a % 16 == 0 else 0)
        elif hasattr(a, "data_ptr"):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
    device = args[0].device.index or 0
    return kernel, device, tuple(spec), tuple(sorted(meta.items()))


def _first_fitting(call: Launch) -> dict:
    key = (*_binary_key(call.kernel, call.args, call.meta), call.block_m)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _compile_first_fitting(call)
    return chosen


def _compile_first_fitting(call: Launch) -> dict:
    q = call.args[0]
    limit = device_shared_limit(q.device.index or 0)
    # Candidates are compiled in order until one fits (the first, on the cards the lists
    # were made for).
    for cand in call.candidates(q.element_size()):
        cfg = cand.kwargs()
        if compiled_shared_bytes(call.fn, call.args, call.meta, cfg) <= limit:
            return cfg
    raise _no_fit(call.kernel, limit)
