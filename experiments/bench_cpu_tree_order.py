"""The cpu_ffi FFF-v2 kernel's two orders for layers of several trees, side by side on the CPU.

``block`` (``FFFJAX_CPU_TREE_ORDER=0``): on several threads, each block of tokens goes through every tree
(threads start once per call); ``tree`` (``FFFJAX_CPU_TREE_ORDER=1``): every tree in turn over all tokens
with the subtree sort (threads start twice per tree). Unset, the kernel takes the block order from 8 trees.
On one thread (fewer than 1024 tokens) both run the tree order. The masked dense
form (``implementation="reference"``) and the dense FF of the same width run beside them. Outputs of the
two orders are compared before timing.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python experiments/bench_cpu_tree_order.py \\
        --out experiments/results
"""

import argparse
import os

import jax
import jax.numpy as jnp

import fffjax
from fffjax import bench, v2

SHAPES = {"384:32x4": (384, 32, 4, 1536), "768:4x9": (768, 4, 9, 4096), "768:16x7": (768, 16, 7, 4096),
          "768:64x5": (768, 64, 5, 4096), "768:128x4": (768, 128, 4, 4096),
          # fewer trees, for the rule of the default order: MiniLM-width students and their H 768 twins
          "384:10x6": (384, 10, 6, 1536), "384:8x7": (384, 8, 7, 1536), "384:4x9": (384, 4, 9, 1536),
          "768:10x6": (768, 10, 6, 4096), "768:8x7": (768, 8, 7, 4096)}


def set_order(tree_order: bool | None) -> None:
    """Forces the tree (True) or block (False) order of the kernel; None: its own choice."""
    if tree_order is None:
        os.environ.pop("FFFJAX_CPU_TREE_ORDER", None)
    else:
        os.environ["FFFJAX_CPU_TREE_ORDER"] = "1" if tree_order else "0"


def run(args) -> list[dict]:
    rows = []
    for shape in args.shapes:
        width, n_trees, depth, dense_width = SHAPES[shape]
        p = v2.init(jax.random.key(0), width, depth, n_trees=n_trees)
        w = (p["w_in"], p["b_in"], p["w_out"])
        kw = {"depth": depth, "n_trees": n_trees}
        ffi = jax.jit(lambda x, a, b, c, kw=kw: fffjax.fff_v2_hard(x, a, b, c, **kw, implementation="cpu_ffi"))
        masked = jax.jit(lambda x, a, b, c, kw=kw: fffjax.fff_v2_hard(x, a, b, c, **kw, implementation="reference"))
        k1, k2 = jax.random.split(jax.random.key(2))
        dense_w = (jax.random.normal(k1, (width, dense_width)) * 0.03,
                   jax.random.normal(k2, (dense_width, width)) * 0.03)
        dense = jax.jit(lambda x, w1, w2: jax.nn.gelu(x @ w1, approximate=False) @ w2)
        for n in args.tokens:
            x = jax.random.normal(jax.random.key(1), (n, width))
            set_order(False)
            y_block = ffi(x, *w)
            set_order(True)
            y_tree = ffi(x, *w)
            set_order(None)
            error = float(jnp.max(jnp.abs(y_block - y_tree)))
            if error > 1e-4:
                raise AssertionError(f"{shape} T={n}: the two orders differ by {error}")
            calls = {"block": lambda x=x, f=ffi, w=w: (set_order(False), f(x, *w))[1],
                     "tree": lambda x=x, f=ffi, w=w: (set_order(True), f(x, *w))[1],
                     "masked": lambda x=x, f=masked, w=w: f(x, *w),
                     f"dense {dense_width}": lambda x=x, f=dense, w=dense_w: f(x, *w)}
            times = bench.side_by_side(calls, rounds=args.rounds, budget_s=args.budget_s)
            set_order(None)
            row = {"shape": shape, "tokens": n, **{k: t.median_s * 1e3 for k, t in times.items()}}
            rows.append(row)
            bench.log(f"{shape} T={n}: " + ", ".join(f"{k} {t.median_s * 1e3:.2f} ms" for k, t in times.items()))
    return rows


def markdown(report: dict) -> str:
    lines = ["# cpu_ffi FFF-v2 with several trees: block order against tree order (cpu)", "",
             bench.provenance_line(report), "",
             "ms per call (one call waited for, median of interleaved samples), float32, weights as jit arguments. "
             "*block*: FFFJAX_CPU_TREE_ORDER=0 (token blocks through every tree on several threads); *tree*: "
             "FFFJAX_CPU_TREE_ORDER=1 (every tree over all tokens, sorted); the kernel's default takes the block "
             "order from 8 trees; *tree / block*: above 1, the block order is faster. One thread below 1024 "
             f"tokens runs the tree order either way. 1-minute load average {report['load_before']:.2f} before, "
             f"{report['load_after']:.2f} after.", "",
             "| width:shape | tokens | block | tree | tree / block | masked dense | dense FF |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        dense = next(v for k, v in r.items() if k.startswith("dense"))
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['block']:.2f} | {r['tree']:.2f} | "
                     f"{r['tree'] / r['block']:.2f}x | {r['masked']:.2f} | {dense:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget-s", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench.measure_and_report(__file__, argv, lambda: run(args), markdown, args.out, "cpu_tree_order")


if __name__ == "__main__":
    main()
