"""The manual's Python examples that run on a CPU run as written, from a folder that is not
the repository (so they cannot lean on relative paths)."""

import subprocess
import sys

import pytest

from support.manual import ROOT, python_block, python_blocks


def _run(block: str, folder) -> None:
    result = subprocess.run([sys.executable, "-c", block], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_op_example_runs(tmp_path):
    _run(python_block("out.sum().backward()  "), tmp_path)


def test_the_op_pages_examples_run_in_order(tmp_path):
    """As a reader runs them: each block of docs/op.md after the ones above it, in one
    interpreter (the decoding block uses the first block's prefix and gate)."""
    pytest.importorskip("transformers")
    _run("\n".join(python_blocks(ROOT / "docs" / "op.md")), tmp_path)


@pytest.mark.parametrize("marker", ["MultiModalLLaMAAdapter(llama, encoder)", "# 5,136: the only trainable tensors",
                                    "bank.unload(\"chat\")"])
def test_python_example_runs_from_another_folder(marker, tmp_path):
    pytest.importorskip("transformers")
    _run(python_block(marker), tmp_path)


def test_litgpt_example_runs_from_another_folder(tmp_path):
    pytest.importorskip("litgpt")
    _run(python_block("enable_fused_adapter(model)  # backend="), tmp_path)
