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


def test_probing_for_a_top_level_kernels_is_harmless():
    """Libraries that probe for a package named `kernels` import this folder when the
    repository root is on sys.path: that import must define nothing and load nothing."""
    code = "import sys; before = set(sys.modules); import kernels; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "['kernels']"


def test_uninstalled_checkout_finds_its_kernels(tmp_path):
    """Run from a copy of the sources with no install (as on a machine with only torch and
    triton): llama_adapter_fast.kernels still resolves to the checkout's kernels/."""
    import shutil

    for folder in ("llama_adapter_fast", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import llama_adapter_fast.kernels.forward as f\n"
        "print(f.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == str(tmp_path / "kernels" / "forward.py")
