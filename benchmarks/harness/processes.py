"""Child processes of the GPU drivers (the suite and the first-contact script): a log that
is also printed, one child streamed with a time limit, and a pool of children with a
deadline. Each child leads its own process group, so stopping it stops what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.env import REPO_ROOT
from benchmarks.harness.timing import Deadline


class Tee:
    """Print to the console and append to a log file (flushed at every line)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # closed by close()
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env(interpret: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a child: unbuffered output, and Triton's interpreter only when
    asked (otherwise the kernels must compile for the GPU)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def kill(proc: subprocess.Popen) -> None:
    """Stop a child and everything it started (it leads its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_streaming(cmd: Sequence[str], say: Tee, timeout_s: float, env: dict[str, str] | None = None,
                  prefix: str = "", label: str | None = None) -> int:
    """Run a child, copying its output line by line; kill it after timeout_s. Returns its
    exit code (-9 when it was stopped)."""
    label = label or " ".join(cmd[2:4])
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

    def copy() -> None:
        for line in proc.stdout:
            # tqdm redraws its bar with carriage returns: keep the last state of each line.
            say(prefix + line.rstrip("\n").split("\r")[-1])

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        say(f"!! {prefix}{label} ran past its time limit: stopped (what it wrote is kept)")
        kill(proc)
        code = -9
    reader.join(timeout=5)
    return code


@dataclass
class Job:
    name: str
    cmd: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    log: object = None
    started: float = 0.0
    result: str = ""
    output: list[str] = field(default_factory=list)


def run_pool(jobs: list[Job], workers: int, deadline: Deadline, say: Tee, log_path: Path) -> None:
    """Run jobs `workers` at a time, in order; stop the ones still running at the deadline.
    Each job's output goes to log_path when it ends (the last lines of a failure are also
    said)."""
    pending, running = list(jobs), []
    with open(log_path, "a", encoding="utf-8") as log:
        while pending or running:
            while pending and len(running) < workers and not deadline.passed():
                job = pending.pop(0)
                job.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
                job.proc = subprocess.Popen(job.cmd, cwd=REPO_ROOT, env=job.env or child_env(),
                                            stdout=job.log, stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True)
                job.started = time.time()
                running.append(job)
            if deadline.passed():
                for job in pending:
                    job.result = "not started (time budget)"
                pending = []
            for job in list(running):
                code = job.proc.poll()
                if code is None and deadline.passed():
                    kill(job.proc)
                    code, job.result = -9, "stopped (time budget)"
                if code is None:
                    continue
                running.remove(job)
                job.result = job.result or ("ok" if code == 0 else f"failed (exit code {code})")
                job.log.seek(0)
                text = job.log.read()
                job.log.close()
                job.output = text.splitlines()
                log.write(f"===== {job.name}: {job.result} after {time.time() - job.started:.0f} s\n{text}\n")
                log.flush()
                if job.result != "ok":
                    tail = [line for line in job.output if line.strip()][-3:]
                    say(f"   {job.name}: {job.result}" + "".join(f"\n      {t}" for t in tail))
            time.sleep(0.2)
