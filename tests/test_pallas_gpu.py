"""The compiled Pallas kernels on a real GPU against their references (run with FFFJAX_GPU_TESTS=1)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from _pallas_helpers import assert_bf16_gradients_close, assert_close, tie_free_tokens, v1_inputs, v2_inputs
from flax import nnx

import fffjax
import pallas_kernels as pk
from fffjax import v2
from pallas_kernels.fff_v2_forward import GROUPED_CONFIG, WALK_CONFIG, FffV2ForwardConfig, default_config
from pallas_kernels.fff_v2_train import FffV2TrainConfig

pytestmark = pytest.mark.gpu


GATHER = FffV2ForwardConfig()
DENSE5 = FffV2ForwardConfig(block_t=64, chunk=128, dense_levels=5)
GROUPED = FffV2ForwardConfig(block_t=64, chunk=128, split_level=7)      # column chunks unrolled
PIPELINED = GROUPED_CONFIG                                              # column chunks as pipelined loops
FEW_TOKENS = default_config(11, 1, 2**15)                               # 128-token blocks in both kernels
ONE_PASS = dataclasses.replace(GROUPED_CONFIG, chunk_tokens=16384)      # route and group 16384 at a time


@pytest.mark.parametrize("n_tokens,width,depth,n_trees,dtype,config", [
    (4099, 768, 11, 1, jnp.float32, GATHER), (4099, 768, 11, 1, jnp.bfloat16, GATHER),
    (4099, 768, 11, 1, jnp.float32, GROUPED), (70000, 768, 11, 1, jnp.bfloat16, PIPELINED),
    (1 << 20, 768, 11, 1, jnp.bfloat16, PIPELINED), (32768, 768, 11, 1, jnp.bfloat16, FEW_TOKENS),
    (4099, 768, 11, 1, jnp.float32, PIPELINED),
    (4099, 768, 11, 1, jnp.bfloat16, DENSE5), (1000, 1000, 7, 2, jnp.float32, GATHER),
    (16384, 768, 4, 128, jnp.bfloat16, DENSE5), (333, 64, 15, 1, jnp.float32, GATHER),
    (4099, 768, 4, 128, jnp.float32, GATHER),
    (70000, 768, 11, 1, jnp.bfloat16, ONE_PASS), (4099, 768, 11, 1, jnp.float32, ONE_PASS),
])
def test_v2_forward_on_gpu(n_tokens, width, depth, n_trees, dtype, config):
    # 128 trees x 5 levels x 4099 tokens: 2.6M routing decisions, dozens within 1e-5 of 0.
    x, w_in, b_in, w_out = v2_inputs(0, n_tokens, width, depth, n_trees, dtype)
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, config=config)
    ref = pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    keep = tie_free_tokens(x, w_in, b_in, depth=depth, n_trees=n_trees)
    assert keep.mean() > 0.95
    assert_close(y[keep], ref[keep], dtype)


@pytest.mark.parametrize("n_tokens", [1, 7, 64, 256])
@pytest.mark.parametrize("n_trees,depth", [(1, 11), (4, 9), (16, 7), (128, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_v2_few_token_walk_on_gpu(n_tokens, n_trees, depth, dtype):
    # The default config at these counts (walk_config), compiled.
    x, w_in, b_in, w_out = v2_inputs(3, n_tokens, 768, depth, n_trees, dtype)
    assert default_config(depth, n_trees, n_tokens, dtype).lookahead == WALK_CONFIG.lookahead
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    ref = pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    keep = tie_free_tokens(x, w_in, b_in, depth=depth, n_trees=n_trees)
    assert_close(y[keep], ref[keep], dtype)


@pytest.mark.parametrize("n_tokens,width,depth,n_trees,weight_block_t,forward", [
    (4099, 768, 11, 1, 64, PIPELINED), (70001, 768, 11, 1, 64, GROUPED), (1000, 1000, 5, 2, 128, GATHER),
    (8192, 768, 4, 16, 256, DENSE5), (64, 768, 9, 4, 64, default_config(9, 4, 64)),
])
def test_v2_gradients_on_gpu(n_tokens, width, depth, n_trees, weight_block_t, forward):
    x, w_in, b_in, w_out = v2_inputs(1, n_tokens, width, depth, n_trees, jnp.float32)
    dy = jax.random.normal(jax.random.key(2), (n_tokens, width))
    config = FffV2TrainConfig(forward=forward, weight_block_t=weight_block_t)

    def loss(*args):
        return jnp.sum(pk.fff_v2_hard_trainable(*args, depth=depth, n_trees=n_trees, config=config) * dy)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w_in, b_in, w_out)
    want = jax.jit(lambda *a: pk.reference_vjp(*a, depth=depth, n_trees=n_trees))(x, w_in, b_in, w_out, dy)
    for name, g, w in zip(("dx", "d_w_in", "d_b_in", "d_w_out"), got, want):
        assert_close(g, w, jnp.float32, name)


def test_v2_bfloat16_grouped_gradients_on_gpu():
    # 16k tokens x 12 levels: a routing flip from summation order (|z| ~ 1e-6) is unlikely.
    n_tokens, depth = 16387, 11
    x, w_in, b_in, w_out = v2_inputs(4, n_tokens, 768, depth, 1, jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(5), (n_tokens, 768), jnp.bfloat16)

    def loss(*args):
        return jnp.sum(pk.fff_v2_hard_trainable(*args, depth=depth).astype(jnp.float32) * dy.astype(jnp.float32))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w_in, b_in, w_out)
    f32 = [a.astype(jnp.float32) for a in (x, w_in, b_in, w_out, dy)]
    want = jax.jit(lambda *a: pk.reference_vjp(*a, depth=depth))(*f32)
    assert_bf16_gradients_close(got, want, ("dx", "d_w_in", "d_b_in", "d_w_out"))


@pytest.mark.parametrize("leaf_width,depth,dtype", [(256, 8, jnp.float32)])
def test_v1_forward_on_gpu(leaf_width, depth, dtype):
    x, params = v1_inputs(3, 3001, 768, leaf_width, 100, depth, dtype)
    y = pk.fff_v1_hard(x, *params, depth=depth, activation=v2.gelu)
    assert_close(y, pk.fff_v1_hard_reference(x, *params, depth=depth, activation=v2.gelu), dtype)


def test_default_implementation_on_gpu_is_pallas_and_trains():
    from fffjax.ops.registry import candidates
    assert candidates("fff_v2_hard", None, jnp.float32, {"depth": 11, "n_trees": 1})[0] == "pallas"
    model = fffjax.UltraFastFF(768, 11, rngs=nnx.Rngs(0))                  # implementation=None
    ref = fffjax.UltraFastFF(768, 11, implementation="reference", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 300, 768))

    def loss(m):
        return jnp.mean(m(x) ** 2)

    got, want = nnx.grad(loss)(model), nnx.grad(loss)(ref)
    for name in ("w_in", "b_in", "w_out"):
        assert_close(getattr(got, name)[...], getattr(want, name)[...], jnp.float32, name)


@pytest.mark.parametrize("rows,width,dtype,fused", [(32768, 768, jnp.bfloat16, True), (32768, 768, jnp.bfloat16, False),
                                                    (1001, 1000, jnp.float32, True), (1001, 64, jnp.float32, False)])
def test_layer_norm_on_gpu(rows, width, dtype, fused):
    from pallas_kernels.layer_norm import layer_norm, layer_norm_reference

    k = jax.random.split(jax.random.key(4), 4)
    x = (3.0 * jax.random.normal(k[0], (rows, width)) + 2.0).astype(dtype)
    residual = jax.random.normal(k[1], (rows, width)).astype(dtype) if fused else None
    scale, bias = jax.random.normal(k[2], (width,)), jax.random.normal(k[3], (width,))
    got = layer_norm(x, scale, bias, residual, eps=1e-12)
    want = layer_norm_reference(x, scale, bias, residual, eps=1e-12)
    for g, w, name in zip(*(((got,), (want,)) if residual is None else (got, want)), ("y", "h")):
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("batch,seq,heads,head_width,dtype,config", [
    (256, 128, 12, 64, jnp.bfloat16, (64, 4)), (256, 128, 12, 64, jnp.bfloat16, (128, 8)),
    (7, 100, 3, 24, jnp.float32, (32, 4)), (2, 512, 12, 64, jnp.bfloat16, (64, 4)),
    (256, 128, 12, 64, jnp.bfloat16, (128, 8, 4, 2)), (7, 100, 3, 24, jnp.float32, (32, 4, 3, 2)),
    (256, 128, 12, 64, jnp.bfloat16, (128, 4, 4, 2)),   # the default
    (2, 512, 12, 64, jnp.bfloat16, (128, 4, 4, 2)),     # the default at MAX_SEQ: one stage fits
])
def test_attention_on_gpu(batch, seq, heads, head_width, dtype, config):
    # config: (block_q, num_warps[, heads_per_program, num_stages])
    from pallas_kernels.attention import AttentionConfig, attention, attention_reference

    k = jax.random.split(jax.random.key(5), 2)
    qkv = (2.0 * jax.random.normal(k[0], (batch, seq, 3 * heads * head_width))).astype(dtype)
    pad = (jax.random.uniform(k[1], (batch, seq)) < 0.3).at[:, 0].set(False)
    key_bias = jnp.where(pad, -10000.0, 0.0).astype(dtype)
    got = attention(qkv, key_bias, num_heads=heads, scale=head_width**-0.5, config=AttentionConfig(**dict(zip(
        ("block_q", "num_warps", "heads_per_program", "num_stages"), config))))
    want = attention_reference(qkv, key_bias, num_heads=heads, scale=head_width**-0.5)
    assert_close(got, want, dtype, "context")


@pytest.mark.parametrize("shape,dtype", [((32768, 3072), jnp.bfloat16), ((1001, 999), jnp.float32),
                                         ((3, 5), jnp.float16)])
def test_gelu_on_gpu(shape, dtype):
    from pallas_kernels.gelu import gelu, gelu_reference

    x = (4.0 * jax.random.normal(jax.random.key(6), shape)).astype(dtype)
    assert_close(gelu(x), gelu_reference(x), dtype, "gelu")
    g = jax.random.normal(jax.random.key(7), shape).astype(dtype)
    got = jax.vjp(gelu, x)[1](g)[0]
    want = jax.vjp(gelu_reference, x)[1](g)[0]
    assert_close(got, want, dtype, "dx")
