"""Checkpoints: exact round trips, config, atomic writes, the run digest, reading any checkpoint."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fffjax.nn import FFF
from fffjax.train import checkpoint
from fffjax.train.checkpoint import PARAMS


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


def test_run_checkpoints_digest_only_the_steps_they_save(tmp_path, monkeypatch):
    """The digest (a host copy and CRC of every array) is skipped on steps the interval policy skips."""
    calls = []
    digest = checkpoint.tree_digest
    monkeypatch.setattr(checkpoint, "tree_digest", lambda tree: calls.append(1) or digest(tree))
    params, opt_state = _params(), {"mu": jnp.zeros((3, 4))}
    with checkpoint.RunCheckpoints(tmp_path / "checkpoints", save_every=3, async_save=False) as run:
        saved = [run.save(step, params=params, opt_state=opt_state, position={"epoch": 0, "index": step, "seed": 0},
                          config={"v": 1}, run={"command": "test"}, metrics={"loss": 1.0 / step},
                          force=step == 4) for step in range(1, 5)]
        assert saved == [False, False, True, True] and run.steps() == [3, 4]
    assert len(calls) == 2  # steps 3 (interval) and 4 (forced); not 1 and 2
    params_back, config, record = checkpoint.load_params(tmp_path)  # the run's latest step
    assert config == {"v": 1} and record["step"] == 4 and record["metrics"] == {"loss": 0.25}
    assert record["run"]["command"] == "test" and record["run"]["digest"] == digest({"params": params,
                                                                                     "opt_state": opt_state})
    np.testing.assert_array_equal(params_back["w"], np.asarray(params["w"]))


def test_background_save_keeps_the_saved_state_when_its_buffers_are_donated(tmp_path):
    """A background save writes the arrays as they were at `save`, though the caller's next (donating)
    update consumes their buffers before the thread copies them; a repeated step is not saved again."""
    update = jax.jit(lambda tree: jax.tree.map(lambda x: x + 1.0, tree), donate_argnums=0)
    state = {"w": jnp.arange(12.0).reshape(3, 4)}
    expected = np.asarray(state["w"]).copy()
    with checkpoint.RunCheckpoints(tmp_path / "checkpoints", save_every=2) as run:
        assert run.save(2, params=state, opt_state={"mu": jnp.zeros(2)}, position={"epoch": 0, "index": 0, "seed": 0},
                        config={}, run={}, metrics={"loss": 1.0})
        for _ in range(3):
            state = update(state)
        assert not run.should_save(2) and not run.save(2, params=state, opt_state={"mu": jnp.zeros(2)},
                                                        position={"epoch": 0, "index": 0, "seed": 0},
                                                        config={}, run={}, metrics={}, force=True)
    np.testing.assert_array_equal(checkpoint.load_params(tmp_path / "checkpoints" / "2")[0]["w"], expected)


def test_a_failed_background_save_raises_from_the_next_call(tmp_path, monkeypatch):
    with checkpoint.RunCheckpoints(tmp_path / "checkpoints", save_every=1) as run:
        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(run.manager, "save", broken)
        assert run.save(1, params=_params(), opt_state={"mu": jnp.zeros(2)},
                        position={"epoch": 0, "index": 0, "seed": 0},
                        config={}, run={}, metrics={})   # returns before the thread fails
        with pytest.raises(OSError, match="disk full"):
            run.wait()
        monkeypatch.undo()


def _flat_checkpoint(tmp_path):
    """A checkpoint shaped like `fffjax demo`'s: FFF-v1 and FF parameter dicts, no crammed-BERT config."""
    from fffjax import v1

    params = {"fff": v1.init(jax.random.key(0), 6, 3, 4, 2),
              "ff": {"w1": jnp.ones((6, 12)), "b1": jnp.zeros((12,)), "w2": jnp.ones((12, 4)), "b2": jnp.zeros((4,))}}
    config = {"model": "fffjax.nn.FFF", "in_features": 6, "out_features": 4, "depth": 2, "leaf_width": 3}
    return checkpoint.save_checkpoint(tmp_path / "demo", params, config), params, config


def test_inspect_describes_a_checkpoint_that_holds_no_crammed_bert(tmp_path):
    path, params, config = _flat_checkpoint(tmp_path)
    info = checkpoint.inspect_checkpoint(path)
    assert info["kind"] == "fffjax.nn.FFF" and info["config"] == config and info["step"] is None
    sizes = {name: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree)) for name, tree in params.items()}
    assert info["parameters"] == {"total": sum(sizes.values()), **sizes}
    with pytest.raises(ValueError, match="does not hold a crammed-BERT model.*fffjax.nn.FFF"):
        checkpoint.load_checkpoint(path)


