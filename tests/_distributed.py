"""Two `jax.distributed` CPU processes on loopback, for the multi-process tests.

A test file that uses this runs itself as the worker: `python FILE PORT PROCESS_ID OUT_JSON`, and the
worker writes its results as JSON to OUT_JSON.
"""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A free TCP port on loopback for the coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(script: str, tmp_path: Path, *, timeout: float,
                      meanwhile: Callable[[], object] | None = None) -> tuple[list[dict], object]:
    """Starts `script` as processes 0 and 1, runs `meanwhile()` while they work, and returns their JSON
    results (in process order) with `meanwhile`'s result. A worker that fails fails the test with its output.
    """
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)  # the workers set their own device counts
    procs = [subprocess.Popen([sys.executable, script, str(port), str(pid), str(tmp_path / f"p{pid}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in (0, 1)]
    try:
        extra = meanwhile() if meanwhile is not None else None
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"p{pid}.json").read_text()) for pid in (0, 1)], extra
