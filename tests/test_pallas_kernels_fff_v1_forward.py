"""FFF-v1 forward kernels in Pallas interpret mode against their jnp reference (CPU)."""

import jax
import jax.numpy as jnp
import pytest
from _pallas_helpers import assert_close, pow2_chunk_for, v1_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fffjax
import pallas_kernels as pk
from fffjax import v2
from pallas_kernels.fff_v1_forward import FffV1ForwardConfig


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_tokens=st.integers(1, 40).filter(lambda t: t % 16),
    width=st.sampled_from([64, 96]),
    leaf_width=st.sampled_from([1, 8, 24, 256]),
    width_out=st.sampled_from([10, 64]),
    depth=st.integers(0, 6),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    activation=st.sampled_from([jax.nn.relu, v2.gelu]),
    output_bias=st.booleans(),
)
def test_forward_matches_reference(seed, n_tokens, width, leaf_width, width_out, depth, dtype, activation,
                                   output_bias):
    x, params = v1_inputs(seed, n_tokens, width, leaf_width, width_out, depth, dtype)
    config = FffV1ForwardConfig(chunk=pow2_chunk_for(max(width, width_out)))
    y = pk.fff_v1_hard(x, *params, depth=depth, activation=activation, leaf_output_bias=output_bias,
                       interpret=True, config=config)
    assert y.dtype == dtype
    ref = pk.fff_v1_hard_reference(x, *params, depth=depth, activation=activation, leaf_output_bias=output_bias)
    assert_close(y, ref, dtype)


def test_through_ops_registry_and_package_bias_layout():
    x, params = v1_inputs(3, 13, 64, 8, 12, 3, jnp.float32)
    params[1] = params[1][:, None]           # the package's (n_nodes, 1) biases
    y = fffjax.ops.fff_v1_hard(x, *params, depth=3, implementation="pallas")
    ref = fffjax.ops.fff_v1_hard(x, *params, depth=3, implementation="reference")
    assert_close(y, ref, jnp.float32)


def test_wide_leaf_rejected():
    x, params = v1_inputs(0, 4, 16, 257, 8, 1, jnp.float32)
    with pytest.raises(NotImplementedError, match="leaf width"):
        pk.fff_v1_hard(x, *params, depth=1, interpret=True)
