"""Multi-head attention for short sequences, read straight from the fused QKV projection.

``context = softmax(q k^T * scale + key_bias) v`` per sequence and head, where ``q, k, v`` are the
columns of crammed BERT's fused projection ``qkv (B, S, 3H)`` in its per-head interleaved layout
(head ``n``: query at columns ``3dn + [0, d)``, key at ``3dn + [d, 2d)``, value at ``3dn + [2d, 3d)``;
``d = H / heads``), and ``context (B, S, H)`` holds head ``n`` at columns ``dn + [0, d)``: the layout
the output projection takes.

One program takes ``block_q`` queries of ``heads_per_program`` heads of one sequence, head after head,
against all of that sequence's keys (padded to a power of two, at most :data:`MAX_SEQ`): per head it
loads its query, key and value columns from ``qkv`` once, forms the ``(block_q, keys)`` float32 scores
on the tensor cores, takes the softmax in registers and writes its ``(block_q, d)`` slice of
``context``; with ``num_stages > 1`` the loop over heads is software-pipelined, so the next head's
loads overlap this head's dots. So nothing but ``qkv`` in and ``context`` out touches HBM. Against
``jax.nn.dot_product_attention`` this saves the copies that cut ``q, k, v`` out of the fused product
(cuDNN wants each as its own ``(B, S, heads, d)`` array) and the ``(B, 1, S, S)`` bias that cuDNN
needs materialised for a padding mask (the comparison: ``experiments/results/attention_gpu.md``).

Scores and softmax are float32; the probabilities are rounded to the value dtype before the product
with ``v`` (as flash attention and the reference do). The kernel is forward only:
``fffjax.ops.attention(..., implementation="pallas")`` differentiates it through the VJP of
:func:`attention_reference`, so training gets the fast forward and XLA's backward.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm

MAX_SEQ = 512   # all keys of a sequence sit in registers: (block_q, keys) float32 scores per program
SMEM_BUDGET = 200 * 1024   # bytes of pipelining buffers per program; a Hopper SM gives a program at most 227 KiB
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """``block_q`` queries per program (a power of two >= 16; capped at the padded sequence length),
    ``num_warps`` Triton warps per program; ``heads_per_program`` heads taken one after the other by
    each program (the largest divisor of the head count not above it), as a loop that Triton
    software-pipelines (the next head's loads overlap this head's dots) when ``num_stages > 1``."""

    block_q: int = 128
    num_warps: int = 4
    heads_per_program: int = 4
    num_stages: int = 2

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block_q", "num_warps"))
        if self.block_q < 16:
            raise ValueError(f"block_q must be >= 16 (Triton dots), got {self.block_q}")
        for name in ("heads_per_program", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def heads_for(self, num_heads: int) -> int:
        """The heads per program for ``num_heads`` heads: the largest divisor <= ``heads_per_program``."""
        return max(h for h in range(1, min(self.heads_per_program, num_heads) + 1) if num_heads % h == 0)

    def stages_for(self, seq: int, head_width: int, itemsize: int) -> int:
        """``num_stages``, or 1 where the pipelined loop's buffers (a query tile, the sequence's keys and
        values, per stage) would pass :data:`SMEM_BUDGET`: at 512 tokens of 64-wide bf16 heads two
        stages need 288 KiB and the kernel would not launch."""
        keys = cm.dot_extent(seq)
        per_stage = (min(self.block_q, keys) + 2 * keys) * cm.dot_extent(head_width) * itemsize
        return self.num_stages if self.num_stages * per_stage <= SMEM_BUDGET else 1


DEFAULT_CONFIG = AttentionConfig()   # the fastest tiles of the sweep in experiments/results/attention_gpu.md


def _kernel(*refs, seq, head_width, scale, block_q, with_bias, heads_per_program, loop):
    if with_bias:
        qkv_ref, bias_ref, out_ref = refs
    else:
        (qkv_ref, out_ref), bias_ref = refs, None
    b, head_group, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    queries = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
    keys = jnp.arange(cm.dot_extent(seq), dtype=jnp.int32)
    query_ok, key_ok = queries < seq, keys < seq
    cols, col_ok = cm.chunk_indices(0, cm.dot_extent(head_width), head_width)
    key_bias = 0.0
    if with_bias:
        key_bias = cm.load(bias_ref.at[b * seq + keys], mask=key_ok, other=0.0).astype(jnp.float32)[None, :]

    def one_head(h, carry):
        head = head_group * heads_per_program + h
        base = head * 3 * head_width
        q = cm.load_rows(qkv_ref, b * seq + queries, base + cols, col_ok, query_ok)
        k = cm.load_rows(qkv_ref, b * seq + keys, base + head_width + cols, col_ok, key_ok)
        v = cm.load_rows(qkv_ref, b * seq + keys, base + 2 * head_width + cols, col_ok, key_ok)
        scores = cm.dot(q, k, trans_b=True) * scale + key_bias           # (block_q, keys) float32
        scores = jnp.where(key_ok[None, :], scores, -jnp.inf)             # padding lanes beyond the sequence
        probs = jnp.exp(scores - jnp.max(scores, axis=1, keepdims=True))
        probs = probs / jnp.sum(probs, axis=1, keepdims=True)
        context = cm.dot(probs.astype(v.dtype), v)
        cm.store_rows(out_ref, b * seq + queries, head * head_width + cols, context, col_ok, query_ok)
        return carry

    if loop:
        jax.lax.fori_loop(0, heads_per_program, one_head, jnp.int32(0))
    else:
        for h in range(heads_per_program):
            one_head(h, None)


def _kernel_call(qkv, key_bias, *, num_heads, scale, interpret, config):
    batch, seq, three_h = qkv.shape
    head_width = three_h // (3 * num_heads)
    block_q = min(config.block_q, cm.dot_extent(seq))
    heads_per_program = config.heads_for(num_heads)
    num_stages = config.stages_for(seq, head_width, jnp.dtype(qkv.dtype).itemsize)
    kernel = functools.partial(_kernel, seq=seq, head_width=head_width, scale=scale, block_q=block_q,
                               with_bias=key_bias is not None, heads_per_program=heads_per_program,
                               loop=num_stages > 1 and heads_per_program > 1)
    operands = [qkv.reshape(batch * seq, three_h)]
    if key_bias is not None:
        operands.append(key_bias.reshape(batch * seq))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch * seq, num_heads * head_width), qkv.dtype),
        grid=(batch, num_heads // heads_per_program, pl.cdiv(seq, block_q)),
        compiler_params=cm.compiler_params(config.num_warps, num_stages),
        interpret=interpret,
        name="attention",
    )(*operands)
    return out.reshape(batch, seq, num_heads * head_width)


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v`` ``(B, S, heads, d)`` from the per-head interleaved ``qkv (B, S, 3H)``."""
    batch, seq, three_h = qkv.shape
    per_head = qkv.reshape(batch, seq, num_heads, 3, three_h // (3 * num_heads))
    return per_head[..., 0, :], per_head[..., 1, :], per_head[..., 2, :]


def attention_reference(qkv, key_bias=None, *, num_heads: int, scale: float):
    """The jnp form of :func:`attention` (same arguments and result): float32 scores and softmax,
    probabilities rounded to the dtype of ``qkv`` before the product with ``v``."""
    batch, seq, _ = qkv.shape
    q, k, v = split_heads(qkv, num_heads)
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=highest, preferred_element_type=jnp.float32) * scale
    if key_bias is not None:
        scores = scores + key_bias.astype(jnp.float32)[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(qkv.dtype)
    context = jnp.einsum("bnqk,bknd->bqnd", probs, v, precision=highest, preferred_element_type=jnp.float32)
    return context.astype(qkv.dtype).reshape(batch, seq, qkv.shape[-1] // 3)


def attention(qkv, key_bias=None, *, num_heads: int, scale: float, interpret: bool = False,
              config: AttentionConfig | None = None):
    """Attention of the fused, per-head interleaved projection ``qkv (B, S, 3H)`` (see the module
    docstring) with an additive ``key_bias (B, S)`` per key (e.g. -10000 at padding) or None.
    ``config`` None: :data:`DEFAULT_CONFIG`, read at call time.

    Returns ``context (B, S, H)`` in the dtype of ``qkv``, head ``n`` at columns ``dn + [0, d)``.
    ``S <= MAX_SEQ``. Forward only (see the module docstring).
    """
    if qkv.ndim != 3 or qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must have shape (batch, seq, 3 * heads * d) with heads={num_heads}, "
                         f"got {tuple(qkv.shape)}")
    if jnp.dtype(qkv.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        raise ValueError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    batch, seq, _ = qkv.shape
    if seq > MAX_SEQ:
        raise ValueError(f"the Pallas attention kernel takes sequences of at most {MAX_SEQ} tokens, got {seq}; "
                         "use implementation='cudnn' or 'xla' for longer ones")
    if key_bias is not None and tuple(key_bias.shape) != (batch, seq):
        raise ValueError(f"key_bias must have shape ({batch}, {seq}) (batch, seq), got {tuple(key_bias.shape)}")
    if qkv.size == 0:
        return attention_reference(qkv, key_bias, num_heads=num_heads, scale=scale)
    config = DEFAULT_CONFIG if config is None else config
    return _kernel_call(qkv, key_bias, num_heads=int(num_heads), scale=float(scale), interpret=interpret,
                        config=config)
