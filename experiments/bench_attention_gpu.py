"""The Pallas fused-QKV attention kernel against cuDNN and XLA attention on UltraFastBERT ``base`` shapes.

Per call: ``qkv (B, S, 3H)`` bf16 (crammed BERT's per-head interleaved projection), a padding bias,
``H = 768``, 12 heads. cuDNN and XLA run ``jax.nn.dot_product_attention`` on ``q, k, v`` cut out of
``qkv`` (the copies are part of their cost, as in a model that computes one fused projection) with
the bias broadcast to the ``(B, 1, S, S)`` cuDNN requires; Pallas reads ``qkv`` as it is, for each
``AttentionConfig`` of ``--configs`` (``BQxW[xHxS]``: block_q x num_warps [x heads_per_program x
num_stages]; the fastest by kernel time is ``best_pallas_config`` in the JSON). Each variant runs
``--layers`` independent calls in one jitted function (as the encoder's 16 layers); reported per
call (:func:`fffjax.bench.per_layer`): GPU kernel time from a profiler trace and wall time over a
stream of calls, with the HBM time of ``qkv`` in and ``context`` out at the copy rate of the same
run (:func:`fffjax.bench.copy_bandwidth`). Writes ``attention_gpu.json`` and ``.md`` to ``--out``.

Run on the GPU machine (about a minute)::

    python experiments/bench_attention_gpu.py --out $OUT
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from fffjax import bench
from pallas_kernels.attention import AttentionConfig, attention, split_heads

# AttentionConfig fields in the order of --configs' BQxW[xHxS].
ATTENTION_TILES = ("block_q", "num_warps", "heads_per_program", "num_stages")


def cut_and_attend(implementation: str, num_heads: int, scale: float):
    def fn(qkv, key_bias):
        b, s, three_h = qkv.shape
        q, k, v = split_heads(qkv, num_heads)
        bias = jnp.broadcast_to(key_bias[:, None, None, :], (b, 1, s, s))
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)
        return out.reshape(b, s, three_h // 3)
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--configs", default="128x8,64x4,128x4,128x8x2x2,128x8x4x2,128x4x4x2,64x4x4x2,128x8x4x3,128x8x12x2",
                    help="comma-separated block_q x num_warps [x heads_per_program x num_stages]")
    args = ap.parse_args(argv)
    heads, d, dtype = 12, 64, jnp.bfloat16
    scale = d**-0.5
    keys = jax.random.split(jax.random.key(0), args.layers + 1)
    qkvs = [jax.random.normal(k, (args.batch, args.seq, 3 * heads * d), dtype) for k in keys[1:]]
    lengths = jax.random.randint(keys[0], (args.batch, 1), args.seq // 2, args.seq + 1)
    key_bias = jnp.where(jnp.arange(args.seq)[None, :] < lengths, 0.0, -10000.0).astype(dtype)
    bandwidth = bench.copy_bandwidth()
    hbm_ms = 4 * qkvs[0].nbytes / 3 / bandwidth * 1e3    # qkv in, context (a third of it) out
    variants = {name: cut_and_attend(name, heads, scale) for name in ("cudnn", "xla")}
    for text in args.configs.split(","):
        config = AttentionConfig(**bench.parse_fields(text, ATTENTION_TILES))
        variants[f"pallas {text}"] = lambda q, b, c=config: attention(
            q, b, num_heads=heads, scale=scale, config=c, interpret=jax.default_backend() != "gpu")
    reference = variants["xla"](qkvs[0], key_bias).astype(jnp.float32)
    rows = []
    for name, one in variants.items():
        fn = jax.jit(lambda qkvs, b, one=one: [one(q, b) for q in qkvs])
        try:
            err = float(jnp.max(jnp.abs(one(qkvs[0], key_bias).astype(jnp.float32) - reference)))
            kernel_ms, wall_ms, summary = bench.per_layer(fn, qkvs, key_bias, layers=args.layers)
        except Exception as e:   # e.g. a tile that needs more shared memory than the GPU has
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        row = {"variant": name, "kernel_ms": kernel_ms, "wall_ms": wall_ms, "hbm_ms": hbm_ms,
               "max_abs_diff_vs_xla": err, "top_kernels": summary["ops"][:4]}
        rows.append(row)
        print(f"{name}: kernel {row['kernel_ms']:.4f} ms, wall {row['wall_ms']:.4f} ms per call "
              f"(HBM time {hbm_ms:.4f} ms), |diff| vs xla {err:.3g}", flush=True)
    timed = [r for r in rows if r["variant"].startswith("pallas") and "error" not in r]
    best = min(timed, key=lambda r: r["kernel_ms"])["variant"].split()[1] if timed else None
    print(f"best pallas config: {best}", flush=True)
    report = {**bench.provenance(__file__, argv), "best_pallas_config": best, "batch": args.batch, "seq": args.seq,
              "heads": heads, "head_width": d, "dtype": "bfloat16", "copy_bandwidth_TBps": bandwidth / 1e12,
              "rows": rows}
    lines = [f"# Attention on {report['device_kind']}: B={args.batch}, S={args.seq}, 12 heads x 64, bf16, "
             "padding bias", "", bench.provenance_line(report), "",
             "| variant | kernel ms per call | wall ms per call | HBM time ms | max abs diff vs xla |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['kernel_ms']:.4f} | {r['wall_ms']:.4f} | {r['hbm_ms']:.4f} | "
                         f"{r['max_abs_diff_vs_xla']:.3g} |")
    bench.write_results(args.out, "attention_gpu", report=report, markdown="\n".join(lines))


if __name__ == "__main__":
    main()
