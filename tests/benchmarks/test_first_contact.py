"""The first-contact script's dry run: every phase of the one GPU command, on the CPU under
Triton's interpreter with tiny shapes, so that a typo or a path cannot waste the GPU run."""

import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.harness import read_csv

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_first_contact.py"


def _run(out: Path, budget: int) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    # Run as the GPU run will: the script by its path, from the repository root.
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", "--budget-s", str(budget)],
                            cwd=ROOT, capture_output=True, text=True, timeout=budget + 120)
    return result, time.time() - start


@pytest.mark.interpreter  # the dry run's own device is the CPU
def test_dry_run_runs_every_phase_inside_its_budget(tmp_path):
    budget = 240
    result, elapsed = _run(tmp_path, budget)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert elapsed < budget, elapsed
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    stem = files[0].split("-20")[0] + "-" + re.search(r"\d{4}-\d\d-\d\d", files[0]).group(0)
    for name in ("first-contact.log", "environment.json", "correctness.csv", "attention.csv", "train-step.csv",
                 "summary.md", "first-contact-extras.tar.gz"):
        assert f"{stem}-{name}" in files, (name, files)
    env = json.loads((tmp_path / f"{stem}-environment.json").read_text())
    assert env["dry_run"] is True and env["torch"] and env["triton"]

    rows = read_csv(tmp_path / f"{stem}-correctness.csv")
    smoke = [r for r in rows if r["section"] == "smoke"]
    assert [r["name"] for r in smoke] == ["autotuned_fwd_bwd", "autotuned_decode", "autotuned_packed"]
    assert all(r["status"] == "PASS" for r in smoke), smoke
    grid = {(r["name"], r["dtype"]): r["status"] for r in rows if r["section"] == "correctness"}
    for name in gpu_check.TINY_GRID:
        assert grid[(name, "fp16")] == grid[(name, "fp32")] == "PASS", grid
        assert grid[(name, "bf16")] == "skipped", grid  # the interpreter has no bfloat16 arithmetic

    attention = read_csv(tmp_path / f"{stem}-attention.csv")
    fused = [r for r in attention if r["impl"] == "fused"]
    assert fused and all(r["status"] == "ok" for r in fused), fused
    # The new kernels against their previous structure, the baselines and the floor, each row
    # with its speedup over the best baseline of its shape and mode.
    ran = {r["impl"] for r in attention if r["status"] == "ok"}
    assert {"fused", "fused-previous", "two-sdpa", "eager", "sdpa floor"} <= ran, ran
    assert all(float(r["speedup_vs_best"]) > 0 for r in attention if r["status"] == "ok")
    # FlexAttention's forward runs on the CPU, its backward only on a GPU: refused, with torch's reason.
    flex = [r for r in attention if r["impl"] == "flex"]
    assert flex and all(r["status"] == "unsupported" and "backward on CPU" in r["note"] for r in flex), flex
    train = read_csv(tmp_path / f"{stem}-train-step.csv")
    assert {r["impl"]: r["status"] for r in train} == dict.fromkeys(
        ("thin-triton", "thin-sdpa", "peft", "mm-triton", "mm-sdpa"), "ok")
    summary = (tmp_path / f"{stem}-summary.md").read_text()
    assert "| smoke+correctness |" in summary and "## Correctness" in summary
    assert "| decode | ok |" in summary and "## Decode step" in summary and "B1 8:2 S512" in summary
    with tarfile.open(tmp_path / f"{stem}-first-contact-extras.tar.gz") as tar:
        assert {"decode.csv", "decode.png"} <= set(tar.getnames()), tar.getnames()
    match = re.search(r"first contact finished in (\d+) s", result.stdout)
    assert match and int(match.group(1)) < budget


@pytest.mark.interpreter
def test_a_budget_too_short_still_ends_in_time_with_its_files(tmp_path):
    """Phases past their deadline are stopped and recorded; the run ends and writes its summary."""
    budget = 20
    result, elapsed = _run(tmp_path, budget)
    assert elapsed < budget + 45, elapsed  # each child gets at most its deadline and a short grace
    names = [p.name for p in tmp_path.iterdir()]
    assert any(n.endswith("-summary.md") for n in names) and any(n.endswith("-first-contact.log") for n in names)
    summary = next(tmp_path.glob("*-summary.md")).read_text()
    assert "| timing |" in summary and "| decode |" in summary and "| train step |" in summary
