"""Pure-XLA FFF-v2 hard forward (``implementation="xla"``): per-level row gathers, differentiable.

Semantics of :func:`fffjax.v2.conditional_forward` (strict ``> 0`` routing, exact erf GELU, K trees,
f32 accumulation for bf16/f16 inputs). On the 2-core CPU of ``experiments/results/bench_cpu.md``
this path stays near 15-20x faster than a dense layer of width 4096 at 16384 tokens: XLA
materialises every level's gathered rows (tokens x H per table and level) before contracting them.
Writing the contraction as an ``einsum`` or a multiply-sum, chunking tokens with ``lax.map`` or a
``fori_loop`` over levels all measured within noise of each other there; the C++ custom call
(``fffjax.ops.cpu_ffi``) is the fast CPU path.
"""

import functools

import jax
import jax.numpy as jnp

from fffjax import tree
from fffjax._typing import Array, Float

HIGHEST = jax.lax.Precision.HIGHEST


def _gelu(z: Array) -> Array:
    return jax.nn.gelu(z, approximate=False)


def gather_forward(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    w_out: Float[Array, "nodes dout"],
    *,
    depth: int,
    n_trees: int = 1,
) -> Float[Array, "batch dout"]:
    """Per level, gather each token's ``K`` node rows and contract them (``einsum``).

    Args:
        x: ``(B, H)``; w_in: ``(K*N, H)``; b_in: ``(K*N,)``; w_out: ``(K*N, H_out)``.
        depth: descents per tree (``N = 2**(depth+1) - 1``); n_trees: K.

    Returns:
        ``(B, H_out)`` in the dtype of ``x``.
    """
    per_tree = tree.v2_nodes_per_tree(depth)
    offsets = jnp.asarray(tree.tree_offsets(n_trees, per_tree), jnp.int32)
    acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else x.dtype
    node = jnp.zeros((x.shape[0], n_trees), jnp.int32)
    y = jnp.zeros((x.shape[0], w_out.shape[1]), acc)
    for _ in range(depth + 1):
        flat = node + offsets                                          # (B, K)
        rows_in = w_in.at[flat].get(mode="promise_in_bounds")          # (B, K, H)
        z = jnp.einsum("bh,bkh->bk", x, rows_in, precision=HIGHEST, preferred_element_type=acc)
        z = z + b_in.at[flat].get(mode="promise_in_bounds").astype(acc)
        rows_out = w_out.at[flat].get(mode="promise_in_bounds")        # (B, K, H_out)
        y = y + jnp.einsum("bk,bkh->bh", _gelu(z).astype(x.dtype), rows_out, precision=HIGHEST,
                           preferred_element_type=acc)
        node = tree.child(node, z > 0)
    return y.astype(x.dtype)


fff_v2_hard_xla = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))(gather_forward)
