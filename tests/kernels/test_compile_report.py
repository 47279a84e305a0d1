"""The kernels compiled for an H100 (sm_90) and an A100 (sm_80) on this machine, with
ptxas, on every launch shape of the report (Triton's specializations: T = 1, P = 1, a group
of 1, B = 1, S = 1, odd sizes): every launch has a config that fits the shared memory, the
configs the launcher can pick fit, and on sm_90 the 16-bit spill targets hold (no pickable
config spills, in any mode; a wgmma config for every kernel), and the decode kernels spill
nowhere. The full sweep (all dtypes
and head dims) is `make compile-report`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("modes", ["causal", "causal-padded,bidirectional", "packed"])
def test_sm90_bf16_compile_report(modes):
    """The spill targets, and the Hopper path's structure: the forward and the fused
    backward's kernels read their tiles through bulk tensor copies and multiply with wgmma,
    at no fewer CTAs per multiprocessor than the same configs through pointers."""
    result = _run("--archs", "90", "--dtypes", "bf16", "--head-dims", "64,128,256", "--modes", modes,
                  "--no-write", "--check", "--spill-targets", "--structure-targets")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 problems" in result.stdout, result.stdout[-4000:]
    assert "Structure targets: all met." in result.stdout
    assert "Launch shapes: base (" in result.stdout and "ones (B=1, Hq=1, Hkv=1, T=1, S=1, P=1)" in result.stdout


def test_decode_kernels_fit_and_never_spill():
    """The decode kernels on both archs, in 16 and 32 bits, at the head dims whose tiles are
    the largest (128, 256: where registers run out) or masked (96: a block of 128 with masked
    columns); the smaller ones are in the full report. On the decode mode's shapes (T = 1, a
    group of 1, MQA, chunks of 5 and 16, every size 1), over a cache with lengths, with first
    positions too, and with a key padding mask: every launch fits and no pickable config
    spills."""
    result = _run("--archs", "90,80", "--dtypes", "bf16,fp32", "--head-dims", "96,128,256", "--modes",
                  "decode,decode-starts,decode-padded",
                  "--no-write", "--check", "--spill-targets")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 problems; 0 pickable configs spill" in result.stdout, result.stdout[-4000:]
    assert "group8-chunk16 (B=2, Hq=32, Hkv=4, T=16" in result.stdout


def test_sm80_fits():
    """On an A100 every training launch has a config that fits (its 16-bit configs spill: not
    tuned for); its decode launches are the decode test's."""
    result = _run("--archs", "80", "--dtypes", "bf16", "--head-dims", "64,128,256", "--modes", "causal,packed",
                  "--no-write", "--check")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 problems" in result.stdout, result.stdout[-4000:]


def _run_patched(tmp_path, patch: str, *args: str) -> subprocess.CompletedProcess:
    """The report in a process whose package was first changed by `patch` (Python lines)."""
    script = tmp_path / "patched_report.py"
    script.write_text(f"import sys\n{patch}\nfrom benchmarks import compile_report\n"
                      "sys.exit(compile_report.main(sys.argv[1:]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(script), "--archs", "90", "--dtypes", "bf16", "--shapes", "base",
                           "--no-write", "--check", "--jobs", "1", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_spill_targets_fail_on_a_spilling_config(tmp_path):
    """--spill-targets is not a formality: a pickable config that spills fails it."""
    result = _run_patched(tmp_path, "from llama_adapter_fast.kernels import configs\n"
                          "configs.CANDIDATES['backward_dkdv'][(2, 128)] = [(64, 128, 4, 2)]",  # 2.8 KB of spills
                          "--head-dims", "128", "--modes", "bidirectional", "--kernels", "backward_dkdv",
                          "--spill-targets")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "backward_dkdv M64 N128 w4 s2 spills" in result.stdout


def test_check_fails_on_a_config_that_does_not_fit(tmp_path):
    """--check is not a formality: a kernel whose only candidate cannot fit fails it."""
    result = _run_patched(tmp_path, "from llama_adapter_fast.kernels import configs\n"
                          "configs.CANDIDATES['forward'][(2, 128)] = [(64, 64, 4, 8)]",
                          "--head-dims", "128", "--modes", "causal", "--kernels", "forward")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "no configuration of the forward kernel fits" in result.stdout


def test_structure_targets_fail_without_bulk_copies(tmp_path):
    """--structure-targets is not a formality: the Hopper path through pointers fails it."""
    result = _run_patched(tmp_path, "from llama_adapter_fast.kernels.utils import SETTINGS\nSETTINGS.tma = False",
                          "--head-dims", "64", "--modes", "causal", "--kernels", "forward", "--structure-targets")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "forward M128 N64 w4 s3: no bulk tensor copies" in result.stdout
