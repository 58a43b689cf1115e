"""fffjax.convert.modeling_fff_decoder: the torch/transformers decoder every decoder export carries.
Its loss is fffjax's next-token loss, its config refuses what it does not build, and an exported
folder loads through the transformers Auto classes in a fresh process where fffjax cannot be
imported: logits, hidden states and greedy ``generate`` agreeing with fffjax, and transformers'
``save_pretrained`` reading back into fffjax."""

import dataclasses
import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _decoder_helpers import SAFE_MARGIN, fff_margins, make, small, torch_modeling_package  # noqa: E402
from _export_helpers import run_without_fffjax  # noqa: E402
from _text_helpers import cramming_style_tokenizer  # noqa: E402

from fffjax import generate as gen  # noqa: E402
from fffjax.cli import main  # noqa: E402
from fffjax.convert.decoder import decoder_keys, export_decoder  # noqa: E402
from fffjax.convert.hf import DECODER_AUTO_MAP, hf_config  # noqa: E402
from fffjax.pretrained import find_tokenizer  # noqa: E402
from fffjax.train.checkpoint import save_checkpoint  # noqa: E402
from fffjax.train.objectives import causal_lm_objective  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
hf_decoder = torch_modeling_package()


def test_labels_give_the_next_token_loss_of_fffjax():
    config = small("dense")
    model = make(config, seed=2)
    module = hf_decoder.FffDecoderForCausalLM(hf_decoder.FffDecoderConfig(**hf_config(config, "causal_lm"))).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_decoder(model).items()}, strict=True)
    ids = np.random.default_rng(3).integers(1, config.vocab_size, size=(3, 12))
    with torch.no_grad():
        loss = module(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
    want, _ = causal_lm_objective(model, {"input_ids": jnp.asarray(ids, jnp.int32),
                                          "attention_mask": jnp.ones(ids.shape, jnp.int32)})
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_config_refuses_what_it_does_not_build():
    with pytest.raises(ValueError, match=r"config.ffn must be one of .* got 'moe'"):
        hf_decoder.FffDecoderConfig(ffn="moe")
    with pytest.raises(ValueError, match="hidden_size 30 must be divisible by num_heads 4"):
        hf_decoder.FffDecoderConfig(hidden_size=30, num_heads=4)
    module = hf_decoder.FffDecoderForCausalLM(hf_decoder.FffDecoderConfig(**hf_config(small("none"), "causal_lm")))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(1, 4\)"):
        module(input_ids=torch.ones((1, 4), dtype=torch.long), attention_mask=torch.ones((1, 5), dtype=torch.long))
    with pytest.raises(ValueError, match="49 positions; this model's max_seq_length is 48"):
        module(input_ids=torch.ones((1, 49), dtype=torch.long))


# ----------------------------------------------------------------------------- a process without fffjax

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["fffjax"] = None  # any import of fffjax now fails
    from pathlib import Path
    import numpy as np, torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    root, cache = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    folder = root / "export"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert not model.training
    assert Path(sys.modules[type(model).__module__].__file__).resolve().is_relative_to(cache)
    texts = json.loads((root / "texts.json").read_text())
    prompts = [ids[:-1] for ids in tokenizer(texts)["input_ids"]]  # without the trailing separator
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for name, array in [("ids", ids), ("mask", mask), ("logits", logits), ("hidden", hidden)]:
        np.save(root / f"{name}.npy", array.numpy())
    report = {"class": type(model).__name__, "keys": list(model.state_dict()), "prompts": prompts,
              "generated": generated[:, width:].tolist()}
    model.save_pretrained(root / "saved")
    (root / "report.json").write_text(json.dumps(report))
    assert sys.modules["fffjax"] is None
""")


def test_export_loads_in_transformers_without_fffjax(tmp_path):
    tokenizer = cramming_style_tokenizer(tmp_path, vocab_size=120, seed=5)
    config = dataclasses.replace(small("fff"), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    model = make(config, seed=6)
    checkpoint = save_checkpoint(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(model, nnx.Param)), config.to_dict())
    tokenizer.save_pretrained(checkpoint / "tokenizer")
    assert main(["export", str(checkpoint), str(tmp_path / "export")]) == 0  # with the checkpoint's tokenizer
    written = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert written == ["config.json", "generation_config.json", "model.safetensors", "modeling_crammed_bert.py",
                       "modeling_fff_decoder.py", "special_tokens_map.json", "tokenizer.json",
                       "tokenizer_config.json"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["auto_map"] == DECODER_AUTO_MAP
    assert find_tokenizer(tmp_path / "export").specials == tokenizer.specials  # what `fffjax generate` reads
    texts = ["the whale swam under the grey sea while the crew sang.", "the wind rose", "old songs of home"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))

    run_without_fffjax(FRESH_PROCESS, tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["class"] == "FffDecoderForCausalLM" and report["keys"] == decoder_keys(config)
    prompts = [gen.prompt_ids(tokenizer, text) for text in texts]
    assert report["prompts"] == prompts
    ids, mask = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "mask.npy")
    assert mask.min() == 0 and (mask[:, -1] == 1).all()  # a left-padded batch
    new = gen.generate(model, prompts, max_new_tokens=8)
    # the prompts and fffjax's continuations in one batch: causal, so the prompt columns are the prompts' own
    whole = jnp.asarray(np.concatenate([ids, np.asarray(new)], axis=1), jnp.int32)
    whole_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, 8)), constant_values=1), jnp.int32)
    unsafe = (fff_margins(model, whole, whole_mask) < SAFE_MARGIN) & (np.asarray(whole_mask) == 1)
    safe = (np.asarray(whole_mask) == 1) & (np.cumsum(unsafe, axis=1) == 0)   # every token up to here routes safely
    width = ids.shape[1]
    assert safe[:, :width].sum() >= 0.5 * mask.sum()
    logits = np.asarray(model(whole, whole_mask))[:, :width]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy")[safe[:, :width]], logits[safe[:, :width]], atol=ATOL,
                               rtol=0)
    hidden = np.asarray(model.hidden_states(whole, whole_mask))[:, :width]
    np.testing.assert_allclose(np.load(tmp_path / "hidden.npy")[safe[:, :width]], hidden[safe[:, :width]], atol=ATOL,
                               rtol=0)
    # greedy generate picks fffjax's tokens, each while its prefix routes safely
    safe_new = safe[:, width - 1:-1]   # token i is picked from the logits of the token before it
    np.testing.assert_array_equal(np.asarray(report["generated"])[safe_new], np.asarray(new)[safe_new])
    assert safe_new.sum() >= 12

    saved = gen.load_causal_lm(tmp_path / "saved")  # transformers' save_pretrained back into fffjax
    assert saved.config == config
    np.testing.assert_array_equal(np.asarray(saved(whole, whole_mask))[:, :width], logits)
