"""fffjax.convert.hf: the published Hugging Face directory layout, and the `fffjax export|import|inspect`
commands on checkpoints and training runs, checked by loading the result into the PyTorch reference."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from _ultrafastbert_helpers import (  # noqa: E402
    ATOL,
    TINY,
    jax_logits,
    padded_batch,
    randomise_jax,
    torch_logits,
    torch_mlm,
)

from fffjax.convert.hf import cmd_export, cmd_import, read_hf_dir, write_hf_dir  # noqa: E402
from fffjax.convert.ultrafastbert import export_ultrafastbert, published_keys  # noqa: E402
from fffjax.models import CrammedBertClassifier, CrammedBertMLM  # noqa: E402
from fffjax.train.checkpoint import inspect_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.torch


def _checkpoint(tmp_path, model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_checkpoint(tmp_path / "ckpt", params, model.config.to_dict())


def test_hf_directory_layout(tmp_path):
    model = randomise_jax(CrammedBertMLM(TINY, rngs=nnx.Rngs(0)), seed=8)
    out = write_hf_dir(export_ultrafastbert(model), TINY, tmp_path / "hf", kind="mlm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "modeling_crammed_bert.py"]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "crammedBERT" and config_json["architectures"] == ["ScriptableLMForPreTraining"]
    assert config_json["auto_map"]["AutoModelForMaskedLM"] == "modeling_crammed_bert.CrammedBertForMaskedLM"
    assert config_json["arch"]["intermed_type"] == "fff" and config_json["arch"]["num_labels"] is None
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert f.get_tensor("encoder.layers.0.attn.self_attention.norm_factor").shape == ()
    state_dict, _ = read_hf_dir(out)
    assert list(state_dict) == published_keys(TINY)
    with pytest.raises(FileExistsError, match="already exists"):
        write_hf_dir(state_dict, TINY, out, kind="mlm")


def test_cli_export_import_inspect_round_trip(tmp_path, capsys):
    from fffjax.cli import main

    model = randomise_jax(CrammedBertMLM(TINY, rngs=nnx.Rngs(0)), seed=9)
    model.eval()
    ckpt = _checkpoint(tmp_path, model)
    ids, mask = padded_batch(TINY, seed=11)
    expected = jax_logits(model, ids, mask)

    formats = [("hf", "model.safetensors"), ("safetensors", "model.safetensors"), ("pt", "pytorch_model.bin")]
    for fmt, weights in formats:
        out = tmp_path / f"hf-{fmt}"
        assert main(["export", str(ckpt), str(out), "--format", fmt]) == 0
        assert (out / weights).is_file()
        state_dict, config_json = read_hf_dir(out)
        module = torch_mlm(state_dict, config_json)  # strict load of what the CLI wrote
        np.testing.assert_allclose(torch_logits(module, ids, mask), expected, atol=ATOL, rtol=0)
        back = tmp_path / f"back-{fmt}"
        assert main(["import", str(out), str(back)]) == 0
        imported, info = load_checkpoint(back)
        assert info["config"] == TINY and info["kind"] == "mlm"
        np.testing.assert_allclose(jax_logits(imported, ids, mask), expected, atol=1e-6, rtol=0)

    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "hf-pt")]) == 2  # a user error: one line on stderr
    err = capsys.readouterr().err
    assert err.startswith("fffjax: error: ") and "already exists" in err
    assert main(["import", str(tmp_path / "hf-pt"), str(tmp_path / "back-pt")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf-pt"), str(tmp_path / "back-pt"), "--overwrite"]) == 0

    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == TINY.to_dict() and info["kind"] == "mlm"
    assert info["parameters"]["total"] == sum(
        int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))
    )


def test_inspect_reads_a_classifier_checkpoint(tmp_path):
    config = dataclasses.replace(TINY, num_labels=3)
    model = CrammedBertClassifier(config, rngs=nnx.Rngs(0))
    ckpt = _checkpoint(tmp_path, model)
    info = inspect_checkpoint(ckpt)
    assert info["kind"] == "classifier" and info["config"]["num_labels"] == 3
    assert info["parameters"]["head"] == config.head_dim * 3 + 3
    out = cmd_export(ckpt, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ScriptableLMForSequenceClassification"]
    back, info = load_checkpoint(cmd_import(out, tmp_path / "back"))
    assert isinstance(back, CrammedBertClassifier) and info["config"] == config


def test_training_run_directory_exports_its_latest_step(tmp_path):
    from fffjax.train.checkpoint import RunCheckpoints

    model = randomise_jax(CrammedBertMLM(TINY, rngs=nnx.Rngs(0)), seed=12)
    model.eval()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with RunCheckpoints(tmp_path / "run" / "checkpoints", save_every=1, async_save=False) as checkpoints:
        for step in (10, 20):
            checkpoints.save(step, params=params, opt_state={"count": jnp.zeros(())},
                             position={"epoch": 0, "index": step, "seed": 0}, config=TINY.to_dict(),
                             run={"command": "pretrain"}, metrics={"loss": 100.0 / step})
    info = inspect_checkpoint(tmp_path / "run")
    assert info["step"] == 20 and info["metrics"] == {"loss": 5.0} and info["path"].endswith("20")
    out = cmd_export(tmp_path / "run", tmp_path / "hf")
    state_dict, config_json = read_hf_dir(out)
    ids, mask = padded_batch(TINY, seed=13)
    np.testing.assert_allclose(torch_logits(torch_mlm(state_dict, config_json), ids, mask),
                               jax_logits(model, ids, mask), atol=ATOL, rtol=0)


def test_export_writes_the_tokenizer_it_is_given(tmp_path):
    from _text_helpers import cramming_style_tokenizer_folder, synthetic_text

    from fffjax.cli import main
    from fffjax.data.tokenizer import Tokenizer

    (tmp_path / "text.txt").write_text(synthetic_text(100))
    tokenizer_dir = cramming_style_tokenizer_folder([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=80, seed=2)
    ckpt = _checkpoint(tmp_path, CrammedBertMLM(TINY, rngs=nnx.Rngs(0)))
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--tokenizer", str(tokenizer_dir)]) == 0
    written = Tokenizer.from_pretrained(tmp_path / "hf")
    assert written.specials == Tokenizer.from_pretrained(tokenizer_dir).specials
    small = dataclasses.replace(TINY, vocab_size=written.vocab_size - 1)
    with pytest.raises(ValueError, match="vocab_size"):
        write_hf_dir({}, small, tmp_path / "small", kind="mlm", tokenizer=written)


def test_decoder_checkpoint_exports_and_imports_as_a_decoder_folder(tmp_path):
    from _decoder_helpers import make, small

    from fffjax.cli import main
    from fffjax.convert.decoder import decoder_keys, export_decoder
    from fffjax.generate import load_causal_lm
    from fffjax.pretrained import find_tokenizer, load_model

    config = small("narrow")
    model = make(config, seed=14)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckpt = save_checkpoint(tmp_path / "ckpt", params, config.to_dict())
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out), "--format", "pt"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "modeling_crammed_bert.py", "modeling_fff_decoder.py",
        "pytorch_model.bin"]
    state_dict, config_json = read_hf_dir(out)
    assert config_json["model_type"] == "fff_decoder" and config_json["ffn"] == "narrow"
    assert list(state_dict) == decoder_keys(config)
    jax.tree.map(np.testing.assert_array_equal, state_dict, export_decoder(model))

    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    assert inspect_checkpoint(tmp_path / "back")["kind"] == "causal_lm"
    for loaded in (load_causal_lm(tmp_path / "back"), load_causal_lm(out)):
        assert loaded.config == config
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), params)

    assert find_tokenizer(out) is None  # a decoder folder, though it holds no tokenizer
    with pytest.raises(ValueError, match="holds a causal language model, not crammed BERT"):
        load_model(out)
    encoder = write_hf_dir(export_ultrafastbert(CrammedBertMLM(TINY, rngs=nnx.Rngs(0))), TINY, tmp_path / "mlm",
                           kind="mlm")
    with pytest.raises(ValueError, match="does not hold a causal LM: its config.json's model_type is 'crammedBERT'"):
        load_causal_lm(encoder)
