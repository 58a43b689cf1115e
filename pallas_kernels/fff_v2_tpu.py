"""FFF-v2 (UltraFastBERT) hard forward as a Pallas TPU (Mosaic) kernel, beside its jnp reference.

One program per ``block_t`` tokens. The node tables ``w_in`` and ``w_out`` sit whole in VMEM (one
copy, not double-buffered), the biases in SMEM as float32 (the scalar-prefetch operand). Every token
walks its trees with scalar node indices: per level it reads its node's rows as one-row slices of the
VMEM tables (``w_ref[pl.ds(n, 1), :]``), reduces ``x . w_in[n]`` across lanes to a ``(1, 1)`` logit,
adds the bias, adds ``gelu(z) * w_out[n]`` to the token's row of a float32 VMEM accumulator, and steps
to ``2n + 1 + (z > 0)`` with ``z`` moved to a scalar register. The ``block_t`` walks of a block are
unrolled side by side, so the scheduler can overlap their load-reduce-branch chains. The block's
rows are stored once.

Why this design: the walk is the reference's own loop, with no masks, no padding of nodes and no
dense work, so it is exact by construction and follows every (K, D, H). The alternatives (the top
levels as one MXU matmul with one-hot masks; per-row DMA from HBM for tables larger than VMEM) would
be faster or take larger tables but add layout cases; they can be added behind :class:`FffV2TpuConfig`.

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class FffV2TpuConfig:
    """Block size of the FFF-v2 TPU kernel.

    Attributes:
        block_t: tokens per program, a multiple of 16 (a bfloat16 VMEM tile has 16 rows); their walks
            are unrolled side by side.
    """

    block_t: int = 16

    def __post_init__(self):
        if self.block_t < 16 or self.block_t % 16:
            raise ValueError(f"block_t must be a positive multiple of 16, got {self.block_t}")


def gelu(z: jax.Array) -> jax.Array:
    """Exact GELU of float32 ``z`` through ``erf`` (Mosaic lowers ``erf``, not ``erfc``)."""
    return 0.5 * z * (1.0 + jax.lax.erf(z * _SQRT_HALF))


def _kernel(b_ref, x_ref, w_in_ref, w_out_ref, y_ref, x32_ref, acc_ref, *, depth: int, n_trees: int,
            nodes_per_tree: int):
    block_t = x_ref.shape[0]
    x32_ref[...] = x_ref[...].astype(jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def one_tree(k, carry):
        base = k * nodes_per_tree
        heap = [jnp.int32(0)] * block_t
        for _ in range(depth + 1):
            for t in range(block_t):
                n = base + heap[t]
                w_row = w_in_ref[pl.ds(n, 1), :].astype(jnp.float32)
                z = jnp.sum(x32_ref[t:t + 1, :] * w_row, axis=1, keepdims=True) + b_ref[n]      # (1, 1)
                acc_ref[t:t + 1, :] += gelu(z) * w_out_ref[pl.ds(n, 1), :].astype(jnp.float32)
                heap[t] = 2 * heap[t] + 1 + (z[0, 0] > 0).astype(jnp.int32)
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
    kernel = functools.partial(_kernel, depth=depth, n_trees=n_trees,
                               nodes_per_tree=tree.v2_nodes_per_tree(depth))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,   # b_in, float32, in SMEM
        grid=(padded // block_t,),
        in_specs=[
            pl.BlockSpec((block_t, width), lambda i, b: (i, 0)),
            pl.BlockSpec(memory_space=pltpu.VMEM),
            pl.BlockSpec(memory_space=pltpu.VMEM),
        ],
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
    )(b_in.astype(jnp.float32), x_pad, w_in, w_out)
    return y[:n_tokens]
