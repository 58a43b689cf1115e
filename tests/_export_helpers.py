"""A fresh Python process where fffjax cannot be imported and transformers runs offline: where the
export tests load an exported folder as a user with only torch and transformers would."""

import subprocess
import sys
from pathlib import Path


def run_without_fffjax(code: str, root: Path) -> None:
    """Runs ``code`` in an isolated interpreter (``python -I``) in ``root`` with ``sys.argv[1:]`` =
    ``[root, cache]``: transformers offline, its remote-code modules cached in ``cache = root/hf_modules``.
    The code itself makes fffjax unimportable (``sys.modules["fffjax"] = None``) before its imports."""
    cache = root / "hf_modules"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_MODULES_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(root / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-I", "-c", code, str(root), str(cache)], cwd=root, env=env, check=True,
                   timeout=300)
