"""``implementation="pallas"``: the kernels of :mod:`pallas_kernels`, adapted to the ops' arguments.

Each adapter refuses what its kernel does not cover with ``NotImplementedError`` (so that an
automatic choice falls back to the next implementation), runs the kernel compiled on a GPU and in
Pallas interpret mode elsewhere (for tests), and makes it differentiable:

* FFF-v2 through its conditional backward kernels (:func:`pallas_kernels.fff_v2_train.fff_v2_hard_trainable`);
  its forward kernel's configuration follows the token count
  (:func:`pallas_kernels.fff_v2_forward.default_config`: one few-token walk launch up to
  :data:`~pallas_kernels.fff_v2_forward.WALK_MAX_TOKENS` tokens, the grouped pipeline above for one deep tree);
* GELU through its backward kernel;
* layer norm, attention, cached attention and FFF-v1 (forward-only kernels) through the VJP of their jnp references
  (:func:`fffjax.ops._vjp.with_reference_vjp`).

:func:`fff_v2_hard_tpu` is ``implementation="pallas_tpu"``: the Mosaic TPU kernel of
:mod:`pallas_kernels.fff_v2_tpu`, compiled when lowered for a TPU and in Pallas interpret
mode when lowered for another platform (plain ``interpret=True``: the TPU interpreter's ordered
callbacks cannot sit in the platform switch), with the reference's VJP. It is opt-in: no platform's
automatic choice includes it.

:mod:`fffjax.ops.registry` imports this module behind a guard: without Pallas-Triton the
implementation is simply not registered.
"""

import jax
import jax.numpy as jnp

from fffjax.ops._vjp import with_reference_vjp
from pallas_kernels import attention as attention_kernel
from pallas_kernels import cached_attention as cached_attention_kernel
from pallas_kernels import fff_v1_forward, fff_v2_forward, fff_v2_tpu, fff_v2_train
from pallas_kernels import gelu as gelu_kernel
from pallas_kernels import layer_norm as layer_norm_kernel

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _check_dtype(x) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
        raise NotImplementedError(f"the Pallas kernels take float32/bfloat16/float16 inputs, got {x.dtype}")


def _check_fff(x, depth: int) -> None:
    _check_dtype(x)
    if depth > fff_v2_forward.MAX_DEPTH:
        raise NotImplementedError(f"the Pallas kernels take depth <= {fff_v2_forward.MAX_DEPTH}, got {depth}")
    if x.shape[0] == 0:
        raise NotImplementedError("the Pallas kernels need at least one token")


def fff_v2_hard(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1):
    """FFF-v2 hard forward and its conditional backward through the Pallas kernels."""
    _check_fff(x, depth)
    return fff_v2_train.fff_v2_hard_trainable(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees,
                                              interpret=_interpret())


_fff_v2_tpu_differentiable = with_reference_vjp(
    lambda x, w_in, b_in, w_out, *, depth, n_trees, interpret: fff_v2_tpu.fff_v2_hard(
        x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret),
    lambda x, w_in, b_in, w_out, *, depth, n_trees, interpret: fff_v2_tpu.fff_v2_hard_reference(
        x, w_in, b_in, w_out, depth=depth, n_trees=n_trees))


def fff_v2_hard_tpu(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1):
    """FFF-v2 hard forward through the Pallas TPU kernel (float32 or bfloat16, node tables up to
    :data:`pallas_kernels.fff_v2_tpu.MAX_TABLE_BYTES` in VMEM), with the reference's VJP."""
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise NotImplementedError(f"the Pallas TPU kernel takes float32/bfloat16 inputs, got {x.dtype}")
    table_bytes = w_in.size * w_in.dtype.itemsize + w_out.size * w_out.dtype.itemsize
    if table_bytes > fff_v2_tpu.MAX_TABLE_BYTES:
        raise NotImplementedError(f"the Pallas TPU kernel keeps w_in and w_out in VMEM, at most "
                                  f"{fff_v2_tpu.MAX_TABLE_BYTES} bytes together, got {table_bytes}")

    def run(interpret):
        static = (("depth", depth), ("n_trees", n_trees), ("interpret", interpret))
        return lambda *arrays: _fff_v2_tpu_differentiable(static, *arrays)

    # Chosen when lowering, so that jax.export(..., platforms=["tpu"]) on a CPU holds the compiled kernel.
    return jax.lax.platform_dependent(x, w_in, b_in, w_out, tpu=run(False), default=run(True))


