"""Cross-lowering of every Pallas kernel for an abstract H200 (runs the real Triton lowering on CPU).

Interpret mode ignores the Triton backend's rules (power-of-two block sizes, no erf, 2-D dots of
>= 16); lowering for ``platform="cuda"`` enforces them without a GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

import pallas_kernels as pk
from fffjax import ops, tree, v2
from fffjax.ops import pallas as ops_pallas
from pallas_kernels.attention import AttentionConfig, attention
from pallas_kernels.fff_v2_forward import WALK_MAX_TOKENS, FffV2ForwardConfig, fff_v2_forward, walk_config
from pallas_kernels.gelu import GeluConfig, gelu
from pallas_kernels.layer_norm import LayerNormConfig, layer_norm

S = jax.ShapeDtypeStruct


def _lower_for_h200(fn, *shapes) -> str:
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _v2_shapes(n_tokens, width, depth, n_trees, dtype):
    n = n_trees * tree.v2_nodes_per_tree(depth)
    return S((n_tokens, width), dtype), S((n, width), dtype), S((n,), dtype), S((n, width), dtype)


@pytest.mark.parametrize("width,depth,n_trees,dtype,config", [
    (768, 11, 1, jnp.bfloat16, FffV2ForwardConfig()),
    (1000, 4, 128, jnp.float32, FffV2ForwardConfig(block_t=32, chunk=128)),
    (768, 11, 1, jnp.bfloat16, FffV2ForwardConfig(block_t=64, chunk=128, dense_levels=6)),
    (96, 0, 2, jnp.float32, FffV2ForwardConfig(block_t=16, dense_levels=1)),
    (768, 11, 1, jnp.bfloat16, FffV2ForwardConfig(block_t=64, chunk=128, num_warps=4, split_level=7)),
    (1000, 12, 1, jnp.float32, FffV2ForwardConfig(block_t=32, chunk=256, split_level=8)),
    (768, 11, 1, jnp.bfloat16, FffV2ForwardConfig(block_t=64, chunk=128, split_level=7, route_block_t=128,
                                                  route_num_warps=8)),
    (768, 11, 1, jnp.bfloat16, FffV2ForwardConfig(block_t=128, chunk=128, num_warps=8, num_stages=3, split_level=7,
                                                  route_block_t=128, route_num_warps=8, route_num_stages=3)),
])
def test_v2_forward_lowers_for_h200(width, depth, n_trees, dtype, config):
    fn = functools.partial(fff_v2_forward, depth=depth, n_trees=n_trees, config=config, save_residuals=True)
    text = _lower_for_h200(fn, *_v2_shapes(1001, width, depth, n_trees, dtype))
    assert "fff_v2_forward" in text
    assert ("fff_v2_forward_grouped" in text) == (config.split_level > 0 and n_trees == 1)


@pytest.mark.parametrize("n_tokens,n_trees,depth", [(1, 4, 9), (64, 16, 7), (8, 3, 6)])
def test_v2_walk_with_tree_rows_lowers_for_h200(n_tokens, n_trees, depth):
    config = FffV2ForwardConfig(block_t=1, chunk=256, num_warps=4, tree_rows=True)
    fn = functools.partial(fff_v2_forward, depth=depth, n_trees=n_trees, config=config)
    text = _lower_for_h200(fn, *_v2_shapes(n_tokens, 768, depth, n_trees, jnp.bfloat16))
    assert "fff_v2_forward" in text


@pytest.mark.parametrize("n_tokens,width,dtype,config", [
    (2**15 + 5, 768, jnp.bfloat16, FffV2ForwardConfig(block_t=64, chunk=64, num_warps=4, num_stages=3, split_level=7,
                                                        route_block_t=128, route_chunk=64, route_num_warps=8,
                                                        route_num_stages=3, chunk_tokens=8192)),
    (1001, 1000, jnp.float32, FffV2ForwardConfig(block_t=32, chunk=256, split_level=8, route_block_t=64,
                                                 chunk_tokens=256)),
])
def test_v2_one_pass_forward_lowers_for_h200(n_tokens, width, dtype, config):
    fn = functools.partial(fff_v2_forward, depth=11, config=config)
    text = _lower_for_h200(fn, *_v2_shapes(n_tokens, width, 11, 1, dtype))
    assert "fff_v2_route_place" in text and "fff_v2_forward_chunk" in text
    assert "fff_v2_rank" not in text and "fff_v2_forward_grouped" not in text


@pytest.mark.parametrize("width,depth,n_trees,dtype", [(768, 11, 1, jnp.bfloat16), (1000, 4, 4, jnp.float32)])
def test_v2_training_lowers_for_h200(width, depth, n_trees, dtype):
    def loss(*args):
        y = pk.fff_v2_hard_trainable(*args, depth=depth, n_trees=n_trees)   # default (grouped for 1x11)
        return jnp.sum(y.astype(jnp.float32))

    text = _lower_for_h200(jax.grad(loss, argnums=(0, 1, 2, 3)), *_v2_shapes(1001, width, depth, n_trees, dtype))
    if n_trees == 1:   # after the grouped forward: the grouped backward kernels
        assert "fff_v2_backward_grouped_dx" in text and "fff_v2_backward_grouped_weights" in text
    else:
        assert "fff_v2_backward_tokens" in text and "fff_v2_backward_weights" in text


@pytest.mark.parametrize("n_tokens,width,depth,n_trees,dtype", [(1, 768, 11, 1, jnp.bfloat16),
                                                                 (64, 768, 9, 4, jnp.bfloat16),
                                                                 (256, 768, 7, 16, jnp.float32),
                                                                 (200, 100, 4, 128, jnp.bfloat16)])
@pytest.mark.parametrize("lookahead", [1, 6])
def test_v2_few_token_walk_lowers_for_h200(n_tokens, width, depth, n_trees, dtype, lookahead):
    config = dataclasses.replace(walk_config(n_tokens, n_trees), lookahead=lookahead)
    fn = functools.partial(fff_v2_forward, depth=depth, n_trees=n_trees, save_residuals=True, config=config)
    text = _lower_for_h200(fn, *_v2_shapes(n_tokens, width, depth, n_trees, dtype))
    assert "fff_v2_forward" in text and "fff_v2_forward_grouped" not in text


@pytest.mark.parametrize("n_tokens,grouped", [(64, False), (WALK_MAX_TOKENS, False), (WALK_MAX_TOKENS + 1, True)])
def test_pallas_op_picks_the_walk_at_few_tokens(n_tokens, grouped, monkeypatch):
    # The "pallas" op as compiled for a GPU: one walk launch up to the threshold, the grouped pipeline above.
    monkeypatch.setattr(ops_pallas, "_interpret", lambda: False)
    op = functools.partial(ops.fff_v2_hard, depth=11, implementation="pallas")
    text = _lower_for_h200(op, *_v2_shapes(n_tokens, 768, 11, 1, jnp.bfloat16))
    assert ("fff_v2_forward_grouped" in text) == grouped and ("fff_v2_route" in text) == grouped


@pytest.mark.parametrize("batch,slots,heads,width,with_bias", [(1, 512, 12, 64, True), (64, 1024, 16, 64, True),
                                                                 (3, 37, 2, 24, False)])
def test_cached_attention_lowers_for_h200(batch, slots, heads, width, with_bias):
    from pallas_kernels.cached_attention import cached_attention
    shapes = [jax.ShapeDtypeStruct((batch, 1, heads, width), jnp.bfloat16)]
    shapes += [jax.ShapeDtypeStruct((batch, slots, heads, width), jnp.bfloat16)] * 2
    if with_bias:
        shapes.append(jax.ShapeDtypeStruct((batch, slots), jnp.bfloat16))
    text = _lower_for_h200(lambda *a: cached_attention(*a, scale=0.125), *shapes)
    assert "cached_attention" in text


@pytest.mark.parametrize("width,leaf_width,depth,dtype", [(768, 256, 8, jnp.bfloat16), (100, 3, 0, jnp.float32)])
def test_v1_forward_lowers_for_h200(width, leaf_width, depth, dtype):
    n_nodes, n_leaves = tree.v1_sizes(depth)
    shapes = (S((1001, width), dtype), S((n_nodes, width), dtype), S((n_nodes,), dtype),
              S((n_leaves, width, leaf_width), dtype), S((n_leaves, leaf_width), dtype),
              S((n_leaves, leaf_width, 50), dtype), S((n_leaves, 50), dtype))
    fn = functools.partial(pk.fff_v1_hard, depth=depth, activation=v2.gelu)
    text = _lower_for_h200(fn, *shapes)
    assert "fff_v1_descent" in text and "fff_v1_leaf_out" in text


@pytest.mark.parametrize("width,dtype,config", [(768, jnp.bfloat16, LayerNormConfig()),
                                                (1000, jnp.float32, LayerNormConfig(block_rows=4, num_warps=4)),
                                                (64, jnp.float32, LayerNormConfig())])   # no masked lanes
def test_layer_norm_lowers_for_h200(width, dtype, config):
    def fn(x, scale, bias, residual):
        y, h = layer_norm(x, scale, bias, residual, eps=1e-12, config=config)
        return y, h, layer_norm(x, scale, bias, eps=1e-12, config=config)

    x = S((1001, width), dtype)
    text = _lower_for_h200(fn, x, S((width,), jnp.float32), S((width,), jnp.float32), x)
    assert "add_layer_norm" in text and "layer_norm" in text.replace("add_layer_norm", "")


@pytest.mark.parametrize("shape,dtype,config", [((32768, 3072), jnp.bfloat16, GeluConfig()),
                                                ((7, 300), jnp.float32, GeluConfig(block=256, num_warps=4))])
def test_gelu_lowers_for_h200(shape, dtype, config):
    fn = functools.partial(gelu, config=config)
    assert "gelu" in _lower_for_h200(fn, S(shape, dtype))
    assert "gelu_backward" in _lower_for_h200(jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32))), S(shape, dtype))


def test_backend_rule_violation_is_caught_by_lowering():
    # A (16, 768) load is legal in interpret mode but not on Triton: lowering must refuse it.
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    fn = pl.pallas_call(kernel, out_shape=S((16, 768), jnp.float32),
                        compiler_params=pk._common.compiler_params(4, 1))
    with pytest.raises(Exception, match="power of 2|power-of-2|power of two"):
        _lower_for_h200(fn, S((16, 768), jnp.float32))


@pytest.mark.parametrize(
    "shape,num_heads,dtype,with_bias,config",
    [
        ((256, 128, 2304), 12, jnp.bfloat16, True, AttentionConfig()),
        ((3, 40, 72), 1, jnp.float32, False, AttentionConfig(block_q=16)),
        ((2, 512, 2304), 12, jnp.bfloat16, True, AttentionConfig(block_q=128, num_warps=8)),
        (
            (256, 128, 2304),
            12,
            jnp.bfloat16,
            True,
            AttentionConfig(block_q=128, num_warps=8, heads_per_program=4, num_stages=2),
        ),
        (
            (3, 40, 216),
            3,
            jnp.float32,
            False,
            AttentionConfig(block_q=16, num_warps=4, heads_per_program=3, num_stages=1),
        ),
    ],
)
def test_attention_lowers_for_h200(shape, num_heads, dtype, with_bias, config, monkeypatch):
    fn = functools.partial(attention, num_heads=num_heads, scale=0.125, config=config)
    args = (S(shape, dtype), S(shape[:2], dtype) if with_bias else None)
    assert "attention" in _lower_for_h200(fn, *args)
    # Training as the model runs it: fffjax.ops' adapter, compiled (not interpreted) as on a GPU.
    monkeypatch.setattr(ops_pallas, "_interpret", lambda: False)
    op = functools.partial(ops.attention, num_heads=num_heads, scale=0.125, implementation="pallas")
    grad = jax.grad(lambda qkv, bias: jnp.sum(op(qkv, bias).astype(jnp.float32)))
    assert "attention" in _lower_for_h200(grad, *args)   # the forward kernel, then XLA's backward
