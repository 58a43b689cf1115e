"""The fused-QKV attention kernel in Pallas interpret mode against its jnp reference and jax's (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.attention import MAX_SEQ, AttentionConfig, attention, attention_reference, split_heads


def _inputs(seed, batch, seq, heads, head_width, dtype, padded=True):
    k = jax.random.split(jax.random.key(seed), 2)
    qkv = (2.0 * jax.random.normal(k[0], (batch, seq, 3 * heads * head_width))).astype(dtype)
    key_bias = None
    if padded:   # crammed BERT's -10000 at padding, the first token always kept
        pad = (jax.random.uniform(k[1], (batch, seq)) < 0.3).at[:, 0].set(False)
        key_bias = jnp.where(pad, -10000.0, 0.0).astype(dtype)
    return qkv, key_bias


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(1, 70), heads=st.integers(1, 3),
       head_width=st.sampled_from([8, 16, 24, 64]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       padded=st.booleans(), block_q=st.sampled_from([16, 32, 128]), heads_per_program=st.sampled_from([1, 2, 3]),
       num_stages=st.sampled_from([1, 2]))
def test_attention_matches_reference(seed, batch, seq, heads, head_width, dtype, padded, block_q,
                                     heads_per_program, num_stages):
    qkv, key_bias = _inputs(seed, batch, seq, heads, head_width, dtype, padded)
    scale = head_width**-0.5
    config = AttentionConfig(block_q=block_q, num_warps=4, heads_per_program=heads_per_program,
                             num_stages=num_stages)
    got = attention(qkv, key_bias, num_heads=heads, scale=scale, interpret=True, config=config)
    want = attention_reference(qkv, key_bias, num_heads=heads, scale=scale)
    assert got.shape == (batch, seq, heads * head_width) and got.dtype == dtype
    assert_close(got, want, dtype, "context")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_is_jax_dot_product_attention(dtype):
    # The reference against jax's own attention on the per-head views, with the mask as jax's bias.
    qkv, key_bias = _inputs(1, 2, 37, 3, 16, dtype)
    q, k, v = split_heads(qkv, 3)
    bias = jnp.broadcast_to(key_bias[:, None, None, :], (2, 1, 37, 37))
    with jax.numpy_dtype_promotion("standard"):   # jax's XLA attention promotes 16-bit logits to float32 implicitly
        want = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=0.25, implementation="xla").reshape(2, 37, 48)
    got = attention(qkv, key_bias, num_heads=3, scale=0.25, interpret=True)
    assert_close(got, want, dtype)


def test_padding_keys_are_ignored():
    # A sequence with its padding keys' values changed gives the same context at every query.
    qkv, _ = _inputs(2, 1, 20, 2, 16, jnp.float32, padded=False)
    pad = jnp.arange(20) >= 13
    key_bias = jnp.where(pad, -1e30, 0.0)[None]
    noisy = qkv.reshape(1, 20, 2, 3, 16).at[:, 13:, :, 1:].add(5.0).reshape(qkv.shape)
    a = attention(qkv, key_bias, num_heads=2, scale=0.25, interpret=True)
    b = attention(noisy, key_bias, num_heads=2, scale=0.25, interpret=True)
    np.testing.assert_allclose(a[:, :13], b[:, :13], atol=1e-6)


def test_op_gradients_are_the_reference_gradients():
    # The kernel is forward only; fffjax.ops.attention(implementation="pallas") differentiates it
    # through the reference's VJP.
    from fffjax import ops

    qkv, key_bias = _inputs(3, 2, 19, 2, 16, jnp.float32)

    def loss(fn, qkv, key_bias):
        return jnp.sum(jnp.sin(fn(qkv, key_bias, num_heads=2, scale=0.25)))

    kernel = lambda *a, **kw: ops.attention(*a, **kw, implementation="pallas")   # noqa: E731
    got = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1))(qkv, key_bias)
    want = jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1))(qkv, key_bias)
    for g, w, name in zip(got, want, ("dqkv", "dkey_bias")):
        assert float(jnp.max(jnp.abs(w))) > 0, name
        assert_close(g, w, jnp.float32, name)


def test_bad_arguments_name_the_argument():
    qkv, key_bias = _inputs(0, 2, 8, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seq, 3 \* heads \* d\) with heads=5"):
        attention(qkv, key_bias, num_heads=5, scale=1.0)
    with pytest.raises(ValueError, match="qkv must have shape"):
        attention(qkv[0], None, num_heads=2, scale=1.0)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(2, 8\)"):
        attention(qkv, key_bias[:, :4], num_heads=2, scale=1.0)
    with pytest.raises(ValueError, match="qkv must be float32, bfloat16 or float16"):
        attention(qkv.astype(jnp.int32), None, num_heads=2, scale=1.0)
    with pytest.raises(ValueError, match=f"at most {MAX_SEQ} tokens.*'cudnn' or 'xla'"):
        attention(jnp.zeros((1, MAX_SEQ + 1, 96)), None, num_heads=2, scale=1.0)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        AttentionConfig(block_q=48)
    with pytest.raises(ValueError, match="block_q must be >= 16"):
        AttentionConfig(block_q=8)
    with pytest.raises(ValueError, match="heads_per_program must be >= 1"):
        AttentionConfig(heads_per_program=0)


def test_heads_per_program_divides_the_heads():
    assert [AttentionConfig(heads_per_program=4).heads_for(n) for n in (12, 6, 5, 1, 16)] == [4, 3, 1, 1, 4]


def test_pipelining_stages_fit_in_shared_memory():
    # Two stages of 512 bf16 keys and values of width 64 (288 KiB) exceed the H200's shared memory.
    config = AttentionConfig(block_q=128, num_stages=2)
    assert config.stages_for(128, 64, 2) == 2
    assert config.stages_for(256, 64, 2) == 2
    assert config.stages_for(512, 64, 2) == 1
    assert config.stages_for(256, 64, 4) == 1
    assert AttentionConfig(num_stages=3).stages_for(100, 24, 4) == 3


def test_empty_batch():
    out = attention(jnp.zeros((0, 5, 48)), None, num_heads=2, scale=1.0)
    assert out.shape == (0, 5, 16)
