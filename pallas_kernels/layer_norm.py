"""Layer norm over the last axis in one pass over HBM, optionally fused with the residual add before it.

``y = (h - mean(h)) / sqrt(var(h) + eps) * scale + bias`` with ``h = x`` or ``h = x + residual`` (the
add in the dtype of ``x``, as a model adds in its compute dtype), statistics in float32 and the
variance the two-pass (biased) one, as torch's ``LayerNorm`` and flax's ``use_fast_variance=False``.

One program normalises ``block_rows`` rows: it loads each row once as a power-of-two block (Triton
blocks are powers of two; masked lanes pad a width such as 768 to 1024 and touch no memory), takes
the mean and the variance in registers and stores ``y`` (and ``h``). So the kernel moves ``x`` in and
``y`` out once (with the residual: two in, two out), where XLA's layer norm makes several passes
(``experiments/results/bert_gpu.md``).

The kernel is forward only: ``fffjax.ops.layer_norm(..., implementation="pallas")`` differentiates it
through the VJP of :func:`layer_norm_reference`, so training keeps XLA's backward.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerNormConfig:
    """``block_rows`` rows per program (a power of two), ``num_warps`` Triton warps per program."""

    block_rows: int = 16
    num_warps: int = 8

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block_rows",))


DEFAULT_CONFIG = LayerNormConfig()


def _kernel(*refs, n_rows, width, eps, block_rows, with_residual):
    if with_residual:
        x_ref, residual_ref, scale_ref, bias_ref, y_ref, h_ref = refs
    else:
        x_ref, scale_ref, bias_ref, y_ref = refs
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    row_ok = rows < n_rows
    cols, col_ok = cm.chunk_indices(0, cm.next_pow2(width), width)
    h = cm.load_rows(x_ref, rows, cols, col_ok, row_ok)
    if with_residual:
        h = h + cm.load_rows(residual_ref, rows, cols, col_ok, row_ok)
        cm.store_rows(h_ref, rows, cols, h, col_ok, row_ok)
    h = h.astype(jnp.float32)
    mean = jnp.sum(h, axis=1) / width                      # masked lanes loaded as 0
    centred = h - mean[:, None]
    if col_ok is not None:
        centred = jnp.where(col_ok[None, :], centred, 0.0)
    var = jnp.sum(centred * centred, axis=1) / width
    scale = cm.load(scale_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
    bias = cm.load(bias_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
    y = centred * (1.0 / jnp.sqrt(var + eps))[:, None] * scale[None, :] + bias[None, :]
    cm.store_rows(y_ref, rows, cols, y, col_ok, row_ok)


def _call(x, residual, scale, bias, eps, interpret, config):
    n_rows, width = x.shape
    with_residual = residual is not None
    kernel = functools.partial(_kernel, n_rows=n_rows, width=width, eps=eps, block_rows=config.block_rows,
                               with_residual=with_residual)
    out = jax.ShapeDtypeStruct((n_rows, width), x.dtype)
    operands = (x, residual, scale, bias) if with_residual else (x, scale, bias)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out) if with_residual else out,
        grid=(pl.cdiv(n_rows, config.block_rows),),
        compiler_params=cm.compiler_params(config.num_warps, 1),
        interpret=interpret,
        name="add_layer_norm" if with_residual else "layer_norm",
    )(*operands)


def layer_norm_reference(x, scale, bias, residual=None, *, eps: float):
    """The jnp form of :func:`layer_norm` (same arguments and results)."""
    h = x if residual is None else x + residual
    h32 = h.astype(jnp.float32)
    mean = jnp.mean(h32, axis=-1, keepdims=True)
    centred = h32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    y = y.astype(x.dtype)
    return y if residual is None else (y, h)


def _kernel_call(x, scale, bias, residual, *, eps, interpret, config):
    """:func:`_call` on ``(..., H)`` arrays (rows flattened and restored)."""
    out = _call(x.reshape(-1, x.shape[-1]), None if residual is None else residual.reshape(-1, x.shape[-1]),
                scale, bias, eps, interpret, config)
    return out.reshape(x.shape) if residual is None else (out[0].reshape(x.shape), out[1].reshape(x.shape))


def layer_norm(x, scale, bias, residual=None, *, eps: float, interpret: bool = False,
               config: LayerNormConfig = DEFAULT_CONFIG):
    """Layer norm of ``x (..., H)`` with ``scale (H,)`` and ``bias (H,)``, or of ``x + residual``.

    Returns ``y (..., H)`` in the dtype of ``x``; with ``residual (..., H)`` the pair ``(y, h)`` where
    ``h = x + residual`` (the new residual stream, written by the same pass). Forward only (see the
    module docstring).
    """
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., H) with H >= 1, got {tuple(x.shape)}")
    width = x.shape[-1]
    for name, value in (("scale", scale), ("bias", bias)):
        if tuple(value.shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},), got {tuple(value.shape)}")
    if residual is not None and (tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype):
        raise ValueError(f"residual must have the shape {tuple(x.shape)} and dtype {x.dtype} of x, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if x.size == 0:
        return layer_norm_reference(x, scale, bias, residual, eps=eps)
    return _kernel_call(x, scale, bias, residual, eps=float(eps), interpret=interpret, config=config)
