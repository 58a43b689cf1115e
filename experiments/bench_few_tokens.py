"""Few-token latency of one FFF-v2 layer call (decoding batches) against the dense FF of the same width.

H = 768; layers 1x11, 4x9 and 16x7 (4095, 4092 and 4080 neurons); 1, 8, 64 and 256 tokens per call.
Every variant is jitted with its weights as arguments, as users call it:

* ``fff_default``: :func:`fffjax.fff_v2_hard` with the default implementation (on a GPU the
  ``"pallas"`` op, which picks the few-token walk up to
  :data:`pallas_kernels.fff_v2_forward.WALK_MAX_TOKENS` tokens; on the CPU ``"cpu_ffi"``).
* GPU only: ``fff_walk`` (the few-token kernel, :func:`~pallas_kernels.fff_v2_forward.walk_config`,
  forced), ``fff_walk_lookahead{L}`` (the same with the other ``lookahead`` values, to tune the default),
  ``fff_walk_lookahead{L}_warps8`` (8 warps, for L >= 4), ``fff_walk_lookahead{L}_warps{1,2}`` (1 or 2 warps,
  L = 1, 2: a level's dot product reduced within fewer warps), ``fff_walk_lookahead{L}_block1`` (one token per
  program where the walk takes several), ``fff_walk_tree_rows`` (several trees: one program per token, its
  trees as the rows of its tiles, ``tree_rows``), ``fff_walk_dense{L}`` (16-token blocks whose top L levels
  are one tensor-core dot over their nodes, ``dense_levels``: fewer dependent levels, fewer programs)
  and ``fff_above_threshold`` (the configuration :func:`~pallas_kernels.fff_v2_forward.default_config`
  picks just above the threshold: the grouped pipeline for 1x11, the 16-token blocks for several trees).
* ``dense_4095``: ``gelu(x @ w1 + b1) @ w2 + b2`` through XLA (cuBLAS on a GPU), exact GELU.

Three times per call. Latency: wall time of one jitted call until its output is ready (dispatch
included), median of samples interleaved round by round (:func:`fffjax.bench.side_by_side`). In a
jitted loop: ``--chain`` calls inside one ``fori_loop`` (:func:`fffjax.bench.chained`), without the
host's dispatch; every call reads one set of weights, which stays in a GPU's L2 cache (a 1x11 layer is
12.6 MB in bfloat16), and each iteration pays the loop's fixed cost. As a model's layers: ``--layer-sets``
calls written out one after another in one jitted program, each with its own weights
(:func:`fffjax.bench.chained_layers`), so that the weights come from HBM as in a model's step. FFF outputs
are checked against the float32 reference before timing (tokens with a routing logit within 1e-3 of
0 left out: bfloat16 may send them either way).

Run on the GPU machine (bfloat16)::

    python experiments/bench_few_tokens.py --out experiments/results

On 2 CPU cores (float32, ``cpu_ffi``; huge pages for malloc as in ``bench_cpu.py``)::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python experiments/bench_few_tokens.py \\
        --out experiments/results

Smoke run of every variant on the CPU (seconds)::

    python experiments/bench_few_tokens.py --layers 4x9 --tokens 3 --kernels --rounds 3 --budget-s 0.01
"""

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fffjax
from fffjax import bench, v2
from pallas_kernels import fff_v2_forward as fwd

WIDTH = 768
DENSE_WIDTH = 4095
LAYERS = {"1x11": (1, 11), "4x9": (4, 9), "16x7": (16, 7)}
LOOKAHEADS = (1, 2, 3, 4, 6)
WALK_WARPS = (1, 2)
WALK_DENSE_LEVELS = (4, 6)
RESULTS = Path(__file__).resolve().parent / "results"
log = bench.log


def dense(x, w1, b1, w2, b2):
    return jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2


def fff_weights(key, layer: str, dtype) -> tuple:
    """``(w_in, b_in, w_out)`` of one FFF-v2 layer of shape ``layer`` at H = :data:`WIDTH`."""
    n_trees, depth = LAYERS[layer]
    p = v2.init(key, WIDTH, depth, n_trees=n_trees, dtype=dtype)
    return p["w_in"], p["b_in"], p["w_out"]


