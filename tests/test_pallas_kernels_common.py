"""pallas_kernels._common: the erf and GELU that lower in Triton, against float64 and jax (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import v2


def test_erf_and_gelu_match_float64():
    from scipy.special import erf as erf64

    from pallas_kernels import _common
    z = np.linspace(-7, 7, 20001).astype(np.float32)
    assert np.max(np.abs(np.asarray(_common.erf(jnp.asarray(z))) - erf64(z.astype(np.float64)))) < 5e-7
    gelu64 = 0.5 * z.astype(np.float64) * (1 + erf64(z.astype(np.float64) / np.sqrt(2)))
    assert np.max(np.abs(np.asarray(_common.gelu(jnp.asarray(z))) - gelu64)) < 2e-6
    grad = jax.vmap(jax.grad(lambda t: v2.gelu(t)))(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(_common.gelu_grad(jnp.asarray(z))), np.asarray(grad), atol=2e-6)
