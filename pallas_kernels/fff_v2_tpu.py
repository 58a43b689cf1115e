"""FFF-v2 (UltraFastBERT) hard forward as a Pallas TPU (Mosaic) kernel, beside its jnp reference.

One program per ``block_t`` tokens. The node tables ``w_in`` and ``w_out`` sit whole in VMEM (one
copy, not double-buffered), the biases in SMEM as float32 (the scalar-prefetch operand). Every token
walks its trees with scalar node indices: per level it reads its node's rows as one-row slices of the
VMEM tables (``w_ref[pl.ds(n, 1), :]``), reduces ``x . w_in[n]`` across lanes to a ``(1, 1)`` logit,
adds the bias, adds ``gelu(z) * w_out[n]`` to the token's row of a float32 VMEM accumulator, and steps
to ``2n + 1 + (z > 0)`` with ``z`` moved to a scalar register. The ``block_t`` walks of a block are
unrolled side by side, so the scheduler can overlap their load-reduce-branch chains. The block's
rows are stored once.

With ``dense_levels = s`` the top ``s`` levels of each tree run for the whole block on the MXU first:
the logits of the tree's first ``2**s`` rows (contiguous in heap order) as one matmul, each token's
path picked level by level with one-hot masks, and the path's ``gelu(z)`` times those rows of
``w_out`` as a second matmul; the scalar walk then starts at level ``s``.

Why this design: the scalar walk is the reference's own loop, with no masks, no padding of nodes and
no dense work, so it is exact by construction and follows every (K, D, H); the MXU top levels are
opt-in (``dense_levels = 0`` by default) until a TPU has measured them. Tables larger than VMEM
(per-row DMA from HBM) are not covered.

The GELU is ``0.5 z (1 + erf(z / sqrt 2))``: ``jax.nn.gelu(approximate=False)`` uses ``erfc``, which
has no Mosaic lowering.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fffjax import tree
from pallas_kernels.fff_v2_forward import fff_v2_hard_reference

__all__ = ["MAX_TABLE_BYTES", "FffV2TpuConfig", "fff_v2_hard", "fff_v2_hard_reference", "gelu"]

# The VMEM the node tables may take: below the 64 MiB of a v7x TensorCore with room for the token
# blocks (v5e and v6e have 128 MiB; the 1x11 layer at H = 768 is 12.6 MB in bfloat16, 25.2 MB in
# float32).
MAX_TABLE_BYTES = 48 * 2**20
_VMEM_HEADROOM_BYTES = 8 * 2**20
_SQRT_HALF = 0.7071067811865476
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class FffV2TpuConfig:
    """Block size and layout of the FFF-v2 TPU kernel.

    Attributes:
        block_t: tokens per program, a multiple of 16 (a bfloat16 VMEM tile has 16 rows); their walks
            are unrolled side by side.
        dense_levels: 0, or ``s`` in ``1..depth``: the top ``s`` levels of each tree run for the whole
            block on the MXU (one matmul over the tree's first ``2**s`` rows, the path picked with
            one-hot masks, one matmul for the output) and the scalar walk starts at level ``s``; the
            trees are then unrolled (static row offsets), so keep ``n_trees`` small.
    """

    block_t: int = 16
    dense_levels: int = 0

    def __post_init__(self):
        if self.block_t < 16 or self.block_t % 16:
            raise ValueError(f"block_t must be a positive multiple of 16, got {self.block_t}")
        if self.dense_levels < 0:
            raise ValueError(f"dense_levels must be >= 0, got {self.dense_levels}")


def gelu(z: jax.Array) -> jax.Array:
    """Exact GELU of float32 ``z`` through ``erf`` (Mosaic lowers ``erf``, not ``erfc``)."""
    return 0.5 * z * (1.0 + jax.lax.erf(z * _SQRT_HALF))


def _walk(x32_ref, w_in_ref, w_out_ref, b_ref, acc_ref, base, heap: list, levels: int) -> None:
    """``levels`` levels of every token's walk from its heap index ``heap[t]`` (int32 scalars) in the
    tree whose first row is ``base``, adding ``gelu(z) * w_out[n]`` to the token's accumulator row."""
    heap = list(heap)
    for _ in range(levels):
        for t in range(len(heap)):
            n = base + heap[t]
            w_row = w_in_ref[pl.ds(n, 1), :].astype(jnp.float32)
            z = jnp.sum(x32_ref[t:t + 1, :] * w_row, axis=1, keepdims=True) + b_ref[n]      # (1, 1)
            acc_ref[t:t + 1, :] += gelu(z) * w_out_ref[pl.ds(n, 1), :].astype(jnp.float32)
            heap[t] = 2 * heap[t] + 1 + (z[0, 0] > 0).astype(jnp.int32)