def dense_weights(key, dtype) -> tuple:
    """``(w1, b1, w2, b2)`` of the dense FF of width :data:`DENSE_WIDTH` (the arguments of :func:`dense`)."""
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (WIDTH, DENSE_WIDTH), dtype) * 0.03, jnp.zeros((DENSE_WIDTH,), dtype),
            jax.random.normal(k2, (DENSE_WIDTH, WIDTH), dtype) * 0.03, jnp.zeros((WIDTH,), dtype))


def layer_sets(calls, layer: str, dtype, n_sets: int, seed: int = 0) -> dict[str, list[tuple]]:
    """Each variant's arguments for :func:`fffjax.bench.chained_layers`: its input beside ``n_sets`` distinct
    weight sets of its kind (FFF or dense), the first being the one it is otherwise timed with."""
    keys = jax.random.split(jax.random.key(seed + 1), 2 * (n_sets - 1))
    fff = [fff_weights(k, layer, dtype) for k in keys[:n_sets - 1]]
    dense_sets = [dense_weights(k, dtype) for k in keys[n_sets - 1:]]
    sets = {}
    for name, (_, args) in calls.items():
        others = dense_sets if name.startswith("dense") else fff
        sets[name] = [args] + [(args[0], *w) for w in others]
    return sets


def variants(layer: str, n_tokens: int, dtype, kernels: bool, seed: int = 0, only: list[str] | None = None):
    """``({name: (jitted fn, args)}, (x, weights, kwargs))`` for one layer and token count; ``kernels``:
    with the forced Pallas variants (interpreted off a GPU); ``only``: keep just these variant names."""
    n_trees, depth = LAYERS[layer]
    k_p, k_x, k_d = jax.random.split(jax.random.key(seed), 3)
    w = fff_weights(k_p, layer, dtype)
    x = jax.random.normal(k_x, (n_tokens, WIDTH), dtype)
    kw = {"depth": depth, "n_trees": n_trees}
    fns = {"fff_default": jax.jit(lambda x, a, b, c: fffjax.fff_v2_hard(x, a, b, c, **kw))}
    if kernels:
        interpret = jax.default_backend() != "gpu"

        def forced(config):
            return jax.jit(lambda x, a, b, c: fwd.fff_v2_forward(x, a, b, c, **kw, config=config,
                                                                  interpret=interpret))

        fns["fff_walk"] = forced(fwd.walk_config(n_tokens, n_trees))
        for la in LOOKAHEADS:
            if la != fwd.WALK_CONFIG.lookahead:
                base = fwd.dataclasses.replace(fwd.WALK_CONFIG, lookahead=la)
                fns[f"fff_walk_lookahead{la}"] = forced(fwd.walk_config(n_tokens, n_trees, base))
            if la >= 4:   # the wider rounds' tiles spread over twice the threads
                wide = fwd.dataclasses.replace(fwd.WALK_CONFIG, lookahead=la, num_warps=8)
                fns[f"fff_walk_lookahead{la}_warps8"] = forced(fwd.walk_config(n_tokens, n_trees, wide))
            if fwd.walk_config(n_tokens, n_trees).block_t > 1:   # one token per program however many there are
                one = fwd.dataclasses.replace(fwd.walk_config(n_tokens, n_trees), block_t=1, lookahead=la)
                fns[f"fff_walk_lookahead{la}_block1"] = forced(one)
        for warps in WALK_WARPS:   # fewer warps: the row's dot product reduced within fewer warps per level
            for la in (1, 2):
                few = fwd.dataclasses.replace(fwd.WALK_CONFIG, lookahead=la, num_warps=warps)
                fns[f"fff_walk_lookahead{la}_warps{warps}"] = forced(fwd.walk_config(n_tokens, n_trees, few))
        for top in WALK_DENSE_LEVELS:   # top levels as one tensor-core dot per 16-token block, then the walk
            tensor_top = fwd.dataclasses.replace(fwd.walk_config(n_tokens, n_trees), block_t=16, dense_levels=top)
            fns[f"fff_walk_dense{top}"] = forced(tensor_top)
        if n_trees > 1:   # one program per token, its trees walked together as the rows of its tiles
            rows = fwd.dataclasses.replace(fwd.WALK_CONFIG, tree_rows=True)
            fns["fff_walk_tree_rows"] = forced(fwd.walk_config(n_tokens, n_trees, rows))
        fns["fff_above_threshold"] = forced(fwd.default_config(depth, n_trees, fwd.WALK_MAX_TOKENS + 1, dtype))
    calls = {name: (fn, (x, *w)) for name, fn in fns.items()}
    calls[f"dense_{DENSE_WIDTH}"] = (jax.jit(dense), (x, *dense_weights(k_d, dtype)))
    if only:
        calls = {k: v for k, v in calls.items() if k in only or k == f"dense_{DENSE_WIDTH}"}
    return calls, (x, w, kw)


