"""The decode-step attention kernel in Pallas interpret mode against its jnp reference and XLA's (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fffjax.ops import xla
from pallas_kernels.cached_attention import CachedAttentionConfig, cached_attention, cached_attention_reference


def _inputs(seed, batch, queries, slots, heads, width, dtype, padded=True):
    k = jax.random.split(jax.random.key(seed), 4)
    q = (2.0 * jax.random.normal(k[0], (batch, queries, heads, width))).astype(dtype)
    keys = (2.0 * jax.random.normal(k[1], (batch, slots, heads, width))).astype(dtype)
    values = jax.random.normal(k[2], (batch, slots, heads, width)).astype(dtype)
    key_bias = None
    if padded:   # empty or future slots at -10000, as the decoder's cache masks them; slot 0 always seen
        empty = (jax.random.uniform(k[3], (batch, slots)) < 0.4).at[:, 0].set(False)
        key_bias = jnp.where(empty, -10000.0, 0.0).astype(dtype)
    return q, keys, values, key_bias


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), queries=st.integers(1, 3), slots=st.integers(1, 150),
       heads=st.integers(1, 3), width=st.sampled_from([8, 24, 64]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       padded=st.booleans(), block_k=st.sampled_from([16, 32, 128]), num_stages=st.sampled_from([1, 2]))
def test_cached_attention_matches_reference(seed, batch, queries, slots, heads, width, dtype, padded, block_k,
                                            num_stages):
    # Slot counts across one and several blocks, partly filled last blocks, head widths below 16 (padded).
    q, k, v, key_bias = _inputs(seed, batch, queries, slots, heads, width, dtype, padded)
    config = CachedAttentionConfig(block_k=block_k, num_stages=num_stages)
    got = cached_attention(q, k, v, key_bias, scale=width**-0.5, interpret=True, config=config)
    want = cached_attention_reference(q, k, v, key_bias, scale=width**-0.5)
    assert got.shape == (batch, queries, heads * width) and got.dtype == dtype
    assert_close(got, want, dtype, "context")


def test_reference_is_xla_cached_attention():
    q, k, v, key_bias = _inputs(1, 2, 1, 40, 3, 16, jnp.float32)
    np.testing.assert_allclose(cached_attention_reference(q, k, v, key_bias, scale=0.25),
                               xla.cached_attention(q, k, v, key_bias, scale=0.25), atol=1e-6)


def test_large_scores_stay_finite_across_blocks():
    # Scores of several hundred in a later block rescale the running sum without overflow.
    q, k, v, _ = _inputs(2, 1, 1, 100, 1, 16, jnp.float32, padded=False)
    k = k.at[:, 70].set(40.0 * q[:, 0])
    got = cached_attention(q, k, v, scale=1.0, interpret=True, config=CachedAttentionConfig(block_k=16))
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(got, cached_attention_reference(q, k, v, scale=1.0), atol=1e-5)


@pytest.mark.parametrize("field,value", [("block_k", 8), ("block_k", 48), ("num_warps", 3), ("num_stages", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        CachedAttentionConfig(**{field: value})


def test_bad_shapes_name_the_argument():
    q, k, v, key_bias = _inputs(0, 2, 1, 8, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="k and v must have shape"):
        cached_attention(q, k, v[:, :4], scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(2, 8\)"):
        cached_attention(q, k, v, key_bias[:, :4], scale=1.0, interpret=True)


def test_the_pallas_op_differentiates_through_the_reference():
    from fffjax import ops
    q, k, v, key_bias = _inputs(3, 2, 1, 20, 2, 16, jnp.float32)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(jnp.sin(ops.cached_attention(q, k, v, key_bias, scale=0.25,
                                                                    implementation=implementation)))

    got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
