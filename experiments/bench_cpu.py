"""CPU benchmark: FFF-v2 hard inference against dense feedforward layers, side by side in one process.

UltraFastBERT 1x11's layer: H = 768, FFF-v2 depth 11 (4095 neurons, 12 on each token's path),
float32, 128 / 1024 / 16384 tokens. Variants (every weight and input random, every row its own):

* ``xla_dense_{4095,4096,3072}``: jitted ``gelu(x @ w1 + b1) @ w2 + b2`` (exact GELU).
* ``torch_dense_{4095,4096,3072}``: ``nn.Linear`` x2 + ``nn.GELU`` under ``torch.inference_mode``.
* ``fff_reference``: ``fff_v2_hard(..., implementation="reference")``, the published masked dense form.
* ``fff_xla``: ``implementation="xla"`` (jnp row gathers); ``fff_cpu_ffi``: the C++ custom call.
* ``torch_fff_gather``: a hard FFF in torch, ``index_select`` per level + einsum dot + ``addcmul``.
* At the largest token count, ablations that say where the time goes (see the ``.md``).

The baseline of every ratio is the fastest dense layer of width 4095 or 4096 (XLA or torch) at the
same token count, named beside the ratio. Timing: :func:`fffjax.bench.side_by_side`: one warm-up
call, then wall clock and process CPU time around one call ending in ``block_until_ready``;
variants interleaved round by round; median of the samples (slow variants get fewer, within
``--budget-s``). FFF outputs are checked against the masked reference before anything is timed.

Large fresh XLA output buffers are page-faulted in 4 KiB pages on every call, for every JAX variant
alike; the script re-executes itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent
huge pages for malloc) unless ``--no-hugetlb``. The setting is recorded in the JSON.

Run (a few minutes on 2 cores; writes ``experiments/results/bench_cpu.{json,md,png}``)::

    python experiments/bench_cpu.py

Smoke run (seconds)::

    python experiments/bench_cpu.py --tokens 64 --max-repeats 3 --budget-s 0.01 --no-torch --out /tmp/bench_cpu
"""

import argparse
import json
import os
import sys
from pathlib import Path

HUGETLB = "glibc.malloc.hugetlb=1"


def _reexec_with_hugetlb(argv: list[str]) -> None:
    if "--no-hugetlb" in argv or HUGETLB in os.environ.get("GLIBC_TUNABLES", ""):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGETLB]))
    # torch's OpenMP threads would otherwise spin after each call, stealing the cores from the
    # variant timed next (variants are interleaved).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.execve(sys.executable, [sys.executable, *argv], env)


