"""Queries over a key/value cache (a decoder's decode step) as one Pallas-Triton kernel.

``context = softmax(q k^T * scale + key_bias) v`` per row and head, where ``q (B, Q, heads, d)`` holds
a few new tokens' queries (one per row in a decode step) and ``k, v (B, T, heads, d)`` the cache's
``T`` slots; ``key_bias (B, T)`` masks the slots that hold no visible token. ``context`` is
``(B, Q, heads * d)``, head ``n`` at columns ``dn + [0, d)``.

XLA runs this as several launches (scores, the masked softmax's reductions, the product with ``v``),
each a small kernel at batch 1, so the decode step's attention is made of launch latencies. Here one
program takes one row and head: it loads its ``(Q, d)`` queries once, then walks the cache in blocks of
``block_k`` slots with an online softmax (running maximum and sum in float32, as flash decoding),
forming each block's scores and its product with ``v`` on the tensor cores; the context is written
once. Scores and softmax are float32; the probabilities are rounded to the value dtype before the
product with ``v``, as in :func:`cached_attention_reference`. Forward only:
``fffjax.ops.cached_attention(..., implementation="pallas")`` differentiates through the reference.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_EMPTY = -1e30   # the score of a padding slot past T: exp(_EMPTY - m) is 0 against any real score


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachedAttentionConfig:
    """``block_k`` cache slots per step of a program's walk (a power of two >= 16), ``num_warps``
    Triton warps and ``num_stages`` software-pipelining stages of the walk over the slot blocks."""

    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block_k", "num_warps"))
        if self.block_k < 16:
            raise ValueError(f"block_k must be >= 16 (Triton dots), got {self.block_k}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = CachedAttentionConfig()


def _kernel(*refs, queries, slots, head_width, scale, block_k, with_bias):
    if with_bias:
        q_ref, k_ref, v_ref, bias_ref, out_ref = refs
    else:
        q_ref, k_ref, v_ref, out_ref = refs
        bias_ref = None
    row, head = pl.program_id(0), pl.program_id(1)
    q_pad, d_pad = cm.dot_extent(queries), cm.dot_extent(head_width)
    q_idx = jnp.arange(q_pad, dtype=jnp.int32)
    q_ok = q_idx < queries
    cols = head * head_width + jnp.arange(d_pad, dtype=jnp.int32)
    col_ok = None if d_pad == head_width else jnp.arange(d_pad, dtype=jnp.int32) < head_width
    q = cm.load_rows(q_ref, row * queries + q_idx, cols, col_ok, q_ok)

    def block(i, carry):
        m, total, acc = carry
        slot = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
        slot_ok = slot < slots
        k = cm.load_rows(k_ref, row * slots + slot, cols, col_ok, slot_ok)
        v = cm.load_rows(v_ref, row * slots + slot, cols, col_ok, slot_ok)
        scores = cm.dot(q, k, trans_b=True) * scale                                # (q_pad, block_k)
        if with_bias:
            bias = cm.load(bias_ref.at[row * slots + slot], mask=slot_ok, other=0.0).astype(jnp.float32)
            scores += bias[None, :]
        scores = jnp.where(slot_ok[None, :], scores, _EMPTY)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        total = total * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + cm.dot(p.astype(v.dtype), v)
        return m_new, total, acc

    init = (jnp.full((q_pad,), _EMPTY, jnp.float32), jnp.zeros((q_pad,), jnp.float32),
            jnp.zeros((q_pad, d_pad), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, pl.cdiv(slots, block_k), block, init)
    cm.store_rows(out_ref, row * queries + q_idx, cols, acc / total[:, None], col_ok, q_ok)


def cached_attention_reference(q, k, v, key_bias=None, *, scale: float):
    """The jnp form of :func:`cached_attention` (same arguments and result): float32 scores and softmax,
    probabilities rounded to the dtype of ``v`` before the product with it."""
    batch, queries, heads, width = q.shape
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=highest, preferred_element_type=jnp.float32) * scale
    if key_bias is not None:
        scores = scores + key_bias.astype(jnp.float32)[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    context = jnp.einsum("bnqk,bknd->bqnd", probs, v, precision=highest, preferred_element_type=jnp.float32)
    return context.astype(q.dtype).reshape(batch, queries, heads * width)


def cached_attention(q, k, v, key_bias=None, *, scale: float, interpret: bool = False,
                     config: CachedAttentionConfig | None = None):
    """Queries ``q (B, Q, heads, d)`` over the cache ``k, v (B, T, heads, d)`` (dtype of ``q``) with an
    additive ``key_bias (B, T)`` per slot or None; ``config`` None: :data:`DEFAULT_CONFIG`, read at
    call time. Returns ``context (B, Q, heads * d)`` in the dtype of ``q``. Forward only."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must have shapes (batch, queries|slots, heads, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, queries, heads, width = q.shape
    slots = k.shape[1]
    if tuple(k.shape) != (batch, slots, heads, width) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have shape ({batch}, slots, {heads}, {width}), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _DTYPES] or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float32, bfloat16, float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_bias is not None and tuple(key_bias.shape) != (batch, slots):
        raise ValueError(f"key_bias must have shape ({batch}, {slots}) (batch, slots), got {tuple(key_bias.shape)}")
    if q.size == 0 or slots == 0:
        return cached_attention_reference(q, k, v, key_bias, scale=scale)
    config = DEFAULT_CONFIG if config is None else config
    block_k = min(config.block_k, cm.dot_extent(slots))
    kernel = functools.partial(_kernel, queries=queries, slots=slots, head_width=width,
                               scale=float(scale), block_k=block_k, with_bias=key_bias is not None)
    operands = [q.reshape(batch * queries, heads * width), k.reshape(batch * slots, heads * width),
                v.reshape(batch * slots, heads * width)]
    if key_bias is not None:
        operands.append(key_bias.reshape(batch * slots))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch * queries, heads * width), q.dtype),
        grid=(batch, heads),
        compiler_params=cm.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="cached_attention",
    )(*operands)
    return out.reshape(batch, queries, heads * width)
