"""Pallas-Triton GPU kernels for FFF hard inference and conditional training.

Importing this package registers ``implementation="pallas"`` for ``fffjax.ops.fff_v2_hard`` (the
forward kernel, differentiable through the conditional backward kernels) and
``fffjax.ops.fff_v1_hard``. On a GPU the kernels run compiled; elsewhere the registered functions
run them in Pallas interpret mode (slow; for tests).

Public API:
    fff_v2_hard(x, w_in, b_in, w_out, *, depth, n_trees=1, interpret=False, config=None)
    fff_v2_hard_trainable(...): the same, with the conditional custom VJP
    fff_v1_hard(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth, activation,
                leaf_output_bias=True, interpret=False, config=...)

The crammed-BERT model's kernels, imported from their modules when a model uses them:
    pallas_kernels.layer_norm.layer_norm(x, scale, bias, residual=None, *, eps, ...)
    pallas_kernels.attention.attention(qkv, key_bias=None, *, num_heads, scale, ...)
    pallas_kernels.gelu.gelu(x, ...)   (the dense twin's exact GELU)
"""

import jax.numpy as jnp

from fffjax.ops import register_implementation
from pallas_kernels import _common
from pallas_kernels.fff_v1_forward import FffV1ForwardConfig, fff_v1_hard, fff_v1_hard_reference
from pallas_kernels.fff_v2_forward import FffV2ForwardConfig, fff_v2_hard, fff_v2_hard_reference
from pallas_kernels.fff_v2_train import FffV2TrainConfig, fff_v2_hard_trainable, reference_vjp

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_DEPTH = 15


def _check_supported(x, depth: int) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        raise NotImplementedError(f"the Pallas kernels take float32/bfloat16/float16 x, got {x.dtype}")
    if depth > MAX_DEPTH:
        raise NotImplementedError(f"the Pallas kernels take depth <= {MAX_DEPTH}, got {depth}")
    if x.shape[0] == 0:
        raise NotImplementedError("the Pallas kernels need at least one token")


def _registered_v2(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1):
    _check_supported(x, depth)
    return fff_v2_hard_trainable(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees,
                                 interpret=not _common.on_gpu())


def _registered_v1(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int, activation,
                   leaf_output_bias: bool = True):
    _check_supported(x, depth)
    return fff_v1_hard(x, node_weights, node_biases, w1s, b1s, w2s, b2s, depth=depth, activation=activation,
                       leaf_output_bias=leaf_output_bias, interpret=not _common.on_gpu())


register_implementation("fff_v2_hard", "pallas", _registered_v2)
register_implementation("fff_v1_hard", "pallas", _registered_v1)

__all__ = [
    "FffV1ForwardConfig", "FffV2ForwardConfig", "FffV2TrainConfig", "fff_v1_hard", "fff_v1_hard_reference",
    "fff_v2_hard", "fff_v2_hard_reference", "fff_v2_hard_trainable", "reference_vjp",
]
