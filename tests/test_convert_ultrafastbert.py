"""fffjax.convert.ultrafastbert: whole-model UltraFastBERT conversion, parity with a PyTorch crammed
BERT written from docs/conventions.md, loaded with ``strict=True``, in both directions (the HF
directory layout and the CLI: test_convert_hf.py)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import crammed_bert_reference as ref  # noqa: E402
from _ultrafastbert_helpers import (  # noqa: E402
    ATOL,
    TINY,
    jax_logits,
    padded_batch,
    randomise_jax,
    randomise_torch,
    torch_logits,
    torch_mlm,
)

from fffjax.convert.hf import hf_config  # noqa: E402
from fffjax.convert.ultrafastbert import (  # noqa: E402
    _expected_shapes,
    export_ultrafastbert,
    import_ultrafastbert,
    published_keys,
)
from fffjax.models import CrammedBertClassifier, CrammedBertMLM, get_config  # noqa: E402

pytestmark = pytest.mark.torch


# ----------------------------------------------------------------------------- JAX -> torch


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_export_loads_strict_and_matches_logits(name):
    config = get_config(name)
    model = randomise_jax(CrammedBertMLM(config, rngs=nnx.Rngs(0)), seed=1)
    model.eval()
    state_dict = export_ultrafastbert(model)
    module = torch_mlm(state_dict, json.loads(json.dumps(hf_config(config, "mlm"))))

    assert list(state_dict) == list(module.state_dict()) == published_keys(config)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    norm_factor = state_dict["encoder.layers.0.attn.self_attention.norm_factor"]
    assert norm_factor.shape == () and float(norm_factor) == pytest.approx(1 / np.sqrt(config.attention_head_width))
    assert state_dict["encoder.embedding.pos_embedding.scale_factor"].shape == (1,)
    np.testing.assert_array_equal(state_dict["decoder.weight"], state_dict["encoder.embedding.word_embedding.weight"])

    ids, mask = padded_batch(config)
    expected = torch_logits(module, ids, mask)
    np.testing.assert_allclose(jax_logits(model, ids, mask), expected, atol=ATOL, rtol=0)
    # the padding mask matters: the same ids without it give other logits
    assert np.abs(jax_logits(model, ids, np.ones_like(mask)) - expected).max() > 1e-3


# ----------------------------------------------------------------------------- torch -> JAX


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_torch_random_init_imports_with_equal_logits(name):
    config = get_config(name)
    torch.manual_seed(0)
    module = randomise_torch(ref.ScriptableLMForPreTraining(config.to_arch()), seed=2).eval()
    arch = json.loads(json.dumps(hf_config(config, "mlm")))["arch"]  # num_labels null, as published
    model = import_ultrafastbert(module.state_dict(), arch)  # torch tensors in, arch dict as config
    model.eval()
    assert model.config == config
    ids, mask = padded_batch(config, seed=3)
    np.testing.assert_allclose(jax_logits(model, ids, mask), torch_logits(module, ids, mask), atol=ATOL, rtol=0)
    # and back: the re-export loads strictly and is the same state dict
    again = export_ultrafastbert(model)
    for key, value in module.state_dict().items():
        np.testing.assert_allclose(again[key], value.numpy(), atol=1e-7, err_msg=key)


def test_import_with_only_the_decoder_key(tmp_path):
    torch.manual_seed(1)
    module = randomise_torch(ref.ScriptableLMForPreTraining(TINY.to_arch()), seed=4).eval()
    state = {k: v.clone() for k, v in module.state_dict().items() if k != "encoder.embedding.word_embedding.weight"}
    import safetensors.torch

    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    loaded = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.embedding.word_embedding.weight" not in loaded
    model = import_ultrafastbert(loaded, TINY)
    model.eval()
    ids, mask = padded_batch(TINY, seed=5)
    np.testing.assert_allclose(jax_logits(model, ids, mask), torch_logits(module, ids, mask), atol=ATOL, rtol=0)
    only_embedding = {k: v for k, v in module.state_dict().items() if k != "decoder.weight"}
    np.testing.assert_array_equal(
        export_ultrafastbert(import_ultrafastbert(only_embedding, TINY))["decoder.weight"],
        module.state_dict()["decoder.weight"].numpy())


def test_jax_conditional_and_masked_fff_agree_on_imported_weights():
    torch.manual_seed(2)
    module = randomise_torch(ref.ScriptableLMForPreTraining(TINY.to_arch()), seed=6).eval()
    ids, mask = padded_batch(TINY, seed=7)
    conditional = import_ultrafastbert(module.state_dict(), TINY, implementation="xla")
    masked = import_ultrafastbert(module.state_dict(), TINY, implementation="reference")
    conditional.eval()
    masked.eval()
    np.testing.assert_allclose(jax_logits(conditional, ids, mask), jax_logits(masked, ids, mask), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_classifier_export_and_import(num_labels):
    config = dataclasses.replace(TINY, num_labels=num_labels)
    model = randomise_jax(CrammedBertClassifier(config, rngs=nnx.Rngs(num_labels)), seed=num_labels)
    model.eval()
    state_dict = export_ultrafastbert(model)
    assert list(state_dict)[-4:] == ["pooler.dense.weight", "pooler.dense.bias", "head.weight", "head.bias"]
    assert state_dict["head.weight"].shape == (num_labels, config.head_dim)
    assert "decoder.weight" not in state_dict
    arch = json.loads(json.dumps(hf_config(config, "classifier")))["arch"]
    assert arch["num_labels"] == num_labels
    module = ref.ScriptableLMForSequenceClassification(arch).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    ids, mask = padded_batch(config, seed=num_labels)
    expected = torch_logits(module, ids, mask)
    assert expected.shape == (3, num_labels)
    np.testing.assert_allclose(jax_logits(model, ids, mask), expected, atol=ATOL, rtol=0)

    randomise_torch(module, seed=10 + num_labels)
    arch["num_labels"] = None  # the published bug's config: the label count comes from head.weight
    back = import_ultrafastbert(module.state_dict(), arch)
    back.eval()
    assert isinstance(back, CrammedBertClassifier) and back.config.num_labels == num_labels
    np.testing.assert_allclose(jax_logits(back, ids, mask), torch_logits(module, ids, mask), atol=ATOL, rtol=0)


def test_mlm_weights_start_a_classifier():
    mlm = randomise_jax(CrammedBertMLM(TINY, rngs=nnx.Rngs(0)), seed=3)
    state_dict = export_ultrafastbert(mlm)
    clf = import_ultrafastbert(state_dict, dataclasses.replace(TINY, num_labels=3), kind="classifier", seed=1)
    assert isinstance(clf, CrammedBertClassifier)
    mlm.eval()
    clf.eval()
    ids, mask = padded_batch(TINY)
    np.testing.assert_allclose(clf.encode(jnp.asarray(ids), jnp.asarray(mask)),
                               mlm.encode(jnp.asarray(ids), jnp.asarray(mask)), atol=1e-6)
    head = np.asarray(clf.head.kernel[...])
    assert head.shape == (TINY.head_dim, 3) and 0.01 < head.std() < 0.03
    assert float(np.abs(np.asarray(clf.head.bias[...])).max()) == 0.0


# ----------------------------------------------------------------------------- errors


def test_import_errors_name_keys_and_shapes():
    state_dict = export_ultrafastbert(CrammedBertMLM(TINY, rngs=nnx.Rngs(0)))
    broken = dict(state_dict)
    del broken["encoder.layers.1.ffn.linear_in.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layers.1.ffn.linear_in.bias'\]"):
        import_ultrafastbert(broken, TINY)
    with pytest.raises(ValueError, match="unexpected keys"):
        import_ultrafastbert({**state_dict, "encoder.layers.2.norm1.weight": np.ones(64, np.float32)}, TINY)
    wrong = dict(state_dict)
    wrong["encoder.layers.0.ffn.linear_in.weight"] = np.zeros((127, 64), np.float32)
    with pytest.raises(ValueError, match=r"linear_in.weight'\]: expected shape \(255, 64\).*found \(127, 64\)"):
        import_ultrafastbert(wrong, TINY)
    with pytest.raises(ValueError, match="norm_factor.*1/sqrt"):
        import_ultrafastbert(
            {**state_dict, "encoder.layers.0.attn.self_attention.norm_factor": np.array(0.5, np.float32)}, TINY
        )
    untied = {**state_dict, "decoder.weight": state_dict["decoder.weight"] + 1.0}
    with pytest.raises(ValueError, match="must be equal"):
        import_ultrafastbert(untied, TINY)
    with pytest.raises(ValueError, match="does not fit"):
        import_ultrafastbert(state_dict, get_config("tiny-dense"))


def test_base_layout_without_materialising():
    base = get_config("base")
    keys = published_keys(base)
    assert len(keys) == 167 and keys[0] == "encoder.embedding.word_embedding.weight" and keys[-1] == "decoder.weight"
    shapes = _expected_shapes(base, "mlm")
    assert shapes["encoder.layers.15.attn.self_attention.query_key_value.weight"] == (2304, 768)
    assert shapes["encoder.layers.3.ffn.linear_in.weight"] == (4095, 768)
    assert shapes["encoder.layers.3.ffn.linear_in.bias"] == (4095,)
    assert shapes["encoder.layers.3.ffn.linear_out.weight"] == (768, 4095)
    assert shapes["encoder.layers.0.attn.self_attention.norm_factor"] == ()
    unique = sum(int(np.prod(s)) for k, s in shapes.items() if k != "decoder.weight" and "norm_factor" not in k)
    assert unique == 163_671_025
    assert len(published_keys(base, "classifier")) == 166 + 4


def test_half_precision_state_dicts_import_as_float32():
    torch.manual_seed(3)
    module = ref.ScriptableLMForPreTraining(TINY.to_arch())
    half = {k: v.to(torch.float16) for k, v in module.state_dict().items()}
    model = import_ultrafastbert(half, TINY)
    table = model.encoder.embedding.word_embedding.embedding[...]
    assert table.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(table), half["decoder.weight"].float().numpy())
