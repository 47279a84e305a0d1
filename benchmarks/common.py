"""Helpers shared by the benchmarks: environment information, result naming, CSV files,
timers, peak memory, time budgets, progress bars and Triton compile control."""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import gc
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
KERNELS_PACKAGE = "llama_adapter_fast.kernels"

# Columns that describe the machine; every CSV row carries them so a file stands alone.
ENV_COLUMNS = ("device", "device_name", "torch", "triton", "cuda", "cudnn", "date")


# ----------------------------------------------------------------------------------------
# Environment and naming


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """What produced a result: the device, its name and the library versions."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn) if cudnn else "",
        "date": datetime.date.today().isoformat(),
    }


def extra_environment() -> dict[str, str]:
    """Versions printed in the logs but not repeated in every CSV row."""
    info = {
        "python": platform.python_version(),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "commit": "",
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_stem(env: dict[str, str]) -> str:
    """File name stem of a run: the device and the date, e.g. ``nvidia-h100-80gb-hbm3-2026-11-27``
    or ``cpu-2026-11-27``."""
    device = slug(env["device_name"]) if env["device"] == "cuda" else "cpu"
    return f"{device}-{env['date']}"


def format_environment(env: dict[str, str]) -> str:
    parts = [env["device_name"], f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------
# CSV files


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] = ()) -> Path:
    """Write rows (dicts) with `columns` first, then any other keys in order of appearance.

    The file is written to a temporary name and renamed, so a run killed while writing leaves
    the previous complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(columns)
    for row in rows:
        header.extend(k for k in row if k not in header)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in header})
    os.replace(tmp, path)
    return path


class RowLog:
    """A CSV file that grows a row at a time, each row flushed as it is written, so that a run
    stopped at any point keeps every finished row. Several processes may append to one file
    (each write holds an exclusive lock; whoever finds the file empty writes the header).

    `fixed` fields (the environment) go into every row; keys outside `columns` are dropped.
    With path None the rows are only kept in memory (`rows`)."""

    def __init__(self, path: str | os.PathLike | None, columns: Sequence[str], fixed: dict | None = None,
                 fresh: bool = True):
        self.path = Path(path) if path is not None else None
        self.columns = list(columns)
        self.fixed = dict(fixed or {})
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        import fcntl

        row = {**self.fixed, **row}
        self.rows.append(row)
        if self.path is None:
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})
            f.flush()


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def as_float(value: object) -> float | None:
    """A CSV cell as a float, or None when it is empty or not a number."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# Timing and memory


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


# ----------------------------------------------------------------------------------------
# Time budgets


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


# ----------------------------------------------------------------------------------------
# Progress


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


# ----------------------------------------------------------------------------------------
# Triton: compile without launching, shorter autotuning


def kernel_objects() -> tuple[list, list]:
    """The JIT functions and autotuners of llama_adapter_fast.kernels that are loaded."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:
        return [], []
    jits, tuners = [], []
    for name, module in list(sys.modules.items()):
        if not name.startswith(KERNELS_PACKAGE) or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, JITFunction) and obj not in jits:
                jits.append(obj)
            elif isinstance(obj, Autotuner) and obj not in tuners:
                tuners.append(obj)
    return jits, tuners


def shorten_autotuning(warmup_ms: float, rep_ms: float) -> int:
    """Time each autotuning candidate for rep_ms instead of Triton's default 100 ms.

    Tuning picks a config once per (head dim, causal, length bucket, dtype); a shorter
    measurement keeps a large sweep within its time budget at a small risk of picking the
    second-best config. Returns the number of autotuners changed.
    """
    import triton.testing

    _, tuners = kernel_objects()
    for tuner in tuners:
        tuner.do_bench = functools.partial(triton.testing.do_bench, warmup=warmup_ms, rep=rep_ms)
    return len(tuners)


def reset_autotuning() -> None:
    """Forget the configs chosen so far, so that the next call tunes (and compiles) again."""
    for tuner in kernel_objects()[1]:
        tuner.cache.clear()


@contextlib.contextmanager
def compile_only(config_shard: tuple[int, int] = (0, 1)) -> Iterator[None]:
    """Compile the Triton kernels that run inside the block without launching them.

    Every autotuning candidate of every kernel is compiled (into Triton's on-disk cache)
    and nothing runs on the GPU, so several processes can compile in parallel on the CPU
    cores and a later timing process finds every binary ready. Outputs computed inside the
    block are garbage. config_shard = (i, n) compiles only every n-th candidate that the
    kernel's prune keeps, from the i-th, to split one kernel's candidates among processes.
    """
    import inspect

    from triton.runtime.jit import JITFunction

    if "warmup" not in inspect.signature(JITFunction.run).parameters:
        raise RuntimeError("this Triton has no compile-only launch (JITFunction.run(warmup=...))")
    from llama_adapter_fast.kernels import configs

    jits, tuners = kernel_objects()
    index, count = config_shard
    saved = {}
    try:
        for jit in jits:
            jit.run = functools.partial(_run_without_launch, type(jit).run.__get__(jit))
        for kernel, tuner in configs.AUTOTUNERS.items():
            saved[tuner] = (vars(tuner).get("early_config_prune"), vars(tuner).get("do_bench"),
                            getattr(tuner, "cache_results", False))
            # This process's share of the call's candidates, before anything is compiled.
            tuner.early_config_prune = functools.partial(_shard_candidates, kernel, index, count)
            tuner.do_bench = _compile_and_pretend_to_time
            # The pretended timings must never reach Triton's on-disk autotuning cache.
            tuner.cache_results = False
        yield
    finally:
        for jit in jits:
            jit.__dict__.pop("run", None)
        for tuner, (prune, do_bench, cache_results) in saved.items():
            tuner.early_config_prune = prune
            tuner.cache_results = cache_results
            if do_bench is None:
                tuner.__dict__.pop("do_bench", None)
            else:
                tuner.do_bench = do_bench
            tuner.cache.clear()


def _shard_candidates(kernel: str, index: int, count: int, candidates, named_args, **kwargs) -> list:
    """Every count-th of the call's candidates from the index-th, none of them compiled yet
    (the kernel's own prune would compile them all to measure their shared memory: the
    timing run does that later, from the cache this fills)."""
    from llama_adapter_fast.kernels import configs

    found = configs.wanted(kernel, candidates, kwargs, named_args["Q"].element_size())
    return found[index::count] or found[:1]


def _run_without_launch(run: Callable, *args, **kwargs):
    kwargs["warmup"] = True
    return run(*args, **kwargs)


def _compile_and_pretend_to_time(kernel_call: Callable[[], object], quantiles=None) -> list[float]:
    kernel_call()  # compiles (launching is switched off)
    return [1.0, 1.0, 1.0]


def autotuning_enabled() -> bool | None:
    """Whether the fused kernels autotune in this process (None when they are not loaded)."""
    try:
        from llama_adapter_fast.kernels import utils
    except ImportError:
        return None
    return bool(getattr(utils, "AUTOTUNE", False))


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n."""
    index, _, count = text.partition("/")
    i, n = int(index), int(count or 1)
    if not 0 <= i < n:
        raise ValueError(f"a shard must be i/n with 0 <= i < n, got {text!r}")
    return i, n
