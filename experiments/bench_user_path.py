"""The FFF-v2 layer as users call it, against the benchmark's way, and the first-call cost of its training path.

Forward, 1x11 at H=768 (default 2^20 bfloat16 tokens), four ways of building the jitted call:

* ``public, weights as arguments``: ``jax.jit(lambda x, w_in, b_in, w_out: fffjax.fff_v2_hard(...))``, the
  default implementation (how users call it);
* ``public, weights as constants``: the same with the weights closed over (XLA may fold work on them
  at compile time);
* ``kernel, weights as arguments`` / ``kernel, weights as constants``: ``pallas_kernels.fff_v2_hard`` with
  :data:`~pallas_kernels.fff_v2_forward.GROUPED_CONFIG`, as ``experiments/bench_gpu.py`` builds it
  (constants);

each timed three ways: one call waited for (:func:`fffjax.bench.latency`), calls sent back to back
(:func:`fffjax.bench.stream`, as ``bench_gpu.py`` times), and per call inside a jitted loop
(:func:`fffjax.bench.chained`). The dense FF of width 4096 (XLA) with its weights as arguments is timed
beside them. The 2x4 grid separates the two candidate causes of a gap between the benchmark and the
user's call: constants against arguments, and the timing method. XLA's cost analysis (bytes accessed)
of each compiled call is recorded too.

Training path, each stage's seconds written as soon as it ends (a time limit leaves the stages done):
``jax.value_and_grad`` of the public op (default implementation) at the same tokens: lowering,
compilation, first run, then the step's median; the same for the masked reference; then a float32
gradient check at 2^16 tokens (the public op's gradients against the masked reference's).

GPU::

    python experiments/bench_user_path.py --out experiments/results

CPU smoke run::

    python experiments/bench_user_path.py --tokens-log2 8 8 --hidden 64 --depth 4 --budget-s 0.01
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fffjax
import pallas_kernels as pk
from fffjax import bench, v2
from pallas_kernels import fff_v2_forward as fwd

log = bench.log


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--depth", type=int, default=11)
    ap.add_argument("--tokens-log2", type=int, nargs=2, default=[20, 16], metavar=("MAIN", "CHECK"),
                    help="log2 tokens of the forward and training runs, and of the float32 gradient check")
    ap.add_argument("--dense-width", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="folder of user_path_{gpu,cpu}.{json,md}")
    return ap.parse_args(argv)


def compiled_bytes(fn, *args) -> float | None:
    """XLA's estimate of the bytes the compiled call accesses (None where the backend gives none)."""
    try:
        cost = fn.lower(*args).compile().cost_analysis()
    except Exception:                                   # backends without a cost model
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("bytes accessed", float("nan"))) if cost else None


def forward_grid(args, x, w, dense_w, kw) -> list[dict]:
    interpret = jax.default_backend() != "gpu"
    config = fwd.GROUPED_CONFIG if jax.default_backend() == "gpu" else None
    variants = {
        ("public", "arguments"): (jax.jit(lambda x, a, b, c: fffjax.fff_v2_hard(x, a, b, c, **kw)), (x, *w)),
        ("public", "constants"): (jax.jit(lambda x: fffjax.fff_v2_hard(x, *w, **kw)), (x,)),
        ("kernel", "arguments"): (jax.jit(lambda x, a, b, c: pk.fff_v2_hard(x, a, b, c, **kw, config=config,
                                                                           interpret=interpret)), (x, *w)),
        ("kernel", "constants"): (jax.jit(lambda x: pk.fff_v2_hard(x, *w, **kw, config=config,
                                                                   interpret=interpret)), (x,)),
        ("dense", "arguments"): (jax.jit(lambda x, w1, b1, w2, b2: jax.nn.gelu(x @ w1 + b1, approximate=False)
                                         @ w2 + b2), (x, *dense_w)),
    }
    rows = []
    for (path, weights), (fn, a) in variants.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*a))
        first = time.perf_counter() - start
        row = {"path": path, "weights": weights, "first_call_s": first,
               "one_call_ms": bench.latency(fn, *a, calls=5) * 1e3,
               "back_to_back_ms": bench.stream(fn, *a, calls=None, budget_s=args.budget_s) * 1e3,
               "in_loop_ms": bench.chained(fn, *a, calls=8, budget_s=args.budget_s) * 1e3,
               "bytes_accessed": compiled_bytes(fn, *a)}
        rows.append(row)
        log(f"forward {path}, weights as {weights}: one call {row['one_call_ms']:.3f} ms, back to back "
            f"{row['back_to_back_ms']:.3f} ms, in a loop {row['in_loop_ms']:.3f} ms (first call {first:.1f} s)")
    return rows


