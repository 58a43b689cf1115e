"""FFF-v2 forward kernel in Pallas interpret mode against its jnp reference (CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close, pow2_chunk_for, tie_free_tokens, v2_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fffjax
import pallas_kernels as pk
from fffjax import v2
from pallas_kernels.fff_v2_forward import (
    WALK_CONFIG,
    FffV2ForwardConfig,
    descend_table,
    fff_v2_forward,
    subtree_table,
)

SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(seed, n_tokens, width, depth, n_trees, dtype, dense_levels):
    x, w_in, b_in, w_out = v2_inputs(seed, n_tokens, width, depth, n_trees, dtype)
    config = FffV2ForwardConfig(block_t=16, chunk=pow2_chunk_for(width), dense_levels=dense_levels)
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=True, config=config)
    assert y.dtype == x.dtype
    ref = pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    assert_close(y, ref, dtype)


@pytest.mark.slow
@SETTINGS
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 40).filter(lambda t: t % 16),
       width=st.sampled_from([64, 96, 768, 1000]), depth=st.integers(0, 11), n_trees=st.sampled_from([1, 2, 4]),
       dense_levels=st.sampled_from([0, 0, 3]))
def test_forward_matches_reference_float32(seed, n_tokens, width, depth, n_trees, dense_levels):
    _check(seed, n_tokens, width, depth, n_trees, jnp.float32, dense_levels)


@pytest.mark.slow
@SETTINGS
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 40).filter(lambda t: t % 16),
       width=st.sampled_from([64, 96, 768, 1000]), depth=st.integers(0, 11), n_trees=st.sampled_from([1, 2, 4]),
       dense_levels=st.sampled_from([0, 0, 2]))
def test_forward_matches_reference_bfloat16(seed, n_tokens, width, depth, n_trees, dense_levels):
    _check(seed, n_tokens, width, depth, n_trees, jnp.bfloat16, dense_levels)


@pytest.mark.slow
@SETTINGS
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 40).filter(lambda t: t % 16),
       width=st.sampled_from([64, 96, 768, 1000]), depth=st.integers(1, 11), split=st.integers(1, 8),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_grouped_forward_matches_reference(seed, n_tokens, width, depth, split, dtype):
    split = min(split, depth)
    x, w_in, b_in, w_out = v2_inputs(seed, n_tokens, width, depth, 1, dtype)
    config = FffV2ForwardConfig(block_t=16, chunk=pow2_chunk_for(width), split_level=max(split, depth - 4),
                                route_block_t=16 if seed % 2 else 32, route_chunk=pow2_chunk_for(width),
                                # stages > 1: the column chunks run as loops (pipelined on the GPU)
                                num_stages=2 if seed % 3 == 0 else 1, route_num_stages=2 if seed % 3 == 1 else 1)
    y, (slots, block_sub, table) = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, interpret=True, config=config,
                                                  save_residuals=True)
    assert_close(y, pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth), dtype)
    logits = jnp.matmul(x.astype(jnp.float32), w_in.astype(jnp.float32).T, precision="highest") + b_in.astype(
        jnp.float32
    )
    path = np.asarray(v2.path_from_logits(logits, depth=depth, n_trees=1))[:, 0, :]
    # The saved table: each slot's logits at its block's columns, and the path read off it.
    split, seen = config.split_level, []
    for b, sub in enumerate(np.asarray(block_sub)):
        col, rows, col_ok = subtree_table(int(sub), split=split, depth=depth)
        rows, col_ok = np.asarray(rows), np.asarray(col_ok)
        block = table[b * 16:(b + 1) * 16]
        _, levels = descend_table(block, col, split=split, depth=depth)
        for i, tok in enumerate(np.asarray(slots)[b * 16:(b + 1) * 16]):
            if tok < 0:
                continue
            seen.append(tok)
            np.testing.assert_allclose(np.asarray(block[i])[col_ok], np.asarray(logits[tok])[rows[col_ok]],
                                       atol=2e-2 if dtype == jnp.bfloat16 else 1e-4)
            np.testing.assert_array_equal([rows[int(c[i])] for c, _ in levels], path[tok])
    assert sorted(seen) == list(range(n_tokens))


def test_grouped_layout_pads_each_subtree_to_whole_blocks():
    from pallas_kernels.fff_v2_forward import FffV2ForwardConfig, group_by_subtree
    x, w_in, b_in, _ = v2_inputs(4, 50, 64, 5, 1, jnp.float32)
    slots, block_sub = group_by_subtree(x, w_in, b_in, split=2, config=FffV2ForwardConfig(block_t=16, split_level=2),
                                        interpret=True)
    slots, block_sub = np.asarray(slots), np.asarray(block_sub)
    assert sorted(slots[slots >= 0].tolist()) == list(range(50))           # every token exactly once
    logits = jnp.matmul(x, w_in.T, precision="highest") + b_in
    sub = np.asarray(v2.path_from_logits(logits, depth=5, n_trees=1))[:, 0, 2] - 3
    for b, s in enumerate(block_sub):
        toks = slots[b * 16:(b + 1) * 16]
        assert np.all(sub[toks[toks >= 0]] == s)                           # one subtree per block


@pytest.mark.parametrize("n_tokens,width,depth,split,chunk_tokens,dtype", [
    (100, 64, 6, 3, 32, jnp.float32),      # a ragged last chunk of 4 tokens, 8 subtrees in 16-column counts
    (77, 96, 8, 4, 16, jnp.bfloat16),      # chunks smaller than a route block
    (50, 64, 5, 2, 64, jnp.float32),       # one chunk larger than the input
    (300, 768, 11, 7, 128, jnp.bfloat16),  # the 1x11 layout: 128 subtrees, most buckets of one or two tokens
])
def test_one_pass_forward_equals_the_grouped_forward_bit_for_bit(n_tokens, width, depth, split, chunk_tokens, dtype):
    # Same tiles, other layout: every token's row meets the same table in the same order, so its output is
    # the same bits whichever bucket slot the atomic counts gave it.
    x, w_in, b_in, w_out = v2_inputs(1, n_tokens, width, depth, 1, dtype)
    grouped = FffV2ForwardConfig(block_t=16, chunk=pow2_chunk_for(width), split_level=split, route_block_t=16,
                                 route_chunk=pow2_chunk_for(width))
    want = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, interpret=True, config=grouped)
    one_pass = dataclasses.replace(grouped, chunk_tokens=chunk_tokens)
    got = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, interpret=True, config=one_pass)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert_close(got, pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth), dtype)
    # With residuals (the training forward) the whole-input layout runs: its table is what the backward reads.
    _, residuals = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, interpret=True, config=one_pass,
                                  save_residuals=True)
    assert residuals.slots.shape[0] >= n_tokens


def test_one_pass_buckets_hold_every_token_of_a_chunk_once_in_its_subtree():
    import functools

    from jax.experimental import pallas as pl

    from pallas_kernels.fff_v2_forward import _route_place_kernel
    x, w_in, b_in, _ = v2_inputs(4, 70, 64, 5, 1, jnp.float32)
    split, chunk_tokens, n_chunks = 2, 32, 3
    place = pl.pallas_call(
        functools.partial(_route_place_kernel, n_tokens=70, width_in=64, split=split, chunk_tokens=chunk_tokens,
                          block_t=16, chunk=64, loop=False),
        out_shape=(jax.ShapeDtypeStruct((n_chunks * 16,), jnp.int32),
                   jax.ShapeDtypeStruct((4 * chunk_tokens,), jnp.int32)),
        grid=(2,), input_output_aliases={4: 0}, interpret=True)
    logits = jnp.matmul(x, w_in.T, precision="highest") + b_in
    sub = np.asarray(v2.path_from_logits(logits, depth=5, n_trees=1))[:, 0, split] - 3
    counts = jnp.zeros((n_chunks * 16,), jnp.int32)
    for c in range(n_chunks):
        counts, slots = place(jnp.array([c], jnp.int32), x, w_in, b_in, counts)
        counts_c, slots = np.asarray(counts)[c * 16:(c + 1) * 16], np.asarray(slots).reshape(4, chunk_tokens)
        tokens = np.arange(c * chunk_tokens, min(70, (c + 1) * chunk_tokens))
        np.testing.assert_array_equal(counts_c[:4], np.bincount(sub[tokens], minlength=4))
        assert not counts_c[4:].any()
        for s in range(4):
            # In token order: interpret mode runs the programs one after another.
            np.testing.assert_array_equal(slots[s, :counts_c[s]], tokens[sub[tokens] == s])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_route_kernel_and_gemm_route_agree(dtype):
    from pallas_kernels.fff_v2_forward import FffV2ForwardConfig, route_to_subtrees
    x, w_in, b_in, w_out = v2_inputs(6, 77, 96, 11, 1, dtype)
    keep = np.asarray(tie_free_tokens(x, w_in, b_in, depth=11, n_trees=1))
    subs = [np.asarray(route_to_subtrees(x, w_in, b_in, split=7, interpret=True,
                                         config=FffV2ForwardConfig(route_block_t=32, route_chunk=32, route=route)))
            for route in ("kernel", "gemm")]
    logits = jnp.matmul(x.astype(jnp.float32), w_in.astype(jnp.float32).T, precision="highest") + b_in.astype(
        jnp.float32
    )
    want = np.asarray(v2.path_from_logits(logits, depth=11, n_trees=1))[:, 0, 7] - 127
    for sub in subs:
        np.testing.assert_array_equal(sub[keep], want[keep])
    y = fff_v2_forward(x, w_in, b_in, w_out, depth=11, interpret=True,
                       config=FffV2ForwardConfig(block_t=16, chunk=32, split_level=7, route="gemm"))
    assert_close(y[keep], pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=11)[keep], dtype)
    with pytest.raises(ValueError, match="route must be one of"):
        FffV2ForwardConfig(route="sort")


@pytest.mark.parametrize("n_tokens,n_sub", [(50, 2), (1000, 128), (40000, 256)])
def test_rank_in_subtree_counts_earlier_tokens_of_the_same_subtree(n_tokens, n_sub):
    # 40000 tokens: 157 programs of 4 loop steps each (the running counts cross steps and spans).
    from pallas_kernels.fff_v2_forward import rank_in_subtree
    sub = np.array(jax.random.randint(jax.random.key(3), (n_tokens,), 0, n_sub, jnp.int32))
    sub[: n_tokens // 3] = n_sub - 1                       # skew: one subtree takes a third of the tokens
    rank, counts, span = rank_in_subtree(jnp.asarray(sub), n_sub, interpret=True)
    rank, counts = np.asarray(rank), np.asarray(counts)
    assert counts.shape == (-(-n_tokens // span), n_sub)
    for p in range(counts.shape[0]):
        part = sub[p * span:(p + 1) * span]
        np.testing.assert_array_equal(counts[p], np.bincount(part, minlength=n_sub))
        want = [int(np.sum(part[:i] == part[i])) for i in range(len(part))]
        np.testing.assert_array_equal(rank[p * span:(p + 1) * span], want)


@pytest.mark.parametrize("depth,split", [(15, 7), (11, 6), (12, 9)])
def test_grouped_split_outside_the_kernel_limits_is_refused(depth, split):
    # Too many levels below the split (a table wider than 64 columns) or above it (route tile > 256).
    x, w_in, b_in, w_out = v2_inputs(0, 20, 64, depth, 1, jnp.float32)
    with pytest.raises(ValueError, match="split_level"):
        fff_v2_forward(x, w_in, b_in, w_out, depth=depth, interpret=True,
                       config=FffV2ForwardConfig(block_t=16, chunk=64, split_level=split))


def test_default_config_groups_deep_single_trees():
    from pallas_kernels.fff_v2_forward import default_config
    assert default_config(11, 1).split_level == 7
    # Up to 2**17 tokens: 128-token blocks in the route and grouped kernels (fff_route_gpu.md).
    assert (default_config(11, 1, 2**20).route_block_t, default_config(11, 1, 2**20).block_t) == (256, 64)
    assert (default_config(11, 1, 2**15).route_block_t, default_config(11, 1, 2**15).block_t) == (128, 128)
    assert default_config(11, 1, 2**17).block_t == 128 and default_config(11, 1).block_t == 64
    assert default_config(11, 1, 2**15).split_level == 7
    assert default_config(11, 1, 2**15, jnp.float32).split_level == 0    # no tensor cores for IEEE float32
    assert default_config(11, 1, 2**15, jnp.bfloat16).split_level == 7
    assert default_config(11, 2).split_level == 0
    assert default_config(3, 1).split_level == 0


def test_residuals_are_the_reference_path_and_logits():
    depth, n_trees = 4, 2
    x, w_in, b_in, w_out = v2_inputs(3, 23, 96, depth, n_trees, jnp.float32)
    _, (nodes, z) = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=True,
                                   config=FffV2ForwardConfig(chunk=64), save_residuals=True)
    logits = jnp.matmul(x, w_in.T, precision="highest") + b_in
    path = v2.path_from_logits(logits, depth=depth, n_trees=n_trees)           # (T, K, L)
    np.testing.assert_array_equal(np.asarray(nodes).T.reshape(path.shape), np.asarray(path))
    expected_z = jnp.take_along_axis(logits, path.reshape(23, -1), axis=1)
    np.testing.assert_allclose(np.asarray(z).T, np.asarray(expected_z), atol=1e-5)


def test_strict_routing_sends_zero_logit_left():
    # All-zero inputs and biases give z == 0 at every node: strict "> 0" goes left (node 2n+1).
    depth = 3
    _, w_in, b_in, w_out = v2_inputs(0, 1, 64, depth, 1, jnp.float32)
    x = jnp.zeros((5, 64), jnp.float32)
    _, (nodes, _) = fff_v2_forward(x, w_in, jnp.zeros_like(b_in), w_out, depth=depth, interpret=True,
                                   save_residuals=True)
    np.testing.assert_array_equal(np.asarray(nodes)[:, 0], [0, 1, 3, 7])


def test_output_width_may_differ_from_input_width():
    x, w_in, b_in, w_out = v2_inputs(1, 19, 64, 3, 1, jnp.float32, width_out=40)
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=3, interpret=True, config=FffV2ForwardConfig(chunk=32))
    assert y.shape == (19, 40)
    assert_close(y, pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=3), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_default_config_of_a_1x11_layer_matches_reference(dtype):
    # bf16: the grouped kernel with pipelined chunk loops, small-token route blocks and the rank
    # layout (what the GPU runs by default); float32: the token-order kernel.
    x, w_in, b_in, w_out = v2_inputs(12, 300, 768, 11, 1, dtype)
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=11, interpret=True)
    assert_close(y, pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=11), dtype)


def test_registered_as_pallas_implementation():
    assert "pallas" in fffjax.ops.available_implementations("fff_v2_hard")
    assert "pallas" in fffjax.ops.available_implementations("fff_v1_hard")
    x, w_in, b_in, w_out = v2_inputs(2, 6, 64, 2, 1, jnp.float32)
    y = fffjax.ops.fff_v2_hard(x.reshape(2, 3, 64), w_in, b_in, w_out, depth=2, implementation="pallas")
    assert y.shape == (2, 3, 64)
    assert_close(y.reshape(6, 64), pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=2), jnp.float32)


@pytest.mark.parametrize("bad", ["w_in", "b_in", "w_out", "depth"])
def test_bad_shapes_raise_naming_the_argument(bad):
    x, w_in, b_in, w_out = v2_inputs(0, 4, 64, 2, 1, jnp.float32)
    args = {"w_in": w_in, "b_in": b_in, "w_out": w_out}
    depth = 2
    if bad == "depth":
        depth = 16
    else:
        args[bad] = args[bad][:-1]
    with pytest.raises(ValueError, match=bad):
        pk.fff_v2_hard(x, args["w_in"], args["b_in"], args["w_out"], depth=depth, interpret=True)


@pytest.mark.parametrize("field,value", [("block_t", 12), ("chunk", 100), ("dense_levels", -1), ("split_level", -2)])
def test_config_rejects_bad_block_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        FffV2ForwardConfig(**{field: value})


# ----------------------------------------------------------------------------- few-token walk

WALK_SHAPES = [(1, 11), (4, 9), (16, 7)]


def _walk_check(n_tokens, n_trees, depth, dtype, width=64, **fields):
    from pallas_kernels.fff_v2_forward import walk_config
    x, w_in, b_in, w_out = v2_inputs(n_tokens + depth, n_tokens, width, depth, n_trees, dtype)
    config = dataclasses.replace(walk_config(n_tokens, n_trees), chunk=32, **fields)
    y = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=True, config=config)
    assert y.dtype == x.dtype
    keep = tie_free_tokens(x, w_in, b_in, depth=depth, n_trees=n_trees)
    ref = pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    assert_close(y[keep], ref[keep], dtype)
    return config


@pytest.mark.parametrize("n_tokens,n_trees,depth,dtype", [(1, 1, 11, jnp.float32), (7, 4, 9, jnp.bfloat16),
                                                          (3, 16, 7, jnp.float32)])
def test_walk_matches_reference_at_few_tokens(n_tokens, n_trees, depth, dtype):
    config = _walk_check(n_tokens, n_trees, depth, dtype)
    assert config.tree_programs == n_trees and config.split_level == 0
    assert config.lookahead == WALK_CONFIG.lookahead


@pytest.mark.slow
@pytest.mark.parametrize("n_trees,depth", WALK_SHAPES)
@pytest.mark.parametrize("n_tokens,dtype", [(1, jnp.float32), (1, jnp.bfloat16), (7, jnp.float32),
                                            (7, jnp.bfloat16), (64, jnp.float32),
                                            (64, jnp.bfloat16), (256, jnp.float32), (256, jnp.bfloat16)])
def test_walk_matches_reference_up_to_the_threshold(n_tokens, n_trees, depth, dtype):
    # Token blocks of 16 keep interpret mode to a few programs; the GPU's blocks are smaller.
    _walk_check(n_tokens, n_trees, depth, dtype, block_t=16, width=128)


@pytest.mark.parametrize("block_t", [1, 4])
@pytest.mark.parametrize("lookahead", [1, 2, 3, 5, 7])
def test_walk_lookahead_and_tree_programs_do_not_change_the_result(lookahead, block_t):
    # Depth 6 (7 levels): rounds of uneven spans; 2 of 4 trees per program; 5 tokens leave the last
    # block of 4 part empty.
    _walk_check(5, 4, 6, jnp.float32, lookahead=lookahead, tree_programs=2, block_t=block_t)


@pytest.mark.parametrize("n_tokens,n_trees,depth,dtype", [(5, 4, 6, jnp.float32), (3, 3, 5, jnp.bfloat16),
                                                          (2, 16, 4, jnp.float32), (4, 1, 6, jnp.float32)])
def test_walk_with_tree_rows_matches_reference(n_tokens, n_trees, depth, dtype):
    # 3 trees fill 3 of 4 tile rows; one tree is the ordinary walk with one row.
    _walk_check(n_tokens, n_trees, depth, dtype, tree_rows=True, tree_programs=1, block_t=1)


def test_the_op_with_a_tree_rows_walk_evaluates_with_it_and_trains_through_tree_programs(monkeypatch):
    # With WALK_CONFIG.tree_rows (read at call time) the op's forward is the tree_rows walk; its gradient
    # comes from the walk over tree programs, which saves the path.
    import pallas_kernels.fff_v2_forward as fwd
    from pallas_kernels.fff_v2_train import saving_forward
    monkeypatch.setattr(fwd, "WALK_CONFIG", dataclasses.replace(fwd.WALK_CONFIG, tree_rows=True))
    depth, n_trees = 4, 4
    assert fwd.default_config(depth, n_trees, 6, jnp.float32).tree_rows
    saving = saving_forward(fwd.default_config(depth, n_trees, 6, jnp.float32), 6, n_trees)
    assert not saving.tree_rows and saving.tree_programs == n_trees
    x, w_in, b_in, w_out = v2_inputs(9, 6, 64, depth, n_trees, jnp.float32)
    dy = jax.random.normal(jax.random.key(2), (6, 64), jnp.float32)

    def loss(impl):
        return lambda *a: jnp.sum(fffjax.ops.fff_v2_hard(*a, depth=depth, n_trees=n_trees, implementation=impl) * dy)

    y = {impl: fffjax.ops.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, implementation=impl)
         for impl in ("pallas", "xla")}
    np.testing.assert_allclose(np.asarray(y["pallas"]), np.asarray(y["xla"]), atol=1e-5, rtol=1e-5)
    got = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_tree_rows_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="tree_rows needs block_t=1"):
        FffV2ForwardConfig(tree_rows=True, block_t=16)
    with pytest.raises(ValueError, match="tree_rows needs"):
        FffV2ForwardConfig(tree_rows=True, block_t=1, lookahead=2)
    x, w_in, b_in, w_out = v2_inputs(0, 3, 64, 3, 2, jnp.float32)
    with pytest.raises(ValueError, match="save_residuals=False"):
        fff_v2_forward(x, w_in, b_in, w_out, depth=3, n_trees=2, interpret=True, save_residuals=True,
                       config=FffV2ForwardConfig(tree_rows=True, block_t=1))


@pytest.mark.parametrize("levels,lookahead,spans", [(12, 1, [1] * 12), (12, 6, [6, 6]), (12, 5, [4, 4, 4]),
                                                    (8, 6, [4, 4]), (10, 4, [4, 3, 3]), (7, 7, [7]),
                                                    (3, 8, [3]), (0, 3, [])])
def test_round_spans_split_the_levels_evenly(levels, lookahead, spans):
    from pallas_kernels.fff_v2_forward import round_spans
    assert round_spans(levels, lookahead) == spans


def test_walk_saves_the_reference_path_for_training():
    from pallas_kernels.fff_v2_forward import walk_config
    depth, n_trees = 5, 4
    x, w_in, b_in, w_out = v2_inputs(3, 9, 64, depth, n_trees, jnp.float32)
    _, (nodes, z) = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=True,
                                   config=dataclasses.replace(walk_config(9, n_trees), chunk=32),
                                   save_residuals=True)
    logits = jnp.matmul(x, w_in.T, precision="highest") + b_in
    path = v2.path_from_logits(logits, depth=depth, n_trees=n_trees)
    np.testing.assert_array_equal(np.asarray(nodes).T.reshape(path.shape), np.asarray(path))
    np.testing.assert_allclose(np.asarray(z).T, np.asarray(jnp.take_along_axis(logits, path.reshape(9, -1), axis=1)),
                               atol=1e-5)


def test_default_config_walks_up_to_the_threshold_and_groups_above():
    from pallas_kernels.fff_v2_forward import WALK_MAX_TOKENS, WALK_PROGRAMS, default_config
    for n in (1, 8, 64, WALK_MAX_TOKENS):
        for n_trees, depth in WALK_SHAPES + [(128, 4)]:
            cfg = default_config(depth, n_trees, n, jnp.bfloat16)
            assert cfg.split_level == 0 and cfg.lookahead == WALK_CONFIG.lookahead
            assert n_trees % cfg.tree_programs == 0 and cfg.tree_programs == min(n_trees, 16)
            assert -(-n // cfg.block_t) <= WALK_PROGRAMS
    above = default_config(11, 1, WALK_MAX_TOKENS + 1, jnp.bfloat16)
    assert above.split_level == 7 and above.lookahead == 1
    assert default_config(7, 16, WALK_MAX_TOKENS + 1, jnp.bfloat16).tree_programs == 1


def test_walk_chunks_widen_with_the_row_width():
    from pallas_kernels.fff_v2_forward import (
        DEFAULT_CONFIG,
        MAX_ROW_CHUNKS,
        default_config,
        operand_config,
        walk_config,
    )
    assert walk_config(1, 1).chunk == WALK_CONFIG.chunk
    assert walk_config(1, 1, width=768).chunk == WALK_CONFIG.chunk
    for width in (768, 1000, 4096, 8192):
        for n_tokens in (1, 1024):   # the walk, then the token-order kernel (depth 13 is too deep to group)
            config = default_config(13, 1, n_tokens, jnp.bfloat16, width=width)
            assert config.split_level == 0
            assert -(-width // config.chunk) <= MAX_ROW_CHUNKS and config.chunk >= DEFAULT_CONFIG.chunk
    assert default_config(13, 1, 1, jnp.bfloat16, width=4096).chunk == 1024
    assert default_config(13, 1, 1024, jnp.bfloat16, width=4096).chunk == 1024
    # ... and its token blocks shrink so that a block's float32 inputs stay at 16 x 1024 values
    assert [default_config(13, 1, 1024, jnp.bfloat16, width=w).block_t for w in (768, 1024, 2048, 4096, 32768)] \
        == [16, 16, 8, 4, 1]
    assert default_config(11, 1, 1024, jnp.bfloat16, width=4096).split_level == 7   # grouped: its own tiles
    # the public entry points size the chunks by the wider of the input and output rows
    x, w_out = jax.ShapeDtypeStruct((1, 768), jnp.bfloat16), jax.ShapeDtypeStruct((2**14 - 1, 4096), jnp.bfloat16)
    assert operand_config(x, w_out, depth=13, n_trees=1) == default_config(13, 1, 1, jnp.bfloat16, width=4096)


def test_walk_with_widened_chunks_matches_the_reference():
    # A narrow base chunk, so that a small row (H = 200, H_out = 72) needs the widening: 32-column chunks
    # would take 7 per row; MAX_ROW_CHUNKS of them take 64 columns each.
    from pallas_kernels.fff_v2_forward import walk_config
    x, w_in, b_in, w_out = v2_inputs(5, 6, 200, 4, 1, jnp.float32, width_out=72)
    base = dataclasses.replace(WALK_CONFIG, chunk=32)
    config = walk_config(6, 1, base, width=200)
    assert config.chunk == 64
    got = fff_v2_forward(x, w_in, b_in, w_out, depth=4, n_trees=1, config=config, interpret=True)
    assert_close(got, pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=4, n_trees=1), jnp.float32)


def test_token_order_default_at_a_wide_row_matches_the_reference():
    # Above the walk's token counts, two trees: the token-order kernel with 8-token blocks of 512-column
    # chunks at H = 2048.
    from pallas_kernels.fff_v2_forward import WALK_MAX_TOKENS, default_config
    n_tokens = WALK_MAX_TOKENS + 3
    config = default_config(2, 2, n_tokens, jnp.float32, width=2048)
    assert (config.split_level, config.block_t, config.chunk) == (0, 8, 512)
    x, w_in, b_in, w_out = v2_inputs(4, n_tokens, 2048, 2, 2, jnp.float32)
    got = pk.fff_v2_hard(x, w_in, b_in, w_out, depth=2, n_trees=2, interpret=True)
    keep = tie_free_tokens(x, w_in, b_in, depth=2, n_trees=2)
    assert_close(got[keep], pk.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=2, n_trees=2)[keep], jnp.float32)


def test_tree_programs_must_divide_the_trees():
    x, w_in, b_in, w_out = v2_inputs(0, 3, 64, 2, 3, jnp.float32)
    with pytest.raises(ValueError, match="tree_programs"):
        fff_v2_forward(x, w_in, b_in, w_out, depth=2, n_trees=3, interpret=True,
                       config=FffV2ForwardConfig(tree_programs=2))
    with pytest.raises(ValueError, match="lookahead"):
        FffV2ForwardConfig(lookahead=0)


def test_pallas_op_walks_at_few_tokens_and_its_gradients_match():
    # Through the op (default config): the walk forward and the token-order backward.
    depth, n_trees = 4, 4
    x, w_in, b_in, w_out = v2_inputs(8, 6, 64, depth, n_trees, jnp.float32)
    dy = jax.random.normal(jax.random.key(1), (6, 64), jnp.float32)

    def loss(impl):
        return lambda *a: jnp.sum(fffjax.ops.fff_v2_hard(*a, depth=depth, n_trees=n_trees, implementation=impl) * dy)

    got = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
