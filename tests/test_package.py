"""Packaging: the kernels are importable as llama_adapter_fast.kernels, and the folder's
__init__ has no side effects (libraries probe for a top-level `kernels` package)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_init_has_no_side_effects():
    tree = ast.parse((ROOT / "kernels" / "__init__.py").read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert body == [], "kernels/__init__.py must hold only its docstring"


def test_kernels_are_a_subpackage():
    code = "import llama_adapter_fast.kernels.forward as f, sys; print(f.__name__); print('kernels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.split() == ["llama_adapter_fast.kernels.forward", "False"]


def test_importing_the_package_does_not_register_a_top_level_kernels():
    import llama_adapter_fast  # noqa: F401

    assert "kernels" not in sys.modules or getattr(sys.modules["kernels"], "__file__", "") != str(
        ROOT / "kernels" / "__init__.py"
    )
