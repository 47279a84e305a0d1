"""The first run on a GPU: everything worth knowing, in order of worth, in one command with
a hard time budget.

    python benchmarks/gpu_first_contact.py OUT             # on a GPU, at most --budget-s (540 s)
    python benchmarks/gpu_first_contact.py OUT --full      # the whole suite (make bench on a GPU), 840 s
    python benchmarks/gpu_first_contact.py OUT --dry-run   # on the CPU: every phase, tiny, under Triton's interpreter

Runs from a bare checkout with torch and triton only (tqdm, matplotlib, transformers and
peft are used where installed). Each phase runs in child processes with a deadline; a phase
that fails, crashes or runs out of time is recorded as such and the next one still runs:

1. environment: the card, driver, clocks, SMs and memory; torch, Triton, CUDA, cuDNN and
   Python; the SDPA backends that run; the commit when the checkout has one.
2. smoke: the autotuned forward and backward in bf16, as a user's first call takes them
   (padded, decode and packed), against SDPA in float32, with the configs the tuner chose.
3. correctness: the grid of gpu_check.py in bfloat16, then float16, then float32
   (autotuning off: one config per binary keeps compilation short), in worker processes
   side by side with the smoke test, then offsets past 2**31 elements.
4. timing: the new kernels against their previous structure (pointer tiles, the prefix
   after the words, the deterministic backward), two SDPA calls on each SDPA backend,
   FlexAttention and the SDPA floor, in TFLOP/s and as speedups over the best baseline:
   bf16, D = 128 then 64, T = 256 to 16k (bench_attention's "compare" preset), after
   compiling the autotuning candidates in parallel processes.
5. decode: bench_decode, one generation step over KV caches of 1k to 32k tokens (the decode
   kernels against the training forward and two SDPA calls, as GB/s of the card's bandwidth).
6. train step: bench_train_step on a LLaMA-7B-shaped model of 4 layers.

Every row is written as soon as it is measured. OUT gets at most 8 files, named by card
and date (<stem> as nvidia-h200-2026-12-02): <stem>-first-contact.log (everything printed),
-environment.json, -correctness.csv (smoke, grid and int64 rows), -attention.csv,
-train-step.csv, -summary.md (phases, correctness, the benchmarks' tables; what
`python -m benchmarks.harness.report --readme` reads), -attention-time-bf16.png and
-first-contact-extras.tar.gz (worker and compile logs, the other plots, the decode CSV and
plot; the summary holds the decode table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_check, harness
from benchmarks.harness import processes

SCRIPT = Path(__file__).resolve()
MAX_FILES = 8


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the budget; deadlines are cumulative, so time a phase leaves goes to the next


# The last 7% of the budget is left for the plots, the summary and the archive.
PHASES = (Phase("environment", 0.05), Phase("smoke+correctness", 0.30), Phase("timing", 0.36),
          Phase("decode", 0.06), Phase("train step", 0.16))
# The implementations the timing phase compares (eager, which materializes the scores, is in
# the full suite only).
COMPARED = "fused,fused-previous,two-sdpa,flex,floor"


def file_names(out: Path, stem: str) -> dict[str, Path]:
    names = {"log": "first-contact.log", "environment": "environment.json", "correctness": "correctness.csv",
             "attention": "attention.csv", "train": "train-step.csv", "summary": "summary.md",
             "plot": "attention-time-bf16.png", "extras": "first-contact-extras.tar.gz"}
    return {key: out / f"{stem}-{name}" for key, name in names.items()}


# ----------------------------------------------------------------------------------------
# Workers: each phase's own process


def worker_environment(args: argparse.Namespace) -> int:
    import torch

    env = harness.environment(harness.default_device())
    info: dict = {**env, **harness.extra_environment(), "dry_run": args.dry_run, "cpu_count": os.cpu_count(),
                  "cpu": harness.cpu_name(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
        info["nvidia_smi"] = _nvidia_smi()

        info["sdpa_backends"] = list(harness.available_sdpa_backends(["flash", "cudnn", "efficient"],
                                                                     torch.device("cuda"), torch.bfloat16))
    info["autotune"] = harness.autotuning_enabled()
    path = Path(args.path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _nvidia_smi() -> dict[str, str]:
    fields = ("name,driver_version,pci.bus_id,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
              "power.draw,temperature.gpu,persistence_mode,compute_mode,memory.total,memory.used")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    return dict(zip(fields.split(","), (v.strip() for v in out[0].split(",")), strict=False)) if out else {}


def worker_smoke(args: argparse.Namespace) -> int:
    """The autotuned path a user's first call takes, against SDPA in float32."""
    import torch

    from benchmarks import bench_attention as ba
    from llama_adapter_fast import (
        gated_prefix_attention,
        gated_prefix_attention_decode,
        gated_prefix_attention_varlen,
    )
    from llama_adapter_fast.ops.testing import expect_launches, training_kernels

    device = harness.default_device()
    dtype = "fp32" if args.dry_run else "bf16"  # the interpreter has no bfloat16 arithmetic
    env = harness.environment(device)
    log = harness.RowLog(args.path, gpu_check.COLUMNS, env, fresh=False)
    size = dict(T=24, D=16, B=1, Hq=4, Hkv=2) if args.dry_run else dict(T=1024, D=128, B=2, Hq=8, Hkv=2)

    def padded() -> str:
        shape = ba.Shape(B=size["B"], T=size["T"], Hq=size["Hq"], Hkv=size["Hkv"], D=size["D"], P=10, dtype=dtype)
        x = ba.make_inputs(shape, device)
        with expect_launches(*training_kernels()):
            check = ba.check_fused(x, device)
        if check["ok"] is False:
            raise AssertionError(check["note"])
        return f"out err {check['out_err']:.1e}, worst grad err {check['grad_err']:.1e}"

    def decode() -> str:
        """One new token per sequence through gated_prefix_attention (which takes the decode
        kernels), then a chunk of 3 over a preallocated cache of two different lengths."""
        S = 7 if args.dry_run else 777
        g = torch.Generator(device=device).manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, device=device, generator=g, dtype=ba.DTYPES[dtype])

        k, v = randn(2, size["Hkv"], S, size["D"]), randn(2, size["Hkv"], S, size["D"])
        pk, pv = randn(size["Hkv"], 10, size["D"]), randn(size["Hkv"], 10, size["D"])
        gate = torch.linspace(-1, 1, size["Hq"], device=device)
        lengths = torch.tensor([S, S // 2 + 1], device=device)
        errors = []
        for T, call in ((1, "gated_prefix_attention"), (3, "gated_prefix_attention_decode")):
            q = randn(2, size["Hq"], T, size["D"])

            def run(backend, *tensors, call=call):
                if call == "gated_prefix_attention":
                    return gated_prefix_attention(*tensors, gate, backend=backend)
                return gated_prefix_attention_decode(tensors[0], tensors[1], tensors[2], lengths, *tensors[3:], gate,
                                                     backend=backend)

            with expect_launches("decode", "decode_combine", times=1):
                out = run("triton", q, k, v, pk, pv)
            ref = run("sdpa", *(t.float() for t in (q, k, v, pk, pv)))
            err, err_low = harness.relative_error(out, ref), harness.relative_error(run("sdpa", q, k, v, pk, pv), ref)
            if not err <= 2 * err_low + 1e-3:
                raise AssertionError(f"decode (T={T}) output error {err:.1e} against SDPA's {err_low:.1e}")
            errors.append(f"T={T} out err {err:.1e} (SDPA in {dtype}: {err_low:.1e})")
        return "; ".join(errors)

    def packed() -> str:
        lens = (5, 0, 13) if args.dry_run else (300, 1, 700, 64)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        g = torch.Generator(device=device).manual_seed(2)
        n, D = sum(lens), size["D"]
        q = torch.randn(n, size["Hq"], D, device=device, generator=g, dtype=ba.DTYPES[dtype], requires_grad=True)
        k, v = (torch.randn(n, size["Hkv"], D, device=device, generator=g, dtype=q.dtype, requires_grad=True)
                for _ in "kv")
        pk, pv = (torch.randn(size["Hkv"], 10, D, device=device, generator=g, dtype=q.dtype, requires_grad=True)
                  for _ in "kv")
        gate = torch.linspace(-1, 1, size["Hq"], device=device, requires_grad=True)
        with expect_launches(*training_kernels()):
            out = gated_prefix_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), pk, pv, gate, backend="triton")
            out.float().square().sum().backward()
        if not all(torch.isfinite(t.grad).all() for t in (q, k, v, pk, pv, gate)):
            raise AssertionError("non-finite gradients")
        return f"{len(lens)} sequences of {lens}: forward and backward ran, finite"

    for name, fn in (("autotuned_fwd_bwd", padded), ("autotuned_decode", decode), ("autotuned_packed", packed)):
        start = time.perf_counter()
        row = dict(section="smoke", name=name, dtype=dtype)
        try:
            row.update(status="PASS", detail=fn())
        except Exception as exc:
            row.update(status="FAIL", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        row.update(detail=f"{row['detail']}; configs {chosen_configs()}", seconds=round(time.perf_counter() - start, 2))
        log.write(row)
        print(f"[{row['status']}] smoke {name}: {row['detail']} ({row['seconds']} s)", flush=True)
    return 0


def chosen_configs() -> str:
    """The configs each autotuner has chosen so far (empty when autotuning is off)."""
    from llama_adapter_fast.kernels import configs

    chosen = []
    for kernel, tuner in configs.AUTOTUNERS.items():
        for config in tuner.cache.values():
            k = config.kwargs
            chosen.append(f"{kernel} {k['BLOCK_M']}x{k['BLOCK_N']} w{config.num_warps} s{config.num_stages}")
    return ", ".join(dict.fromkeys(chosen)) or f"fixed (autotune {harness.autotuning_enabled()})"


def worker_grid(args: argparse.Namespace) -> int:
    """Every n-th case of the grid in the given dtypes from the i-th, or the int64 check."""
    env = harness.environment(harness.default_device())
    log = harness.RowLog(args.path, gpu_check.COLUMNS, env, fresh=False)
    deadline = harness.Deadline(args.deadline)
    if args.int64:
        row = gpu_check.check_large_index()
        log.write(row)
        print(f"[{row['status']}] int64: {row['detail']}", flush=True)
        return 0
    index, count = harness.parse_shard(args.shard)
    grid = gpu_check.TINY_GRID if args.dry_run else gpu_check.GRID
    for name, dtype_name, case in gpu_check.cases(args.dtypes.split(","), grid)[index::count]:
        if deadline.passed():
            row = dict(section="correctness", name=name, dtype=dtype_name, status="skipped",
                       detail="time budget spent")
        else:
            row = gpu_check.check_case(name, dtype_name, case)
        log.write(row)
        print(f"[{row['status']}] {dtype_name} {name}: {row['detail']} ({row.get('seconds', 0)} s)", flush=True)
    return 0


def compile_jobs(shapes, workers: int, preset: str, train_args: list[str], env: dict[str, str]) -> list:
    """Compile-only processes that fill Triton's cache before the timing process runs: one
    per (dtype, head dim) group and share of the autotuning candidates (the shapes of a
    group share their binaries), and one for the train step's model."""
    groups = list(dict.fromkeys((shape.dtype, shape.D) for shape in shapes))
    shards = max(1, min(6, round(2 * workers / max(1, len(groups)))))
    jobs = [processes.Job("compile train-step model", processes.python_command(
        "benchmarks.bench_train_step", "--compile-only", *train_args), env)]
    for dtype, D in groups:
        jobs += [processes.Job(f"compile {dtype} D={D} candidates {i}/{shards}", processes.python_command(
            "benchmarks.bench_attention", "--compile-only", "--preset", preset, "--dtypes", dtype, "--head-dims",
            str(D), "--config-shard", f"{i}/{shards}"), env) for i in range(shards)]
    return jobs


# ----------------------------------------------------------------------------------------
# The run


class Run:
    """The orchestrating process: deadlines, children, the files of OUT."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.full = args.full
        self.start = time.time()
        self.budget = args.budget_s or (240.0 if self.dry else 840.0 if self.full else 540.0)
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="first-contact-"))  # what goes into the archive
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.env = harness.environment(self.device)
        self.stem = harness.run_stem(self.env)
        self.files = file_names(self.out, self.stem)
        for path in self.files.values():
            path.unlink(missing_ok=True)
        self.say = processes.Tee(self.files["log"])
        self.workers = args.workers or max(1, min(12, (os.cpu_count() or 2) - 2))
        self.phases: list[tuple[str, str, float]] = []  # (phase, result, seconds)
        ends, at = {}, self.start
        for phase in PHASES:
            at += phase.share * self.budget
            ends[phase.name] = at
        self.ends = ends
        # Whatever runs is stopped by then, so that the files are written inside the budget.
        self.hard_end = self.start + self.budget - min(20.0, 0.05 * self.budget)

    def train_args(self) -> list[str]:
        """The train step's model: LLaMA-7B's shapes, 8 of its layers (4 in the first contact)."""
        return ["--layers", "8" if self.full else "4"]

    def deadline(self, phase: str) -> float:
        return self.ends[phase]

    def kill_after(self, phase: str, grace_s: float = 30.0) -> float:
        """Seconds from now until a phase's child is stopped: a shape or variant that started
        before the phase's deadline may finish a little later, never past the hard end."""
        return min(self.ends[phase] + grace_s, self.hard_end) - time.time()

    def child_env(self, autotune: bool | None = None) -> dict[str, str]:
        extra = {} if autotune is None else {"LLAMA_ADAPTER_FAST_AUTOTUNE": "1" if autotune else "0"}
        return processes.child_env(interpret=self.dry, **extra)

    def worker(self, kind: str, *extra: str) -> list[str]:
        return [sys.executable, str(SCRIPT), str(self.out), "--worker", kind, *extra,
                *(["--dry-run"] if self.dry else [])]

    def phase(self, name: str, body) -> None:
        started = time.time()
        self.say(f"\n== {name} (until +{self.ends[name] - self.start:.0f} s of {self.budget:.0f} s)")
        try:
            result = body() or "done"
        except Exception as exc:  # a phase's own failure is recorded; the next phase still runs
            result = f"failed: {type(exc).__name__}: {exc}"
            self.say(traceback.format_exc())
        self.phases.append((name, result, time.time() - started))
        self.say(f"   {name}: {result} in {time.time() - started:.0f} s")

    # -- phases
    def environment(self) -> str:
        code = processes.run_streaming(self.worker("env", "--path", str(self.files["environment"])), self.say,
                                       self.kill_after("environment", grace_s=0), self.child_env(),
                                       label="the environment worker")
        return "ok" if code == 0 else f"exit code {code}"

    def correctness(self) -> str:
        path = str(self.files["correctness"])
        deadline = self.deadline("smoke+correctness")
        harness.RowLog(path, gpu_check.COLUMNS)  # a fresh file with its header written by the first row
        dtypes = ["bf16", "fp16", "fp32"]
        shards = self.workers
        jobs = [processes.Job("smoke", self.worker("smoke", "--path", path), self.child_env(autotune=True))]
        for dtype in dtypes:
            jobs += [processes.Job(f"grid {dtype} {i}/{shards}",
                                   self.worker("grid", "--path", path, "--dtypes", dtype, "--shard", f"{i}/{shards}",
                                               "--deadline", f"{deadline:.0f}"), self.child_env(autotune=False))
                     for i in range(shards)]
            if dtype == "bf16" and not self.dry:
                jobs.append(processes.Job("int64", self.worker("grid", "--path", path, "--int64"),
                                          self.child_env(autotune=False)))
        processes.run_pool(jobs, self.workers + 1, harness.Deadline(deadline), self.say,
                           self.work / "correctness-workers.log")
        for job in jobs:
            for line in job.output:
                if line.startswith("["):
                    self.say(f"   {line}")
        done = sum(job.result == "ok" for job in jobs)
        return f"{done}/{len(jobs)} worker processes finished"

    def timing(self) -> str:
        from benchmarks import bench_attention

        deadline = self.deadline("timing")
        csv = str(self.files["attention"])
        if self.dry:
            tiny = ["--device", "cpu", "--seq-lens", "32", "--tokens", "32", "--head-dims", "16", "--kv-heads", "2",
                    "--dtypes", "fp32"]
            jobs = [processes.Job("compile tiny", processes.python_command("benchmarks.bench_attention",
                                                                             "--compile-only", *tiny),
                                  self.child_env())]
            timed = ["--impls", f"{COMPARED},eager", "--repeats", "1", *tiny]
        else:
            preset = "gpu" if self.full else "compare"
            shapes = bench_attention.sweep() if self.full else bench_attention.compare_shapes()
            jobs = compile_jobs(shapes, self.workers, preset, self.train_args(), self.child_env(autotune=True))
            timed = ["--preset", preset] + ([] if self.full else ["--impls", COMPARED])
        # Compiling may take up to half of the phase; the timing process compiles what is left.
        compile_deadline = harness.Deadline(time.time() + 0.5 * (deadline - time.time()))
        self.say(f"   compiling: {len(jobs)} jobs on {self.workers} processes")
        processes.run_pool(jobs, self.workers, compile_deadline, self.say, self.work / "compile.log")
        code = processes.run_streaming(
            processes.python_command("benchmarks.bench_attention", *timed, "--csv", csv, "--deadline",
                                     f"{deadline:.0f}"),
            self.say, self.kill_after("timing"), self.child_env(autotune=True), prefix="   ")
        return "ok" if code == 0 else f"exit code {code}"

    def decode(self) -> str:
        args = ["--device", "cpu"] if self.dry else []
        code = processes.run_streaming(
            processes.python_command("benchmarks.bench_decode", *args, "--csv", str(self.work / "decode.csv"),
                                     "--deadline", f"{self.deadline('decode'):.0f}"),
            self.say, self.kill_after("decode"), self.child_env(autotune=True), prefix="   ")
        return "ok" if code == 0 else f"exit code {code}"

    def train_step(self) -> str:
        deadline = self.deadline("train step")
        if self.dry:
            args = ["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                    "--variants", "thin-triton,thin-sdpa,peft,mm-triton,mm-sdpa"]
        else:
            args = [*self.train_args(), "--steps", "5" if self.full else "3", "--warmup", "2"]
        code = processes.run_streaming(
            processes.python_command("benchmarks.bench_train_step", *args, "--csv", str(self.files["train"]),
                                     "--deadline", f"{deadline:.0f}"),
            self.say, self.kill_after("train step"), self.child_env(autotune=True), prefix="   ")
        return "ok" if code == 0 else f"exit code {code}"

    # -- the end
    def finish(self) -> int:
        from benchmarks.harness import report

        csvs = [p for p in (self.files["attention"], self.files["train"]) if p.is_file()]
        attention, train = report.load(csvs) if csvs else ([], [])
        if csvs:
            try:
                report.render(csvs, self.work, self.stem)
            except Exception as exc:  # the CSVs are the result; a plotting failure must not hide them
                self.say(f"!! plotting failed: {type(exc).__name__}: {exc}")
        headline = self.work / self.files["plot"].name
        if headline.is_file():
            shutil.copy(headline, self.files["plot"])
        correctness = harness.read_csv(self.files["correctness"]) if self.files["correctness"].is_file() else []
        decode = harness.read_csv(self.work / "decode.csv") if (self.work / "decode.csv").is_file() else []
        summary = self.summary(correctness, attention, train, [self.files["plot"]] if headline.is_file() else [])
        if decode:
            from benchmarks import bench_decode

            summary += "\n## Decode step\n\n" + bench_decode.markdown(decode) + "\n"
        self.files["summary"].write_text(summary, encoding="utf-8")
        self.say("\n" + summary)
        self.say(f"first contact finished in {time.time() - self.start:.0f} s (budget {self.budget:.0f} s)")
        self.say.close()
        with tarfile.open(self.files["extras"], "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                if path.name != headline.name:  # that one is in OUT already
                    tar.add(path, arcname=path.name)
        shutil.rmtree(self.work, ignore_errors=True)
        written = sorted(p.name for p in self.out.iterdir() if p.name.startswith(self.stem))
        assert len(written) <= MAX_FILES, written
        return 1 if any(r["status"] == "FAIL" for r in correctness) else 0

    def summary(self, correctness: list[dict], attention: list[dict], train: list[dict], images: list[Path]) -> str:
        from benchmarks.harness import report

        lines = [f"# First contact: {self.env['device_name']}, {self.env['date']}", "",
                 f"{harness.format_environment(self.env)}; budget {self.budget:.0f} s"
                 + ("; dry run (Triton's interpreter, tiny shapes)" if self.dry else ""), "",
                 "| phase | result | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {result} | {seconds:.0f} |" for name, result, seconds in self.phases]
        grid = gpu_check.TINY_GRID if self.dry else gpu_check.GRID
        lines += ["", "## Correctness", "", "| dtype | pass | fail | skipped | not run |", "|---|---|---|---|---|"]
        for dtype in ("bf16", "fp16", "fp32"):
            rows = [r for r in correctness if r["section"] == "correctness" and r["dtype"] == dtype]
            count = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "skipped")}
            lines.append(f"| {dtype} | {count['PASS']} | {count['FAIL']} | {count['skipped']} | "
                         f"{len(grid) - len(rows)} |")
        special = [r for r in correctness if r["section"] != "correctness" or r["status"] != "PASS"]
        if special:
            lines += ["", "| section | case | dtype | result | detail |", "|---|---|---|---|---|"]
            lines += [f"| {r['section']} | {r['name']} | {r['dtype']} | {r['status']} | {r['detail']} |"
                      for r in special]
        if attention or train:  # the benchmarks' own summary, without its title
            lines += ["", report.markdown(attention, train, images).split("\n", 1)[1]]
        return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (created); at most 8 files land there")
    p.add_argument("--budget-s", type=float, default=None, help="hard budget of the whole run (540 s; 240 dry)")
    p.add_argument("--dry-run", action="store_true", help="every phase on the CPU under Triton's interpreter, tiny")
    p.add_argument("--full", action="store_true",
                   help="the whole benchmark suite: every attention shape (T 256 to 16k, bf16 and fp16, head dims "
                        "128 and 64, 32 and 8 kv heads) and an 8-layer train step (budget 840 s); what make bench "
                        "runs on a GPU")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: cores - 2)")
    # Internal: one phase's worker process.
    p.add_argument("--worker", choices=("env", "smoke", "grid"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--int64", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1" and args.worker is not None:
        raise SystemExit("a dry-run worker must run under TRITON_INTERPRET=1")
    if args.worker is not None:
        return {"env": worker_environment, "smoke": worker_smoke, "grid": worker_grid}[args.worker](args)
    run = Run(args)
    run.say(f"first contact on {harness.format_environment(run.env)}: budget {run.budget:.0f} s, "
            f"{run.workers} workers, output {run.out}" + (" (dry run)" if run.dry else ""))
    run.phase("environment", run.environment)
    run.phase("smoke+correctness", run.correctness)
    run.phase("timing", run.timing)
    run.phase("decode", run.decode)
    run.phase("train step", run.train_step)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
