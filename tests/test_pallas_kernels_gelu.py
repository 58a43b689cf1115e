"""The elementwise exact-GELU kernel in Pallas interpret mode against its jnp reference (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.gelu import GeluConfig, gelu, gelu_reference


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(1,), (7, 300), (3, 5, 64), (4097,)]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]), block=st.sampled_from([16, 256, 4096]))
def test_gelu_matches_reference(seed, shape, dtype, block):
    x = (4.0 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)   # reaches the erf clamp at |x/sqrt 2| = 4
    got = gelu(x, interpret=True, config=GeluConfig(block=block, num_warps=4))
    assert got.shape == x.shape and got.dtype == x.dtype
    assert_close(got, gelu_reference(x), dtype)


def test_reference_is_the_exact_gelu():
    from scipy.special import erf as erf64

    x = jnp.linspace(-9.0, 9.0, 1001)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(gelu_reference(x), 0.5 * x64 * (1.0 + erf64(x64 / np.sqrt(2.0))), atol=2e-6)
    np.testing.assert_allclose(gelu(x, interpret=True), gelu_reference(x), atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_is_the_reference_gradient(dtype):
    x = (3.0 * jax.random.normal(jax.random.key(1), (5, 33))).astype(dtype)
    config = GeluConfig(block=64, num_warps=4)
    got = jax.grad(lambda a: jnp.sum(jnp.sin(gelu(a, interpret=True, config=config)).astype(jnp.float32)))(x)
    want = jax.grad(lambda a: jnp.sum(jnp.sin(gelu_reference(a)).astype(jnp.float32)))(x)
    assert got.dtype == dtype
    assert_close(got, want, dtype, "dx")


def test_empty_and_bad_inputs():
    assert gelu(jnp.zeros((0, 4), jnp.bfloat16), interpret=True).shape == (0, 4)
    with pytest.raises(ValueError, match="x must be a floating array"):
        gelu(jnp.arange(4), interpret=True)
    with pytest.raises(ValueError, match="block must be a power of two"):
        GeluConfig(block=1000)