_reexec_with_hugetlb(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fffjax import bench, tree, v2  # noqa: E402
from fffjax.ops import cpu_ffi, fff_v2_hard  # noqa: E402

H, DEPTH, WIDTHS = 768, 11, (4095, 4096, 3072)
BASELINES = ("xla_dense_4095", "xla_dense_4096", "torch_dense_4095", "torch_dense_4096")
RESULTS = Path(__file__).resolve().parent / "results"
log = bench.log


def machine_info(torch_mod) -> dict:
    """:func:`fffjax.bench.machine_info` with what this benchmark depends on: the malloc and OpenMP
    settings, whether the ``cpu_ffi`` kernel compiled, torch's version and threads."""
    info = {**bench.machine_info(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "cpu_ffi_available": cpu_ffi.available(), "cpu_ffi_build_error": cpu_ffi.build_error(),
            "torch": getattr(torch_mod, "__version__", None)}
    if torch_mod is not None:
        info["torch_threads"] = torch_mod.get_num_threads()
    return info


# ----------------------------------------------------------------------------- variants

def _gelu(z):
    return jax.nn.gelu(z, approximate=False)


@jax.jit
def xla_dense(x, w1, b1, w2, b2):
    return _gelu(x @ w1 + b1) @ w2 + b2


@jax.jit
def xla_dense_no_gelu(x, w1, b1, w2, b2):
    return (x @ w1 + b1) @ w2 + b2


@jax.jit
def write_floor(x):
    """Reads x and writes an output of the same size: the memory floor of any layer at this size."""
    return x * 2.0


def xla_routing_only(x, w_in, b_in, *, depth):
    """The "xla" path's gathers and dots without the output stage: the path's node indices."""
    node = jnp.zeros((x.shape[0],), jnp.int32)
    nodes = []
    for _ in range(depth + 1):
        z = jnp.einsum("bh,bh->b", x, w_in.at[node].get(mode="promise_in_bounds")) + b_in[node]
        nodes.append(node)
        node = tree.child(node, z > 0)
    return jnp.stack(nodes, axis=1)


def xla_multiply_sum(x, w_in, b_in, w_out, *, depth):
    """The "xla" path with the contraction written as gather, multiply and sum (no ``einsum``)."""
    node = jnp.zeros((x.shape[0],), jnp.int32)
    y = jnp.zeros((x.shape[0], w_out.shape[1]), x.dtype)
    for _ in range(depth + 1):
        z = jnp.sum(x * w_in[node], axis=-1) + b_in[node]
        y = y + _gelu(z)[:, None] * w_out[node]
        node = tree.child(node, z > 0)
    return y


def xla_lax_map_chunks(x, w_in, b_in, w_out, *, depth, chunk):
    """The "xla" path over token blocks with ``lax.map`` (to keep each block's gathered rows in cache)."""
    blocks = x.reshape(-1, chunk, x.shape[1])
    fn = lambda xb: v2.conditional_forward(xb, w_in, b_in, w_out, depth=depth)  # noqa: E731
    return jax.lax.map(fn, blocks).reshape(x.shape[0], -1)


def xla_fori_levels(x, w_in, b_in, w_out, *, depth):
    """The "xla" path with a ``fori_loop`` over levels instead of unrolling them."""
    def level(_, carry):
        node, y = carry
        z = jnp.einsum("bh,bh->b", x, w_in.at[node].get(mode="promise_in_bounds")) + b_in[node]
        y = y + _gelu(z)[:, None] * w_out.at[node].get(mode="promise_in_bounds")
        return tree.child(node, z > 0), y
    init = (jnp.zeros((x.shape[0],), jnp.int32), jnp.zeros((x.shape[0], w_out.shape[1]), x.dtype))
    return jax.lax.fori_loop(0, depth + 1, level, init)[1]


def xla_dense_top_levels(x, w_in, b_in, w_out, *, depth, top):
    """The "xla" path with the first ``top`` levels (``2**top - 1`` shared rows) as one small matmul."""
    n_top = 2**top - 1
    z_top = x @ w_in[:n_top].T + b_in[:n_top]                          # (B, n_top)
    node = jnp.zeros((x.shape[0],), jnp.int32)
    coef = jnp.zeros_like(z_top)
    rows = jnp.arange(x.shape[0])
    for _ in range(top):
        z = z_top[rows, node]
        coef = coef.at[rows, node].set(_gelu(z))
        node = tree.child(node, z > 0)
    y = coef @ w_out[:n_top]
    for _ in range(top, depth + 1):
        z = jnp.einsum("bh,bh->b", x, w_in.at[node].get(mode="promise_in_bounds")) + b_in[node]
        y = y + _gelu(z)[:, None] * w_out.at[node].get(mode="promise_in_bounds")
        node = tree.child(node, z > 0)
    return y


def xla_sorted_by_path(x, w_in, b_in, w_out, *, depth, top):
    """The "xla" path on tokens sorted by their node at level ``top`` (rows shared by neighbours)."""
    node = jnp.zeros((x.shape[0],), jnp.int32)
    for _ in range(top):
        node = tree.child(node, jnp.einsum("bh,bh->b", x, w_in[node]) + b_in[node] > 0)
    order = jnp.argsort(node)
    y_sorted = v2.conditional_forward(x[order], w_in, b_in, w_out, depth=depth)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def torch_fff_gather(torch, x, w_in, b_in, w_out, depth: int):
    """Hard FFF-v2 in torch: per level gather each token's row, dot, GELU, accumulate its output row."""
    node = torch.zeros(x.shape[0], dtype=torch.long)
    y = torch.zeros(x.shape[0], w_out.shape[1])
    for _ in range(depth + 1):
        z = torch.einsum("bh,bh->b", x, w_in.index_select(0, node)) + b_in.index_select(0, node)
        y.addcmul_(torch.nn.functional.gelu(z)[:, None], w_out.index_select(0, node))
        node = 2 * node + 1 + (z > 0).long()
    return y


class Variant:
    """One row of the table: ``call()`` returns only when its result is computed, with the environment
    variables ``env`` set for the call (the ``cpu_ffi`` kernel reads its ablation switches there)."""

    def __init__(self, name: str, call, *, group: str, width: int | None = None, env: dict | None = None):
        self.name, self.group, self.width, self.env = name, group, width, env or {}
        self._call = call

    def call(self):
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return self._call()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def build_variants(tokens: int, seed: int, ablations: bool, torch_mod):
    key = jax.random.PRNGKey(seed)
    k_x, k_fff, *k_dense = jax.random.split(key, 2 + len(WIDTHS))
    x = jax.random.normal(k_x, (tokens, H), jnp.float32)
    p = v2.init(k_fff, H, DEPTH)
    w_in, b_in, w_out = p["w_in"], p["b_in"], p["w_out"]
    variants, checks = [], {}

    def fff(impl):
        return lambda: fff_v2_hard(x, w_in, b_in, w_out, depth=DEPTH, implementation=impl).block_until_ready()

    dense_params = {}
    for width, k in zip(WIDTHS, k_dense):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        a, b = 1 / np.sqrt(H), 1 / np.sqrt(width)
        dense_params[width] = (jax.random.uniform(k1, (H, width), jnp.float32, -a, a),
                               jax.random.uniform(k2, (width,), jnp.float32, -a, a),
                               jax.random.uniform(k3, (width, H), jnp.float32, -b, b),
                               jax.random.uniform(k4, (H,), jnp.float32, -b, b))
        variants.append(Variant(f"xla_dense_{width}",
                                lambda dp=dense_params[width]: xla_dense(x, *dp).block_until_ready(),
                                group="dense", width=width))
    variants.append(Variant("fff_reference", fff("reference"), group="fff"))
    variants.append(Variant("fff_xla", fff("xla"), group="fff"))
    if cpu_ffi.available():
        variants.append(Variant("fff_cpu_ffi", fff("cpu_ffi"), group="fff"))
    if torch_mod is not None:
        torch = torch_mod
        tx = torch.from_numpy(np.asarray(x))
        for width in WIDTHS:
            layer = torch.nn.Sequential(torch.nn.Linear(H, width), torch.nn.GELU(), torch.nn.Linear(width, H))
            w1, b1, w2, b2 = (torch.from_numpy(np.asarray(t)) for t in dense_params[width])
            with torch.no_grad():
                layer[0].weight.copy_(w1.T), layer[0].bias.copy_(b1)
                layer[2].weight.copy_(w2.T), layer[2].bias.copy_(b2)

            def run_dense(layer=layer):
                with torch.inference_mode():
                    return layer(tx)
            variants.append(Variant(f"torch_dense_{width}", run_dense, group="dense", width=width))
        tw = [torch.from_numpy(np.asarray(t)) for t in (w_in, b_in, w_out)]

        def run_torch_fff():
            with torch.inference_mode():
                return torch_fff_gather(torch, tx, *tw, DEPTH)
        variants.append(Variant("torch_fff_gather", run_torch_fff, group="fff"))
        checks["torch_fff_gather"] = lambda n: torch_fff_gather(torch, tx[:n], *tw, DEPTH).numpy()
    if ablations:
        routing = jax.jit(lambda x, w_in, b_in: xla_routing_only(x, w_in, b_in, depth=DEPTH))
        orig = jax.jit(lambda *a: xla_multiply_sum(*a, depth=DEPTH))
        chunked = jax.jit(lambda *a: xla_lax_map_chunks(*a, depth=DEPTH, chunk=min(1024, tokens)))
        fori = jax.jit(lambda *a: xla_fori_levels(*a, depth=DEPTH))
        top4 = jax.jit(lambda *a: xla_dense_top_levels(*a, depth=DEPTH, top=4))
        sort8 = jax.jit(lambda *a: xla_sorted_by_path(*a, depth=DEPTH, top=8))
        p12 = v2.init(k_fff, H, 0, n_trees=12)  # a dense layer of 12 neurons: no routing at all
        d12 = (p12["w_in"].T, p12["b_in"], p12["w_out"], jnp.zeros(H))
        variants += [
            Variant("ablation_write_floor", lambda: write_floor(x).block_until_ready(), group="ablation"),
            Variant("ablation_xla_dense_12", lambda d12=d12: xla_dense(x, *d12).block_until_ready(),
                    group="ablation", width=12),
            Variant("ablation_xla_dense_4096_no_gelu",
                    lambda: xla_dense_no_gelu(x, *dense_params[4096]).block_until_ready(),
                    group="ablation", width=4096),
            Variant("ablation_xla_routing_only", lambda: routing(x, w_in, b_in).block_until_ready(), group="ablation"),
            Variant("ablation_xla_multiply_sum", lambda: orig(x, w_in, b_in, w_out).block_until_ready(),
                    group="ablation"),
            Variant("ablation_xla_lax_map_1024", lambda: chunked(x, w_in, b_in, w_out).block_until_ready(),
                    group="ablation"),
            Variant("ablation_xla_fori_levels", lambda: fori(x, w_in, b_in, w_out).block_until_ready(),
                    group="ablation"),
            Variant("ablation_xla_dense_top_4", lambda: top4(x, w_in, b_in, w_out).block_until_ready(),
                    group="ablation"),
            Variant("ablation_xla_sorted_by_path", lambda: sort8(x, w_in, b_in, w_out).block_until_ready(),
                    group="ablation"),
        ]
        checks["ablation_xla_multiply_sum"] = lambda n: orig(x[:n], w_in, b_in, w_out)
        checks["ablation_xla_lax_map_1024"] = lambda n: jax.jit(
            lambda *a: xla_lax_map_chunks(*a, depth=DEPTH, chunk=n // 2))(x[:n], w_in, b_in, w_out)
        checks["ablation_xla_fori_levels"] = lambda n: fori(x[:n], w_in, b_in, w_out)
        checks["ablation_xla_dense_top_4"] = lambda n: top4(x[:n], w_in, b_in, w_out)
        checks["ablation_xla_sorted_by_path"] = lambda n: sort8(x[:n], w_in, b_in, w_out)
        if cpu_ffi.available():
            p7 = v2.init(k_fff, H, 7)
            variants += [
                Variant("ablation_cpu_ffi_unsorted", fff("cpu_ffi"), group="ablation", env={"FFFJAX_CPU_SORT": "0"}),
                Variant("ablation_cpu_ffi_1_thread", fff("cpu_ffi"), group="ablation", env={"FFFJAX_CPU_THREADS": "1"}),
                Variant("ablation_cpu_ffi_depth_7", lambda p7=p7: fff_v2_hard(
                    x, p7["w_in"], p7["b_in"], p7["w_out"], depth=7, implementation="cpu_ffi").block_until_ready(),
                    group="ablation"),
            ]
    for impl in ("xla", "cpu_ffi"):
        checks[f"fff_{impl}"] = lambda n, impl=impl: fff_v2_hard(x[:n], w_in, b_in, w_out, depth=DEPTH,
                                                                 implementation=impl)
    reference = lambda n: v2.masked_forward(x[:n], w_in, b_in, w_out, depth=DEPTH)  # noqa: E731
    return variants, checks, reference


def check_outputs(checks, reference, tokens: int) -> dict:
    """Max |error| of every FFF variant against the masked reference on the first tokens."""
    n = min(tokens, 2048)
    expected = np.asarray(reference(n), np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    errors = {}
    for name, fn in checks.items():
        if name == "fff_cpu_ffi" and not cpu_ffi.available():
            continue
        err = float(np.max(np.abs(np.asarray(fn(n), np.float64) - expected)))
        errors[name] = err
        if err > 1e-4 * scale:
            raise AssertionError(f"{name} differs from the masked reference by {err:.3g} at {n} tokens")
    return errors


def summarise(tokens, variants, times: dict[str, bench.Timing]) -> list[dict]:
    """One row per variant: its median, minimum and CPU time, and its speed-up over the baselines."""
    rows = []
    for v in variants:
        t = times[v.name]
        rows.append({"tokens": tokens, "variant": v.name, "group": v.group, "width": v.width,
                     "ms_median": t.median_s * 1e3, "ms_min": t.min_s * 1e3, "repeats": len(t.samples_s),
                     "tokens_per_s": tokens / t.median_s, "env": v.env, "cpu_ms_median": t.cpu_median_s * 1e3})
    by_name = {r["variant"]: r for r in rows}
    base = min((by_name[b] for b in BASELINES if b in by_name), key=lambda r: r["ms_median"])
    d3072 = min((by_name[b] for b in ("xla_dense_3072", "torch_dense_3072") if b in by_name),
                key=lambda r: r["ms_median"])
    for r in rows:
        r["baseline"] = base["variant"]
        r["speedup_vs_baseline"] = base["ms_median"] / r["ms_median"]
        r["baseline_3072"] = d3072["variant"]
        r["speedup_vs_dense_3072"] = d3072["ms_median"] / r["ms_median"]
        r["cpu_time_speedup_vs_baseline"] = base["cpu_ms_median"] / r["cpu_ms_median"]
    return rows


# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    info, rows, errors = result["machine"], result["results"], result["output_max_abs_error"]
    lines = [
        "# CPU benchmark: FFF-v2 hard inference vs dense feedforward",
        "",
        f"UltraFastBERT 1x11 layer: H = {H}, FFF-v2 depth {DEPTH} ({tree.v2_nodes_per_tree(DEPTH)} neurons, "
        f"{DEPTH + 1} per token), float32. Machine: {info['cpu_model']}, {info['cores']} cores "
        f"({', '.join(f'{k} {v}' for k, v in info['caches'].items())}); jax {info['jax']}, torch {info.get('torch')}; "
        f"`GLIBC_TUNABLES={info['glibc_tunables'] or '(unset)'}`, "
        f"`OMP_WAIT_POLICY={info['omp_wait_policy'] or '(unset)'}`; load average before/after: "
        f"{info['loadavg_start']} / {info['loadavg_end']}.",
        "",
        bench.provenance_line({"date_utc": info.get("date_utc"), **result}),   # older files: the date in machine
        "",
        "Wall clock per call (median of the repeats, variants interleaved in one process). **Speedup** is "
        "relative to the fastest dense layer of width 4095 or 4096 (XLA or torch) at the same token count, "
        "named in the *baseline* column; *vs 3072* is relative to the fastest dense layer of width 3072. "
        "*CPU ms* is the process CPU time of the same calls (all threads), and *CPU-time speedup* its ratio "
        "to the baseline's: on a machine shared with other jobs it is steadier than wall clock (time spent "
        "waiting for a core is not counted), though spinning worker threads count against a variant.",
        "",
    ]
    for tokens in sorted({r["tokens"] for r in rows}):
        sub = [r for r in rows if r["tokens"] == tokens]
        lines += [f"## {tokens} tokens", "",
                  "| variant | ms (median) | ms (min) | repeats | tokens/s | speedup | baseline | vs 3072 "
                  "| CPU ms | CPU-time speedup |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in sub:
            lines.append(f"| {r['variant']} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | {r['repeats']} | "
                         f"{r['tokens_per_s']:.3g} | {r['speedup_vs_baseline']:.1f}x | {r['baseline']} | "
                         f"{r['speedup_vs_dense_3072']:.1f}x | {r['cpu_ms_median']:.2f} | "
                         f"{r['cpu_time_speedup_vs_baseline']:.1f}x |")
        lines.append("")
    names = sorted({k for errs in errors.values() for k in errs})
    lines += ["## Output check (max |error| vs the masked reference, first min(tokens, 2048) tokens)", "",
              "| tokens | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for tokens, errs in errors.items():
        lines.append(f"| {tokens} | " + " | ".join(f"{errs[k]:.2e}" if k in errs else "-" for k in names) + " |")
    lines.append("")
    lines += analysis_lines(rows)
    return "\n".join(lines)


def analysis_lines(rows: list[dict]) -> list[str]:
    """Where the time goes: bounds and the ablation rows of the largest token count, in numbers."""
    tokens = max(r["tokens"] for r in rows)
    ms = {r["variant"]: r["ms_median"] for r in rows if r["tokens"] == tokens}
    cpu = {r["variant"]: r["cpu_ms_median"] for r in rows if r["tokens"] == tokens}
    base = next(r for r in rows if r["tokens"] == tokens)["baseline"]
    fff_names = [n for n in ("fff_cpu_ffi", "fff_xla") if n in ms]
    best = min(fff_names, key=ms.get)
    levels, nodes = DEPTH + 1, tree.v2_nodes_per_tree(DEPTH)
    row_kb = levels * 2 * H * 4 / 1e3
    table_mb = nodes * 2 * H * 4 / 1e6
    xy_mb = 2 * tokens * H * 4 / 1e6
    lines = [
        f"## Where the time goes ({tokens} tokens)", "",
        f"Target: `fff_v2_hard` >= 50x faster than `{base}` ({ms[base]:.1f} ms). "
        + "; ".join(f"`{n}`: {ms[base] / ms[n]:.1f}x ({ms[n]:.2f} ms; CPU-time ratio {cpu[base] / cpu[n]:.1f}x)"
                    for n in fff_names)
        + f" -> target {'met' if ms[base] / ms[best] >= 50 else 'missed'} by `{best}` "
        "(`implementation=None` picks `cpu_ffi` on the CPU when it compiled, else `xla`).", "",
        "Bounds:",
        f"- FLOPs: a token does {levels} dot products and {levels} row updates of width {H} "
        f"({4 * levels * H / 1e3:.1f} kFLOP) against {4 * H * 4096 / 1e6:.1f} MFLOP in a dense layer of "
        f"width 4096: {4096 / levels:.0f}x fewer (the paper's 'theoretical 341x' is 4095/12).",
        f"- Bytes: every token reads {levels} rows of `w_in` and {levels} of `w_out`: {row_kb:.1f} kB, "
        f"{tokens * row_kb / 1e3:.0f} MB of row reads in all, from a table of {table_mb:.1f} MB (bigger than "
        "this machine's L2 and about its whole L3, which other processes share), plus "
        f"{xy_mb:.0f} MB of `x` in and `y` out.",
    ]
    if "ablation_write_floor" in ms:
        floor = ms["ablation_write_floor"]
        lines.append(f"- Memory floor: a jitted `x * 2` (reads `x`, writes an output of the same size) takes "
                     f"{floor:.2f} ms, so no layer that produces `y` can beat {ms[base] / floor:.0f}x here; "
                     f"`{best}` spends {100 * floor / ms[best]:.0f}% of its time at that floor.")
    if "ablation_xla_dense_12" in ms:
        lines.append(f"- A dense layer of just 12 neurons (no routing at all, the published 'fff-native' lower bound) "
                     f"takes {ms['ablation_xla_dense_12']:.2f} ms: {ms[base] / ms['ablation_xla_dense_12']:.0f}x.")
    lines += ["", "Ablations (same run, interleaved):"]
    notes = {
        "ablation_cpu_ffi_unsorted": "`cpu_ffi` with every level in token order (`FFFJAX_CPU_SORT=0`): the deep rows "
                                     "come from memory once per token instead of once per subtree",
        "ablation_cpu_ffi_1_thread": "`cpu_ffi` on one thread (`FFFJAX_CPU_THREADS=1`)",
        "ablation_cpu_ffi_depth_7": "`cpu_ffi` at depth 7 (8 levels, 0.8 MB per table: stays in L2/L3)",
        "ablation_xla_multiply_sum": "gathers, then multiply and sum (`xla_multiply_sum`)",
        "ablation_xla_routing_only": "the \"xla\" path's gathers and dots without the output stage",
        "ablation_xla_lax_map_1024": "the \"xla\" path over blocks of 1024 tokens with `lax.map`",
        "ablation_xla_fori_levels": "the \"xla\" path with a `fori_loop` over levels (multiply-sum)",
        "ablation_xla_dense_top_4": "the \"xla\" path with levels 0-3 (15 shared rows) as one matmul each way",
        "ablation_xla_sorted_by_path": "the \"xla\" path on tokens sorted by their level-8 node "
                                       "(argsort, permute, unpermute)",
        "ablation_xla_dense_4096_no_gelu": "the dense 4096 layer without its GELU",
    }
    for name, text in notes.items():
        if name in ms:
            ref = ("fff_cpu_ffi" if "cpu_ffi" in name
                   else "xla_dense_4096" if name.startswith("ablation_xla_dense_4096") else "fff_xla")
            lines.append(f"- {text}: {ms[name]:.2f} ms (vs `{ref}` {ms[ref]:.2f} ms).")
    lines += [
        "",
        "Why the \"xla\" path stays far from the target: XLA:CPU lowers each level's `w_in[node]` to a gather "
        "fusion that writes a (tokens, 1, H) buffer (50 MB at 16384 tokens), which an XNNPACK dot fusion then "
        "reads back (seen in the optimised HLO: `select_gather_fusion` -> `ynn_fusion`). Twelve levels of that "
        "are over a gigabyte of extra memory traffic, whichever way the contraction is written (einsum, "
        "multiply-sum, `lax.map` blocks, `fori_loop`, the top levels as a matmul: all within noise of each "
        "other above); sorting the tokens by path in XLA (argsort and two permutations of `x`/`y`) costs more "
        "than the cache locality it buys, because the gathered rows are materialised anyway. The C++ kernel "
        "(`fffjax/ops/_fff_cpu.cc`) keeps each token's `x` in L1, reads each row on its path once, walks the "
        "top levels in token order (their rows stay in L2), then counting-sorts tokens by subtree so that the "
        "deep rows of `w_in` and `w_out` come from memory once per subtree rather than once per token.",
        "",
        "The machine is shared with other jobs (load averages above): time slicing slows every variant, the "
        "compute-bound dense layers most, so ratios measured under load can flatter the FFF; the interleaving "
        "keeps the variants under the same conditions. The CPU-time columns approximate what a quiet machine "
        "would show; rerun the script on an idle machine for clean wall-clock figures.",
    ]
    return lines + [""]


def figure(rows: list[dict]):
    """Bars of ms per call and of speed-up over the baseline, per token count (ablations left out)."""
    plt = bench.pyplot()
    main = [r for r in rows if r["group"] != "ablation"]
    names = list(dict.fromkeys(r["variant"] for r in main))
    token_counts = sorted({r["tokens"] for r in main})
    fig, (ax_ms, ax_sp) = plt.subplots(1, 2, figsize=(14, 6.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ms = [next((r["ms_median"] for r in main if r["variant"] == name and r["tokens"] == t), np.nan)
              for t in token_counts]
        sp = [next((r["speedup_vs_baseline"] for r in main if r["variant"] == name and r["tokens"] == t), np.nan)
              for t in token_counts]
        xs = np.arange(len(token_counts)) + (i - len(names) / 2 + 0.5) * width
        ax_ms.bar(xs, ms, width, label=name)
        ax_sp.bar(xs, sp, width, label=name)
    for ax in (ax_ms, ax_sp):
        ax.set_xticks(np.arange(len(token_counts)), [str(t) for t in token_counts])
        ax.set_xlabel("tokens")
        ax.set_yscale("log")
    ax_ms.set_ylabel("ms per call (median)")
    ax_ms.set_title(f"H={H}, FFF-v2 depth {DEPTH} vs dense, fp32, CPU")
    ax_sp.axhline(50, color="k", ls="--", lw=1, label="50x target")
    ax_sp.set_ylabel("speedup vs fastest dense 4095/4096")
    ax_sp.set_title("speedup (baseline: fastest dense of width 4095/4096)")
    handles, labels = ax_sp.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 16384])
    parser.add_argument("--max-repeats", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=3.0, help="time per variant per token count")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-hugetlb", action="store_true", help="keep glibc's default malloc (4 KiB page faults)")
    parser.add_argument("--out", default=str(RESULTS / "bench_cpu"), help="path of the results without suffix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the existing .json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        saved = json.loads(out.with_suffix(".json").read_text())
        bench.write_results(out.parent, out.name, markdown=markdown(saved), figure=figure(saved["results"]))
        log(f"rewrote {out}.md, .png from {out}.json")
        return

    torch_mod = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(len(os.sched_getaffinity(0)))
            torch_mod = torch
        except ImportError:
            log("torch not installed: torch variants skipped")
    log("compiling / loading the cpu_ffi kernel")
    head = bench.provenance(__file__, argv)
    info = machine_info(torch_mod)
    info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    log(f"machine: {info['cpu_model']}, {info['cores']} cores, jax {info['jax']}, torch {info.get('torch')}, "
        f"GLIBC_TUNABLES={info['glibc_tunables']!r}, load {info['loadavg_start']}")
    rows, errors = [], {}
    for tokens in args.tokens:
        log(f"{tokens} tokens: building variants")
        variants, checks, reference = build_variants(tokens, args.seed, tokens == max(args.tokens), torch_mod)
        errors[tokens] = check_outputs(checks, reference, tokens)
        log(f"{tokens} tokens: outputs match the masked reference (max |err| {max(errors[tokens].values()):.2e})")
        times = bench.side_by_side({v.name: v.call for v in variants}, rounds=args.max_repeats, warmup=1,
                                   budget_s=args.budget_s, min_rounds=3, log=log)
        sub = summarise(tokens, variants, times)
        rows += sub
        for r in sub:
            log(f"  {r['variant']:34s} {r['ms_median']:10.3f} ms  {r['speedup_vs_baseline']:8.1f}x vs {r['baseline']}")
        info[f"loadavg_after_{tokens}"] = [round(v, 2) for v in os.getloadavg()]
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {**head, "config": {"H": H, "depth": DEPTH, "dtype": "float32", "tokens": args.tokens,
                                 "dense_widths": list(WIDTHS), "baselines": list(BASELINES)},
              "machine": info, "output_max_abs_error": {str(k): v for k, v in errors.items()}, "results": rows}
    bench.write_results(out.parent, out.name, report=result, markdown=markdown(result), figure=figure(rows))
    log(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
