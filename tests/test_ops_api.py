"""fffjax.ops.api, the public ops: bad input to the hard-inference ops raises an error naming the
argument; the transformer ops (layer norm, attention, GELU) through every implementation the CPU runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _argument_helpers import (
    DEPTH,
    H_OUT,
    IN,
    N_LEAVES,
    N_NODES,
    NOT_AN_INT,
    OUT,
    V1_WEIGHTS,
    V2_WEIGHTS,
    WIDTH,
    X_V1,
    X_V2,
    H,
    K,
    N,
    zeros,
)
from flax import nnx

from fffjax import ops
from fffjax.ops import fff_v1_hard, fff_v2_hard

F32, BF16 = jnp.float32, jnp.bfloat16


def v2_call(x=X_V2, depth=DEPTH, n_trees=K, implementation="xla", **weights):
    return fff_v2_hard(x, **{**V2_WEIGHTS, **weights}, depth=depth, n_trees=n_trees,
                       implementation=implementation)


def v1_call(x=X_V1, depth=DEPTH, implementation="xla", **weights):
    return fff_v1_hard(x, **{**V1_WEIGHTS, **weights}, depth=depth, implementation=implementation)


# --------------------------------------------------------------------------- fff_v2_hard


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(x=zeros(3, H + 1)), ValueError, rf"x must have shape \(\.\.\., {H}\)"),
        (dict(x=zeros(2, 3, H - 1)), ValueError, r"x must have shape .*\(2, 3, 5\)"),
        (dict(x=np.ones((3, H), np.int32)), TypeError, "x must be a floating-point array"),
        (dict(x=[[0.0] * H]), TypeError, "x must be an array"),
        (dict(depth=-1), ValueError, "depth must be an int >= 0, got -1"),
        (dict(depth=2.0), (ValueError, TypeError), NOT_AN_INT.format("depth")),
        (dict(depth=DEPTH + 1), ValueError, rf"w_in must have shape \({K * 15}, {H}\), got \({N}, {H}\): "
         rf"{N} rows is {K} depth-{DEPTH} trees \(2\*\*\(depth\+1\)-1 = 7 nodes per tree x n_trees={K}\); "
         rf"depth={DEPTH + 1} expects {K * 15}$"),
        (dict(depth=DEPTH - 1), ValueError,
         rf"{N} rows is {K} depth-{DEPTH} trees .*; depth={DEPTH - 1} expects {K * 3}$"),
        (dict(n_trees=0), ValueError, "n_trees must be an int >= 1"),
        (dict(n_trees=1), ValueError,
         rf"w_in must have shape \(7, {H}\), got \({N}, {H}\): "
         rf"{N} rows is {K} trees of depth {DEPTH} \(7 nodes each\); "
         "n_trees=1 expects 7$"),
        (dict(n_trees=K + 1), ValueError,
         rf"{N} rows is {K} trees of depth {DEPTH} .*; n_trees={K + 1} expects {7 * (K + 1)}$"),
        (dict(w_in=zeros(N - 1, H)), ValueError, rf"w_in must have shape \({N}, {H}\), got \({N - 1}, {H}\): "
         rf"{N - 1} rows is not {K} whole trees of any depth .*; depth={DEPTH}, n_trees={K} expect {N}$"),
        (dict(w_in=zeros(N)), ValueError, "w_in must have shape"),
        (dict(b_in=zeros(N + 1)), ValueError, rf"b_in must have shape \({N},\), got \({N + 1},\)"),
        (dict(b_in=zeros(K * 15)), ValueError,
         rf"{K * 15} entries is {K} depth-3 trees .*; depth={DEPTH} expects {N}$"),
        (dict(b_in=zeros(N, 1)), ValueError, "b_in must have shape"),
        (dict(w_out=zeros(N - 2, H_OUT)), ValueError, rf"w_out must have shape \({N}, H_out\)"),
        (dict(w_out=zeros(K * 3, H_OUT)), ValueError,
         rf"w_out must have shape \({N}, H_out\), got \({K * 3}, {H_OUT}\): {K * 3} rows is {K} depth-1 trees"),
        (dict(w_out=zeros(H_OUT, N)), ValueError, "w_out must have shape"),
        (dict(implementation="cuda-magic"), ValueError, "implementation must be one of .*'cuda-magic'"),
    ],
)
def test_fff_v2_hard_names_the_bad_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        v2_call(**kwargs)


# --------------------------------------------------------------------------- fff_v1_hard


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(x=zeros(4, IN + 2)), ValueError, rf"x must have shape \(\.\.\., {IN}\)"),
        (dict(x=np.ones((4, IN), np.int64)), TypeError, "x must be a floating-point array"),
        (dict(depth=-2), ValueError, "depth must be an int >= 0, got -2"),
        (dict(depth=DEPTH + 1), ValueError,
         rf"w1s must have shape \(8, in, width\), got \({N_LEAVES}, {IN}, {WIDTH}\): "
         rf"{N_LEAVES} leaves is a depth-{DEPTH} tree \(2\*\*depth = {N_LEAVES} leaves\); "
         rf"depth={DEPTH + 1} expects 8$"),
        (dict(depth=DEPTH - 1), ValueError,
         rf"{N_LEAVES} leaves is a depth-{DEPTH} tree .*; depth={DEPTH - 1} expects 2$"),
        (dict(node_weights=zeros(N_NODES + 1, IN)), ValueError,
         rf"node_weights must have shape \({N_NODES}, {IN}\), got \({N_NODES + 1}, {IN}\)"),
        (dict(node_weights=zeros(N_NODES, IN + 1)), ValueError, "node_weights must have shape"),
        (dict(node_weights=zeros(7, IN)), ValueError, rf"node_weights must have shape \({N_NODES}, {IN}\), got "
         rf"\(7, {IN}\): 7 node rows is a depth-3 tree \(2\*\*depth - 1 = 7 nodes\); depth={DEPTH} expects {N_NODES}$"),
        (dict(node_biases=zeros(1, 1)), ValueError,
         rf"1 node row is a depth-1 tree .*; depth={DEPTH} expects {N_NODES}$"),
        (dict(node_biases=zeros(N_NODES, 2)), ValueError, rf"node_biases must have shape \({N_NODES}, 1\)"),
        (dict(node_biases=zeros(N_NODES + 1)), ValueError, rf"node_biases must have shape \({N_NODES},\)"),
        (dict(w1s=zeros(N_LEAVES, IN)), ValueError, "w1s must have shape"),
        (dict(w1s=zeros(N_LEAVES + 1, IN, WIDTH)), ValueError, "w1s must have shape"),
        (dict(b1s=zeros(N_LEAVES, WIDTH + 1)), ValueError, rf"b1s must have shape \({N_LEAVES}, {WIDTH}\)"),
        (dict(w2s=zeros(N_LEAVES, WIDTH + 1, OUT)), ValueError, "w2s must have shape"),
        (dict(w2s=zeros(N_LEAVES, WIDTH)), ValueError, "w2s must have shape"),
        (dict(w2s=zeros(2, WIDTH, OUT)), ValueError,
         rf"2 leaves is a depth-1 tree .*; depth={DEPTH} expects {N_LEAVES}$"),
        (dict(b1s=zeros(3, WIDTH)), ValueError,
         rf"3 leaves is not 2\*\*depth leaves for any depth; depth={DEPTH} expects"),
        (dict(b2s=zeros(N_LEAVES, OUT + 1)), ValueError, rf"b2s must have shape \({N_LEAVES}, {OUT}\)"),
        (dict(implementation="nope"), ValueError, "implementation must be one of .*'nope'"),
    ],
)
def test_fff_v1_hard_names_the_bad_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        v1_call(**kwargs)


def test_package_layout_node_biases_accepted():
    """The package's ``(n, 1)`` node biases are valid input (the control for the cases above)."""
    y = v1_call(node_biases=V1_WEIGHTS["node_biases"][:, None])
    np.testing.assert_array_equal(y, v1_call())
    assert y.shape == (2, 3, OUT)