def timed_stages(name: str, fn, *args, budget_s: float) -> dict:
    """Lowering, compilation and first-run seconds of ``jax.jit(fn)``, then its median step in ms."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    step = bench.latency(compiled, *args, calls=3, warmup=1)
    out = {"stage": name, "lower_s": t1 - t0, "compile_s": t2 - t1, "first_run_s": t3 - t2, "step_ms": step * 1e3}
    log(f"{name}: lower {out['lower_s']:.1f} s, compile {out['compile_s']:.1f} s, first run "
        f"{out['first_run_s']:.2f} s, step {out['step_ms']:.3f} ms")
    return out


def training_path(args, x, w, kw, report, save) -> None:
    def loss_public(x, a, b, c):
        return jnp.sum(fffjax.fff_v2_hard(x, a, b, c, **kw).astype(jnp.float32) ** 2)

    def loss_masked(x, a, b, c):
        return jnp.sum(v2.masked_forward(x, a, b, c, **kw).astype(jnp.float32) ** 2)

    grads = {"public": jax.value_and_grad(loss_public, argnums=(0, 1, 2, 3)),
             "masked reference": jax.value_and_grad(loss_masked, argnums=(0, 1, 2, 3))}
    for name, fn in grads.items():
        report["training"].append(timed_stages(f"value_and_grad, {name}, {x.shape[0]} {x.dtype} tokens", fn, x, *w,
                                               budget_s=args.budget_s))
        save()
    n_check = 2 ** args.tokens_log2[1]
    x32, w32 = x[:n_check].astype(jnp.float32), tuple(a.astype(jnp.float32) for a in w)
    start = time.perf_counter()
    (_, g_public), (_, g_ref) = (jax.jit(grads[k])(x32, *w32) for k in grads)
    keep = np.asarray(v2.routing_margin(x32, w32[0], w32[1], **kw) > 1e-3)
    errors = []
    for gp, gr in zip(g_public, g_ref, strict=True):
        gp, gr = np.asarray(gp), np.asarray(gr)
        if gp.shape[0] == n_check:                     # d/dx: compare tie-free tokens only
            gp, gr = gp[keep], gr[keep]
        errors.append(float(np.abs(gp - gr).max() / max(1e-30, float(np.abs(gr).max()))))
    report["gradient_check"] = {"tokens": n_check, "seconds": time.perf_counter() - start,
                                "max_rel_error_x_w_in_b_in_w_out": errors}
    log(f"float32 gradient check at {n_check} tokens: {report['gradient_check']['seconds']:.1f} s, errors {errors}")
    save()


def markdown(report: dict) -> str:
    lines = [f"# FFF-v2 as users call it ({report['device_kind']})", "", bench.provenance_line(report), "",
             f"H = {report['hidden']}, 1x{report['depth']}, {report['tokens']} {report['dtype']} tokens. ms per call.",
             "", "## Forward", "",
             "| path | weights | one call waited | back to back | in a jitted loop | first call s | bytes accessed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["forward"]:
        nbytes = f"{r['bytes_accessed'] / 1e6:.1f} MB" if (r["bytes_accessed"] or 0) > 0 else "-"
        lines.append(f"| {r['path']} | {r['weights']} | {r['one_call_ms']:.3f} | {r['back_to_back_ms']:.3f} | "
                     f"{r['in_loop_ms']:.3f} | {r['first_call_s']:.1f} | {nbytes} |")
    lines += ["", "## Training path", "", "| stage | lower s | compile s | first run s | step ms |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['first_run_s']:.2f} | "
              f"{r['step_ms']:.3f} |" for r in report["training"]]
    if "gradient_check" in report:
        g = report["gradient_check"]
        lines += ["", f"Float32 gradient check at {g['tokens']} tokens (public op against the masked reference, "
                  f"compilation included): {g['seconds']:.1f} s; max relative errors (x, w_in, b_in, w_out): "
                  + ", ".join(f"{e:.1e}" for e in g["max_rel_error_x_w_in_b_in_w_out"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse(argv)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    kw = {"depth": args.depth}
    p = v2.init(jax.random.key(0), args.hidden, args.depth, dtype=dtype)
    w = (p["w_in"], p["b_in"], p["w_out"])
    n = 2 ** args.tokens_log2[0]
    x = jax.random.normal(jax.random.key(1), (n, args.hidden), dtype)
    k1, k2 = jax.random.split(jax.random.key(2))
    dense_w = (jax.random.normal(k1, (args.hidden, args.dense_width), dtype) * 0.03,
               jnp.zeros((args.dense_width,), dtype),
               jax.random.normal(k2, (args.dense_width, args.hidden), dtype) * 0.03, jnp.zeros((args.hidden,), dtype))
    report = {**bench.provenance(__file__, argv if argv is not None else sys.argv[1:]), "hidden": args.hidden,
              "depth": args.depth, "tokens": n, "dtype": jnp.dtype(dtype).name, "forward": [], "training": []}
    name = "user_path_gpu" if on_gpu else "user_path_cpu"

    def save():
        if args.out:
            bench.write_results(args.out, name, report=report, markdown=markdown(report))

    report["forward"] = forward_grid(args, x, w, dense_w, kw)
    save()
    training_path(args, x, w, kw, report, save)
    print(markdown(report))
    if args.out:
        log(f"wrote {Path(args.out) / name}.json: {json.dumps(report['gradient_check'])}")


if __name__ == "__main__":
    main()
