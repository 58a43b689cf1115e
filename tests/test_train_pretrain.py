"""fffjax.train.pretrain: the `pretrain` command end to end on a fake text cache, then `finetune`
(fffjax.train.finetune) from its checkpoint."""

import json

import numpy as np
import pytest
from _text_helpers import fake_text_cache
from _train_helpers import SEQ, small_config

from fffjax.train.metrics import read_metrics


@pytest.mark.slow
def test_pretrain_and_finetune_commands_end_to_end(tmp_path):
    import argparse

    from fffjax.models import CrammedBertClassifier, CrammedBertMLM
    from fffjax.pretrained import from_pretrained
    from fffjax.train import finetune, pretrain

    cache = tmp_path / "text"
    fake_text_cache(cache)
    run_config = tmp_path / "run.json"
    run_config.write_text(json.dumps({
        "model": small_config().to_dict(),
        "train": {"steps": 4, "batch_size": 8, "save_every": 2, "eval_every": 2, "learning_rate": 3e-3},
        "data": {"sources": ["sotu"], "seq_length": SEQ, "holdout": 0.1, "eval_batches": 1}}))

    def invoke(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return module.run(parser.parse_args(argv))

    out = tmp_path / "pretrain"
    assert (
        invoke(pretrain, ["--config", str(run_config), "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    )
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_loss" in records[-1]
    assert (out / "loss.png").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    # running it again resumes at the last step: nothing to train, the log is unchanged
    assert (
        invoke(pretrain, ["--config", str(run_config), "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    )
    assert read_metrics(out / "metrics.jsonl") == records

    ft = tmp_path / "finetune"
    assert invoke(finetune, ["--config", str(run_config), "--task", "spam", "--init", str(out), "--out", str(ft),
                             "--cache", str(cache), "--steps", "3", "--no-progress"]) == 0
    result = json.loads((ft / "result.json").read_text())
    assert result["n_test"] == 8 and 0.0 <= result["test_accuracy"] <= 1.0
    assert [r["step"] for r in read_metrics(ft / "metrics.jsonl")] == [1, 2, 3]
    # both runs load for inference with their tokenizer, in eval mode
    mlm, tokenizer = from_pretrained(out)
    classifier, ft_tokenizer = from_pretrained(ft)
    assert isinstance(mlm, CrammedBertMLM) and isinstance(classifier, CrammedBertClassifier)
    assert classifier.encoder.embedding.dropout.deterministic and mlm.encoder.embedding.dropout.deterministic
    assert ft_tokenizer.specials == tokenizer.specials and tokenizer.mask_id == 4


def test_random_token_rows_are_packed_rows_of_word_pieces():
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS
    from fffjax.train.pretrain import random_token_rows

    rows = random_token_rows(64, 16, 40, seed=3)
    assert rows.shape == (64, 16) and rows.dtype == np.int32
    assert (rows[:, 0] == WORDPIECE_SPECIALS.cls).all()
    body = rows[:, 1:]
    assert not np.isin(body, WORDPIECE_SPECIALS.ids).any() and body.max() < 40
    assert set(np.unique(body)) == set(range(len(WORDPIECE_SPECIALS.ids), 40))  # every word piece drawn
    np.testing.assert_array_equal(rows, random_token_rows(64, 16, 40, seed=3))
    with pytest.raises(ValueError, match="vocab_size"):
        random_token_rows(4, 16, 5)


def test_pretrain_random_tokens_needs_no_corpus_or_tokenizer(tmp_path, monkeypatch):
    import argparse

    from fffjax.train import pretrain

    monkeypatch.setenv("FFFJAX_DATA", str(tmp_path / "no-data"))
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--random-tokens", "--steps", "3", "--batch-size", "8", "--seq-length", "32",
            "--save-every", "2", "--out", str(out), "--no-progress"]
    assert pretrain.run(parser.parse_args(argv)) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and not any("eval_loss" in r for r in records)
    assert all(r["tokens_per_s"] > 0 and r["wall_tokens_per_s"] > 0 for r in records)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert not (out / "tokenizer").exists() and not (tmp_path / "no-data").exists()
    from fffjax.train.checkpoint import load_params

    assert load_params(out)[2]["run"]["data"] == "random-tokens"
    with pytest.raises(ValueError, match="--random-tokens"):
        pretrain.run(parser.parse_args([*argv, "--tokenizer", str(tmp_path)]))
