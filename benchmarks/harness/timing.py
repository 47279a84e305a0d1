"""Timing and memory: medians with the 20th and 80th percentiles (CUDA events through
triton.testing.do_bench on a GPU, perf_counter on the CPU), peak memory, time budgets and
progress lines."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds: the median and the 20th and 80th percentiles."""

    ms: float
    p20: float
    p80: float


class CudaTimer:
    """triton.testing.do_bench: CUDA events, the L2 cache flushed before every call."""

    def __init__(self, warmup_ms: float = 10, rep_ms: float = 50):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, fn: Callable[[], object]) -> Timing:
        import triton.testing

        ms, p20, p80 = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(ms, p20, p80)


class CpuTimer:
    """Wall-clock medians on the CPU (perf_counter), after one warm-up call."""

    def __init__(self, repeats: int = 7, min_repeats: int = 3, budget_s: float = 3.0):
        self.repeats, self.min_repeats, self.budget_s = repeats, min_repeats, budget_s

    def __call__(self, fn: Callable[[], object]) -> Timing:
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.repeats:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            # A slow call stops early, once a few repeats are in.
            if len(times) >= self.min_repeats and time.perf_counter() - start > self.budget_s:
                break
        return Timing(*quantiles(times))


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentiles (inclusive method, so 1 or 2 values work)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), cuts[1], cuts[7]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated while fn runs, above what was allocated before (MiB); None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - base) / 2**20


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def release_memory(collect: bool = True) -> None:
    """Give cached blocks back, so the next measurement starts clean. After a failure,
    collect=True also frees the tensors that the exception's frames held (slow: a full gc)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Deadline:
    """A point in time (time.time()) after which no new work should start; None means never."""

    def __init__(self, at: float | None = None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(time.time() + seconds if seconds else None)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.time()

    def passed(self, reserve_s: float = 0.0) -> bool:
        return self.left() < reserve_s


def log(message: str) -> None:
    """Print a line without breaking a tqdm progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, flush=True)
        return
    tqdm.write(message, file=sys.stdout)


def progress(items: Iterable, desc: str) -> Iterator:
    """A tqdm bar on a terminal; elsewhere (a pipe, a log file) or without tqdm, a plain
    "desc: i/n" line per item."""
    items = list(items)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stdout.isatty():
        yield from tqdm(items, desc=desc, dynamic_ncols=True, file=sys.stdout)
        return
    for i, item in enumerate(items):
        print(f"{desc}: {i + 1}/{len(items)}", flush=True)
        yield item
