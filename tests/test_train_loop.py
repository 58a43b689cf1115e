"""fffjax.train.loop: `fit` writes the metrics JSONL, the loss plot and the checkpoints of a run."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from _train_helpers import BASE, SEQ, VOCAB, mlm_rows, small_config
from flax import nnx

from fffjax.data import pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS
from fffjax.models import CrammedBertMLM
from fffjax.train import Trainer, fit, mlm_objective
from fffjax.train import sharding as shd


def test_fit_writes_metrics_plot_and_checkpoints(tmp_path):
    config = dataclasses.replace(BASE, steps=6, save_every=3, eval_every=3)
    trainer = Trainer(CrammedBertMLM(small_config(), rngs=nnx.Rngs(0)), mlm_objective, config,
                      mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    pipe = pipeline.mlm_pipeline(mlm_rows(), 16, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
    held = [
        pipeline.mlm_pipeline(mlm_rows(32, seed=1), 16, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS).batch_at(
            pipeline.initial_position(9)
        )
    ]
    records = fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(),
                  eval_batches=lambda: held, progress=False, tokens_per_example=SEQ)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_s"} <= set(records[0])
    assert "eval_loss" in records[2] and "eval_loss" in records[5] and "eval_loss" not in records[3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    from fffjax.train.checkpoint import restore_checkpoint

    params, model_config = restore_checkpoint(tmp_path / "checkpoints" / "6")
    assert model_config == small_config().to_dict()
    np.testing.assert_array_equal(np.asarray(params["encoder"]["final_norm"]["scale"]),
                                  np.asarray(trainer.state["params"]["encoder"]["final_norm"]["scale"]))
    with pytest.raises(FileExistsError, match="out_dir"):  # no silent overwrite of a finished run
        fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(), resume=False, progress=False)


def test_fit_digests_only_saved_steps_and_times_steps_and_checkpoints_apart(tmp_path, monkeypatch):
    """Over 6 steps with save_every=4 the digest runs for steps 4 and 6 (the last, forced) only; every
    record times the step and the checkpoint apart; a record lost after its checkpoint comes back on resume."""
    from fffjax.train import checkpoint

    digested = []
    digest = checkpoint.tree_digest
    monkeypatch.setattr(checkpoint, "tree_digest", lambda tree: digested.append(1) or digest(tree))
    config = dataclasses.replace(BASE, steps=6, save_every=4)
    trainer = Trainer(CrammedBertMLM(small_config(), rngs=nnx.Rngs(0)), mlm_objective, config,
                      mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    pipe = pipeline.mlm_pipeline(mlm_rows(), 16, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
    records = fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(), progress=False,
                  tokens_per_example=SEQ)
    assert len(digested) == 2
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    restored = checkpoint.load_params(tmp_path / "checkpoints" / "4")[2]
    assert restored["run"]["digest"] is not None and restored["metrics"]["step"] == 4
    timing = ("step_s", "eval_s", "checkpoint_s", "wall_s", "tokens_per_s", "wall_tokens_per_s")
    for record in records:
        assert all(record[name] >= 0 for name in timing), record
        assert (record["checkpoint_s"] > 0) == (record["step"] in (4, 6)), record
        assert record["eval_s"] == 0, record   # no eval_batches
        assert record["wall_s"] == pytest.approx(record["step_s"] + record["eval_s"] + record["checkpoint_s"])
        assert record["tokens_per_s"] == pytest.approx(16 * SEQ / record["step_s"])
        assert record["wall_tokens_per_s"] == pytest.approx(16 * SEQ / record["wall_s"])
    # a crash after step 6's save and before its log line: resuming writes the checkpoint's record back
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    resumed = fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(), progress=False,
                  tokens_per_example=SEQ)
    assert [r["step"] for r in resumed] == list(range(1, 7)) and resumed[-1]["loss"] == records[-1]["loss"]
