"""fffjax.train.pretrain: the `pretrain` command end to end on a fake text cache, then `finetune`
(fffjax.train.finetune) from its checkpoint."""

import json

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
