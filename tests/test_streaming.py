"""Weight streaming: FFF-v2 with its deep levels in host memory, exact against the on-device layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fffjax
from fffjax import v2
from fffjax.ops import streaming


def _layer(n_trees, depth, dtype, width=32, dout=24, n_tokens=9):
    p = v2.init(jax.random.key(0), width, depth, n_trees=n_trees, dtype=dtype)
    w_out = jax.random.normal(jax.random.key(2), (p["w_in"].shape[0], dout), dtype)
    x = jax.random.normal(jax.random.key(1), (n_tokens, width), dtype)
    return x, p["w_in"], p["b_in"], w_out


def test_cold_subtrees_list_the_nodes_under_each_hot_leaf_in_level_order():
    np.testing.assert_array_equal(streaming.cold_subtree_nodes(3, 1),
                                  [[1, 3, 4, 7, 8, 9, 10], [2, 5, 6, 11, 12, 13, 14]])
    nodes = streaming.cold_subtree_nodes(6, 3)
    assert nodes.shape == (8, 15)
    # Every node of levels 3..6 once; hot nodes never.
    np.testing.assert_array_equal(np.sort(nodes.ravel()), np.arange(7, 127))


def test_a_bundle_row_holds_a_node_s_input_row_output_row_and_bias():
    x, w_in, b_in, w_out = _layer(2, 4, jnp.float32)
    cold = streaming.bundle_cold_levels(w_in, b_in, w_out, depth=4, n_trees=2, hot_levels=2)
    assert cold.shape == (2 * 4, 7, 32 + 24 + 1)
    node = 31 + streaming.cold_subtree_nodes(4, 2)[3, 5]          # tree 1, subtree 3, its sixth node
    np.testing.assert_array_equal(cold[4 + 3, 5], np.concatenate([w_in[node], w_out[node], b_in[node:node + 1]]))


@pytest.mark.parametrize("n_trees,depth,hot_levels", [(1, 5, 2), (4, 4, 0), (3, 4, 4), (2, 6, 3), (1, 8, 5)])
@pytest.mark.parametrize("serve", streaming.SERVE)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_streamed_layer_equals_the_on_device_layer(n_trees, depth, hot_levels, serve, dtype):
    x, w_in, b_in, w_out = _layer(n_trees, depth, dtype)
    layer = fffjax.stream_v2(w_in, b_in, w_out, depth=depth, n_trees=n_trees, hot_levels=hot_levels)
    assert layer.cold.sharding.memory_kind == "pinned_host"
    assert layer.hot_w_in.sharding.memory_kind == jax.devices()[0].default_memory().kind
    assert layer.hot_w_in.shape == (n_trees * (2**hot_levels - 1), 32)
    y = fffjax.fff_v2_streamed(x, layer, serve=serve)
    ref = v2.conditional_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_streamed_layer_jits_with_the_layer_as_an_argument():
    x, w_in, b_in, w_out = _layer(2, 5, jnp.float32)
    layer = fffjax.stream_v2(w_in, b_in, w_out, depth=5, n_trees=2, hot_levels=3)
    y = jax.jit(lambda x, layer: fffjax.fff_v2_streamed(x, layer, serve="host"))(x, layer)
    np.testing.assert_allclose(y, v2.conditional_forward(x, w_in, b_in, w_out, depth=5, n_trees=2), atol=1e-6)


def test_bad_arguments_are_named():
    x, w_in, b_in, w_out = _layer(1, 4, jnp.float32)
    with pytest.raises(ValueError, match="hot_levels must be an int in 0..depth=4"):
        fffjax.stream_v2(w_in, b_in, w_out, depth=4, hot_levels=5)
    with pytest.raises(ValueError, match="share one dtype"):
        fffjax.stream_v2(w_in, b_in.astype(jnp.bfloat16), w_out, depth=4, hot_levels=2)
    with pytest.raises(ValueError, match="w_in"):
        fffjax.stream_v2(w_in, b_in, w_out, depth=5, hot_levels=2)
    layer = fffjax.stream_v2(w_in, b_in, w_out, depth=4, hot_levels=2)
    with pytest.raises(ValueError, match="serve must be one of"):
        fffjax.fff_v2_streamed(x, layer, serve="disk")
    with pytest.raises(ValueError, match="layer.din"):
        fffjax.fff_v2_streamed(x[:, :16], layer)


def test_bench_streaming_smoke_run_writes_every_batch_and_serving_mode(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_streaming.py"
    argv = ["--hidden", "32", "--depth", "6", "--hot-levels", "3", "--batches", "1", "5", "--copy-max-mb", "0.1",
            "--check-depth", "4", "--budget-s", "0.01", "--rounds", "2", "--fill-chunk-mb", "0.01",
            "--dtype", "float32", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "streaming_cpu.json").read_text())
    assert max(report["exactness"].values()) < 1e-5
    assert [(r["batch"], r["variant"]) for r in report["results"]] == [
        (b, v) for serve in ("fetch", "staged", "host") for b in (1, 5) for v in (serve, "hot levels only")]
    assert all(r["error"] is None and r["ms"] > 0 for r in report["results"])
    for variant in ("fetch", "staged"):
        fetch = next(r for r in report["results"] if r["batch"] == 5 and r["variant"] == variant)
        # 5 tokens x 1 tree x a cold subtree of 4 levels (15 rows) x bundle rows of 2 * 32 + 1 float32 values
        assert fetch["link_bytes"] == 5 * 15 * 65 * 4
    assert report["layer"]["cold_levels"] == 4 and report["layer"]["subtree_nodes"] == 15
