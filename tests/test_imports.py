"""The import graph of fffjax and pallas_kernels: no cycles (function-local imports count, and so does
the package ``__init__`` that importing a submodule runs), kernels as leaves, the core free of torch, and
no import-time side effects on the process."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fffjax", "pallas_kernels")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _packages_run_by(importer: str, module: str) -> set[str]:
    """The packages whose ``__init__`` an import of ``module`` runs first (``a`` and ``a.b`` for
    ``a.b.c``), less the importer's own packages, which are initialised before the importer."""
    parts = module.split(".")
    packages = {".".join(parts[:i]) for i in range(1, len(parts))}
    return {p for p in packages if not importer.startswith(p + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(path, modules)
        graph[name] = (deps | {p for d in deps for p in _packages_run_by(name, d)}) - {name}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_kernels_import_only_jax_and_the_pure_core():
    allowed = {"fffjax", "fffjax.tree", "fffjax.v1", "fffjax.v2", "fffjax._typing", "fffjax._vma"}
    for name, deps in _graph().items():
        if name.startswith("pallas_kernels"):
            outside = {d for d in deps if not d.startswith("pallas_kernels")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def test_models_never_import_a_backend():
    for name, deps in _graph().items():
        if name.startswith(("fffjax.models", "fffjax.nn", "fffjax.train")):
            backends = {
                d for d in deps if d.startswith("pallas_kernels") or d in ("fffjax.ops.cpu_ffi", "fffjax.ops.pallas")
            }
            assert not backends, f"{name} imports {sorted(backends)}"


# Third-party libraries that install warning filters of their own when imported; loaded first so
# that only the package's own changes are seen.
DEPENDENCIES = ("numpy", "scipy.special", "jax", "jax.experimental.pallas.triton", "flax.nnx", "optax",
                "orbax.checkpoint", "chex", "jaxtyping", "sklearn", "matplotlib", "tokenizers", "tqdm.auto")


def test_the_kernels_load_only_the_pure_core():
    """``pallas_kernels`` imports fffjax's pure core for its references, not the ops that register it."""
    code = "import sys, pallas_kernels; print(sorted(m for m in sys.modules if m.startswith('fffjax')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    core = ["fffjax", "fffjax._typing", "fffjax._vma", "fffjax.tree", "fffjax.v1", "fffjax.v2"]
    assert loaded.stdout.split("\n")[-2] == str(core)


@pytest.mark.parametrize("module", ["fffjax", "fffjax.pretrained", "fffjax.train", "pallas_kernels"])
def test_importing_has_no_process_side_effects(module):
    code = ("import sys, warnings, importlib\n"
            f"for dep in {DEPENDENCIES!r}:\n    importlib.import_module(dep)\n"
            "before = list(warnings.filters); import " + module +
            "\nassert warnings.filters == before, [f for f in warnings.filters if f not in before]"
            "\nassert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
