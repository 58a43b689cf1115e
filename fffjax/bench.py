"""Timing, kernel profiles and result files for the scripts in ``experiments/``.

How long something takes, in one vocabulary (each of these returns seconds per call, and compiles
and warms up before it measures):

* :func:`latency`: each call waited for before the next is sent: what a caller that needs every
  answer sees (host dispatch plus device time).
* :func:`stream`: calls sent back to back, the last one waited for: throughput, with the host's
  dispatch overlapping the device's work.
* :func:`chained`: calls chained inside one jitted loop: device time without dispatch.
* :func:`side_by_side`: several variants timed round by round, interleaved, so that a busy or noisy
  machine slows them alike; per-variant medians and ratios against the first.

Where the time goes: :func:`profile_kernels` (a JAX profiler trace of one call: kernel time, span,
time per HLO op), :func:`per_layer` (that plus :func:`stream` for a call of independent layers),
:func:`copy_bandwidth` (the device's copy rate, the roofline of memory-bound kernels).

What makes a result reproducible: :func:`command_line`, :func:`machine_info`, :func:`provenance`
and :func:`provenance_line` record the command, date and machine; :func:`write_results` writes
``NAME.json``, ``NAME.md`` and ``NAME.png`` under ``experiments/results/`` (or any folder).

This module is a leaf: it imports jax, numpy and the standard library (matplotlib when a figure is
asked for), never a model or a kernel.
"""

import dataclasses
import gzip
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value}")


# ----------------------------------------------------------------------------- timing


