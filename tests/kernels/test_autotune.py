"""The launch path that runs only on a GPU (Triton's autotuner, the prune by compiled shared
memory, the fixed-config choice), driven on the CPU through Triton's own machinery: the
kernels compile for sm_90 with ptxas and only the device parts (limits, loading, launching,
timing) are stubbed, by tests/support/fake_gpu.py. Each scenario runs in a process of its own,
without the interpreter (see tests/support/autotune_scenarios.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("scenario, autotune", [("autotuned", "1"), ("limits", "1"), ("fixed", "0"), ("decode", "1"),
                                                       ("tma", "0")])
def test_gpu_launch_path(scenario, autotune):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LLAMA_ADAPTER_FAST_AUTOTUNE"] = autotune
    result = subprocess.run([sys.executable, str(HERE.parent / "support" / "autotune_scenarios.py"), scenario], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ok: {scenario}" in result.stdout
