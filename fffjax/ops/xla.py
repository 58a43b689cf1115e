"""Pure-XLA FFF-v2 hard forward (``implementation="xla"``): per-level row gathers, differentiable.

This is :func:`fffjax.v2.conditional_forward`, jitted (strict ``> 0`` routing, exact erf GELU, K trees,
f32 accumulation for bf16/f16 inputs). On the 2-core CPU of ``experiments/results/bench_cpu.md``
this path stays near 15-20x faster than a dense layer of width 4096 at 16384 tokens: XLA
materialises every level's gathered rows (tokens x H per table and level) before contracting them.
Writing the contraction as an ``einsum`` or a multiply-sum, chunking tokens with ``lax.map`` or a
``fori_loop`` over levels all measured within noise of each other there; the C++ custom call
(``fffjax.ops.cpu_ffi``) is the fast CPU path.
"""

import functools

import jax

from fffjax import v2

fff_v2_hard_xla = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))(v2.conditional_forward)