def latency(fn: Callable, *args, calls: int = 10, warmup: int = 2, repeats: int = 3) -> float:
    """Median seconds of one call ``fn(*args)`` when each call is waited for before the next is sent.

    ``warmup`` untimed calls first (the first one compiles), then ``repeats`` runs of ``calls``
    calls, each followed by ``jax.block_until_ready`` on its output; returns the median over the
    runs of their mean seconds per call. Counts the host's dispatch of every call. ``fn`` may also
    block itself (a training step that fetches its metrics) or return non-JAX values.
    """
    _check_positive(calls=calls, repeats=repeats)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def stream(fn: Callable, *args, calls: int | None = 10, warmup: int = 2, repeats: int = 3,
           budget_s: float = 0.3, max_calls: int = 50) -> float:
    """Median seconds per call of ``fn(*args)`` over calls sent back to back, the last one waited for.

    ``warmup`` calls first, each waited for (the first one compiles). Then ``repeats`` runs of
    ``calls`` calls: the host enqueues them without waiting and blocks once on the last output, so
    dispatch overlaps the device's work (calls on one device run in order). Returns the median over
    the runs of their seconds per call. ``calls=None`` picks ``min(max_calls, budget_s / (time of
    the last warm-up call) / repeats)`` calls (at least 1), so that all runs take about
    ``budget_s``; it needs ``warmup >= 1``.
    """
    _check_positive(repeats=repeats, max_calls=max_calls)
    if calls is None and warmup < 1:
        raise ValueError(f"warmup: calls=None sizes the runs from the last warm-up call; expected >= 1, got {warmup}")
    last = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        last = time.perf_counter() - start
    if calls is None:
        calls = int(min(max_calls, max(1, budget_s / max(last, 1e-6) / repeats)))
    _check_positive(calls=calls)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def _zero_outputs(fn: Callable, *args):
    """Zeros shaped like ``fn(*args)``'s outputs (traced, not run): the "previous output" of a first call."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


def calls_in_order(fn: Callable, arg_sets: Sequence[tuple]) -> list:
    """The outputs of ``fn(*args)`` for each tuple of ``arg_sets``, traced as calls in that order.

    Each call's inputs pass through an optimization barrier together with the previous call's output,
    and every barrier's output is returned, so that XLA can neither reorder, merge nor drop a call (an
    output nothing reads lets XLA prune it from the barrier and then remove its call as dead code).
    """
    out = _zero_outputs(fn, *arg_sets[0])
    outs = []
    for args in arg_sets:
        args, out = jax.lax.optimization_barrier((args, out))
        outs.append(out)
        out = fn(*args)
    return outs[1:] + [out]


def chained(fn: Callable, *args, calls: int = 16, budget_s: float = 0.3, repeats: int = 3) -> float:
    """Device seconds per call of ``fn(*args)``, without the host's dispatch.

    ``calls`` calls run in one jitted ``fori_loop``; each call's inputs pass through an optimization
    barrier together with the previous call's outputs, so XLA can neither hoist a call out of the
    loop nor drop one. The loop is timed by :func:`stream` (``calls=None``, ``budget_s``,
    ``repeats``) and the time divided by ``calls``. For stages of tens of microseconds, whose
    dispatch would otherwise dominate. A GPU's loop bounds each iteration with its own control flow, a
    fixed cost per call that a model's layers, written out one after another, do not pay:
    :func:`chained_layers` times calls that way.
    """
    _check_positive(calls=calls)

    def looped(*args):
        def body(_, state):
            return jax.lax.optimization_barrier((state[0], fn(*state[0])))

        return jax.lax.fori_loop(0, calls, body, (args, _zero_outputs(fn, *args)))[1]

    return stream(jax.jit(looped), *args, calls=None, budget_s=budget_s, repeats=repeats) / calls


def chained_layers(fn: Callable, arg_sets: Sequence[tuple], *, budget_s: float = 0.3, repeats: int = 3) -> float:
    """Device seconds per call of ``fn``, one call per argument tuple of ``arg_sets`` written out in order
    in one jitted program (:func:`calls_in_order`), as a model's layers each read their own weights.

    Unlike :func:`chained`, whose calls all read one set of weights (which stays in a GPU's L2 cache when
    it fits) inside a loop, the calls here are straight-line code and read ``len(arg_sets)`` distinct
    sets: with more bytes than the cache holds, each call finds its weights in HBM, as in a model's step.
    Distinct buffers also keep XLA from merging calls whose inputs it could prove equal. Timed by
    :func:`stream` (``calls=None``, ``budget_s``, ``repeats``).
    """
    _check_positive(calls=len(arg_sets))
    program = jax.jit(lambda *sets: calls_in_order(fn, sets))
    return stream(program, *arg_sets, calls=None, budget_s=budget_s, repeats=repeats) / len(arg_sets)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One variant's times in :func:`side_by_side`, per call.

    Attributes:
        samples_s: wall seconds per call, one sample per round the variant ran.
        cpu_samples_s: process CPU seconds per call (all threads) of the same samples.
        median_s, min_s, cpu_median_s: their median, minimum and the CPU samples' median.
        vs_first: ``median_s`` over the first variant's ``median_s`` (1 for the first; 2 means
            twice as slow).
    """

    samples_s: tuple[float, ...]
    cpu_samples_s: tuple[float, ...]
    median_s: float
    min_s: float
    cpu_median_s: float
    vs_first: float


