"""Shared inputs and tolerances for the Pallas kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import v1, v2


def v2_inputs(seed: int, n_tokens: int, width: int, depth: int, n_trees: int, dtype, width_out=None):
    """Published-init FFF-v2 weights and normal tokens, as ``(x, w_in, b_in, w_out)``."""
    k_p, k_x = jax.random.split(jax.random.key(seed))
    p = v2.init(k_p, width, depth, n_trees=n_trees, out_features=width_out, dtype=dtype)
    x = jax.random.normal(k_x, (n_tokens, width), dtype)
    return x, p["w_in"], p["b_in"], p["w_out"]


def v1_inputs(seed: int, n_tokens: int, width: int, leaf_width: int, width_out: int, depth: int, dtype):
    """FFF-v1 package-init weights (in :data:`fffjax.v1.PARAM_NAMES` order) and normal tokens."""
    k_p, k_x = jax.random.split(jax.random.key(seed))
    p = v1.init(k_p, width, leaf_width, width_out, depth, dtype=dtype)
    x = jax.random.normal(k_x, (n_tokens, width), dtype)
    return x, [p[n] for n in v1.PARAM_NAMES]


def tie_free_tokens(x, w_in, b_in, *, depth: int, n_trees: int, margin: float = 1e-5) -> np.ndarray:
    """``(T,)`` bool: the tokens with no routing logit within ``margin`` of 0 (see
    :func:`fffjax.v2.routing_margin`: a closer one can flip with the summation order)."""
    return np.asarray(v2.routing_margin(x, w_in, b_in, depth=depth, n_trees=n_trees) > margin)


def assert_close(actual, expected, dtype, name="y"):
    """float32: within ``1e-5 * max(1, max|expected|)``; 16-bit: within 2 bf16 ulps of the output scale."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name} has non-finite values"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    tol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 2 * 2.0**-8
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol * scale, f"{name}: max |error| {err:.3g} > {tol * scale:.3g}"


def assert_bf16_gradients_close(got, want, names):
    """bfloat16 gradients ``got`` against float32 ``want``: each within ``2e-2 * max(1, max|want|)``
    (operands rounded to bfloat16 inside the kernels; sums over tokens in float32)."""
    for name, g, w in zip(names, got, want):
        assert g.dtype == jnp.bfloat16, name
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) <= 2e-2 * scale, name


def pow2_chunk_for(width: int) -> int:
    """A chunk that covers ``width`` in two power-of-two chunks, the second one ragged."""
    size = 1
    while size < width:
        size *= 2
    return max(size // 2, 16)
