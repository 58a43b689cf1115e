"""fffjax.train.finetune: `fffjax finetune --init` from a published-layout folder whose tokenizer has
its specials in a shuffled order (as the published UltraFastBERT tokenizers do)."""

import argparse
import dataclasses
import json

from _text_helpers import cramming_style_tokenizer_folder, fake_text_cache, synthetic_text
from flax import nnx

from fffjax.convert.hf import write_hf_dir
from fffjax.convert.ultrafastbert import export_ultrafastbert
from fffjax.data.tokenizer import Tokenizer
from fffjax.models import CrammedBertClassifier, CrammedBertMLM, get_config
from fffjax.pretrained import from_pretrained
from fffjax.train import finetune


def test_finetune_from_a_published_folder_uses_its_tokenizer(tmp_path):
    cache = tmp_path / "text"
    fake_text_cache(cache)
    (tmp_path / "text.txt").write_text(synthetic_text(300))
    tokenizer = Tokenizer.from_pretrained(
        cramming_style_tokenizer_folder([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=120, seed=7))
    config = dataclasses.replace(get_config("tiny"), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                 max_seq_length=32)
    mlm = CrammedBertMLM(config, rngs=nnx.Rngs(0))
    published = write_hf_dir(export_ultrafastbert(mlm), config, tmp_path / "published", kind="mlm")
    tokenizer.save_pretrained(published)
    run_config = tmp_path / "run.json"
    run_config.write_text(json.dumps({"model": "tiny", "train": {"steps": 2, "batch_size": 8, "save_every": 2},
                                      "data": {"seq_length": 32}}))
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    out = tmp_path / "ft"
    args = parser.parse_args(["--config", str(run_config), "--task", "spam", "--init", str(published),
                              "--out", str(out), "--cache", str(cache), "--no-progress"])
    assert finetune.run(args) == 0
    classifier, ft_tokenizer = from_pretrained(out)
    assert isinstance(classifier, CrammedBertClassifier) and ft_tokenizer.specials == tokenizer.specials
    assert classifier.config.vocab_size == tokenizer.vocab_size and classifier.config.pad_token_id == tokenizer.pad_id
    # the encoder started from the published weights: the word embedding moved little in two steps
    start = mlm.encoder.embedding.word_embedding.embedding[...]
    end = classifier.encoder.embedding.word_embedding.embedding[...]
    assert float(abs(end - start).max()) < 0.05
