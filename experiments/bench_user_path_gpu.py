"""The FFF-v2 layer on a GPU as a user calls it: forward, training step and their first-call times.

1x11 at H = 768, bfloat16, ``--tokens`` (default 2**20) tokens. Every variant is jitted in this process:

* Forward, side by side (:func:`fffjax.bench.side_by_side`, one call waited for per sample) and per
  call inside a jitted loop (:func:`fffjax.bench.chained`, no dispatch):
  - ``fff_args``: ``fffjax.fff_v2_hard`` with the default implementation, the weights jit arguments
    (what a user writes);
  - ``fff_closed``: the same with the weights closed over as jit constants (XLA may fold work on them
    at compile time), to tell how much of a gap between the two ways of timing comes from that;
  - ``dense_xla``: ``gelu(x @ w1 + b1) @ w2 + b2``, width 4096, weights as arguments (cuBLAS);
  - ``dense_torch``: ``torch.nn`` Linear-GELU-Linear of width 4096 (CUDA events), where torch is installed;
  - ``fff_chunkC[_rR]`` for each ``--chunk-tokens C`` (and ``--chunk-route-block R``): the Pallas op with
    the default tiles (route programs of ``R`` tokens) and the one-pass
    layout of ``C`` tokens per chunk (``FffV2ForwardConfig.chunk_tokens``), weights as arguments; its
    largest difference from ``fff_args`` is reported (0 when each token's output is bit for bit the same).
  The HBM roofline: x read once and y written once at the copy bandwidth measured in the same run.
* Training, each in its own jitted function of all inputs: ``jax.value_and_grad`` of
  ``sum(layer(x) * g)`` with respect to x and the weights, for the public op (default implementation)
  and for the masked dense reference (``implementation="reference"``) at ``--tokens``, then the
  float32 gradients of the public op against the reference's at ``--check-tokens`` (tokens near a
  routing tie given no upstream gradient, since either side may route them the other way). For each: the
  seconds to trace and lower, to compile, and the first run, then the step time (side by side).

The results are written after every phase (``--out``), so a run stopped by a time limit keeps what it
measured. Run on the GPU machine::

    python experiments/bench_user_path_gpu.py --out experiments/results
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import fffjax
from fffjax import bench, v2
from fffjax.bench import log

WIDTH, DEPTH, DENSE_WIDTH = 768, 11, 4096
NAME = "user_path_gpu"


def dense(x, w1, b1, w2, b2):
    return jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2


def first_call(fn, *args) -> tuple[dict, object]:
    """``({"lower_s", "compile_s", "run_s"}, compiled)``: the ahead-of-time phases of ``jax.jit(fn)``'s first call."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return {"lower_s": lower_s, "compile_s": compile_s, "run_s": time.perf_counter() - start}, compiled


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|)."""
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def layer_inputs(n_tokens: int, dtype, seed: int = 0):
    k_p, k_x, k_g = jax.random.split(jax.random.key(seed), 3)
    p = v2.init(k_p, WIDTH, DEPTH, dtype=dtype)
    x = jax.random.normal(k_x, (n_tokens, WIDTH), dtype)
    g = jax.random.normal(k_g, (n_tokens, WIDTH), jnp.float32)
    return x, (p["w_in"], p["b_in"], p["w_out"]), g


def chunked_layer(chunk_tokens: int, n_tokens: int, route_block_t: int | None = None):
    """The Pallas layer with the default tiles at ``n_tokens`` and the one-pass layout of ``chunk_tokens``
    (and ``route_block_t`` tokens per route program, None: the default's)."""
    import dataclasses

    from pallas_kernels import fff_v2_forward as fwd

    config = dataclasses.replace(fwd.default_config(DEPTH, 1, n_tokens, jnp.bfloat16), chunk_tokens=chunk_tokens)
    if route_block_t is not None:
        config = dataclasses.replace(config, route_block_t=route_block_t)
    return lambda x, a, b, c: fwd.fff_v2_forward(x, a, b, c, depth=DEPTH, config=config)


def training_fn(implementation):
    def loss(x, w_in, b_in, w_out, g):
        y = fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=DEPTH, implementation=implementation)
        return jnp.sum(y.astype(jnp.float32) * g)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def run(args, argv, save) -> dict:
    out = {**bench.provenance(__file__, argv), "tokens": args.tokens, "width": WIDTH, "depth": DEPTH,
           "dense_width": DENSE_WIDTH, "forward": {}, "training": {}}
    log(f"{out['command']} on {out['device_kind']}, jax {jax.__version__}")
    out["copy_bandwidth"] = bench.copy_bandwidth()
    out["roofline_ms"] = args.tokens * 2 * WIDTH * 2 / out["copy_bandwidth"] * 1e3
    log(f"copy bandwidth {out['copy_bandwidth'] / 1e12:.2f} TB/s, roofline {out['roofline_ms']:.3f} ms")

    x, w, g = layer_inputs(args.tokens, jnp.bfloat16)
    k1, k2 = jax.random.split(jax.random.key(1))
    bf16 = jnp.bfloat16
    dense_w = (jax.random.normal(k1, (WIDTH, DENSE_WIDTH), bf16) * 0.03, jnp.zeros((DENSE_WIDTH,), bf16),
               jax.random.normal(k2, (DENSE_WIDTH, WIDTH), bf16) * 0.03, jnp.zeros((WIDTH,), bf16))
    fns = {"fff_args": (lambda x, a, b, c: fffjax.fff_v2_hard(x, a, b, c, depth=DEPTH), (x, *w)),
           "fff_closed": (lambda x: fffjax.fff_v2_hard(x, *w, depth=DEPTH), (x,)),
           "dense_xla": (dense, (x, *dense_w))}
    one_pass = [(f"fff_chunk{c}" + (f"_r{r}" if r else ""), c, r) for c in args.chunk_tokens
                for r in (args.chunk_route_block or [None])]
    for name, chunk, route_block in one_pass:
        fns[name] = (chunked_layer(chunk, args.tokens, route_block), (x, *w))
    compiled = {}
    one_pass_names = {name for name, _, _ in one_pass}
    for name, (fn, fargs) in list(fns.items()):
        try:
            out["forward"][name], compiled[name] = first_call(fn, *fargs)
        except Exception as error:
            if name not in one_pass_names:
                raise
            # A one-pass variant that fails to build is reported, and the other variants are still timed.
            out["forward"][name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            del fns[name]
        log(f"{name}: first call {out['forward'][name]}")
    one_pass = [entry for entry in one_pass if entry[0] in fns]
    times = bench.side_by_side({k: (lambda c=compiled[k], a=fns[k][1]: c(*a)) for k in fns}, rounds=args.rounds,
                               budget_s=args.budget_s, log=log)
    for name, t in times.items():
        row = out["forward"][name]
        row["ms"] = t.median_s * 1e3
        row["chained_ms"] = bench.chained(jax.jit(fns[name][0]), *fns[name][1], calls=8, budget_s=args.budget_s) * 1e3
        row["of_roofline"] = out["roofline_ms"] / row["ms"]
        log(f"{name}: {row['ms']:.3f} ms per call, {row['chained_ms']:.3f} ms chained")
    want = np.asarray(compiled["fff_args"](*fns["fff_args"][1]).astype(jnp.float32))
    for name, _, _ in one_pass:
        got = np.asarray(compiled[name](*fns[name][1]).astype(jnp.float32))
        out["forward"][name]["max_abs_diff_from_fff_args"] = float(np.max(np.abs(got - want)))
    torch_ms = bench.torch_dense_ms(WIDTH, DENSE_WIDTH, "bfloat16", args.tokens)
    if torch_ms is not None:
        out["forward"]["dense_torch"] = {"ms": torch_ms}
        log(f"dense_torch: {torch_ms:.3f} ms")
    save(out)
    if args.skip_training:
        return out

    for name, impl in (("fff_public_op", None), ("masked_reference", "reference")):
        phases, step = first_call(training_fn(impl), x, *w, g)
        log(f"training {name}: first call {phases}")
        t = bench.side_by_side({name: lambda s=step: s(x, *w, g)}, rounds=args.rounds, budget_s=args.budget_s)[name]
        out["training"][name] = {**phases, "tokens": args.tokens, "dtype": "bfloat16", "step_ms": t.median_s * 1e3}
        log(f"training {name}: {t.median_s * 1e3:.3f} ms per step")
        del step
        save(out)

    xs, ws, gs = layer_inputs(args.check_tokens, jnp.float32)
    # A token within 1e-3 of a routing tie may take the other branch in either implementation: it gets
    # no upstream gradient, so that it enters neither dx nor the weight gradients of the comparison.
    tie_free = v2.routing_margin(xs, ws[0], ws[1], depth=DEPTH) > 1e-3
    gs = gs * tie_free[:, None].astype(gs.dtype)
    phases, step = first_call(training_fn(None), xs, *ws, gs)
    got = step(xs, *ws, gs)
    want = jax.jit(training_fn("reference"))(xs, *ws, gs)
    errors = [relative_error(np.asarray(a), np.asarray(b)) for a, b in zip(got[1], want[1])]
    out["training"]["fp32_gradient_check"] = {**phases, "tokens": args.check_tokens, "dtype": "float32",
                                              "near_ties_without_gradient": int(np.sum(~np.asarray(tie_free))),
                                              "max_rel_error_dx_dw_in_db_in_dw_out": errors}
    log(f"fp32 gradient check at {args.check_tokens}: first call {phases}, relative errors {errors}")
    save(out)
    return out


def markdown(out: dict) -> str:
    fwd, train = out["forward"], out["training"]
    lines = [f"# The FFF-v2 layer as users call it ({out['device_kind']})", "", bench.provenance_line(out), "",
             f"1x11, H = {out['width']}, bfloat16, {out['tokens']:,} tokens. Copy bandwidth in this run "
             f"{out['copy_bandwidth'] / 1e12:.2f} TB/s (read + write); roofline = x read once + y written once at "
             f"that rate: {out['roofline_ms']:.3f} ms. *per call*: one jitted call waited for, median of samples "
             "interleaved round by round; *chained*: per call inside a jitted loop of 8 (no dispatch). First "
             "call: `jax.jit(f).lower(...)` (tracing and lowering), `.compile()`, the first run.", "",
             "## Forward", "", "| variant | per call ms | chained ms | of roofline | dense XLA / this | "
             "lower s | compile s | first run s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in fwd.items():
        if "lower_s" not in row:
            continue
        ratio = fwd["dense_xla"]["ms"] / row["ms"] if "ms" in fwd.get("dense_xla", {}) and "ms" in row else float("nan")
        lines.append(f"| {name} | {row.get('ms', float('nan')):.3f} | {row.get('chained_ms', float('nan')):.3f} | "
                     f"{row.get('of_roofline', float('nan')):.1%} | {ratio:.2f}x | {row['lower_s']:.1f} | "
                     f"{row['compile_s']:.1f} | {row['run_s']:.2f} |")
    if "dense_torch" in fwd and "ms" in fwd.get("fff_args", {}):
        lines += ["", f"torch Linear-GELU-Linear (width {out['dense_width']}, CUDA events): "
                  f"{fwd['dense_torch']['ms']:.3f} ms = **{fwd['dense_torch']['ms'] / fwd['fff_args']['ms']:.1f}x** "
                  "the public op's time."]
        for name, row in fwd.items():
            if name.startswith("fff_chunk") and "ms" in row:
                lines.append(f"{name}: torch's time / its time **{fwd['dense_torch']['ms'] / row['ms']:.1f}x**.")
    failed = [f"{name} ({row['error']})" for name, row in fwd.items() if "error" in row]
    if failed:
        lines += ["", "Failed to build: " + "; ".join(failed) + "."]
    diffs = [f"{name} {row['max_abs_diff_from_fff_args']:g}" for name, row in fwd.items()
             if "max_abs_diff_from_fff_args" in row]
    if diffs:
        lines += ["", "Largest |difference| of each one-pass output from `fff_args`'s: " + ", ".join(diffs) + "."]
    if train:
        lines += ["", "## Training (value_and_grad of sum(layer(x) * g) for x and the weights)", "",
                  "| path | tokens | dtype | lower s | compile s | first run s | step ms |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for name, row in train.items():
            step = f"{row['step_ms']:.3f}" if "step_ms" in row else "-"
            lines.append(f"| {name} | {row['tokens']:,} | {row['dtype']} | {row['lower_s']:.1f} | "
                         f"{row['compile_s']:.1f} | {row['run_s']:.2f} | {step} |")
        check = train.get("fp32_gradient_check")
        if check:
            scope = (f"the {check['near_ties_without_gradient']} tokens within 1e-3 of a routing tie given no upstream "
                     "gradient" if "near_ties_without_gradient" in check else "dx on tie-free tokens")
            lines += ["", f"fp32 gradient check (public op against the masked reference; {scope}), max "
                      "relative error of dx, dw_in, db_in, dw_out: "
                      + ", ".join(f"{e:.1e}" for e in check["max_rel_error_dx_dw_in_db_in_dw_out"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2**20)
    parser.add_argument("--check-tokens", type=int, default=2**16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk-tokens", type=int, nargs="*", default=[],
                        help="also time the one-pass layout with these tokens per chunk")
    parser.add_argument("--chunk-route-block", type=int, nargs="*", default=[],
                        help="route programs' tokens for the one-pass variants (default: the default tiles')")
    parser.add_argument("--skip-training", action="store_true", help="forward only")
    parser.add_argument("--budget-s", type=float, default=1.0, help="time per variant")
    parser.add_argument("--out", default=None, help=f"folder of {NAME}.{{json,md}} (default: print only)")
    args = parser.parse_args(argv)

    def save(out):
        if args.out:
            bench.write_results(args.out, NAME, report=out, markdown=markdown(out))

    out = run(args, argv, save)
    print(markdown(out))


if __name__ == "__main__":
    main()
