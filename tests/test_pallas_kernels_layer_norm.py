"""The one-pass layer-norm kernel in Pallas interpret mode against its jnp reference and flax (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.layer_norm import LayerNormConfig, layer_norm, layer_norm_reference


def _inputs(seed, shape, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    width = shape[-1]
    x = (3.0 * jax.random.normal(k[0], shape) + 2.0).astype(dtype)     # a mean far from 0: tests the two passes
    residual = jax.random.normal(k[1], shape).astype(dtype)
    return x, residual, jax.random.normal(k[2], (width,)), jax.random.normal(k[3], (width,))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), width=st.sampled_from([64, 96, 768, 1000]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), fused=st.booleans(),
       block_rows=st.sampled_from([1, 4, 16]))
def test_layer_norm_matches_reference(seed, rows, width, dtype, fused, block_rows):
    x, residual, scale, bias = _inputs(seed, (rows, width), dtype)
    residual = residual if fused else None
    got = layer_norm(
        x, scale, bias, residual, eps=1e-12, interpret=True, config=LayerNormConfig(block_rows=block_rows, num_warps=4)
    )
    want = layer_norm_reference(x, scale, bias, residual, eps=1e-12)
    got, want = (got, want) if fused else ((got,), (want,))
    for g, w, name in zip(got, want, ("y", "h")):
        assert g.dtype == dtype
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_two_pass_layer_norm(dtype):
    x, residual, scale, bias = _inputs(1, (2, 7, 96), dtype)
    flax_norm = nnx.LayerNorm(96, epsilon=1e-12, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    flax_norm.scale[...], flax_norm.bias[...] = scale, bias
    y, h = layer_norm(x, scale, bias, residual, eps=1e-12, interpret=True)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(x + residual, np.float32))
    with jax.numpy_dtype_promotion("standard"):   # flax's statistics promote 16-bit inputs to float32
        want = flax_norm(x + residual)
    assert_close(y, want, dtype)


def test_op_gradients_are_the_reference_gradients():
    # The kernel is forward only; fffjax.ops.layer_norm(implementation="pallas") differentiates it
    # through the reference's VJP.
    from fffjax import ops

    x, residual, scale, bias = _inputs(2, (19, 96), jnp.float32)

    def loss(norm, *args):
        y, h = norm(*args)
        return jnp.sum(y * y) + jnp.sum(jnp.sin(h))

    def through_op(x, scale, bias, residual):
        return ops.layer_norm(x, scale, bias, residual, eps=1e-5, implementation="pallas")

    got = jax.grad(lambda *a: loss(through_op, *a), argnums=(0, 1, 2, 3))(x, scale, bias, residual)
    want = jax.grad(lambda *a: loss(lambda *b: layer_norm_reference(*b, eps=1e-5), *a),
                    argnums=(0, 1, 2, 3))(x, scale, bias, residual)
    for g, w, name in zip(got, want, ("dx", "dscale", "dbias", "dresidual")):
        assert float(jnp.max(jnp.abs(w))) > 0, name
        assert_close(g, w, jnp.float32, name)


def test_bad_input_names_the_argument():
    x, residual, scale, bias = _inputs(0, (4, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(64,\)"):
        layer_norm(x, scale[:10], bias, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="residual must have the shape"):
        layer_norm(x, scale, bias, residual[:2], eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        LayerNormConfig(block_rows=6)
