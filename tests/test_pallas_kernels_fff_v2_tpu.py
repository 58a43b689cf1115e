"""The FFF-v2 Pallas TPU kernel: the TPU interpreter against the reference, cross-lowering for a TPU
with ``jax.export`` on the CPU, the opt-in ``"pallas_tpu"`` implementation, and (on a TPU only) the
compiled kernel against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_helpers import assert_close, tie_free_tokens, v2_inputs
from jax import export
from jax.experimental.pallas import tpu as pltpu

import fffjax
from fffjax import tree
from fffjax.ops import registry
from pallas_kernels import fff_v2_tpu
from pallas_kernels.fff_v2_tpu import FffV2TpuConfig

S = jax.ShapeDtypeStruct


def _compare(n_tokens, width, depth, n_trees, dtype, config, interpret):
    x, w_in, b_in, w_out = v2_inputs(n_tokens + width + depth, n_tokens, width, depth, n_trees, dtype)
    y = fff_v2_tpu.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret,
                               config=config)
    ref = fff_v2_tpu.fff_v2_hard_reference(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    assert y.dtype == x.dtype and y.shape == (n_tokens, w_out.shape[1])
    keep = tie_free_tokens(x, w_in, b_in, depth=depth, n_trees=n_trees)
    assert keep.mean() > 0.9
    assert_close(np.asarray(y.astype(jnp.float32))[keep], np.asarray(ref.astype(jnp.float32))[keep], dtype)


# Token counts not a multiple of the block; depth 0, 2, 3 and 11; one tree and several; H = 768 and 96;
# the scalar walk alone and after the top levels on the MXU (every level but the last one for 2x3).
@pytest.mark.parametrize("n_tokens,width,depth,n_trees,dtype,config", [
    (15, 128, 11, 1, jnp.bfloat16, FffV2TpuConfig(dense_levels=4)),
    (11, 64, 3, 2, jnp.float32, FffV2TpuConfig(dense_levels=3)),
    (13, 768, 2, 3, jnp.float32, None),
    (40, 96, 0, 4, jnp.float32, FffV2TpuConfig(block_t=32)),
])
def test_interpreted_kernel_matches_the_reference(n_tokens, width, depth, n_trees, dtype, config):
    _compare(n_tokens, width, depth, n_trees, dtype, config, pltpu.InterpretParams())


def test_routing_is_strict_and_output_width_may_differ():
    # A logit of exactly 0 goes left: zero weights and biases make every logit 0, so every token
    # visits nodes 0, 1, 3 (heap order) of its tree, whose output rows are the only nonzero ones.
    depth, width, width_out = 2, 16, 24
    n = tree.v2_nodes_per_tree(depth)
    w_in = jnp.zeros((n, width), jnp.float32)
    b_in = jnp.zeros((n,), jnp.float32)
    w_out = jnp.zeros((n, width_out), jnp.float32).at[jnp.asarray([0, 1, 3])].set(1.0)
    x = jnp.ones((5, width), jnp.float32)
    y = fff_v2_tpu.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, interpret=pltpu.InterpretParams())
    assert y.shape == (5, width_out)
    np.testing.assert_array_equal(np.asarray(y), 0.0)   # gelu(0) = 0 on every visited node
    b_in = b_in.at[jnp.asarray([0, 1, 3])].set(-1.0)    # negative logits: still left, gelu(-1) on each
    y = fff_v2_tpu.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(np.asarray(y), 3 * float(fff_v2_tpu.gelu(jnp.float32(-1.0))), rtol=1e-6)


def test_bad_config_and_oversized_tables_are_refused():
    with pytest.raises(ValueError, match="block_t must be a positive multiple of 16, got 24"):
        FffV2TpuConfig(block_t=24)
    with pytest.raises(ValueError, match="dense_levels must be >= 0, got -1"):
        FffV2TpuConfig(dense_levels=-1)
    x, w_in, b_in, w_out = v2_inputs(0, 4, 32, 2, 1, jnp.float32)
    with pytest.raises(ValueError, match="config.dense_levels must be at most depth = 2"):
        fff_v2_tpu.fff_v2_hard(x, w_in, b_in, w_out, depth=2, config=FffV2TpuConfig(dense_levels=3))
    n = tree.v2_nodes_per_tree(15)   # 65535 rows of 4096 bfloat16 columns: 1 GiB
    shapes = (S((8, 4096), jnp.bfloat16), S((n, 4096), jnp.bfloat16), S((n,), jnp.bfloat16),
              S((n, 4096), jnp.bfloat16))
    with pytest.raises(ValueError, match="w_in and w_out must fit MAX_TABLE_BYTES"):
        jax.eval_shape(functools.partial(fff_v2_tpu.fff_v2_hard, depth=15), *shapes)


def _export_for_tpu(fn, n_tokens, width, depth, n_trees, dtype):
    n = n_trees * tree.v2_nodes_per_tree(depth)
    shapes = (S((n_tokens, width), dtype), S((n, width), dtype), S((n,), dtype), S((n, width), dtype))
    return export.export(jax.jit(fn), platforms=["tpu"])(*shapes)


@pytest.mark.parametrize("n_tokens,width,depth,n_trees,dtype", [
    (1001, 768, 11, 1, jnp.bfloat16), (1001, 768, 11, 1, jnp.float32), (100, 1000, 4, 4, jnp.float32),
])
def test_public_op_exports_the_mosaic_kernel_for_a_tpu(n_tokens, width, depth, n_trees, dtype):
    # Runs the Pallas-to-Mosaic lowering on the CPU: unsupported primitives (erfc), block shapes and
    # index maps fail here; Mosaic's own layout and VMEM rules are checked only when a TPU compiles it.
    fn = functools.partial(fffjax.fff_v2_hard, depth=depth, n_trees=n_trees, implementation="pallas_tpu")
    exported = _export_for_tpu(fn, n_tokens, width, depth, n_trees, dtype)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in text and "fff_v2_hard_tpu" in text
    assert "callback" not in text   # the compiled kernel, not the interpreter


@pytest.mark.parametrize("depth,n_trees,dtype,dense_levels", [
    (11, 1, jnp.bfloat16, 7), (11, 1, jnp.float32, 7), (4, 4, jnp.float32, 2),
])
def test_kernel_with_mxu_top_levels_exports_for_a_tpu(depth, n_trees, dtype, dense_levels):
    fn = functools.partial(fff_v2_tpu.fff_v2_hard, depth=depth, n_trees=n_trees,
                           config=FffV2TpuConfig(dense_levels=dense_levels))
    assert "tpu_custom_call" in _export_for_tpu(fn, 1001, 768, depth, n_trees, dtype).mlir_module()


def test_export_catches_what_mosaic_cannot_lower(monkeypatch):
    # The check above is meaningful: jax.nn.gelu's erfc has no Mosaic lowering and fails the export.
    monkeypatch.setattr(fff_v2_tpu, "gelu", lambda z: jax.nn.gelu(z, approximate=False))
    fn = functools.partial(fff_v2_tpu.fff_v2_hard, depth=2)
    with pytest.raises(NotImplementedError, match="erfc"):
        _export_for_tpu(fn, 40, 128, 2, 1, jnp.float32)


def test_pallas_tpu_is_opt_in():
    assert "pallas_tpu" in registry.available_implementations("fff_v2_hard")
    for platform in ("tpu", "gpu", "cuda", "cpu"):
        assert "pallas_tpu" not in registry.preference("fff_v2_hard", platform, jnp.bfloat16,
                                                       {"depth": 11, "n_trees": 1})
    assert "pallas_tpu" not in registry.candidates("fff_v2_hard", None, jnp.bfloat16, {"depth": 11, "n_trees": 1})
    assert registry.candidates("fff_v2_hard", "pallas_tpu", jnp.bfloat16, {"depth": 11, "n_trees": 1}) == (
        "pallas_tpu",)


def test_pallas_tpu_implementation_runs_interpreted_off_a_tpu_with_the_reference_gradient():
    x, w_in, b_in, w_out = v2_inputs(3, 2 * 7, 64, 2, 2, jnp.float32)
    x = x.reshape(2, 7, 64)

    def loss(impl, x, w_in):
        return jnp.sum(fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=2, n_trees=2, implementation=impl) ** 2)

    y = fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=2, n_trees=2, implementation="pallas_tpu")
    ref = fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=2, n_trees=2, implementation="xla")
    assert y.shape == (2, 7, 64)
    assert_close(y, ref, jnp.float32)
    grads = jax.grad(functools.partial(loss, "pallas_tpu"), argnums=(0, 1))(x, w_in)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1))(x, w_in)
    for g, w in zip(grads, want):
        assert_close(g, w, jnp.float32, "grad")


def test_pallas_tpu_declines_what_it_does_not_cover():
    x, w_in, b_in, w_out = v2_inputs(0, 4, 32, 1, 1, jnp.float16)
    with pytest.raises(NotImplementedError, match="float32/bfloat16"):
        fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=1, implementation="pallas_tpu")
    n = tree.v2_nodes_per_tree(13)   # 16383 rows of 1024 float32 columns, twice: 128 MiB
    shapes = (S((8, 1024), jnp.float32), S((n, 1024), jnp.float32), S((n,), jnp.float32), S((n, 1024), jnp.float32))
    with pytest.raises(NotImplementedError, match="keeps w_in and w_out in VMEM"):
        jax.eval_shape(functools.partial(fffjax.fff_v2_hard, depth=13, implementation="pallas_tpu"), *shapes)


@pytest.mark.tpu
class TestCompiledOnTpu:
    """The compiled Mosaic kernel against the reference (needs a TPU; skipped elsewhere)."""

    @pytest.mark.parametrize("n_tokens,width,depth,n_trees,dtype,config", [
        (4099, 768, 11, 1, jnp.bfloat16, None), (4099, 768, 11, 1, jnp.float32, None),
        (4099, 768, 11, 1, jnp.bfloat16, FffV2TpuConfig(dense_levels=7)),
        (4099, 768, 11, 1, jnp.float32, FffV2TpuConfig(block_t=32, dense_levels=7)),
        (1000, 1000, 4, 128, jnp.float32, FffV2TpuConfig(block_t=32)), (333, 64, 0, 2, jnp.bfloat16, None),
        (1000, 96, 4, 4, jnp.float32, FffV2TpuConfig(dense_levels=2)),
    ])
    def test_kernel_matches_the_reference(self, n_tokens, width, depth, n_trees, dtype, config):
        _compare(n_tokens, width, depth, n_trees, dtype, config, False)

    def test_public_op_matches_xla(self):
        x, w_in, b_in, w_out = v2_inputs(1, 2048, 768, 11, 1, jnp.bfloat16)
        y = fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=11, implementation="pallas_tpu")
        ref = fffjax.fff_v2_hard(x, w_in, b_in, w_out, depth=11, implementation="xla")
        keep = tie_free_tokens(x, w_in, b_in, depth=11, n_trees=1)
        assert_close(np.asarray(y.astype(jnp.float32))[keep], np.asarray(ref.astype(jnp.float32))[keep],
                     jnp.bfloat16)