def first_call_s(calls) -> dict[str, float]:
    """Wall seconds of each variant's first call (tracing, compilation and one run)."""
    seconds = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds[name] = time.perf_counter() - start
    return seconds


def check(calls, x, w, kw) -> dict[str, float]:
    """Max |error| / max(1, max|ref|) of each FFF variant on the tie-free tokens."""
    ref = np.asarray(v2.conditional_forward(*(a.astype(jnp.float32) for a in (x, *w)), **kw))
    keep = np.asarray(v2.routing_margin(x.astype(jnp.float32), w[0].astype(jnp.float32), w[1].astype(jnp.float32),
                                        **kw) > 1e-3)[:, None]
    scale = max(1.0, float(np.max(np.abs(ref))))
    errors = {}
    for name, (fn, args) in calls.items():
        if name.startswith("fff"):
            y = np.asarray(fn(*args).astype(jnp.float32))
            errors[name] = float(np.max(np.where(keep, np.abs(y - ref), 0.0))) / scale
    return errors


def run(args, argv=None, on_cell=None) -> dict:
    """The results of every (layer, token count) cell; ``on_cell(results so far)`` after each cell, so that
    a run stopped by a time limit leaves the cells it finished."""
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    head = bench.provenance(__file__, argv)
    log(f"{head['command']} on {head['device_kind']}, {dtype.name}")
    rows = []
    env = {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "load_average_1min_before": os.getloadavg()[0]}
    for layer in args.layers:
        for n in args.tokens:
            calls, (x, w, kw) = variants(layer, n, dtype, on_gpu or args.kernels, only=args.variants)
            compile_s = first_call_s(calls)
            log(f"{layer} T={n} first calls: " + ", ".join(f"{k} {s:.1f} s" for k, s in compile_s.items()))
            errors = check(calls, x, w, kw)
            bad = {k: e for k, e in errors.items() if e > (1e-5 if dtype == jnp.float32 else 2e-2)}
            if bad:
                raise AssertionError(f"{layer} T={n}: outputs differ from the reference: {bad}")
            times = bench.side_by_side({k: (lambda fn=fn, a=a: fn(*a)) for k, (fn, a) in calls.items()},
                                       rounds=args.rounds, budget_s=args.budget_s, warmup=3)
            device = {k: bench.chained(fn, *a, calls=args.chain, budget_s=args.budget_s)
                      for k, (fn, a) in calls.items()}
            sets = layer_sets(calls, layer, dtype, args.layer_sets)
            layers = {k: bench.chained_layers(fn, sets[k], budget_s=args.budget_s) for k, (fn, _) in calls.items()}
            dense = f"dense_{DENSE_WIDTH}"
            for name, t in times.items():
                rows.append({"layer": layer, "tokens": n, "impl": name, "us": t.median_s * 1e6,
                             "min_us": t.min_s * 1e6, "samples": len(t.samples_s),
                             "vs_dense": t.median_s / times[dense].median_s, "device_us": device[name] * 1e6,
                             "device_vs_dense": device[name] / device[dense], "layers_us": layers[name] * 1e6,
                             "layers_vs_dense": layers[name] / layers[dense], "max_rel_error": errors.get(name),
                             "first_call_s": compile_s[name]})
            log(f"{layer} T={n}: " + ", ".join(
                f"{k} {t.median_s * 1e6:.1f} us (in a loop {device[k] * 1e6:.1f}, {args.layer_sets} layers "
                f"{layers[k] * 1e6:.1f})" for k, t in times.items()))
            if on_cell:
                on_cell({**head, **env, "dtype": dtype.name, "width": WIDTH, "dense_width": DENSE_WIDTH,
                         "layer_sets": args.layer_sets, "results": rows})
    env["load_average_1min_after"] = os.getloadavg()[0]
    return {**head, **env, "dtype": dtype.name, "width": WIDTH, "dense_width": DENSE_WIDTH,
            "layer_sets": args.layer_sets, "results": rows}


