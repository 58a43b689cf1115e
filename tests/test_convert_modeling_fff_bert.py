"""fffjax.convert.modeling_fff_bert: the torch/transformers BERT every BERT export carries. Its config refuses
what it does not build, its FFF-v1 layer descends as fffjax's hard FFF-v1 does, and a BERT checkpoint with every
kind of feedforward slot exported by ``fffjax export`` loads through the transformers Auto classes in a fresh
process where fffjax cannot be imported, with the hidden states of fffjax; the folder reads back into fffjax
(``from_pretrained``, ``fffjax embed``, ``fffjax import``) exactly, and so does transformers' ``save_pretrained``
of it."""

import dataclasses
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _bert_export_helpers import SMALL, mixed_bert, safe_rows, torch_modeling_package  # noqa: E402
from _export_helpers import run_without_fffjax  # noqa: E402
from _text_helpers import cramming_style_tokenizer  # noqa: E402

import fffjax  # noqa: E402
from fffjax.cli import main  # noqa: E402
from fffjax.convert.bert import bert_keys  # noqa: E402
from fffjax.convert.hf import BERT_AUTO_MAP  # noqa: E402
from fffjax.convert.layers import export_fastfeedforward  # noqa: E402
from fffjax.models.bert import FFN_ACTIVATIONS, bert_checkpoint_config  # noqa: E402
from fffjax.nn import FFF  # noqa: E402
from fffjax.pretrained import load_model  # noqa: E402
from fffjax.text import embed  # noqa: E402
from fffjax.train.checkpoint import load_bert_checkpoint, save_bert_checkpoint  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-5
hf_bert = torch_modeling_package()


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_config_refuses_what_it_does_not_build():
    with pytest.raises(ValueError, match=r"ffn_layers must hold one spec per layer \(2\), got 1"):
        hf_bert.FffBertConfig(num_hidden_layers=2, ffn_layers=[{"kind": "dense", "width": 8}])
    with pytest.raises(ValueError, match=r"ffn_layers\[1\] must be a dict with 'kind' one of .* got \{'kind': 'moe'\}"):
        hf_bert.FffBertConfig(num_hidden_layers=2, ffn_layers=[{"kind": "dense", "width": 8}, {"kind": "moe"}])
    with pytest.raises(ValueError, match=r"ffn_layers\[0\]\['activation'\] must be one of .* got 'tanh'"):
        hf_bert.FffBertConfig(num_hidden_layers=1, ffn_layers=[{"kind": "fff_v1", "depth": 1, "leaf_width": 2,
                                                                "activation": "tanh"}])


@pytest.mark.parametrize("activation, legacy_eval", [("gelu", False), ("gelu", True), ("relu", False)])
def test_fff_v1_layer_takes_the_hard_descent_of_fffjax(activation, legacy_eval):
    layer = FFF(16, 4, 16, 3, activation=FFN_ACTIVATIONS[activation], legacy_eval=legacy_eval, rngs=nnx.Rngs(1))
    layer.eval()
    module = hf_bert.HardFastFeedforward(16, 4, 3, activation, leaf_output_bias=not legacy_eval)
    assert all(torch.isfinite(p).all() for p in module.parameters()) and int(module.depth) == 3   # its own init
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_fastfeedforward(layer).items()}, strict=True)
    x = np.random.default_rng(2).standard_normal((5, 7, 16)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(layer(jnp.asarray(x))), atol=1e-5, rtol=0)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["fffjax"] = None  # any import of fffjax now fails
    from pathlib import Path
    import numpy as np, torch
    from transformers import AutoModel, AutoTokenizer

    root, cache = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    folder = root / "export"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert not model.training
    assert Path(sys.modules[type(model).__module__].__file__).resolve().is_relative_to(cache)
    texts = json.loads((root / "texts.json").read_text())
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for name, array in [("ids", batch["input_ids"]), ("mask", batch["attention_mask"]), ("hidden", hidden)]:
        np.save(root / f"{name}.npy", array.numpy())
    model.save_pretrained(root / "saved")
    report = {"class": type(model).__name__, "keys": list(model.state_dict())}
    (root / "report.json").write_text(json.dumps(report))
    assert sys.modules["fffjax"] is None
""")


def test_export_loads_in_transformers_without_fffjax_and_reads_back(tmp_path):
    tokenizer = cramming_style_tokenizer(tmp_path, vocab_size=120, seed=5)
    config = dataclasses.replace(SMALL, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    model = mixed_bert(config, seed=6)
    specs = bert_checkpoint_config(model)["ffn_layers"]
    checkpoint = save_bert_checkpoint(tmp_path / "ckpt", model, tokenizer=tokenizer)
    assert main(["export", str(checkpoint), str(tmp_path / "export")]) == 0   # with the checkpoint's tokenizer
    written = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert written == ["config.json", "model.safetensors", "modeling_crammed_bert.py", "modeling_fff_bert.py",
                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config_json = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config_json["auto_map"] == BERT_AUTO_MAP and config_json["model_type"] == "fff_bert"
    assert config_json["ffn_layers"] == specs
    texts = ["the whale swam under the grey sea while the crew sang.", "the wind rose", "old songs of home"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))

    run_without_fffjax(FRESH_PROCESS, tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["class"] == "FffBertModel" and report["keys"] == bert_keys(config, specs)
    ids, mask = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "mask.npy")
    assert mask.min() == 0   # a padded batch
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    safe = safe_rows(model, ids, mask)
    assert safe.sum() >= 2
    real = (mask == 1) & safe[:, None]
    np.testing.assert_allclose(np.load(tmp_path / "hidden.npy")[real], ours[real], atol=ATOL, rtol=0)

    # back into fffjax: from_pretrained, `fffjax embed`, `fffjax import`, transformers' save_pretrained
    loaded, found = fffjax.from_pretrained(tmp_path / "export")
    assert found.specials == tokenizer.specials
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert main(["embed", str(tmp_path / "export"), "--input", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "emb.npy"), "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), embed(model, tokenizer, texts), atol=1e-6, rtol=0)
    assert main(["import", str(tmp_path / "export"), str(tmp_path / "imported")]) == 0
    imported = load_bert_checkpoint(tmp_path / "imported")
    assert bert_checkpoint_config(imported) == bert_checkpoint_config(model)
    jax.tree.map(np.testing.assert_array_equal, _params(imported), _params(model))
    saved = load_model(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, _params(saved), _params(model))
