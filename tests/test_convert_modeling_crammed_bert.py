"""fffjax.convert.modeling_crammed_bert: the transformers model every export carries. Its state_dict
keys are the published ones, an export loads into it strictly, its eval logits are fffjax's, its
training path is the published masked form's; and an exported folder loads through the transformers
Auto classes in a fresh process where fffjax cannot be imported, logits, tokenizer and fill-mask
pipeline agreeing with fffjax."""

import dataclasses
import importlib.util
import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _export_helpers import run_without_fffjax  # noqa: E402
from _text_helpers import cramming_style_tokenizer  # noqa: E402
from _ultrafastbert_helpers import ATOL, TINY, jax_logits, padded_batch, randomise_jax  # noqa: E402
from torch_reference import UltraFastFFReference  # noqa: E402

from fffjax.cli import main  # noqa: E402
from fffjax.convert.hf import AUTO_MAP, MODELING_FILE, hf_config, read_hf_dir, write_hf_dir  # noqa: E402
from fffjax.convert.ultrafastbert import export_ultrafastbert, published_keys  # noqa: E402
from fffjax.models import CrammedBertClassifier, CrammedBertMLM, get_config  # noqa: E402
from fffjax.pretrained import load_model  # noqa: E402
from fffjax.train.checkpoint import save_checkpoint  # noqa: E402

pytestmark = pytest.mark.torch


def _standalone_module():
    """The modeling file loaded as the exports load it: a top-level module, outside the fffjax package
    (and so outside the test run's jaxtyping import hook, which would wrap its dataclass config)."""
    spec = importlib.util.spec_from_file_location("modeling_crammed_bert", MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hf_model = _standalone_module()

CLASSES = {"mlm": hf_model.CrammedBertForMaskedLM, "classifier": hf_model.CrammedBertForSequenceClassification}
TEXTS = ["the whale swam under the grey sea while the crew sang.", "the wind rose", "old songs of home"]


def _torch_model(config, kind):
    hf = hf_model.CrammedBertConfig(**json.loads(json.dumps(hf_config(config, kind))))
    return CLASSES[kind](hf)


def _jax_model(config, kind, seed):
    model = randomise_jax({"mlm": CrammedBertMLM, "classifier": CrammedBertClassifier}[kind](
        config, rngs=nnx.Rngs(seed)), seed=seed)
    model.eval()
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
@pytest.mark.parametrize("kind", ["mlm", "classifier"])
def test_state_dict_keys_are_the_published_ones(name, kind):
    model = _torch_model(get_config(name), kind)
    assert list(model.state_dict()) == published_keys(get_config(name), kind)
    if kind == "mlm":
        embedding = model.encoder.embedding.word_embedding
        assert model.decoder.weight is embedding.weight
        assert float(embedding.weight.detach()[embedding.padding_idx].abs().sum()) == 0.0


def test_published_shape_has_167_keys():
    config = get_config("base")
    with torch.device("meta"):
        model = _torch_model(config, "mlm")
    assert list(model.state_dict()) == published_keys(config) and len(published_keys(config)) == 167


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
@pytest.mark.parametrize("kind", ["mlm", "classifier"])
def test_export_loads_strict_and_gives_fffjax_eval_logits(name, kind):
    config = dataclasses.replace(get_config(name), num_labels=3)
    model = _jax_model(config, kind, seed=4)
    module = _torch_model(config, kind).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_ultrafastbert(model).items()}, strict=True)
    ids, mask = padded_batch(config, seed=5)
    with torch.no_grad():
        got = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    want = jax_logits(model, ids, mask)
    assert got.shape == want.shape
    if kind == "mlm":  # padding positions' logits mean nothing
        got, want = got[mask == 1], want[mask == 1]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_fff_layer_trains_as_the_published_masked_form():
    depth, trees, width = 3, 2, 8
    reference = UltraFastFFReference(width, width, depth, trees)
    layer = hf_model.FastFeedforward(width, depth, trees)
    layer.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(5, 7, width, generator=torch.Generator().manual_seed(0))
    outputs = []
    for module in (reference, layer):
        module.zero_grad()
        y = module(x)
        (y * torch.linspace(-1, 1, width)).sum().backward()
        outputs.append((y.detach(), module.linear_in.weight.grad, module.linear_in.bias.grad,
                        module.linear_out.weight.grad))
    for want, got in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_classifier_from_an_mlm_export_starts_a_fresh_head(tmp_path):
    mlm = _jax_model(TINY, "mlm", seed=6)
    folder = write_hf_dir(export_ultrafastbert(mlm), TINY, tmp_path / "mlm", kind="mlm")
    state_dict, _ = read_hf_dir(folder)
    module = hf_model.CrammedBertForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert module.head.weight.shape == (3, TINY.head_dim)
    assert float(module.pooler.dense.bias.detach().abs().sum()) == 0.0
    np.testing.assert_array_equal(module.encoder.embedding.word_embedding.weight.detach().numpy(),
                                  state_dict["encoder.embedding.word_embedding.weight"])


