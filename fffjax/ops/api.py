"""The kernelled ops as public functions: argument checks, then :func:`fffjax.ops.registry.dispatch`."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fffjax import tree, v1, v2
from fffjax.ops.registry import dispatch


def _check_floating(name: str, a) -> None:
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def fff_v2_hard(
    x,
    w_in,
    b_in,
    w_out,
    *,
    depth: int,
    n_trees: int = 1,
    implementation: str | None = None,
):
    """FFF-v2 (UltraFastBERT) hard forward: each token evaluates the ``depth + 1`` neurons on its path.

    Args:
        x: ``(..., H)`` floating inputs.
        w_in: ``(K*N, H)`` node weights (= the published ``linear_in.weight``), ``N = 2**(depth+1) - 1``.
        b_in: ``(K*N,)`` node biases.
        w_out: ``(K*N, H_out)`` output rows (= the published ``linear_out.weight.T``).
        depth: descents per tree (>= 0).
        n_trees: K, the number of independent trees, whose outputs are summed.
        implementation: ``"xla"``, ``"cpu_ffi"`` (C++ CPU kernel), ``"reference"`` (masked dense),
            ``"pallas"``, ``"pallas_tpu"`` (the Mosaic TPU kernel; only when named) or ``None`` (see
            :mod:`fffjax.ops.registry`: ``"cpu_ffi"`` then ``"xla"`` on the CPU; on a GPU ``"pallas"``,
            or ``"reference"`` when the path holds more than
            :data:`~fffjax.ops.registry.DENSE_PATH_FRACTION` of each tree's neurons; ``"xla"`` on a TPU).

    Returns:
        ``(..., H_out)`` in the dtype of ``x``. Routing goes right on a strictly positive logit.
    """
    v2.check_arguments(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    lead = x.shape[:-1]
    y = dispatch("fff_v2_hard", implementation, (x.reshape(-1, x.shape[-1]),), (w_in, b_in, w_out),
                 depth=depth, n_trees=n_trees)
    return y.reshape(*lead, w_out.shape[1])


def fff_v1_hard(
    x,
    node_weights,
    node_biases,
    w1s,
    b1s,
    w2s,
    b2s,
    *,
    depth: int,
    activation: Callable = jax.nn.relu,
    leaf_output_bias: bool = True,
    implementation: str | None = None,
):
    """FFF-v1 hard forward: descend ``depth`` levels (right when ``z >= 0``), then the reached leaf's MLP.

    Args:
        x: ``(..., in)`` floating inputs.
        node_weights: ``(2**depth - 1, in)``; node_biases: ``(2**depth - 1,)`` or the package's ``(n, 1)``.
        w1s: ``(2**depth, in, width)``; b1s: ``(2**depth, width)``;
        w2s: ``(2**depth, width, out)``; b2s: ``(2**depth, out)`` (the package's (in, out) layouts).
        activation: hidden-layer activation of the leaves.
        leaf_output_bias: add ``b2s`` (``False`` reproduces fastfeedforward 0.2.1's eval, which drops it).
        implementation: ``"xla"``, ``"cpu_ffi"`` (C++ CPU kernel, ``jax.nn.relu`` only), ``"reference"``,
            ``"pallas"`` or ``None`` (``"cpu_ffi"`` then ``"xla"`` on the CPU, ``"pallas"`` on a GPU).

    Returns:
        ``(..., out)`` in the dtype of ``x``.
    """
    node_biases = v1.check_arguments(x, node_weights, node_biases, w1s, b1s, w2s, b2s, depth=depth)
    lead = x.shape[:-1]
    y = dispatch("fff_v1_hard", implementation, (x.reshape(-1, x.shape[-1]),),
                 (node_weights, node_biases, w1s, b1s, w2s, b2s),
                 depth=depth, activation=activation, leaf_output_bias=leaf_output_bias)
    return y.reshape(*lead, w2s.shape[2])


def layer_norm(
    x,
    scale,
    bias,
    residual = None,
    *,
    eps: float,
    implementation: str | None = None,
):
    """Layer norm over the last axis of ``x``, or of ``x + residual`` in the same pass.

    Statistics in float32 with the two-pass variance (as torch's ``LayerNorm``):
    ``y = (h - mean) / sqrt(var + eps) * scale + bias`` with ``h = x`` or ``x + residual``.

    Args:
        x: ``(..., H)`` floating inputs.
        scale, bias: ``(H,)``.
        residual: ``(..., H)`` in the dtype of ``x``, or None.
        eps: added to the variance.
        implementation: ``"xla"``, ``"pallas"`` or ``None`` (Pallas on a GPU for 16-bit ``x``).

    Returns:
        ``y (..., H)`` in the dtype of ``x``; with ``residual`` the pair ``(y, h)``, ``h = x + residual``
        (the new residual stream).
    """
    _check_floating("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., H) with H >= 1, got {tuple(x.shape)}")
    width = x.shape[-1]
    tree.check_shape("scale", scale, (width,))
    tree.check_shape("bias", bias, (width,))
    if residual is not None and (tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype):
        raise ValueError(f"residual must have the shape {tuple(x.shape)} and dtype {x.dtype} of x, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    rows = (x.reshape(-1, width), None if residual is None else residual.reshape(-1, width))
    out = dispatch("layer_norm", implementation, rows, (scale, bias), eps=float(eps))
    if residual is None:
        return out.reshape(x.shape)
    return out[0].reshape(x.shape), out[1].reshape(x.shape)


def attention(
    qkv,
    key_bias = None,
    *,
    num_heads: int,
    scale: float,
    causal: bool = False,
    implementation: str | None = None,
):
    """Multi-head self-attention from crammed BERT's fused, per-head interleaved projection.

    ``context = softmax(q k^T * scale + key_bias) v`` per sequence and head (float32 softmax), where
    head ``n``'s query, key and value are columns ``3dn + [0, d)``, ``[d, 2d)``, ``[2d, 3d)`` of ``qkv``
    (``d = H / num_heads``; :func:`fffjax.ops.xla.split_heads`). Bidirectional by default; ``causal``
    lets position ``i`` see keys ``j <= i`` only (a decoder).

    Args:
        qkv: ``(B, S, 3H)`` floating.
        key_bias: ``(B, S)`` additive bias per key (e.g. -10000 at padding) or None.
        num_heads: heads; ``3 * num_heads`` divides the last axis of ``qkv``.
        scale: multiplies the scores.
        causal: mask every key after the query's position.
        implementation: ``"xla"``, ``"cudnn"``, ``"pallas"`` or ``None`` (on a GPU for 16-bit inputs
            Pallas up to its maximum sequence length, then cuDNN; XLA otherwise; the Pallas kernel is
            bidirectional only, so a causal call falls back to cuDNN).

    Returns:
        ``context (B, S, H)`` in the dtype of ``qkv``, head ``n`` at columns ``dn + [0, d)``.
    """
    tree.check_count(num_heads, "num_heads", 1)
    if getattr(qkv, "ndim", None) != 3 or qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must have shape (batch, seq, 3 * heads * d) with heads={num_heads}, "
                         f"got {tuple(getattr(qkv, 'shape', ()))}")
    _check_floating("qkv", qkv)
    if key_bias is not None:
        tree.check_shape("key_bias", key_bias, qkv.shape[:2], " (batch, seq)")
    return dispatch("attention", implementation, (qkv, key_bias), num_heads=num_heads, scale=float(scale),
                    causal=bool(causal))


def cached_attention(
    q,
    k,
    v,
    key_bias = None,
    *,
    scale: float,
    implementation: str | None = None,
):
    """Queries over a key/value cache: ``softmax(q k^T * scale + key_bias) v`` per head (float32 softmax).

    The decode step of a causal decoder: the new tokens' queries against every slot of the cache,
    where ``key_bias`` masks the slots that hold no visible token (empty, padding, or later than the
    query). Every query of a row sees the same keys, so a decode step passes one query per row.

    Args:
        q: ``(B, Q, heads, d)`` floating queries.
        k, v: ``(B, T, heads, d)`` keys and values in the dtype of ``q``.
        key_bias: ``(B, T)`` additive bias per key (e.g. -10000 at empty slots) or None.
        scale: multiplies the scores.
        implementation: ``"xla"``, ``"cpu_ffi"`` (C++, CPU, float32), ``"pallas"`` (one launch; GPU,
            interpret mode elsewhere) or ``None`` (the platform's preference, see
            :func:`fffjax.ops.registry.preference`).

    Returns:
        ``context (B, Q, heads * d)`` in the dtype of ``q``, head ``n`` at columns ``dn + [0, d)``.
    """
    _check_floating("q", q)
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"q must have shape (batch, queries, heads, d), got {tuple(getattr(q, 'shape', ()))}")
    if getattr(k, "ndim", None) != 4:
        raise ValueError(f"k must have shape (batch, slots, heads, d), got {tuple(getattr(k, 'shape', ()))}")
    batch, _, heads, width = q.shape
    cache_shape = (batch, k.shape[1], heads, width)
    for name, a in (("k", k), ("v", v)):
        tree.check_shape(name, a, cache_shape, " (batch, slots, heads, d) of q's batch, heads and d")
        if a.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {a.dtype}")
    if key_bias is not None:
        tree.check_shape("key_bias", key_bias, cache_shape[:2], " (batch, slots)")
    return dispatch("cached_attention", implementation, (q, k, v, key_bias), scale=float(scale))


def gelu(x, *, implementation: str | None = None):
    """Exact (erf) GELU of ``x`` (any shape) in the dtype of ``x``.

    ``implementation``: ``"xla"`` (``jax.nn.gelu(x, approximate=False)``), ``"pallas"`` (computed in
    float32) or ``None`` (Pallas on a GPU for 16-bit ``x``).
    """
    _check_floating("x", x)
    if x.size == 0:
        return x
    return dispatch("gelu", implementation, (x if x.ndim else x.reshape(1),)).reshape(x.shape)
