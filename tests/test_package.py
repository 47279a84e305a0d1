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


# Floors of the package, lowest first: a module imports only from its own floor or lower.
FLOORS = (
    ("llama_adapter_fast.kernels",),
    ("llama_adapter_fast.ops", "llama_adapter_fast.files", "llama_adapter_fast.bundled"),
    ("llama_adapter_fast.models", "llama_adapter_fast.integrations"),
    ("llama_adapter_fast.training",),
    ("llama_adapter_fast.generation",),
    ("llama_adapter_fast.cli",),
)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["llama_adapter_fast", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (at any depth of its
    code, function-level imports included), resolved to modules."""
    files = [*ROOT.glob("llama_adapter_fast/**/*.py"), *ROOT.glob("kernels/*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: the kernels' own imports
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _floor(module: str) -> int:
    if module == "llama_adapter_fast":  # the public API: the op
        return 1
    return next(i for i, prefixes in enumerate(FLOORS) if module.startswith(prefixes))


def test_imports_point_one_way_without_circles():
    graph = _package_imports()
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _floor(b) > _floor(a))
    assert not upward, f"imports pointing up: {upward}"
    # No circles: a depth-first search finds no module on its own path.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_over_about_500_lines_outside_the_kernels():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.glob("llama_adapter_fast/**/*.py")
            if (n := len(p.read_text().splitlines())) > 530}
    assert not long, long