# ----------------------------------------------------------------------------- a process without fffjax

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["fffjax"] = None  # any import of fffjax now fails
    from pathlib import Path
    import numpy as np, torch
    from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer,
                              pipeline)

    root, cache = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    autos = {"mlm": AutoModelForMaskedLM, "classifier": AutoModelForSequenceClassification}
    texts = json.loads((root / "texts.json").read_text())
    report = {}
    for name, kind in json.loads((root / "folders.json").read_text()).items():
        folder = root / name
        model = autos[kind].from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert not model.training
        assert Path(sys.modules[type(model).__module__].__file__).resolve().is_relative_to(cache)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        np.save(root / f"{name}-ids.npy", batch["input_ids"].numpy())
        np.save(root / f"{name}-mask.npy", batch["attention_mask"].numpy())
        np.save(root / f"{name}-logits.npy", logits.numpy())
        report[name] = {"class": type(model).__name__, "keys": list(model.state_dict())}
        if kind == "mlm":
            encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
            with torch.no_grad():
                hidden = encoder(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
            np.save(root / f"{name}-hidden.npy", hidden.numpy())
            fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
            report[name]["fill"] = fill(f"the whale {tokenizer.mask_token} under the sea.", top_k=5)
            model.save_pretrained(root / f"{name}-saved")
    (root / "report.json").write_text(json.dumps(report))
    assert sys.modules["fffjax"] is None
""")


def test_export_loads_in_transformers_without_fffjax(tmp_path):
    tokenizer = cramming_style_tokenizer(tmp_path, vocab_size=120, seed=5)
    folders, models = {}, {}
    for name in ("tiny", "tiny-dense"):
        config = dataclasses.replace(get_config(name), vocab_size=tokenizer.vocab_size,
                                     pad_token_id=tokenizer.pad_id, num_labels=3)
        for seed, kind in enumerate(("mlm", "classifier")):
            model = models[f"{name}-{kind}"] = _jax_model(config, kind, seed=10 + seed)
            folders[f"{name}-{kind}"] = kind
            if (name, kind) == ("tiny", "mlm"):  # the command: the tokenizer stored with the checkpoint
                checkpoint = save_checkpoint(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                             config.to_dict())
                tokenizer.save_pretrained(checkpoint / "tokenizer")
                assert main(["export", str(checkpoint), str(tmp_path / f"{name}-{kind}")]) == 0
            else:
                write_hf_dir(export_ultrafastbert(model), config, tmp_path / f"{name}-{kind}", kind=kind,
                             fmt="pt" if kind == "classifier" else "hf", tokenizer=tokenizer)
    written = sorted(p.name for p in (tmp_path / "tiny-mlm").iterdir())
    assert written == ["config.json", "model.safetensors", "modeling_crammed_bert.py", "special_tokens_map.json",
                       "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tiny-mlm" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (tmp_path / "tiny-classifier" / "pytorch_model.bin").is_file()
    (tmp_path / "folders.json").write_text(json.dumps(folders))
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))

    run_without_fffjax(FRESH_PROCESS, tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    for name, kind in folders.items():
        model, config = models[name], models[name].config
        assert report[name]["class"] == CLASSES[kind].__name__
        assert report[name]["keys"] == published_keys(config, kind)
        ids, mask = (np.load(tmp_path / f"{name}-{part}.npy") for part in ("ids", "mask"))
        assert ids.shape[0] == len(TEXTS) and mask.min() == 0  # a padded batch
        np.testing.assert_array_equal((ids, mask), tokenizer.encode_padded(TEXTS, ids.shape[1]))
        got, want = np.load(tmp_path / f"{name}-logits.npy"), jax_logits(model, ids, mask)
        if kind == "mlm":
            got, want = got[mask == 1], want[mask == 1]
            hidden = np.asarray(model.encode(jnp.asarray(ids), jnp.asarray(mask)))
            np.testing.assert_allclose(np.load(tmp_path / f"{name}-hidden.npy")[mask == 1], hidden[mask == 1],
                                       atol=ATOL, rtol=0)
            sentence_ids = np.asarray([tokenizer.encode(f"the whale {tokenizer.mask_token} under the sea.")])
            logits = jax_logits(model, sentence_ids, np.ones_like(sentence_ids))[0, list(sentence_ids[0]).index(
                tokenizer.mask_id)]
            probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            top = np.argsort(-probabilities, kind="stable")[:5]
            assert [c["token"] for c in report[name]["fill"]] == top.tolist()
            np.testing.assert_allclose([c["score"] for c in report[name]["fill"]], probabilities[top], atol=1e-4)
            saved = load_model(tmp_path / f"{name}-saved")  # transformers' save_pretrained back into fffjax
            np.testing.assert_allclose(jax_logits(saved, ids, mask)[mask == 1], want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