# --------------------------------------------------------------------------- layer norm, attention, GELU


def _norm_inputs(dtype, rows=6, width=24):
    k = jax.random.split(jax.random.key(0), 4)
    x = (2.0 * jax.random.normal(k[0], (rows, width)) + 1.0).astype(dtype)
    residual = jax.random.normal(k[1], (rows, width)).astype(dtype)
    return x, residual, jax.random.normal(k[2], (width,)), jax.random.normal(k[3], (width,))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_layer_norm_matches_flax(dtype, implementation):
    x, residual, scale, bias = _norm_inputs(dtype)
    norm = nnx.LayerNorm(24, epsilon=1e-12, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    with jax.numpy_dtype_promotion("standard"):   # flax's statistics promote 16-bit inputs to float32
        want_fused, want_alone = norm(x + residual), norm(x)
    y, h = ops.layer_norm(x, scale, bias, residual, eps=1e-12, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(x + residual, np.float32))
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_fused, np.float32), atol=tol)
    assert y.dtype == dtype
    alone = ops.layer_norm(x, scale, bias, eps=1e-12, implementation=implementation)
    np.testing.assert_allclose(np.asarray(alone, np.float32), np.asarray(want_alone, np.float32), atol=tol)


def test_layer_norm_names_the_bad_argument():
    x, residual, scale, bias = _norm_inputs(F32)
    with pytest.raises(ValueError, match=r"scale must have shape \(24,\), got \(10,\)"):
        ops.layer_norm(x, scale[:10], bias, eps=1e-5)
    with pytest.raises(ValueError, match="residual must have the shape"):
        ops.layer_norm(x, scale, bias, residual[:2], eps=1e-5)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ops.layer_norm(jnp.ones((2, 24), jnp.int32), scale, bias, eps=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas", "cpu_ffi"])
def test_attention_matches_the_einsum_form(implementation):
    batch, seq, heads, width = 2, 9, 3, 8
    qkv = jax.random.normal(jax.random.key(1), (batch, seq, 3 * heads * width))
    key_bias = jnp.where(jnp.arange(seq) >= 6, -10000.0, 0.0)[None].repeat(batch, 0)
    q, k, v = ops.split_heads(qkv, heads)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * 0.3 + key_bias[:, None, None, :]
    want = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, -1), v).reshape(batch, seq, heads * width)
    got = ops.attention(qkv, key_bias, num_heads=heads, scale=0.3, implementation=implementation)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(2, 9\)"):
        ops.attention(qkv, key_bias[:, :4], num_heads=heads, scale=0.3)
    with pytest.raises(ValueError, match="qkv must have shape .* with heads=5"):
        ops.attention(qkv, None, num_heads=5, scale=0.3)


