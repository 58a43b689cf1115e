"""A decoder's attention over its key/value cache: the platform's kernel against XLA, side by side.

``fffjax.ops.cached_attention`` with the platform's kernel (``"cpu_ffi"`` on the CPU, float32;
``"pallas"`` on a GPU, bfloat16) and ``"xla"`` at the decoder presets' shapes (one query per row, as a
decode step asks; a cache half full), jitted; outputs compared before timing. Two times per call: one
call waited for (dispatch included, median of interleaved samples, :func:`fffjax.bench.side_by_side`),
and the device time per call inside a jitted loop (:func:`fffjax.bench.chained`), as the op costs
inside a model's jitted decode step.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python experiments/bench_cached_attention.py \\
        --out experiments/results
    python experiments/bench_cached_attention.py --out experiments/results    # on a GPU machine
"""

import argparse

import jax
import jax.numpy as jnp

from fffjax import bench, ops

# (name, heads, head width, cache slots): the decoder presets' attention (small: H 256; base: H 768).
SHAPES = (("small", 4, 64, 256), ("base", 12, 64, 256), ("base", 12, 64, 1024))


def platform_kernel() -> tuple[str, jnp.dtype]:
    """The kernel this backend offers and the dtype a decoder runs it in."""
    if jax.default_backend() == "gpu":
        return "pallas", jnp.dtype(jnp.bfloat16)
    return "cpu_ffi", jnp.dtype(jnp.float32)


def run(args) -> list[dict]:
    kernel, dtype = platform_kernel()
    rows = []
    for name, heads, width, slots in SHAPES:
        for batch in args.batches:
            keys = jax.random.split(jax.random.key(batch), 3)
            q = jax.random.normal(keys[0], (batch, 1, heads, width), dtype)
            k, v = (jax.random.normal(key, (batch, slots, heads, width), dtype) for key in keys[1:])
            key_bias = jnp.where(jnp.arange(slots) < slots // 2, 0.0, -10000.0).astype(dtype)[None].repeat(batch, 0)
            scale = width**-0.5
            fns = {impl: jax.jit(lambda q, k, v, b, impl=impl, scale=scale: ops.cached_attention(
                q, k, v, b, scale=scale, implementation=impl)) for impl in (kernel, "xla")}
            inputs = (q, k, v, key_bias)
            error = float(jnp.max(jnp.abs(fns[kernel](*inputs).astype(jnp.float32)
                                          - fns["xla"](*inputs).astype(jnp.float32))))
            times = bench.side_by_side({impl: (lambda f=f, a=inputs: f(*a)) for impl, f in fns.items()},
                                       rounds=args.rounds, budget_s=args.budget_s)
            device = {impl: bench.chained(f, *inputs, budget_s=args.budget_s) for impl, f in fns.items()}
            row = {"preset": name, "heads": heads, "width": width, "slots": slots, "batch": batch,
                   "kernel": kernel, "dtype": dtype.name,
                   "kernel_ms": times[kernel].median_s * 1e3, "xla_ms": times["xla"].median_s * 1e3,
                   "kernel_device_us": device[kernel] * 1e6, "xla_device_us": device["xla"] * 1e6,
                   "max_abs_error": error, "cache_mb": 2 * k.nbytes / 1e6}
            rows.append(row)
            bench.log(f"{name} slots {slots} batch {batch}: {kernel} {row['kernel_ms']:.3f} ms "
                      f"({row['kernel_device_us']:.1f} us in a loop), xla {row['xla_ms']:.3f} ms "
                      f"({row['xla_device_us']:.1f} us), error {error:.1e}")
    return rows


def markdown(report: dict) -> str:
    rows = report["results"]
    kernel, dtype = rows[0]["kernel"], rows[0]["dtype"]
    lines = [f"# Attention over a key/value cache ({report['device_kind']}): {kernel} against XLA", "",
             bench.provenance_line(report), "",
             f"One query per row (a decode step), {dtype}, the cache half full (-10000 bias on the empty slots); "
             "per call: ms of one call waited for (dispatch included, median of interleaved samples) and us of "
             f"device time inside a jitted loop; *xla / {kernel}* above 1: the kernel is faster. 1-minute load "
             f"average {report['load_before']:.2f} before, {report['load_after']:.2f} after.", "",
             f"| preset | heads x width | slots | batch | cache MB | {kernel} ms | xla ms | xla / {kernel} "
             f"| {kernel} us in a loop | xla us in a loop | xla / {kernel} in a loop | max abs error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['heads']} x {r['width']} | {r['slots']} | {r['batch']} | {r['cache_mb']:.1f} | "
              f"{r['kernel_ms']:.3f} | {r['xla_ms']:.3f} | {r['xla_ms'] / r['kernel_ms']:.2f}x | "
              f"{r['kernel_device_us']:.1f} | {r['xla_device_us']:.1f} | "
              f"{r['xla_device_us'] / r['kernel_device_us']:.2f}x | {r['max_abs_error']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    name = "cached_attention_gpu" if jax.default_backend() == "gpu" else "cached_attention_cpu"
    bench.measure_and_report(__file__, argv, lambda: run(args), markdown, args.out, name)


if __name__ == "__main__":
    main()