def side_by_side(variants: Mapping[str, Callable[[], Any]], *, rounds: int, calls: int = 1, warmup: int = 2,
                 budget_s: float | None = None, min_rounds: int = 3,
                 log: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Times zero-argument callables interleaved, round by round; a :class:`Timing` for each.

    A sample of a variant is ``calls`` calls sent back to back, the last one's output waited for
    (``calls=1``: one call, waited for), divided by ``calls``; its process CPU time is taken with
    it. Each variant runs ``warmup`` untimed calls (the first one compiles) and its first sample
    in turn; then every round runs each variant that still wants a sample, starting one variant
    later than the round before, so that slow spells of a shared machine fall on all variants
    alike. A variant takes ``rounds`` samples; with ``budget_s``, only
    ``clip(budget_s / first sample, min_rounds, rounds)`` (slow variants fewer). ``log`` gets a
    line per variant after its first sample.
    """
    _check_positive(rounds=rounds, calls=calls, min_rounds=min_rounds)
    if not variants:
        raise ValueError("variants: expected at least one callable, got none")
    names = list(variants)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wanted: dict[str, int] = {}

    def sample(name: str) -> None:
        fn = variants[name]
        cpu_start, start = time.process_time(), time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        wall[name].append((time.perf_counter() - start) / calls)
        cpu[name].append((time.process_time() - cpu_start) / calls)

    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(variants[name]())
        sample(name)
        first = wall[name][0]
        wanted[name] = rounds if budget_s is None else int(np.clip(budget_s / max(first, 1e-6), min_rounds, rounds))
        if log is not None:
            log(f"warm {name:34s} {first * 1e3:10.3f} ms -> {wanted[name]} samples")
    for r in range(1, max(wanted.values())):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if r < wanted[name]:
                sample(name)
    first_median = statistics.median(wall[names[0]])
    return {name: Timing(samples_s=tuple(wall[name]), cpu_samples_s=tuple(cpu[name]),
                         median_s=statistics.median(wall[name]), min_s=min(wall[name]),
                         cpu_median_s=statistics.median(cpu[name]),
                         vs_first=statistics.median(wall[name]) / first_median) for name in names}


# ----------------------------------------------------------------------------- kernel profiles


def device_events(trace: Mapping) -> list[dict]:
    """The complete (``ph == "X"``) events of a Perfetto trace that ran on a GPU.

    GPU events are those of the processes named ``/device:GPU...`` (the profiler's device lines,
    one per stream). In a trace without a GPU (CPU smoke runs), the events that carry an ``hlo_op``.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu_pids = {e["pid"] for e in trace.get("traceEvents", []) if e.get("ph") == "M"
                and e.get("name") == "process_name" and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    if gpu_pids:
        return [e for e in events if e.get("pid") in gpu_pids]
    return [e for e in events if "hlo_op" in e.get("args", {})]


def kernel_summary(events: Sequence[Mapping], top: int = 30) -> dict:
    """``{span_ms, busy_ms, kernels, ops: [{op, calls, ms}]}`` of the kernel events of one call.

    ``span_ms``: from the first kernel's start to the last one's end; ``busy_ms``: the summed
    kernel time (``span - busy`` is time the device waited, e.g. launch gaps); ``kernels``: how many
    ran; ``ops``: kernel time grouped by HLO op name without its instance number (``fusion.12`` and
    ``fusion.3`` are one row), the kernel's own name where the event has no op or was replayed from
    an XLA command buffer (a CUDA graph), longest first, ``top`` rows at most.
    """
    if not events:
        return {"span_ms": 0.0, "busy_ms": 0.0, "kernels": 0, "ops": []}
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    ops: dict[str, tuple[int, float]] = {}
    for e in events:
        op = e.get("args", {}).get("hlo_op") or ""
        if not op or op.startswith("command_buffer"):
            op = e["name"]
        op = re.sub(r"[._]\d+$", "", op)[:90]
        calls, us = ops.get(op, (0, 0.0))
        ops[op] = (calls + 1, us + e["dur"])
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    return {"span_ms": (end - start) / 1e3, "busy_ms": sum(e["dur"] for e in events) / 1e3, "kernels": len(events),
            "ops": [{"op": op, "calls": c, "ms": us / 1e3} for op, (c, us) in ranked]}


def profile_kernels(fn: Callable, *args, warmup: int = 2, top: int = 30) -> dict:
    """:func:`kernel_summary` of one call ``fn(*args)`` traced by the JAX profiler.

    ``warmup`` untraced calls first (the first one compiles), each waited for; then one traced call.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        path = next(Path(folder).rglob("perfetto_trace.json.gz"))
        with gzip.open(path) as f:
            return kernel_summary(device_events(json.load(f)), top=top)


class LayerTimes(NamedTuple):
    """Per-layer times of a call of independent layers (:func:`per_layer`)."""

    kernel_ms: float  # summed kernel time of one profiled call, over the layers
    wall_ms: float  # wall time per call over a stream of calls, over the layers
    summary: dict  # the profiled call's kernel_summary


def per_layer(fn: Callable, *args, layers: int, calls: int = 10, warmup: int = 2, repeats: int = 5) -> LayerTimes:
    """Kernel and wall milliseconds per layer of ``fn(*args)``, a jitted call of ``layers`` independent layers.

    Kernel time: :func:`profile_kernels` of one call (after one warm-up call). Wall time:
    :func:`stream` with ``calls``, ``warmup`` and ``repeats``. Several layers in one call make the
    per-layer figures those of a model's stack, not of one isolated launch.
    """
    _check_positive(layers=layers)
    summary = profile_kernels(fn, *args, warmup=1)
    wall = stream(fn, *args, calls=calls, warmup=warmup, repeats=repeats)
    return LayerTimes(summary["busy_ms"] / layers, wall * 1e3 / layers, summary)


def copy_bandwidth(n_bytes: int = 2**31) -> float:
    """Bytes per second (read plus written) of a jitted elementwise ``a + 1`` over ``n_bytes`` of float32.

    The default device's copy rate: the fastest any memory-bound kernel can move data, against which
    a roofline is drawn. Timed by :func:`stream` (``budget_s=0.5``, 5 runs).
    """
    _check_positive(n_bytes=n_bytes // 4)
    x = jnp.ones((n_bytes // 4,), jnp.float32) * 1.5
    seconds = stream(jax.jit(lambda a: a + 1.0), x, calls=None, budget_s=0.5, repeats=5)
    moved = 2 * x.nbytes
    del x
    return moved / seconds


def torch_dense_ms(width_in: int, width: int, dtype_name: str, n_tokens: int) -> float | None:
    """Milliseconds per call of torch's ``Linear(width_in, width) -> GELU -> Linear(width, width_in)`` on
    ``n_tokens`` random tokens of ``dtype_name`` (``"float32"`` or ``"bfloat16"``), by CUDA events (median
    of 3 timed loops); None without torch or CUDA. The dense baseline as torch users run it."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    with torch.no_grad():
        model = torch.nn.Sequential(torch.nn.Linear(width_in, width), torch.nn.GELU(),
                                    torch.nn.Linear(width, width_in)).to("cuda", dt)
        x = torch.randn(n_tokens, width_in, device="cuda", dtype=dt)
        for _ in range(2):
            model(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        reps = int(min(50, max(1, 100.0 / max(start.elapsed_time(end), 1e-3))))
        times = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps)
    del model, x
    torch.cuda.empty_cache()
    return statistics.median(times)


# ----------------------------------------------------------------------------- provenance


def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """``python experiments/NAME.py ARGS``: the command that reruns ``script`` from the repository root.

    ``argv``: the script's arguments (default ``sys.argv[1:]``), shell-quoted.
    """
    path = Path(script)
    where = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python {where} {shlex.join(args)}".strip()


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _cpu_caches() -> dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    except OSError:
        return {}
    return {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in lscpu.splitlines()
            if line.strip().startswith(("L1d", "L2", "L3"))}


def machine_info() -> dict:
    """The machine a result is measured on.

    ``device_kind`` and ``device_count`` of JAX's default backend (``backend``), the CPU model, the
    cores this process may use and the CPU caches, and the versions of python, jax, jaxlib and
    numpy with the OS platform.
    """
    import jaxlib

    devices = jax.devices()
    return {"device_kind": devices[0].device_kind, "device_count": len(devices), "backend": jax.default_backend(),
            "cpu_model": _cpu_model(), "cores": len(os.sched_getaffinity(0)), "caches": _cpu_caches(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


def provenance(script: str | Path, argv: Sequence[str] | None = None) -> dict:
    """``{"command", "date_utc", "device_kind", "machine"}``: how and where a result is being made.

    The head of every results JSON; ``command`` is :func:`command_line` of ``script`` and ``argv``,
    ``machine`` is :func:`machine_info`.
    """
    machine = machine_info()
    return {"command": command_line(script, argv), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device_kind": machine["device_kind"], "machine": machine}


def measure_and_report(script: str | Path, argv: Sequence[str] | None, measure: Callable[[], list],
                       render: Callable[[Mapping], str], out: str | Path | None, name: str) -> dict:
    """Runs ``measure()`` under :func:`provenance`, with the 1-minute load average before and after
    (``load_before``, ``load_after``; its rows under ``results``), prints ``render(report)`` and writes the
    report to ``out/name.{json,md}`` (``out`` None: print only). Returns the report."""
    report = {**provenance(script, argv), "load_before": os.getloadavg()[0]}
    report["results"] = measure()
    report["load_after"] = os.getloadavg()[0]
    text = render(report)
    print(text)
    if out:
        write_results(out, name, report=report, markdown=text)
    return report


def provenance_line(report: Mapping) -> str:
    """One markdown sentence: the command that made ``report``, its date, device and jax version.

    Reads the keys of :func:`provenance` and, for results written before it, the older ``commands``
    (several runs merged), ``device`` and ``jax_version`` / ``jax`` keys; parts that are missing are
    left out.
    """
    machine = report.get("machine", {})
    commands = [report["command"]] if "command" in report else list(report.get("commands", []))
    device = report.get("device_kind") or report.get("device")
    jax_version = machine.get("jax") or report.get("jax_version") or report.get("jax")
    where = ", ".join(filter(None, [report.get("date_utc"), device, jax_version and f"jax {jax_version}"]))
    made_by = " and ".join(f"`{c}`" for c in commands) or "`(command not recorded)`"
    return f"Produced by {made_by}" + (f" ({where})." if where else ".")


# ----------------------------------------------------------------------------- result files


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend (figures go to files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(folder: str | Path, name: str, *, report: Mapping | None = None, markdown: str | None = None,
                  figure=None, dpi: int = 120) -> list[Path]:
    """Writes the files of a result into ``folder``: ``name.json``, ``name.md``, ``name.png``.

    Each only when given: ``report`` as indented JSON (values JSON cannot hold written with
    ``str``), ``markdown`` as text ending in a newline, ``figure`` (a matplotlib figure, closed
    afterwards) at ``dpi``. Folders are created, also those inside ``name`` (``"sub/run"``).
    Returns the paths written.
    """
    if report is None and markdown is None and figure is None:
        raise ValueError("write_results: expected at least one of report, markdown, figure")
    stem = Path(folder) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    folder, name = stem.parent, stem.name
    written = []
    if report is not None:
        written.append(folder / f"{name}.json")
        written[-1].write_text(json.dumps(report, indent=1, default=str) + "\n")
    if markdown is not None:
        written.append(folder / f"{name}.md")
        written[-1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    if figure is not None:
        written.append(folder / f"{name}.png")
        figure.savefig(written[-1], dpi=dpi)
        pyplot().close(figure)
    return written


def log(message: str) -> None:
    """Prints ``[HH:MM:SS] message`` and flushes (progress lines of long runs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_fields(text: str, names: Sequence[str], *, separator: str = "x") -> dict[str, int]:
    """Keyword arguments of a kernel config from a compact spec: ``"128x8"`` -> ``{names[0]: 128, names[1]: 8}``.

    The integers are given in the order of ``names``; trailing ones may be left out (the config's
    defaults apply).
    """
    parts = text.split(separator)
    if not text or len(parts) > len(names) or not all(p.isdigit() for p in parts):
        raise ValueError(f"config spec: expected up to {len(names)} integers joined by {separator!r} "
                         f"({separator.join(names)}), got {text!r}")
    return dict(zip(names, (int(p) for p in parts)))
