"""The implementations every platform has: XLA programs written in jnp.

* ``"xla"`` for every op: FFF-v2 by per-level row gathers (:func:`fffjax.v2.conditional_forward`),
  FFF-v1 by the row-gather descent (:func:`fffjax.v1.hard_forward`), the two-pass layer norm,
  ``jax.nn.dot_product_attention`` (bidirectional, causal, or over a key/value cache) and
  ``jax.nn.gelu``. All are differentiable and partitioned by GSPMD under a mesh.
* ``"reference"`` for the FFF ops: the published masked dense computation (every neuron, then a
  path mask), the form the other implementations are tested against; on a GPU it is also the
  fastest for shallow trees (see :data:`fffjax.ops.registry.DENSE_PATH_FRACTION`).
* ``"cudnn"`` for attention: cuDNN's fused attention through ``jax.nn.dot_product_attention``
  (GPU only).
* ``"xla"`` for ``cached_attention``, the decode step of a causal decoder over its key/value cache.

Every function takes the op's row arguments first, then its replicated ones, as the registry
calls them (:mod:`fffjax.ops.registry`).
"""

import functools

import jax
import jax.numpy as jnp

from fffjax import v1, v2
from fffjax._typing import Array, Float

fff_v2_hard = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))(v2.conditional_forward)
fff_v2_hard_masked = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))(v2.masked_forward)

_jit_v1 = functools.partial(jax.jit, static_argnames=("depth", "activation", "leaf_output_bias"))
fff_v1_hard = _jit_v1(v1.hard_forward)
fff_v1_hard_masked = _jit_v1(v1.hard_forward_reference)


def layer_norm(
    x: Float[Array, "*rows hidden"],
    residual: Float[Array, "*rows hidden"] | None,
    scale: Float[Array, " hidden"],
    bias: Float[Array, " hidden"],
    *,
    eps: float,
):
    """Layer norm of ``h = x`` or ``h = x + residual`` (added in the dtype of ``x``) over the last axis,
    in the order of flax's ``nnx.LayerNorm(use_fast_variance=False)``: float32 statistics, the
    two-pass (biased) variance ``mean((h - mean h)**2)`` as torch's, then
    ``(h - mean) * (rsqrt(var + eps) * scale) + bias``, returned in the dtype of ``x``.

    Returns ``y``, or ``(y, h)`` with a residual (the new residual stream).
    """
    h = x if residual is None else x + residual
    h32 = h.astype(jnp.float32)
    mean = jnp.mean(h32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h32 - mean), axis=-1, keepdims=True)
    multiplier = jax.lax.rsqrt(var + jnp.float32(eps)) * scale.astype(jnp.float32)
    y = ((h32 - mean) * multiplier + bias.astype(jnp.float32)).astype(x.dtype)
    return y if residual is None else (y, h)


def split_heads(qkv: Float[Array, "batch seq three_hidden"], num_heads: int) -> tuple[Array, Array, Array]:
    """``q, k, v`` ``(B, S, heads, d)`` from crammed BERT's per-head interleaved projection
    ``qkv (B, S, 3H)``: head ``n``'s query at columns ``3dn + [0, d)``, key ``3dn + [d, 2d)``,
    value ``3dn + [2d, 3d)``."""
    batch, seq, three_h = qkv.shape
    per_head = qkv.reshape(batch, seq, num_heads, 3, three_h // (3 * num_heads))
    return per_head[..., 0, :], per_head[..., 1, :], per_head[..., 2, :]


def _dot_product_attention(qkv, key_bias, *, num_heads: int, scale: float, causal: bool, implementation: str):
    batch, seq, three_h = qkv.shape
    q, k, v = split_heads(qkv, num_heads)
    bias = None
    if key_bias is not None:   # cuDNN takes the bias materialised as (B, 1, S, S)
        bias = jnp.broadcast_to(key_bias[:, None, None, :], (batch, 1, seq, seq)).astype(qkv.dtype)
    with jax.numpy_dtype_promotion("standard"):   # jax's attention promotes 16-bit scores to float32 inside
        context = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                               implementation=implementation)
    return context.reshape(batch, seq, three_h // 3)


def attention(qkv, key_bias=None, *, num_heads: int, scale: float, causal: bool = False) -> Array:
    """``softmax(q k^T * scale + key_bias) v`` per head by XLA (float32 softmax), from the fused
    projection ``qkv (B, S, 3H)`` (:func:`split_heads`) and an additive ``key_bias (B, S)`` or None;
    ``causal`` masks the keys after each query. ``context (B, S, H)``, head ``n`` at columns ``dn + [0, d)``."""
    return _dot_product_attention(qkv, key_bias, num_heads=num_heads, scale=scale, causal=causal,
                                  implementation="xla")


def attention_cudnn(qkv, key_bias=None, *, num_heads: int, scale: float, causal: bool = False) -> Array:
    """:func:`attention` through cuDNN's fused flash attention (GPU, 16-bit inputs)."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError("implementation='cudnn' needs a CUDA GPU")
    return _dot_product_attention(qkv, key_bias, num_heads=num_heads, scale=scale, causal=causal,
                                  implementation="cudnn")


def cached_attention(
    q: Float[Array, "batch queries heads width"],
    k: Float[Array, "batch slots heads width"],
    v: Float[Array, "batch slots heads width"],
    key_bias: Float[Array, "batch slots"] | None = None,
    *,
    scale: float,
) -> Float[Array, "batch queries heads_width"]:
    """``softmax(q k^T * scale + key_bias) v`` per head by XLA (float32 softmax): queries over a
    key/value cache, every query of a row seeing the same keys; ``context (B, Q, heads * d)``."""
    batch, queries, heads, width = q.shape
    bias = None if key_bias is None else key_bias[:, None, None, :].astype(q.dtype)
    with jax.numpy_dtype_promotion("standard"):
        context = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")
    return context.reshape(batch, queries, heads * width)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU in the dtype of ``x``: ``jax.nn.gelu(x, approximate=False)``."""
    return jax.nn.gelu(x, approximate=False)
