"""Packaging: the kernels are importable as llama_adapter_fast.kernels (the link
llama_adapter_fast/kernels -> ../kernels) and never as a top-level `kernels`, a name that
belongs to Hugging Face's kernel hub, which transformers imports."""

import ast
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd: pathlib.Path | str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True).stdout


def test_kernels_folder_is_no_regular_package():
    """Without an __init__.py the folder is at most a namespace portion from the root, which
    loses to any installed package of that name; the package reaches it through its link."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "llama_adapter_fast" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


def test_kernels_are_a_subpackage():
    code = "import llama_adapter_fast.kernels.forward as f, sys; print(f.__name__); print('kernels' in sys.modules)"
    assert _run(code, "/").split() == ["llama_adapter_fast.kernels.forward", "False"]


def test_root_sees_the_hubs_kernels_and_transformers_imports():
    """From the repository root (first on sys.path for `python -m pytest`, `python -m
    llama_adapter_fast.cli`, `python -c`), `import kernels` is Hugging Face's package where it
    is installed (transformers >= 5.25 requires it), at most an empty namespace elsewhere, and
    transformers' model classes import beside it."""
    pytest.importorskip("transformers")
    code = ("import importlib.util\n"
            "hub = importlib.util.find_spec('kernels')\n"
            "import llama_adapter_fast.kernels.forward\n"
            "from transformers import LlamaForCausalLM\n"
            "print(hub.origin if hub else 'absent', hub.submodule_search_locations if hub else '')\n")
    origin, locations = _run(code, ROOT).split(" ", 1)
    try:
        hub_files = importlib.metadata.distribution("kernels").files
    except importlib.metadata.PackageNotFoundError:  # an older transformers without the kernel hub
        assert origin in ("absent", "None"), origin  # the folder is at most an empty namespace
        return
    hub_init = next(f for f in hub_files if f.as_posix() == "kernels/__init__.py")
    assert pathlib.Path(origin).resolve() == pathlib.Path(hub_init.locate()).resolve()
    assert (ROOT / "kernels").resolve() not in pathlib.Path(origin).resolve().parents


def test_uninstalled_checkout_finds_its_kernels(tmp_path):
    """Run from a copy of the sources with no install (as on a machine with only torch and
    triton): llama_adapter_fast.kernels resolves through the link to the checkout's kernels/."""
    for folder in ("llama_adapter_fast", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "assets"))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import llama_adapter_fast.kernels.forward as f\n"
        "print(f.__file__)\n"
    )
    out = pathlib.Path(_run(code, tmp_path).strip())
    assert out.resolve() == (tmp_path / "kernels" / "forward.py").resolve()
    assert out.is_relative_to(tmp_path)


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


def test_no_private_name_is_imported_across_the_packages_modules():
    """A module's underscored names are its own: another module of the package that needs
    one gets a public name instead."""
    found = []
    for path in [*ROOT.glob("llama_adapter_fast/**/*.py"), *ROOT.glob("kernels/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level or (node.module or "").startswith("llama_adapter_fast"):
                found += [f"{path.relative_to(ROOT)}: {alias.name} from {node.module}"
                          for alias in node.names if alias.name.startswith("_")]
    assert not found, found
