"""A decoder's attention over its key/value cache on the CPU: the C++ kernel against XLA, side by side.

``fffjax.ops.cached_attention`` with ``implementation="cpu_ffi"`` and ``"xla"`` at the decoder presets'
shapes (one query per row, as a decode step asks; a cache half full), float32, jitted; outputs compared
before timing.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python experiments/bench_cached_attention_cpu.py \\
        --out experiments/results
"""

import argparse

import jax
import jax.numpy as jnp

from fffjax import bench, ops

# (name, heads, head width, cache slots): the decoder presets' attention (small: H 256; base: H 768).
SHAPES = (("small", 4, 64, 256), ("base", 12, 64, 256), ("base", 12, 64, 1024))


def run(args) -> list[dict]:
    rows = []
    for name, heads, width, slots in SHAPES:
        for batch in args.batches:
            keys = jax.random.split(jax.random.key(batch), 3)
            q = jax.random.normal(keys[0], (batch, 1, heads, width))
            k, v = (jax.random.normal(key, (batch, slots, heads, width)) for key in keys[1:])
            key_bias = jnp.where(jnp.arange(slots) < slots // 2, 0.0, -10000.0)[None].repeat(batch, 0)
            scale = width**-0.5
            fns = {impl: jax.jit(lambda q, k, v, b, impl=impl, scale=scale: ops.cached_attention(
                q, k, v, b, scale=scale, implementation=impl)) for impl in ("cpu_ffi", "xla")}
            error = float(jnp.max(jnp.abs(fns["cpu_ffi"](q, k, v, key_bias) - fns["xla"](q, k, v, key_bias))))
            times = bench.side_by_side({impl: (lambda f=f, a=(q, k, v, key_bias): f(*a)) for impl, f in fns.items()},
                                       rounds=args.rounds, budget_s=args.budget_s)
            row = {"preset": name, "heads": heads, "width": width, "slots": slots, "batch": batch,
                   "cpu_ffi_ms": times["cpu_ffi"].median_s * 1e3, "xla_ms": times["xla"].median_s * 1e3,
                   "max_abs_error": error, "cache_mb": 2 * k.nbytes / 1e6}
            rows.append(row)
            bench.log(f"{name} slots {slots} batch {batch}: cpu_ffi {row['cpu_ffi_ms']:.3f} ms, "
                      f"xla {row['xla_ms']:.3f} ms, error {error:.1e}")
    return rows


def markdown(report: dict) -> str:
    lines = ["# Attention over a key/value cache on the CPU: cpu_ffi against XLA", "", bench.provenance_line(report),
             "", "One query per row (a decode step), float32, the cache half full (-10000 bias on the empty slots); "
             "ms per call (one call waited for, median of interleaved samples); *xla / cpu_ffi* above 1: the C++ "
             f"kernel is faster. 1-minute load average {report['load_before']:.2f} before, "
             f"{report['load_after']:.2f} after.", "",
             "| preset | heads x width | slots | batch | cache MB | cpu_ffi ms | xla ms | xla / cpu_ffi "
             "| max abs error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['heads']} x {r['width']} | {r['slots']} | {r['batch']} | {r['cache_mb']:.1f} | "
              f"{r['cpu_ffi_ms']:.3f} | {r['xla_ms']:.3f} | {r['xla_ms'] / r['cpu_ffi_ms']:.1f}x | "
              f"{r['max_abs_error']:.1e} |" for r in report["results"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench.measure_and_report(__file__, argv, lambda: run(args), markdown, args.out, "cached_attention_cpu")


if __name__ == "__main__":
    main()