def _dense_top(x_ref, w_in_ref, w_out_ref, b_top_ref, acc_ref, tree_index: int, base: int, levels: int) -> list:
    """The top ``levels`` levels of one tree for the whole block on the MXU: the logits of its first
    ``2**levels`` rows (the top ``2**levels - 1`` nodes and one unused) as one matmul, each token's path
    picked level by level with one-hot masks, and the path's ``gelu(z)`` times ``w_out`` as a second
    matmul. Returns each token's heap index at level ``levels`` (int32 scalars)."""
    cols = 2**levels
    lhs, rhs = x_ref[...], w_in_ref[base:base + cols, :]
    if lhs.dtype != rhs.dtype:
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    logits = jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                 preferred_element_type=jnp.float32) + b_top_ref[tree_index:tree_index + 1, :]
    col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    node = jnp.zeros((logits.shape[0], 1), jnp.int32)
    coef = jnp.zeros(logits.shape, jnp.float32)
    for _ in range(levels):
        on_path = col == node
        z = jnp.sum(jnp.where(on_path, logits, 0.0), axis=1, keepdims=True)
        coef = jnp.where(on_path, gelu(z), coef)
        node = 2 * node + 1 + (z > 0).astype(jnp.int32)
    acc_ref[...] += jax.lax.dot_general(coef, w_out_ref[base:base + cols, :].astype(jnp.float32),
                                        (((1,), (0,)), ((), ())), precision=_HIGHEST,
                                        preferred_element_type=jnp.float32)
    return [node[t, 0] for t in range(logits.shape[0])]


def _kernel(b_ref, x_ref, w_in_ref, w_out_ref, *refs, depth: int, n_trees: int, nodes_per_tree: int,
            dense_levels: int):
    b_top_ref, (y_ref, x32_ref, acc_ref) = (refs[0], refs[1:]) if dense_levels else (None, refs)
    block_t = x_ref.shape[0]
    x32_ref[...] = x_ref[...].astype(jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if dense_levels:   # trees unrolled: static row offsets for the top tables
        for k in range(n_trees):
            base = k * nodes_per_tree
            heap = _dense_top(x_ref, w_in_ref, w_out_ref, b_top_ref, acc_ref, k, base, dense_levels)
            _walk(x32_ref, w_in_ref, w_out_ref, b_ref, acc_ref, base, heap, depth + 1 - dense_levels)
    else:
        def one_tree(k, carry):
            _walk(x32_ref, w_in_ref, w_out_ref, b_ref, acc_ref, k * nodes_per_tree, [jnp.int32(0)] * block_t,
                  depth + 1)
            return carry

        jax.lax.fori_loop(0, n_trees, one_tree, 0)
    y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


@functools.partial(jax.jit, static_argnames=("depth", "n_trees", "interpret", "config"))
def fff_v2_hard(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, interpret=False,
                config: FffV2TpuConfig | None = None):
    """FFF-v2 hard forward on a TPU TensorCore: ``(T, H)`` tokens to ``(T, H_out)`` in ``x.dtype``.

    Args:
        x: ``(T, H)``; w_in: ``(K*N, H)``; b_in: ``(K*N,)``; w_out: ``(K*N, H_out)`` with
            ``N = 2**(depth+1) - 1`` (the layout of :mod:`fffjax.v2`), float32 or bfloat16.
        depth, n_trees: the tree shape.
        interpret: False (compiled for a TPU), True (Pallas interpret mode) or a
            ``pltpu.InterpretParams`` (the TPU interpreter, on any backend).
        config: :class:`FffV2TpuConfig` (None: the defaults).

    Raises:
        ValueError: when ``w_in`` and ``w_out`` together exceed :data:`MAX_TABLE_BYTES`.

    Accumulates in float32; routing goes right on a strictly positive logit.
    """
    config = FffV2TpuConfig() if config is None else config
    if config.dense_levels > depth:
        raise ValueError(f"config.dense_levels must be at most depth = {depth} (the tree's first 2**dense_levels "
                         f"rows are one matmul), got {config.dense_levels}")
    table_bytes = _nbytes(w_in) + _nbytes(w_out)
    if table_bytes > MAX_TABLE_BYTES:
        raise ValueError(f"w_in and w_out must fit MAX_TABLE_BYTES = {MAX_TABLE_BYTES} bytes of VMEM together, "
                         f"got {table_bytes} bytes")
    n_tokens, width = x.shape
    width_out = w_out.shape[1]
    block_t = config.block_t
    padded = pl.cdiv(max(n_tokens, 1), block_t) * block_t
    x_pad = jnp.pad(x, ((0, padded - n_tokens), (0, 0)))
    block_bytes = 3 * block_t * (width + width_out) * 4   # double-buffered x and y blocks, float32 scratch
    nodes_per_tree = tree.v2_nodes_per_tree(depth)
    kernel = functools.partial(_kernel, depth=depth, n_trees=n_trees, nodes_per_tree=nodes_per_tree,
                               dense_levels=config.dense_levels)
    b32 = b_in.astype(jnp.float32)
    # The top levels' biases as vectors in VMEM, (K, 2**dense_levels).
    b_top = () if not config.dense_levels else (b32.reshape(n_trees, nodes_per_tree)[:, :2**config.dense_levels],)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,   # b_in, float32, in SMEM
        grid=(padded // block_t,),
        in_specs=[
            pl.BlockSpec((block_t, width), lambda i, b: (i, 0)),
            pl.BlockSpec(memory_space=pltpu.VMEM),
            pl.BlockSpec(memory_space=pltpu.VMEM),
        ] + [pl.BlockSpec(memory_space=pltpu.VMEM)] * len(b_top),
        out_specs=pl.BlockSpec((block_t, width_out), lambda i, b: (i, 0)),
        scratch_shapes=[pltpu.VMEM((block_t, width), jnp.float32), pltpu.VMEM((block_t, width_out), jnp.float32)],
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, width_out), x.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL,),
            vmem_limit_bytes=table_bytes + block_bytes + _VMEM_HEADROOM_BYTES),
        interpret=interpret,
        name="fff_v2_hard_tpu",
    )(b32, x_pad, w_in, w_out, *b_top)
    return y[:n_tokens]
