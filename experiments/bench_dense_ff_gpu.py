"""How fast the dense twin's feedforward can run, GELU variants side by side on one GPU.

Crammed BERT's ``dense_out(GELU(dense_in(x)))`` at UltraFastBERT ``base`` shapes
(``x (B*S, 768)`` bf16, width 3072, exact GELU).

Variants (each runs ``--layers`` independent feedforwards in one jitted function, as the encoder's 16
layers; GEMMs are XLA's, i.e. cuBLAS):
- ``jax.nn.gelu``: ``jax.nn.gelu(approximate=False)``, which XLA lowers to ``0.5 x erfc(-x / sqrt 2)``
  in the input dtype;
- ``xla erf f32``: ``0.5 x (1 + erf(x / sqrt 2))`` in float32 through XLA's ``erf``;
- ``pallas BLOCKxWARPS``: :func:`pallas_kernels.gelu.gelu` (float32 rational erf, one read and one
  write) with each ``GeluConfig`` of ``--gelu-configs``;
- ``tanh (not exact)``: ``jax.nn.gelu(approximate=True)``, which cuBLAS can fuse into the GEMM: a lower
  bound, not crammed BERT's function;
- ``no GELU``: the two GEMMs alone.

Reported per layer (:func:`fffjax.bench.per_layer`): GPU kernel time from a profiler trace, wall
time over a stream of calls, the GELU pass alone (:func:`fffjax.bench.profile_kernels`), and the HBM
time of the GELU's read and write at the copy rate of the same run
(:func:`fffjax.bench.copy_bandwidth`). Writes ``dense_ff_gpu.json`` and ``.md`` to ``--out``.

Run on the GPU machine (under a minute)::

    python experiments/bench_dense_ff_gpu.py --out $OUT
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from fffjax import bench
from pallas_kernels.gelu import GeluConfig
from pallas_kernels.gelu import gelu as pallas_gelu

# GeluConfig fields in the order of --gelu-configs' BLOCKxWARPS.
GELU_TILES = ("block", "num_warps")


def _erf_f32(h):
    h32 = h.astype(jnp.float32)
    return (0.5 * h32 * (1.0 + jax.lax.erf(h32 * 0.7071067811865476))).astype(h.dtype)


GELUS = {
    "jax.nn.gelu": lambda h: jax.nn.gelu(h, approximate=False),
    "xla erf f32": _erf_f32,
    "tanh (not exact)": lambda h: jax.nn.gelu(h, approximate=True),
    "no GELU": lambda h: h,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tokens", type=int, default=256 * 128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--gelu-configs", default="4096x8,1024x4,2048x4,8192x8,16384x8",
                    help="comma list of the Pallas kernel's block x num_warps")
    args = ap.parse_args(argv)
    gelus = dict(GELUS)
    for text in args.gelu_configs.split(","):
        config = GeluConfig(**bench.parse_fields(text, GELU_TILES))
        gelus[f"pallas {text}"] = lambda h, c=config: pallas_gelu(h, interpret=jax.default_backend() != "gpu", config=c)
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 2 * args.layers + 1)
    x = jax.random.normal(keys[0], (args.tokens, args.hidden), dtype)
    w_in = [jax.random.normal(k, (args.hidden, args.width), dtype) * 0.02 for k in keys[1:args.layers + 1]]
    w_out = [jax.random.normal(k, (args.width, args.hidden), dtype) * 0.02 for k in keys[args.layers + 1:]]
    pre = x @ w_in[0]
    bandwidth = bench.copy_bandwidth()
    gelu_hbm_ms = 2 * pre.nbytes / bandwidth * 1e3
    reference = jax.nn.gelu(pre.astype(jnp.float32), approximate=False)
    rows = []
    for name, act in gelus.items():
        ff = jax.jit(lambda x, w_in, w_out, act=act: [act(x @ a) @ b for a, b in zip(w_in, w_out)])
        alone = jax.jit(lambda hs, act=act: [act(h) for h in hs])
        hs = [pre] * args.layers
        err = float(jnp.max(jnp.abs(act(pre).astype(jnp.float32) - reference)))
        ff_kernel_ms, ff_wall_ms, ff_summary = bench.per_layer(ff, x, w_in, w_out, layers=args.layers)
        alone_summary = (bench.profile_kernels(alone, hs, warmup=1) if name != "no GELU"
                         else {"busy_ms": 0.0, "ops": []})
        row = {"variant": name, "max_abs_err_vs_f32_erf_gelu": err,
               "ff_kernel_ms_per_layer": ff_kernel_ms, "ff_wall_ms_per_layer": ff_wall_ms,
               "gelu_kernel_ms_per_layer": alone_summary["busy_ms"] / args.layers,
               "gelu_vs_hbm": alone_summary["busy_ms"] / args.layers / gelu_hbm_ms,
               "ff_top_ops": ff_summary["ops"][:4]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {**bench.provenance(__file__, argv), "tokens": args.tokens, "hidden": args.hidden, "width": args.width,
              "layers": args.layers, "copy_bandwidth_gb_s": bandwidth / 1e9, "gelu_hbm_ms_per_layer": gelu_hbm_ms,
              "rows": rows}
    bench.write_results(args.out, "dense_ff_gpu", report=report, markdown=markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# The dense twin's feedforward on " + (report.get("device_kind") or report["device"]),
        "",
        f"`{report['tokens']} x {report['hidden']}` bf16 tokens, width {report['width']}, "
        f"{report['layers']} independent layers per call; per layer. GELU's HBM time (one read, one write of "
        f"`{report['tokens']} x {report['width']}` bf16 at {report['copy_bandwidth_gb_s']:.0f} GB/s): "
        f"{report['gelu_hbm_ms_per_layer']:.3f} ms.",
        "",
        bench.provenance_line(report),
        "",
        "| GELU | max abs err vs float32 erf GELU | FF kernel time (ms) | FF wall, stream (ms) | GELU alone (ms) "
        "| GELU vs HBM time |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['max_abs_err_vs_f32_erf_gelu']:.2e} | {r['ff_kernel_ms_per_layer']:.3f} | "
                     f"{r['ff_wall_ms_per_layer']:.3f} | {r['gelu_kernel_ms_per_layer']:.3f} | "
                     f"{r['gelu_vs_hbm']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
