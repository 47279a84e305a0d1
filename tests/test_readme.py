"""The README's Python examples that run on a CPU run as written, from a folder that is not
the repository (so they cannot lean on relative paths)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks with {marker!r}"
    return found[0]


@pytest.mark.parametrize("marker", ["MultiModalLLaMAAdapter(llama, encoder)", "# 5,136: the only trainable tensors"])
def test_python_example_runs_from_another_folder(marker, tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", _block(marker)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_litgpt_example_runs_from_another_folder(tmp_path):
    pytest.importorskip("litgpt")
    block = _block("enable_fused_adapter(model)  # backend=")
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
