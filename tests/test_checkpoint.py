"""Orbax checkpoint helper: exact round trips, config, atomic writes."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fffjax.nn import FFF
from fffjax.train import checkpoint


def _params():
    return {
        "w": jax.random.normal(jax.random.key(0), (3, 4)),
        "layer": {"b": jnp.arange(5, dtype=jnp.int32), "h": jnp.ones((2,), jnp.bfloat16)},
    }


def test_round_trip_is_exact_with_and_without_target(tmp_path):
    params, config = _params(), {"depth": 3, "activation": "relu", "widths": [64, 8, 10]}
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params, config)
    assert path == (tmp_path / "ckpt").absolute()
    for target in (None, params):
        restored, restored_config = checkpoint.restore_checkpoint(path, target)
        assert restored_config == config
        assert jax.tree.structure(restored) == jax.tree.structure(params)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert checkpoint.read_config(path) == config


def test_nnx_module_state_round_trip(tmp_path):
    model = FFF(6, 3, 2, 2, usage_mode="soft", rngs=nnx.Rngs(1))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    path = checkpoint.save_checkpoint(tmp_path / "fff", state, {"depth": 2})
    fresh = FFF(6, 3, 2, 2, usage_mode="soft", rngs=nnx.Rngs(2))
    restored, _ = checkpoint.restore_checkpoint(path, nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))
    abstract = nnx.state(fresh, nnx.Param)
    nnx.replace_by_pure_dict(abstract, restored)
    nnx.update(fresh, abstract)
    for name in ("node_weights", "w1s", "b2s"):
        np.testing.assert_array_equal(getattr(fresh, name)[...], getattr(model, name)[...])


def test_existing_path_needs_overwrite(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "c", _params(), {"v": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save_checkpoint(path, _params(), {"v": 2})
    checkpoint.save_checkpoint(path, _params(), {"v": 2}, overwrite=True)
    assert checkpoint.read_config(path) == {"v": 2}


def test_bad_config_and_missing_checkpoint_raise(tmp_path):
    with pytest.raises(TypeError, match="config"):
        checkpoint.save_checkpoint(tmp_path / "c", _params(), {"f": object()})
    with pytest.raises(TypeError, match="config"):
        checkpoint.save_checkpoint(tmp_path / "c", _params(), [1, 2])
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.restore_checkpoint(tmp_path)


def test_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails after the arrays are written leaves nothing under the final name."""
    path = tmp_path / "ckpt"

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", fail)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", fail)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, _params(), {"v": 1})
    assert not path.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers
    monkeypatch.undo()
    checkpoint.save_checkpoint(tmp_path / "ok", _params(), {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" not in p.name) == ["ok"]
