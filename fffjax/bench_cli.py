"""``fffjax bench``: the benchmark and experiment scripts of ``experiments/``, listed or run.

``fffjax bench`` lists the scripts, each with the first line of its docstring; ``fffjax bench NAME
[ARGS...]`` runs ``experiments/NAME.py ARGS...`` with this Python interpreter and returns its exit
status (``NAME`` may leave out a ``bench_`` prefix: ``fffjax bench cpu --help``). The scripts
belong to the repository, not to the package: they are found in the ``experiments/`` folder beside
the installed ``fffjax`` package, i.e. in a checkout installed with ``pip install -e .``.
"""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

HELP = "list the benchmark scripts of experiments/, or run one: fffjax bench NAME [ARGS...]"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def scripts(folder: Path = EXPERIMENTS) -> dict[str, tuple[Path, str]]:
    """``{name: (path, description)}`` of the scripts ``folder/*.py``, sorted by name.

    The description is the first line of the module docstring, read without importing the script.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"no experiments folder at {folder}: the benchmark scripts come with the "
                                "repository; run from a checkout installed with `pip install -e .`")
    found = {}
    for path in sorted(folder.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""
        found[path.stem] = (path, doc.strip().split("\n")[0])
    return found


def resolve(name: str, available: dict[str, tuple[Path, str]]) -> str:
    """The script ``name`` stands for: itself or ``bench_<name>``; a ValueError names the choices."""
    for candidate in (name, f"bench_{name}"):
        if candidate in available:
            return candidate
    raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(available)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the script to run (without it: list the scripts)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments (try --help)")


def run(args: argparse.Namespace) -> int:
    available = scripts()
    if args.name is None:
        width = max(map(len, available), default=0)
        print(f"Scripts in {EXPERIMENTS} (run one: fffjax bench NAME [ARGS...]):")
        for name, (_, description) in available.items():
            print(f"  {name:{width}}  {description}")
        return 0
    name = resolve(args.name, available)  # an unknown name: `fffjax: error: ...`, status 2 (fffjax.cli)
    return subprocess.run([sys.executable, str(available[name][0]), *args.args], check=False).returncode
