"""Triton compile control for the GPU runs: compile every autotuning candidate without
launching anything (several processes in parallel fill Triton's cache for the timing
process), shorter autotuning, and the parsing of shards."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

KERNELS_PACKAGE = "llama_adapter_fast.kernels"


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
