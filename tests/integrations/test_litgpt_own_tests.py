"""litgpt's own adapter tests, run with the fused backend switched on.

The files are tests/test_adapter.py and tests/test_adapter_v2.py of the installed litgpt's
source distribution, which `make setup` downloads from the package index and unpacks into
the virtual environment (litgpt-src/). They run in a separate pytest session with
support/litgpt_fused_plugin.py, which fuses every adapter model they build (backend="triton": the
kernels under Triton's interpreter without a GPU) and reports each outcome and the kernel
launches.
"""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("litgpt", reason="litgpt is an optional dependency (pip install llama-adapter-fast[litgpt])")

SOURCE = Path(os.environ.get("LITGPT_SOURCE", Path(sys.prefix) / "litgpt-src"))
FILES = ("tests/test_adapter.py", "tests/test_adapter_v2.py")
# Tests that fail the same way without the fused backend, and why.
DESELECTED = {
    "tests/test_adapter_v2.py::test_against_hf_mixtral": (
        "litgpt 0.5.13's checkpoint converter looks up transformers 4's Mixtral weight names "
        "(model.layers.N.mlp.gate.weight), which transformers 5 renamed: KeyError with litgpt's own path too"
    ),
}


def _source_version() -> str | None:
    info = SOURCE / "PKG-INFO"
    if not info.is_file():
        return None
    return next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("Version:")), None)


def test_litgpts_adapter_tests_pass_with_the_fused_backend(tmp_path):
    if _source_version() is None:
        pytest.skip(f"litgpt's test sources are not unpacked in {SOURCE} (make setup does it)")
    assert _source_version() == version("litgpt"), "litgpt's test sources are not those of the installed version"
    (tmp_path / "tests").mkdir()
    for name in FILES:
        (tmp_path / name).write_text((SOURCE / name).read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # One pytest process per file, side by side: the interpreter keeps each on one core.
    runs = []
    plugin_folder = str(Path(__file__).parents[1] / "support")
    for name in FILES:
        report = tmp_path / f"{Path(name).stem}.json"
        env = {**os.environ, "LITGPT_FUSED_REPORT": str(report), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [plugin_folder, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "litgpt_fused_plugin", "-p", "no:cacheprovider",
                   "-W", "ignore::DeprecationWarning", name, *(f"--deselect={t}" for t in DESELECTED)]
        runs.append((report, subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)))
    result = {"outcomes": {}, "skip_reasons": {}, "launches": {}, "fused_models": 0}
    logs = []
    for report, run in runs:
        log, _ = run.communicate(timeout=1200)
        logs.append(log[-3000:])
        assert report.is_file() and run.returncode == 0, log[-4000:]
        part = json.loads(report.read_text())
        result["outcomes"].update(part["outcomes"])
        result["skip_reasons"].update(part["skip_reasons"])
        result["fused_models"] += part["fused_models"]
        for kernel, count in part["launches"].items():
            result["launches"][kernel] = result["launches"].get(kernel, 0) + count
    outcomes = result["outcomes"]
    failed = sorted(t for t, o in outcomes.items() if o == "failed")
    assert not failed, f"{failed}\n" + "\n".join(logs)
    counts = {o: sum(v == o for v in outcomes.values()) for o in ("passed", "skipped")}
    print(f"litgpt {version('litgpt')} adapter tests with the fused backend: {counts['passed']} passed, "
          f"{counts['skipped']} skipped (litgpt's own marks), {len(DESELECTED)} deselected; "
          f"{result['fused_models']} models fused; kernel launches {result['launches']}")
    for test, reason in sorted(result["skip_reasons"].items()):
        print(f"  skipped {test}: {reason}")
    # The tests that run a forward reached the kernels: training, backward and generation.
    assert result["fused_models"] > 0 and counts["passed"] > 0
    for kernel in ("forward", "backward_prefix", "backward", "decode"):
        assert result["launches"].get(kernel, 0) > 0, kernel