# (time key, ratio key, title) of each time per call the tables show
TIMES = (("us", "vs_dense", "latency of one call"), ("device_us", "device_vs_dense", "per call in a jitted loop"),
         ("layers_us", "layers_vs_dense", "per call over distinct weights, as a model's layers"))


def markdown(out: dict) -> str:
    rows = out["results"]
    device = out["device_kind"]
    lines = [f"# Few-token latency of one FFF-v2 layer call ({device})", "", bench.provenance_line(out), "",
             f"H = {out['width']}, {out['dtype']}, weights passed as jit arguments; microseconds per call: the "
             "latency of one call waited for (dispatch included, median of interleaved samples), the time per "
             "call inside a jitted loop of calls on one set of weights (no dispatch; the weights stay in a GPU's L2 "
             f"cache) and per call of {out.get('layer_sets', '?')} calls written out in one jitted program that each "
             "read their own weights (as a model's layers: read from HBM once they exceed the cache); in brackets "
             "the time over "
             f"the dense FF of width {out['dense_width']} (XLA) at the same token count, timed the same way. "
             "`fff_default` is `fffjax.fff_v2_hard` with the default implementation. "
             f"GLIBC_TUNABLES={out.get('glibc_tunables') or '(unset)'}; 1-minute load average "
             f"{out.get('load_average_1min_before', float('nan')):.2f} before, "
             f"{out.get('load_average_1min_after', float('nan')):.2f} after (the machine's other work included).", ""]
    counts = sorted({r["tokens"] for r in rows})
    for layer in LAYERS:
        lrows = [r for r in rows if r["layer"] == layer]
        if not lrows:
            continue
        impls = list(dict.fromkeys(r["impl"] for r in lrows))
        for key, ratio, title in TIMES:
            if not all(key in r for r in lrows):   # reports written before a column existed
                continue
            lines += [f"## {layer}: {title}", "", "| impl | " + " | ".join(f"{n} tok" for n in counts) + " |",
                      "|---" + "|---:" * len(counts) + "|"]
            for impl in impls:
                cells = []
                for n in counts:
                    r = next((r for r in lrows if r["impl"] == impl and r["tokens"] == n), None)
                    cells.append("-" if r is None else f"{r[key]:.1f} ({r[ratio]:.2f}x)")
                lines.append(f"| {impl} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Targets (issue 18, item 3)", ""]
    for _, ratio, what in TIMES:
        if not all(ratio in r for r in rows):
            continue
        for layer in LAYERS:
            got = [r for r in rows if r["layer"] == layer and r["impl"] == "fff_default"]
            if not got:
                continue
            every = all(r[ratio] <= 1.0 for r in got)
            lines.append(f"- {layer}, {what}: default FFF at or below the dense layer at every count: "
                         f"{'yes' if every else 'no'} (worst {max(r[ratio] for r in got):.2f}x).")
        at64 = next((r for r in rows if r["layer"] == "1x11" and r["impl"] == "fff_default" and r["tokens"] == 64),
                    None)
        if at64:
            lines.append(f"- 1x11 at 64 tokens, {what}: {at64[ratio]:.2f}x the dense layer "
                         f"(target <= 0.33x: {'met' if at64[ratio] <= 1 / 3 else 'not met'}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=0.5, help="time per variant per token count")
    parser.add_argument("--chain", type=int, default=16, help="calls per jitted loop of the device-time column")
    parser.add_argument("--layer-sets", type=int, default=16,
                        help="distinct weight sets (calls) of the column timed as a model's layers")
    parser.add_argument("--kernels", action="store_true",
                        help="time the forced Pallas variants off a GPU too (interpret mode: a smoke run only)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="time only these variants (the dense layer always runs; default: all)")
    parser.add_argument("--out", default=None, help="folder for few_tokens_{cpu,gpu}.{json,md} (default: print only)")
    args = parser.parse_args(argv)
    for flag, value in (("--chain", args.chain), ("--layer-sets", args.layer_sets)):
        if value < 1:
            parser.error(f"{flag}: expected a positive number of calls, got {value}")
    name = "few_tokens_gpu" if jax.default_backend() == "gpu" else "few_tokens_cpu"

    def save(out):
        if args.out:
            bench.write_results(args.out, name, report=out, markdown=markdown(out))

    out = run(args, argv, on_cell=save)
    save(out)
    print(markdown(out))


if __name__ == "__main__":
    main()