def test_cli_inspect_and_export_of_a_checkpoint_without_crammed_bert(tmp_path, capsys):
    from fffjax.cli import main

    path, _, _ = _flat_checkpoint(tmp_path)
    assert main(["inspect", str(path)]) == 0
    assert "fffjax.nn.FFF" in capsys.readouterr().out
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith(f"fffjax: error: checkpoint {path} does not hold a crammed-BERT model")
    assert not (tmp_path / "hf").exists()


def test_resolve_checkpoint_finds_demo_folders_and_run_steps(tmp_path):
    demo_out = tmp_path / "demo"
    checkpoint.save_checkpoint(demo_out / "checkpoint", _params(), {"v": 1})
    assert checkpoint.resolve_checkpoint(demo_out) == demo_out / "checkpoint"
    for step in (2, 10):
        checkpoint.save_checkpoint(tmp_path / "run" / "checkpoints" / str(step), _params(), {"step": step})
    (tmp_path / "run" / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # a save in progress
    assert checkpoint.resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "10"
    assert checkpoint.resolve_checkpoint(tmp_path / "run" / "checkpoints" / "2").name == "2"


def test_resolve_checkpoint_says_what_a_path_is_instead(tmp_path):
    cases = {"missing": "does not exist", "file.json": "is a file", "hf": "is a Hugging Face folder",
             "run": "has no complete step checkpoint", "empty": "is neither an fffjax checkpoint"}
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for name, message in cases.items():
        with pytest.raises(FileNotFoundError, match=message):
            checkpoint.resolve_checkpoint(tmp_path / name)


def test_reading_a_damaged_checkpoint_names_it(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", _params(), {"v": 1})
    (path / "config" / "metadata").write_text("{truncated")
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"checkpoint {path} is unreadable"):
        checkpoint.read_config(path)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt2", _params(), {"v": 1})
    chunks = [f for f in (path / PARAMS).rglob("*") if f.is_file() and f.parent.name == "d"]  # tensorstore's data
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"\0" * 3)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"checkpoint {path} is unreadable"):
        checkpoint.restore_checkpoint(path)


def test_reading_a_training_step_reads_only_params_and_config(tmp_path, caplog):
    """Loading a step of a run reads its params and config items and no other (no orbax warnings about
    opt_state, data, run or metrics items it has no handler for)."""
    params = _params()
    with checkpoint.RunCheckpoints(tmp_path / "checkpoints", save_every=1, async_save=False) as run:
        run.save(1, params=params, opt_state={"mu": jnp.zeros((3, 4))}, position={"epoch": 0, "index": 1, "seed": 0},
                 config={"v": 1}, run={"command": "test"}, metrics={"loss": 1.0})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restored, config, record = checkpoint.load_params(tmp_path)
        info = checkpoint.inspect_checkpoint(tmp_path)
    assert config == {"v": 1} and record["step"] == 1 and info["parameters"]["total"] == 3 * 4 + 5 + 2
    np.testing.assert_array_equal(restored["layer"]["b"], np.arange(5))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_bert_with_fff_slots_saves_and_loads_back(tmp_path):
    from fffjax.models.bert import Bert, BertConfig, gelu
    from fffjax.nn import UltraFastFF

    config = BertConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                        max_positions=12)
    bert = Bert(config, rngs=nnx.Rngs(0))
    bert.layers[0].ffn = FFF(16, 6, 16, 2, activation=gelu, rngs=nnx.Rngs(1))
    bert.layers[2].ffn = UltraFastFF(16, 2, n_trees=3, rngs=nnx.Rngs(2))
    bert.eval()
    path = checkpoint.save_bert_checkpoint(tmp_path / "bert", bert)
    loaded = checkpoint.load_bert_checkpoint(path)
    assert [type(layer.ffn).__name__ for layer in loaded.layers] == ["FFF", "DenseFfn", "UltraFastFF"]
    assert loaded.layers[0].ffn.deterministic   # eval mode, as every loader returns
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    np.testing.assert_array_equal(np.asarray(loaded(ids, mask)), np.asarray(bert(ids, mask)))
    info = checkpoint.inspect_checkpoint(path)
    assert info["kind"] == "bert" and info["config"]["ffn_layers"][2] == {"kind": "fff_v2", "depth": 2, "n_trees": 3}
    with pytest.raises(ValueError, match="holds a BERT encoder .*load_bert_checkpoint"):
        checkpoint.load_checkpoint(path)
    checkpoint.save_checkpoint(tmp_path / "other", {"w": np.zeros(2)}, {"model": "causal_lm"})
    with pytest.raises(ValueError, match="does not hold a BERT encoder: its config names model 'causal_lm'"):
        checkpoint.load_bert_checkpoint(tmp_path / "other")
