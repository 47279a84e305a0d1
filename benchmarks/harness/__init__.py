"""The benchmarks' harness: what every benchmark shares, so that each bench file holds its
cases only.

- `env.py`: the device and versions of a run, the names of result files;
- `files.py`: CSV files (whole, or a row at a time), markdown tables, bar charts;
- `timing.py`: medians and percentiles on a GPU and a CPU, peak memory, time budgets, progress;
- `compile.py`: Triton compile control (compile without launching, shorter autotuning);
- `processes.py`: child processes with time limits, for the GPU runs;
- `sdpa.py`: the baseline's SDPA backends, which run here, which one torch picks;
- `modes.py`: one implementation timed forward, backward and both, its variants tried in order;
- `report.py`: the attention and train-step tables and plots, and the README's Results section.
"""

from benchmarks.harness.compile import (
    autotuning_enabled,
    compile_only,
    parse_shard,
    reset_autotuning,
    shorten_autotuning,
)
from benchmarks.harness.env import (
    ENV_COLUMNS,
    REPO_ROOT,
    RESULTS_DIR,
    cpu_name,
    default_device,
    environment,
    extra_environment,
    format_environment,
    package_version,
    run_stem,
)
from benchmarks.harness.files import RowLog, as_float, bar_plot, markdown_table, pyplot, read_csv, write_csv
from benchmarks.harness.modes import MODES, Refused, first_line, measure_variants, relative_error
from benchmarks.harness.sdpa import (
    available_sdpa_backends,
    default_sdpa_backend,
    repeat_heads,
    sdpa_backend,
    sdpa_backends,
)
from benchmarks.harness.timing import (
    CpuTimer,
    CudaTimer,
    Deadline,
    Timing,
    is_out_of_memory,
    log,
    peak_memory_mib,
    progress,
    quantiles,
    release_memory,
    synchronize,
)

__all__ = [
    "autotuning_enabled", "compile_only", "parse_shard", "reset_autotuning", "shorten_autotuning",
    "ENV_COLUMNS", "REPO_ROOT", "RESULTS_DIR", "cpu_name", "default_device", "environment", "extra_environment",
    "format_environment", "package_version", "run_stem",
    "RowLog", "as_float", "bar_plot", "markdown_table", "pyplot", "read_csv", "write_csv",
    "MODES", "Refused", "first_line", "measure_variants", "relative_error",
    "available_sdpa_backends", "default_sdpa_backend", "repeat_heads", "sdpa_backend", "sdpa_backends",
    "CpuTimer", "CudaTimer", "Deadline", "Timing", "is_out_of_memory", "log", "peak_memory_mib", "progress",
    "quantiles", "release_memory", "synchronize",
]
