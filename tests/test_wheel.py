"""The distribution: `python -m build` makes an sdist and a wheel (from the sdist, as pip
does); the wheel holds the kernels and every asset, carries the metadata, and installed into
a clean environment outside the repository it runs the op through the Triton kernels and the
command line."""

import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import llama_adapter_fast

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: setuptools and build come from the test environment (pinned there), so
    # the test needs no download.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=out)
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("llama_adapter_fast-*.whl")
    return wheel


def test_build_makes_one_wheel_and_one_sdist_of_the_version(dist):
    version = llama_adapter_fast.__version__
    assert sorted(p.name for p in dist.iterdir()) == [
        f"llama_adapter_fast-{version}-py3-none-any.whl", f"llama_adapter_fast-{version}.tar.gz"]


def test_wheel_holds_the_kernels_and_every_asset(dist):
    names = set(zipfile.ZipFile(_wheel(dist)).namelist())
    kernels = {f"llama_adapter_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert kernels and kernels <= names
    assert not any(n.startswith("kernels/") for n in names), "the kernels must not install as a top-level package"
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llama_adapter_fast" / "assets").rglob("*")
              if p.is_file()}
    assert assets and not assets - names, sorted(assets - names)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llama_adapter_fast").rglob("*.py")}
    assert not modules - names, sorted(modules - names)


def test_wheel_metadata(dist):
    wheel = zipfile.ZipFile(_wheel(dist))
    info = f"llama_adapter_fast-{llama_adapter_fast.__version__}.dist-info"
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert re.search(r"^License-Expression: Apache-2.0$", metadata, re.M)
    assert re.search(r"^Requires-Dist: torch>=", metadata, re.M)
    assert re.search(r"^Requires-Dist: numpy<2\.4$", metadata, re.M)
    assert re.search(r"^Provides-Extra: hf$", metadata, re.M)
    assert wheel.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "llama-adapter-fast = llama_adapter_fast.cli:main" in entry_points


@pytest.mark.interpreter
def test_wheel_runs_the_op_and_the_cli_in_a_clean_environment(dist, tmp_path):
    """A new environment holds only the wheel; its dependencies are this environment's
    site-packages, appended through a .pth file (whose own .pth files, this package's editable
    hook among them, are not processed), and nothing runs from the repository."""
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                    _wheel(dist)], check=True)
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # In this interpreter's order: a venv's own packages before the system's it can see.
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib / "dependencies.pth").write_text("\n".join(ours) + "\n")
    code = (
        "import torch, llama_adapter_fast as laf\n"
        "from llama_adapter_fast.kernels.utils import LAUNCH_COUNTS\n"
        "print(laf.__file__)\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 4, 9, 32) for _ in range(3))\n"
        "pk, pv = torch.randn(4, 3, 32), torch.randn(4, 3, 32)\n"
        "gate = torch.tensor([0.3, -0.5, 0.8, 0.1])\n"
        "out = laf.gated_prefix_attention(q, k, v, pk, pv, gate, backend='triton')\n"
        "ref = laf.gated_prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(),\n"
        "                                 gate.double(), backend='eager')\n"
        "print(float((out.double() - ref).norm() / ref.norm()), sum(LAUNCH_COUNTS.values()))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    run = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=environ)
    location, numbers = run.stdout.strip().splitlines()
    assert Path(location).is_relative_to(purelib)
    error, launches = numbers.split()
    assert float(error) < 1e-5 and int(launches) >= 1
    cli = subprocess.run([env / "bin" / "llama-adapter-fast", "--help"], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=environ)
    assert "finetune" in cli.stdout and "generate" in cli.stdout
