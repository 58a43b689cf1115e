"""The grouped FFF-v2 forward's two ways to route tokens through the top levels, side by side.

A 1x11 layer (H = 768, one tree of depth 11), bf16, grouped kernel with ``split_level = 7``
(:func:`pallas_kernels.fff_v2_forward.default_config`), for each token count of ``--tokens``:
- ``kernel``: the route kernel (top logits in registers, 4 bytes per token to HBM);
- ``gemm``: one XLA (cuBLAS) matmul writing the ``(T, 127)`` float32 top logits, then the descent;
- each of ``--configs``: ``rBTxCxWxS``, the route kernel with route_block_t x route_chunk x
  route_num_warps x route_num_stages; ``gBTxCxWxS``, the grouped kernel with block_t x chunk x
  num_warps x num_stages (the rest as the default config); ``+`` joins both, e.g.
  ``r128x64x8x3+g128x64x8x3``.

Each variant runs ``--layers`` (default: enough for 2**19 tokens in all) independent layers in one
jitted function; reported per layer (:func:`fffjax.bench.per_layer`): GPU kernel time from a
profiler trace (and its longest ops), and wall time over a stream of calls. Writes
``fff_route_gpu.json`` and ``.md`` to ``--out``.

Run on the GPU machine (about a minute)::

    python experiments/bench_fff_route_gpu.py --out $OUT
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from fffjax import bench, v2
from pallas_kernels.fff_v2_forward import ROUTES, default_config, fff_v2_forward

WIDTH, DEPTH = 768, 11


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tokens", default="32768,131072,1048576", help="comma list of token counts")
    ap.add_argument("--layers", type=int, default=None, help="layers per call (default: 2**19 tokens in all)")
    ap.add_argument("--configs", default="", help="comma list of tiles to time as well: rBTxCxWxS (route kernel), "
                                                  "gBTxCxWxS (grouped kernel)")
    args = ap.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    dtype = jnp.bfloat16
    rows = []
    for n_tokens in (int(t) for t in args.tokens.split(",")):
        layers = args.layers or max(1, 2**19 // n_tokens)
        keys = jax.random.split(jax.random.key(n_tokens), layers + 1)
        x = jax.random.normal(keys[0], (n_tokens, WIDTH), dtype)
        params = [v2.init(k, WIDTH, DEPTH, dtype=dtype) for k in keys[1:]]
        outputs = {}
        base = default_config(DEPTH, 1, n_tokens, dtype)
        variants = {route: dataclasses.replace(base, route=route) for route in ROUTES}
        for text in filter(None, args.configs.split(",")):
            variants[f"kernel {text}"] = dataclasses.replace(base, route="kernel", **tiles(text))
        for route, config in variants.items():

            def one(x, p, config=config):
                return fff_v2_forward(x, p["w_in"], p["b_in"], p["w_out"], depth=DEPTH, config=config,
                                      interpret=interpret)

            fn = jax.jit(lambda x, ps, one=one: [one(x, p) for p in ps])
            try:
                outputs[route] = one(x, params[0]).astype(jnp.float32)
                kernel_ms, wall_ms, summary = bench.per_layer(fn, x, params, layers=layers, calls=5, warmup=1,
                                                              repeats=3)
            except Exception as e:   # e.g. tiles that need more shared memory than the GPU has
                print(f"{n_tokens} {route}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            row = {"tokens": n_tokens, "route": route, "layers": layers, "config": str(config),
                   "kernel_ms_per_layer": kernel_ms, "wall_ms_per_layer": wall_ms,
                   "top_ops": [{**o, "ms": o["ms"] / layers} for o in summary["ops"][:8]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if route != "kernel":
                row["max_abs_diff_vs_kernel_route"] = float(jnp.max(jnp.abs(outputs[route] - outputs["kernel"])))
    report = {**bench.provenance(__file__, argv), "width": WIDTH, "depth": DEPTH, "dtype": "bfloat16", "rows": rows}
    bench.write_results(args.out, "fff_route_gpu", report=report, markdown=markdown(report))
    print(markdown(report))


# FffV2ForwardConfig fields of --configs' tiles, in their order: r = route kernel, g = grouped kernel.
TILES = {"r": ("route_block_t", "route_chunk", "route_num_warps", "route_num_stages"),
         "g": ("block_t", "chunk", "num_warps", "num_stages")}


def tiles(text: str) -> dict:
    """``"rBTxCxWxS+gBTxCxWxS"`` (either part optional) -> the FffV2ForwardConfig fields it sets."""
    out = {}
    for part in text.split("+"):
        if part[:1] not in TILES:
            raise ValueError(f"--configs: expected tiles starting with 'r' or 'g', got {part!r}")
        out.update(bench.parse_fields(part[1:], TILES[part[0]]))
    return out


def markdown(report: dict) -> str:
    lines = [f"# Routing the grouped FFF-v2 forward on {report.get('device_kind') or report['device']}", "",
             f"1x{report['depth']} layer, H = {report['width']}, bf16; per layer.", "",
             bench.provenance_line(report), "",
             "| tokens | route | kernel time (ms) | wall, stream (ms) | longest ops (ms) |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        ops = ", ".join(f"{o['op']} {o['ms']:.4f}" for o in r["top_ops"][:5])
        lines.append(f"| {r['tokens']:,} | {r['route']} | {r['kernel_ms_per_layer']:.4f} | "
                     f"{r['wall_ms_per_layer']:.4f} | {ops} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
