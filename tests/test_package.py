"""Packaging guards."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_name_resolves_to_this_repository():
    """`import kernels` is our package, not the unrelated PyPI project of the same name."""
    import kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


def test_importing_the_package_does_no_heavy_work():
    """`import nlplatform` pulls in neither torch nor lightning (commands import what they need lazily)."""
    code = "import sys, nlplatform, nlplatform.cli; print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_command_exits_2_with_usage():
    """An unknown command is rejected by the CLI with exit status 2 and a usage line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "nlplatform", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_models_command_lists_every_preset_with_its_parameter_count():
    """`nlplatform models` sizes every family's presets on the meta device and prints their parameter counts."""
    from nlplatform import registry

    proc = subprocess.run([sys.executable, "-m", "nlplatform", "models"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:2]): line.split()[2] for line in proc.stdout.splitlines()[1:]}
    for name in registry.FAMILIES:
        for preset in registry.get_spec(name).presets:
            assert int(rows[(name, preset)].replace(",", "")) > 0
    assert rows[("transformer", "340m")] == "343,847,936"


def _project_modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for package in ("nlplatform", "kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file: at the top, inside functions, under
    ``TYPE_CHECKING``. ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``
    (a package importing its own submodules while they load is how packages work, so parents are not added)."""
    import ast

    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_the_import_graph_of_the_packages_has_no_cycle():
    """No module reaches itself through imports, counting those inside functions and under TYPE_CHECKING: each
    module builds only on modules below it, so any of them imports alone, in any order."""
    modules = _project_modules()
    graph = {name: _imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["nlplatform.recipe"] >= {"nlplatform.config", "nlplatform.registry", "nlplatform.optim"}  # seen
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(
                    " -> ".join(trail[trail.index(nxt) :] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Run in a new interpreter: the heavy third-party libraries load once, then every project module is imported in a
# forked child of that process, which holds no project module yet. A child's failure comes back as its last line.
_IMPORT_EACH = """
import importlib, os, sys, traceback
for heavy in ("numpy", "torch", "triton", "lightning", "omegaconf", "mlflow", "optuna", "datasets", "lm_eval"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("nlplatform", "kernels")]
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module of the two packages imports by itself, in a process where no other module of theirs was imported
    first (a fork of a fresh interpreter that loaded only third-party libraries)."""
    # as a user's interpreter: without the Triton interpreter the tests switch on (kernels.tools.build refuses it)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = sorted(m for m in _project_modules() if not m.endswith(".__main__"))  # entry points run when imported
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "", proc.stdout