_fff_v1_differentiable = with_reference_vjp(
    lambda x, *weights, depth, activation, leaf_output_bias, interpret: fff_v1_forward.fff_v1_hard(
        x, *weights, depth=depth, activation=activation, leaf_output_bias=leaf_output_bias, interpret=interpret),
    lambda x, *weights, depth, activation, leaf_output_bias, interpret: fff_v1_forward.fff_v1_hard_reference(
        x, *weights, depth=depth, activation=activation, leaf_output_bias=leaf_output_bias))


def fff_v1_hard(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int, activation,
                leaf_output_bias: bool = True):
    """FFF-v1 hard forward through the Pallas kernels (leaf width up to
    :data:`pallas_kernels.fff_v1_forward.MAX_LEAF_WIDTH`), with the reference's VJP."""
    _check_fff(x, depth)
    if w1s.shape[2] > fff_v1_forward.MAX_LEAF_WIDTH:
        raise NotImplementedError(
            f"the Pallas FFF-v1 kernel takes leaf width <= {fff_v1_forward.MAX_LEAF_WIDTH}, got {w1s.shape[2]}")
    static = (("depth", depth), ("activation", activation), ("leaf_output_bias", bool(leaf_output_bias)),
              ("interpret", _interpret()))
    return _fff_v1_differentiable(static, x, node_weights, node_biases, w1s, b1s, w2s, b2s)


_layer_norm_differentiable = with_reference_vjp(
    lambda x, residual, scale, bias, *, eps, interpret: layer_norm_kernel.layer_norm(
        x, scale, bias, residual, eps=eps, interpret=interpret),
    lambda x, residual, scale, bias, *, eps, interpret: layer_norm_kernel.layer_norm_reference(
        x, scale, bias, residual, eps=eps))


def layer_norm(x, residual, scale, bias, *, eps: float):
    """The one-pass layer norm kernel (residual add fused), with the reference's VJP."""
    _check_dtype(x)
    return _layer_norm_differentiable((("eps", float(eps)), ("interpret", _interpret())), x, residual, scale, bias)


_attention_differentiable = with_reference_vjp(
    lambda qkv, key_bias, *, num_heads, scale, interpret: attention_kernel.attention(
        qkv, key_bias, num_heads=num_heads, scale=scale, interpret=interpret),
    lambda qkv, key_bias, *, num_heads, scale, interpret: attention_kernel.attention_reference(
        qkv, key_bias, num_heads=num_heads, scale=scale))


def attention(qkv, key_bias=None, *, num_heads: int, scale: float, causal: bool = False):
    """Bidirectional attention read straight from the fused projection, up to
    :data:`pallas_kernels.attention.MAX_SEQ` tokens, with the reference's VJP."""
    _check_dtype(qkv)
    if causal:
        raise NotImplementedError("the Pallas attention kernel is bidirectional; use 'cudnn' or 'xla' for causal")
    if qkv.shape[1] > attention_kernel.MAX_SEQ:
        raise NotImplementedError(f"the Pallas attention kernel takes sequences of at most "
                                  f"{attention_kernel.MAX_SEQ} tokens, got {qkv.shape[1]}; use 'cudnn' or 'xla'")
    static = (("num_heads", int(num_heads)), ("scale", float(scale)), ("interpret", _interpret()))
    return _attention_differentiable(static, qkv, key_bias)


_cached_attention_differentiable = with_reference_vjp(
    lambda q, k, v, key_bias, *, scale, interpret: cached_attention_kernel.cached_attention(
        q, k, v, key_bias, scale=scale, interpret=interpret),
    lambda q, k, v, key_bias, *, scale, interpret: cached_attention_kernel.cached_attention_reference(
        q, k, v, key_bias, scale=scale))


def cached_attention(q, k, v, key_bias=None, *, scale: float):
    """Queries over a key/value cache in one launch (the decode step's attention), with the reference's VJP."""
    _check_dtype(q)
    if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        raise NotImplementedError("the Pallas cached-attention kernel needs at least one query and one slot")
    return _cached_attention_differentiable((("scale", float(scale)), ("interpret", _interpret())), q, k, v, key_bias)


def gelu(x):
    """Exact GELU through the elementwise forward and backward kernels."""
    _check_dtype(x)
    return gelu_kernel.gelu(x, interpret=_interpret())
