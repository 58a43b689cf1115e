"""fffjax.train.lm: `fffjax train-lm` end to end on a tiny corpus of two sources (train, evaluate on
held-out closing paragraphs, resume, generate), and its cached data prepared once."""

import argparse
import json
import math
import shutil

import numpy as np
import pytest
from _text_helpers import synthetic_text

from fffjax import cli
from fffjax.train import lm
from fffjax.train.metrics import read_metrics

SOURCES = ["sotu", "moby_dick"]


def _cache(root):
    (root / "corpus").mkdir(parents=True)
    for seed, name in enumerate(SOURCES):
        (root / "corpus" / f"{name}.txt").write_text(synthetic_text(300, seed=seed).replace("\n", "\n\n"))
    return root


def _run_config(path, **model):
    config = {"vocab_size": 256, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_length": 32,
              "ffn": "fff", "fff_depth": 3, "fff_trees": 2, **model}
    path.write_text(json.dumps({
        "model": config,
        "train": {"steps": 4, "batch_size": 8, "save_every": 2, "eval_every": 2, "learning_rate": 3e-3},
        "data": {"sources": SOURCES, "seq_length": 16, "holdout": 0.1, "eval_batches": 2}}))
    return path


def _invoke(argv):
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    return lm.run(parser.parse_args(argv))


@pytest.mark.slow
def test_train_lm_trains_evaluates_resumes_and_its_run_generates(tmp_path, capsys):
    cache = _cache(tmp_path / "text")
    config = _run_config(tmp_path / "run.json")
    out = tmp_path / "run"
    argv = ["--config", str(config), "--out", str(out), "--cache", str(cache), "--no-progress"]
    assert _invoke(argv) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "eval_loss" in records[1] and "eval_loss" in records[3] and "eval_loss" not in records[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["model"]["ffn"] == "fff"
    assert summary["eval_perplexity"] == pytest.approx(math.exp(records[-1]["eval_loss"]))
    assert summary["epochs"] > 0 and (out / "tokenizer" / "tokenizer.json").exists()

    assert _invoke(argv) == 0                                    # resumes at step 4: nothing left to train
    assert read_metrics(out / "metrics.jsonl") == records
    capsys.readouterr()
    assert cli.main(["generate", str(out), "the whale", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the whale")


@pytest.mark.slow
def test_train_lm_with_load_balance_logs_the_term_beside_the_cross_entropy(tmp_path):
    cache = _cache(tmp_path / "text")
    out = tmp_path / "run"
    config = _run_config(tmp_path / "run.json", load_balance=0.1)
    assert _invoke(["--config", str(config), "--cache", str(cache), "--out", str(out), "--steps", "2",
                    "--eval-every", "2", "--no-progress"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 < r["load_balance"] <= 3 / 4 for r in records)   # one layer of depth 3
    assert "eval_load_balance" in records[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["load_balance"] == 0.1 and summary["load_balance"] == records[-1]["load_balance"]
    assert summary["eval_perplexity"] == pytest.approx(math.exp(records[-1]["eval_loss"]))


def test_lm_data_holds_out_each_sources_end_and_is_read_back_without_the_corpus(tmp_path):
    cache = _cache(tmp_path / "text")
    tokenizer_path, train, held = lm.prepare_lm_data(cache, SOURCES, vocab_size=200, seq_length=16, holdout=0.1)
    assert train.shape[1] == held.shape[1] == 16 and len(held) > 0 and train.dtype == np.int32
    tokens_held = {int(t) for t in held.ravel()}
    assert len(tokens_held) > 5
    shutil.rmtree(cache / "corpus")                              # a complete cache needs no corpus
    again = lm.prepare_lm_data(cache, SOURCES, vocab_size=200, seq_length=16, holdout=0.1)
    assert again[0] == tokenizer_path
    np.testing.assert_array_equal(again[1], train)
    np.testing.assert_array_equal(again[2], held)
    with pytest.raises(FileNotFoundError, match="corpus file"):     # another split needs the corpus again
        lm.prepare_lm_data(cache, SOURCES, vocab_size=200, seq_length=16, holdout=0.2)


def test_eval_batches_and_bad_settings_are_named(tmp_path):
    held = np.arange(5 * 16, dtype=np.int32).reshape(5, 16)
    batches = lm.eval_batch_list(held, 2, None)
    assert len(batches) == 2 and np.all(batches[0]["attention_mask"] == 1)
    np.testing.assert_array_equal(batches[1]["input_ids"], held[2:4])
    with pytest.raises(ValueError, match="holdout: 5 held-out rows fill no batch of 8"):
        lm.eval_batch_list(held, 8, None)
    cache = _cache(tmp_path / "text")
    config = _run_config(tmp_path / "run.json")
    with pytest.raises(ValueError, match="--seq-length: at most the model's max_seq_length 32, got 64"):
        _invoke(["--config", str(config), "--cache", str(cache), "--seq-length", "64", "--out", str(tmp_path / "r")])