def test_causal_attention_matches_the_masked_einsum_form():
    batch, seq, heads, width = 2, 7, 2, 4
    qkv = jax.random.normal(jax.random.key(2), (batch, seq, 3 * heads * width))
    key_bias = jnp.where(jnp.arange(seq) < 2, -10000.0, 0.0)[None].repeat(batch, 0)   # left padding
    q, k, v = ops.split_heads(qkv, heads)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * 0.5 + key_bias[:, None, None, :]
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
    want = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, -1), v).reshape(batch, seq, heads * width)
    got = ops.attention(qkv, key_bias, num_heads=heads, scale=0.5, causal=True)
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=1e-5)   # rows whose keys are all padding: any mean
    assert np.all(np.isfinite(np.asarray(got)))
    bidirectional = ops.attention(qkv, key_bias, num_heads=heads, scale=0.5)
    assert not np.allclose(bidirectional[:, 2:-1], got[:, 2:-1], atol=1e-3)
    np.testing.assert_allclose(bidirectional[:, -1], got[:, -1], atol=1e-5)   # the last query sees every key
    with pytest.raises(NotImplementedError, match="bidirectional"):
        ops.attention(qkv, key_bias, num_heads=heads, scale=0.5, causal=True, implementation="pallas")


@pytest.mark.parametrize("implementation", [None, "xla", "pallas"])
def test_cached_attention_matches_the_einsum_form_and_the_causal_rows(implementation):
    batch, seq, heads, width = 2, 6, 2, 4
    qkv = jax.random.normal(jax.random.key(3), (batch, seq, 3 * heads * width))
    q, k, v = ops.split_heads(qkv, heads)
    causal = ops.attention(qkv, None, num_heads=heads, scale=0.5, causal=True)
    slots = 9   # a cache longer than the keys written: the empty slots are masked
    k_cache = jnp.zeros((batch, slots, heads, width)).at[:, :seq].set(k)
    v_cache = jnp.zeros((batch, slots, heads, width)).at[:, :seq].set(v)
    for t in range(seq):   # query t sees the slots 0..t, as the causal form's row t
        key_bias = jnp.where(jnp.arange(slots) <= t, 0.0, -10000.0)[None].repeat(batch, 0)
        got = ops.cached_attention(q[:, t:t + 1], k_cache, v_cache, key_bias, scale=0.5,
                                   implementation=implementation)
        assert got.shape == (batch, 1, heads * width)
        np.testing.assert_allclose(got[:, 0], causal[:, t], atol=1e-5)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 9, 2, 4\)"):
        ops.cached_attention(q, k_cache, v_cache[:, :4], scale=0.5)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(2, 9\)"):
        ops.cached_attention(q, k_cache, v_cache, key_bias[:, :4], scale=0.5)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ops.cached_attention(q, k_cache.astype(BF16), v_cache, scale=0.5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gelu_is_exact_and_differentiable(implementation):
    x = jnp.linspace(-5.0, 5.0, 42).reshape(3, -1)
    np.testing.assert_allclose(ops.gelu(x, implementation=implementation), jax.nn.gelu(x, approximate=False),
                               atol=2e-6)
    got = jax.grad(lambda a: jnp.sum(ops.gelu(a, implementation=implementation) ** 2))(x)
    want = jax.grad(lambda a: jnp.sum(jax.nn.gelu(a, approximate=False) ** 2))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
