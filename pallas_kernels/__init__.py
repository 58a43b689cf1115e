"""Pallas-Triton GPU kernels and one Pallas TPU (Mosaic) kernel, each module beside the jnp reference
it is tested against.

A leaf package: its modules import jax and, for their references, :mod:`fffjax.tree`,
:mod:`fffjax.v1` and :mod:`fffjax.v2`; they register nothing. :mod:`fffjax.ops.pallas` adapts them
to the ops' ``implementation="pallas"`` (argument checks, interpret mode off a GPU, the
reference VJP of the forward-only kernels). On a GPU the kernels run compiled; with
``interpret=True`` they run in Pallas interpret mode on any backend (slow; for tests).

Modules:
    fff_v2_forward: fff_v2_hard(x, w_in, b_in, w_out, *, depth, n_trees=1, interpret=False, config=None)
    fff_v2_train:   fff_v2_hard_trainable(...) (the same with the conditional backward kernels)
    fff_v1_forward: fff_v1_hard(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth, activation, ...)
    layer_norm:     layer_norm(x, scale, bias, residual=None, *, eps, ...) (forward only)
    attention:      attention(qkv, key_bias=None, *, num_heads, scale, ...) (forward only)
    gelu:           gelu(x, ...) (forward and backward kernels)
    fff_v2_tpu:     fff_v2_hard(x, w_in, b_in, w_out, *, depth, n_trees=1, interpret=False, config=None) for a
                    TPU (Mosaic; checked in the TPU interpreter and by cross-lowering, not yet run on a TPU)
"""

from pallas_kernels.fff_v1_forward import FffV1ForwardConfig, fff_v1_hard, fff_v1_hard_reference
from pallas_kernels.fff_v2_forward import FffV2ForwardConfig, fff_v2_hard, fff_v2_hard_reference
from pallas_kernels.fff_v2_train import FffV2TrainConfig, fff_v2_hard_trainable, reference_vjp

__all__ = [
    "FffV1ForwardConfig", "FffV2ForwardConfig", "FffV2TrainConfig", "fff_v1_hard", "fff_v1_hard_reference",
    "fff_v2_hard", "fff_v2_hard_reference", "fff_v2_hard_trainable", "reference_vjp",
]
