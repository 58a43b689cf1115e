"""FFF-v2 conditional training (custom VJP, Pallas interpret mode) against jax.grad of the masked reference."""

import jax
import jax.numpy as jnp
import pytest
from _pallas_helpers import assert_bf16_gradients_close, assert_close, pow2_chunk_for, v2_inputs
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fffjax
import pallas_kernels as pk
from pallas_kernels.fff_v2_forward import FffV2ForwardConfig
from pallas_kernels.fff_v2_train import FffV2TrainConfig

NAMES = ("dx", "d_w_in", "d_b_in", "d_w_out")


def _grads(x, w_in, b_in, w_out, dy, depth, n_trees, config):
    def loss(*args):
        y = pk.fff_v2_hard_trainable(*args, depth=depth, n_trees=n_trees, interpret=True, config=config)
        return jnp.sum(y.astype(jnp.float32) * dy)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)


def _check(seed, n_tokens, width, depth, n_trees, weight_block_t, split_level=0, chunk=None, num_stages=1):
    x, w_in, b_in, w_out = v2_inputs(seed, n_tokens, width, depth, n_trees, jnp.float32)
    dy = jax.random.normal(jax.random.key(seed + 1), (n_tokens, width))
    chunk = chunk or pow2_chunk_for(width)
    forward = FffV2ForwardConfig(chunk=chunk, split_level=split_level, num_stages=num_stages,
                                 route_chunk=chunk, route_num_stages=num_stages)
    config = FffV2TrainConfig(forward=forward, token_chunk=chunk, weight_chunk=chunk, weight_block_t=weight_block_t,
                              grouped_chunk=chunk, num_stages=num_stages)
    got = _grads(x, w_in, b_in, w_out, dy, depth, n_trees, config)
    want = pk.reference_vjp(x, w_in, b_in, w_out, dy, depth=depth, n_trees=n_trees)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, jnp.float32, name)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 40).filter(lambda t: t % 16),
       width=st.sampled_from([64, 96]), depth=st.integers(0, 6), n_trees=st.sampled_from([1, 2, 4]),
       weight_block_t=st.sampled_from([8, 16]))
def test_gradients_match_masked_reference(seed, n_tokens, width, depth, n_trees, weight_block_t):
    _check(seed, n_tokens, width, depth, n_trees, weight_block_t)


@pytest.mark.slow
def test_gradients_wide_ragged_layer():
    _check(7, 21, 1000, 3, 1, 16)


@pytest.mark.slow
def test_gradients_through_grouped_forward():
    _check(8, 45, 64, 6, 1, 16, split_level=2)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 150), width=st.sampled_from([64, 96]),
       depth=st.integers(1, 7), data=st.data())
def test_grouped_gradients_match_masked_reference(seed, n_tokens, width, depth, data):
    # The grouped backward: per-block dx kernel, per-subtree weight kernel, top rows summed in XLA.
    split = data.draw(st.integers(max(1, depth - 3), depth), label="split")
    _check(seed, n_tokens, width, depth, 1, 16, split_level=split)


def test_grouped_gradients_with_pipelined_chunk_loops():
    # num_stages > 1: the route, grouped forward and grouped dx kernels run their 4 column chunks as loops.
    _check(11, 70, 128, 5, 1, 16, split_level=2, chunk=32, num_stages=2)


def test_grouped_gradients_with_every_token_in_one_subtree():
    # Routing skew: one subtree gets all tokens, the others none (their rows' gradients are zero).
    depth, split = 5, 3
    x, w_in, b_in, w_out = v2_inputs(4, 70, 64, depth, 1, jnp.float32)
    b_in = b_in.at[:7].set(100.0)          # every top logit > 0: all tokens enter the rightmost subtree
    w_in = w_in.at[:7].set(0.0)
    dy = jax.random.normal(jax.random.key(5), (70, 64))
    config = FffV2TrainConfig(forward=FffV2ForwardConfig(chunk=64, split_level=split), grouped_chunk=64)
    got = _grads(x, w_in, b_in, w_out, dy, depth, 1, config)
    want = pk.reference_vjp(x, w_in, b_in, w_out, dy, depth=depth, n_trees=1)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, jnp.float32, name)


@pytest.mark.slow
def test_bfloat16_gradients_close_to_float32():
    depth, n_trees = 3, 2
    x, w_in, b_in, w_out = v2_inputs(5, 20, 64, depth, n_trees, jnp.float32)
    dy = jax.random.normal(jax.random.key(9), (20, 64))
    config = FffV2TrainConfig(forward=FffV2ForwardConfig(chunk=64), token_chunk=64, weight_chunk=64)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w_in, b_in, w_out)]
    got = _grads(*bf16, dy, depth, n_trees, config)
    want = pk.reference_vjp(*[a.astype(jnp.float32) for a in bf16], dy, depth=depth, n_trees=n_trees)
    assert_bf16_gradients_close(got, want, NAMES)


@pytest.mark.slow
def test_grouped_bfloat16_gradients_close_to_float32():
    depth = 6
    x, w_in, b_in, w_out = v2_inputs(6, 90, 64, depth, 1, jnp.float32)
    dy = jax.random.normal(jax.random.key(10), (90, 64))
    config = FffV2TrainConfig(forward=FffV2ForwardConfig(chunk=64, split_level=3), grouped_chunk=64)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w_in, b_in, w_out)]
    got = _grads(*bf16, dy, depth, 1, config)
    want = pk.reference_vjp(*[a.astype(jnp.float32) for a in bf16], dy.astype(jnp.bfloat16).astype(jnp.float32),
                            depth=depth, n_trees=1)
    assert_bf16_gradients_close(got, want, NAMES)


@pytest.mark.slow
def test_ultrafastff_trains_through_pallas():
    def make(impl):
        return fffjax.UltraFastFF(64, 3, n_trees=2, implementation=impl, rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(1), (2, 9, 64))
    target = jax.random.normal(jax.random.key(2), (2, 9, 64))

    def loss(model):
        return jnp.mean((model(x) - target) ** 2)

    model = make("pallas")
    before = loss(model)
    got = nnx.grad(loss)(model)
    want = nnx.grad(loss)(make("reference"))
    for name in ("w_in", "b_in", "w_out"):
        g, w = getattr(got, name)[...], getattr(want, name)[...]
        assert float(jnp.max(jnp.abs(w))) > 0, name
        assert_close(g, w, jnp.float32, name)
    # One SGD step through the kernel lowers the loss.
    for name in ("w_in", "b_in", "w_out"):
        getattr(model, name)[...] = getattr(model, name)[...] - 0.5 * getattr(got, name)[...]
    assert float(loss(model)) < float(before)


def test_train_config_rejects_bad_block_sizes():
    with pytest.raises(ValueError, match="weight_block_t"):
        FffV2TrainConfig(weight_block_t=24)
