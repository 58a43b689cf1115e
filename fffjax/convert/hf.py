"""The published Hugging Face layout of UltraFastBERT, and the ``fffjax export|import`` commands.

A model directory as published (``pbelcak/UltraFastBERT-1x11-long``)::

    config.json         {"arch": {...crammed BERT's resolved arch block...}, "architectures": [...],
                         "model_type": "crammedBERT", "torch_dtype": "float32", "transformers_version"}
    model.safetensors   the state dict (metadata {"format": "pt"}, which transformers requires)
    pytorch_model.bin   instead, with format "pt" (a torch.save'd dict; read with weights_only=True)

The published ``crammed_bert.py`` (its ``crammedBertConfig`` and ``ScriptableLM*`` classes,
registered with the transformers Auto classes) loads such a directory with ``from_pretrained``.

Every folder fffjax exports is that layout and also loads in transformers without cramming:
``config.json`` adds an ``auto_map`` naming the classes of ``modeling_crammed_bert.py``
(:mod:`fffjax.convert.modeling_crammed_bert`, copied beside the weights), so
``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification`` / ``AutoModel``
``.from_pretrained(folder, trust_remote_code=True)`` build the model with only torch and
transformers installed, and the tokenizer files written beside it (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) load with ``AutoTokenizer``. The format
only picks the weights file: ``hf`` (the default) and ``safetensors`` write ``model.safetensors``,
``pt`` writes ``pytorch_model.bin``; transformers and the published code read either.

A causal decoder (:class:`fffjax.models.CausalLM`) exports the same way, to a folder of its own kind
(:mod:`fffjax.convert.decoder` gives the state dict)::

    config.json                 the DecoderConfig fields, "model_type": "fff_decoder", "architectures":
                                ["FffDecoderForCausalLM"], "tie_word_embeddings": true, "auto_map", "dtype"
    generation_config.json      {"pad_token_id", "use_cache": false}: transformers' generate runs without a cache
    model.safetensors           (or pytorch_model.bin) the state dict
    modeling_fff_decoder.py     the torch/transformers decoder, and modeling_crammed_bert.py, whose blocks it imports
    tokenizer files

which ``AutoModelForCausalLM`` / ``AutoModel`` ``.from_pretrained(folder, trust_remote_code=True)``
load. A BERT encoder's checkpoint (:func:`fffjax.train.checkpoint.save_bert_checkpoint`, FFF slots and
all; :mod:`fffjax.convert.bert` gives the state dict) exports to a BERT folder::

    config.json                 transformers' BertConfig dict, "model_type": "fff_bert", "ffn_layers" (one
                                feedforward spec per layer), "architectures": ["FffBertModel"], "auto_map"
    model.safetensors           (or pytorch_model.bin) the state dict
    modeling_fff_bert.py        the torch/transformers BertModel with FFF layers, and modeling_crammed_bert.py
    tokenizer files

which ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads. ``fffjax export`` picks the
kind from the checkpoint's config (``"model": "causal_lm"`` for a decoder, ``"bert"`` for a BERT encoder),
``fffjax import`` from ``config.json``.

fffjax checkpoints (:mod:`fffjax.train.checkpoint`, which reads and writes them) are orbax
directories with a ``params`` item (the model's ``nnx.Param`` state as a pure dict) and a
``config`` item (``ModelConfig.to_dict()``); a training run's ``<run>/checkpoints/<step>/`` has the
same two items plus ``opt_state``, ``run`` (with the step) and ``metrics``.
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from fffjax.convert.bert import MODEL_TYPE as BERT_MODEL_TYPE
from fffjax.convert.bert import bert_hf_config, export_bert, import_bert, is_bert_hf_config
from fffjax.convert.decoder import decoder_config, export_decoder, import_decoder
from fffjax.convert.io import KEY_ORDER_METADATA, load
from fffjax.convert.ultrafastbert import export_ultrafastbert, import_ultrafastbert
from fffjax.data.tokenizer import Tokenizer
from fffjax.models.bert import MODEL_NAME as BERT_KIND
from fffjax.models.bert import bert_checkpoint_config
from fffjax.models.config import ModelConfig
from fffjax.models.decoder import MODEL_NAME as DECODER_KIND
from fffjax.models.decoder import DecoderConfig, causal_lm_from_params
from fffjax.train.checkpoint import (
    load_bert_checkpoint,
    load_checkpoint,
    load_params,
    read_config,
    resolve_checkpoint,
    save_bert_checkpoint,
    save_checkpoint,
)

FORMATS = {"hf": "model.safetensors", "safetensors": "model.safetensors", "pt": "pytorch_model.bin"}
ARCHITECTURES = {"mlm": "ScriptableLMForPreTraining", "classifier": "ScriptableLMForSequenceClassification",
                 DECODER_KIND: "FffDecoderForCausalLM"}
MODELING_FILE = Path(__file__).with_name("modeling_crammed_bert.py")
# The transformers Auto classes -> the classes of MODELING_FILE that implement them.
AUTO_MAP = {auto: f"{MODELING_FILE.stem}.{cls}" for auto, cls in [
    ("AutoConfig", "CrammedBertConfig"),
    ("AutoModel", "CrammedBertModel"),
    ("AutoModelForMaskedLM", "CrammedBertForMaskedLM"),
    ("AutoModelForSequenceClassification", "CrammedBertForSequenceClassification"),
]}
DECODER_MODELING_FILE = Path(__file__).with_name("modeling_fff_decoder.py")
DECODER_AUTO_MAP = {auto: f"{DECODER_MODELING_FILE.stem}.{cls}" for auto, cls in [
    ("AutoConfig", "FffDecoderConfig"),
    ("AutoModel", "FffDecoderModel"),
    ("AutoModelForCausalLM", "FffDecoderForCausalLM"),
]}
DECODER_MODEL_TYPE = "fff_decoder"  # config.json's "model_type" of a decoder folder
BERT_MODELING_FILE = Path(__file__).with_name("modeling_fff_bert.py")
BERT_AUTO_MAP = {auto: f"{BERT_MODELING_FILE.stem}.{cls}" for auto, cls in [
    ("AutoConfig", "FffBertConfig"),
    ("AutoModel", "FffBertModel"),
]}
# The transformers release recorded in the published config.json (docs/conventions.md).
TRANSFORMERS_VERSION = "4.49.0"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")


# ----------------------------------------------------------------------------- HF directories


def is_decoder_config(config_json: Any) -> bool:
    """Whether a ``config.json`` dict is a decoder folder's (its ``model_type``)."""
    return isinstance(config_json, dict) and config_json.get("model_type") == DECODER_MODEL_TYPE


def is_hf_config(config_json: Any) -> bool:
    """Whether a ``config.json`` dict is one of the folders fffjax reads: the published layout's (an
    ``arch`` block), a decoder's or an exported BERT's."""
    return is_decoder_config(config_json) or is_bert_hf_config(config_json) or (
        isinstance(config_json, dict) and isinstance(config_json.get("arch"), dict))


def _modeling_files(kind: str) -> tuple[Path, ...]:
    """The modeling files a folder of ``kind`` carries: the decoder's and the BERT's import the encoder's blocks."""
    extra = {DECODER_KIND: (DECODER_MODELING_FILE,), BERT_KIND: (BERT_MODELING_FILE,)}.get(kind, ())
    return (*extra, MODELING_FILE)


def hf_config(config: "ModelConfig | DecoderConfig | dict[str, Any]", kind: str) -> dict[str, Any]:
    """The ``config.json`` contents for ``config``: for ``kind`` "mlm" or "classifier" the published
    one, with the ``auto_map`` of ``modeling_crammed_bert.py`` (which the published code ignores); for
    "causal_lm" the decoder's; for "bert" (``config`` a BERT checkpoint's config item) the BERT folder's
    (see the module docstring)."""
    if kind == BERT_KIND:
        return {**bert_hf_config(config), "auto_map": dict(BERT_AUTO_MAP)}
    if kind not in ARCHITECTURES:
        raise ValueError(f"kind must be one of {sorted(ARCHITECTURES) + [BERT_KIND]}, got {kind!r}")
    if kind == DECODER_KIND:
        fields = {k: v for k, v in decoder_config(config).to_dict().items() if k != "model"}
        return {**fields, "architectures": [ARCHITECTURES[kind]], "auto_map": dict(DECODER_AUTO_MAP),
                "dtype": "float32", "model_type": DECODER_MODEL_TYPE, "tie_word_embeddings": True}
    arch = config.to_arch()
    if kind == "mlm":
        arch["num_labels"] = None  # as published: the pretraining model has no label count
    return {
        "arch": arch,
        "architectures": [ARCHITECTURES[kind]],
        "auto_map": dict(AUTO_MAP),
        "model_type": "crammedBERT",
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
    }


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
        old = out.with_name(out.name + ".old-" + tmp.name)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def write_hf_dir(state_dict: dict[str, np.ndarray], config: "ModelConfig | DecoderConfig | dict[str, Any]", out_dir,
                 *, kind: str, fmt: str = "hf", tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json``, the weights file, the modeling files of ``kind`` (``modeling_crammed_bert.py``;
    for "causal_lm" also ``modeling_fff_decoder.py`` and ``generation_config.json``; for "bert" also
    ``modeling_fff_bert.py``, ``config`` then a BERT checkpoint's config item) and, given a ``tokenizer``,
    its files into ``out_dir`` (atomically: a temporary sibling directory renamed into place).

    ``fmt`` picks the weights file (``FORMATS``). An existing ``out_dir`` is refused unless
    ``overwrite``; a tokenizer with more tokens than the model's ``vocab_size`` is refused. Floating
    arrays are written as float32, integer ones (an FFF-v1 ``depth``) as they are.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    vocab_size = config["vocab_size"] if isinstance(config, dict) else config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                         f"{vocab_size}")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(config, kind), indent=2) + "\n")
        for modeling_file in _modeling_files(kind):
            shutil.copyfile(modeling_file, tmp / modeling_file.name)
        if kind == DECODER_KIND:  # transformers' generate must run without a cache, which the decoder keeps none of
            generation = {"pad_token_id": config.pad_token_id, "use_cache": False}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # np.array(order="C"), not np.ascontiguousarray: the latter turns the 0-d norm_factor into (1,).
        arrays = {k: np.array(v, dtype=v.dtype if np.issubdtype(v.dtype, np.integer) else np.float32, order="C")
                  for k, v in state_dict.items()}
        if FORMATS[fmt].endswith(".safetensors"):
            import safetensors.numpy

            safetensors.numpy.save_file(arrays, str(tmp / FORMATS[fmt]), metadata={
                "format": "pt", KEY_ORDER_METADATA: json.dumps(list(arrays))})
        else:
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp / FORMATS[fmt])
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_hf_dir(src_dir) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state_dict, config.json dict)`` of a published-layout directory or an exported decoder's.

    Weights: ``model.safetensors``, else ``pytorch_model.bin`` / ``*.pt`` read with
    ``torch.load(weights_only=True)`` (nothing but tensors is unpickled).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"DIR {src} is not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"DIR {src} has no config.json")
    config_json = json.loads(config_path.read_text())
    if not is_hf_config(config_json):
        raise ValueError(f"{config_path} has no 'arch' block (is it a crammed-BERT / UltraFastBERT config?) "
                         f"and is not a decoder's or an exported BERT's (model_type {DECODER_MODEL_TYPE!r} or "
                         f"{BERT_MODEL_TYPE!r})")
    candidates = [src / name for name in WEIGHT_FILES] + sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        if (src / "model.safetensors.index.json").is_file():
            raise ValueError(f"DIR {src} holds a sharded checkpoint; merge it into one model.safetensors first")
        raise FileNotFoundError(f"DIR {src} has no weights file (expected one of {list(WEIGHT_FILES)} or *.pt)")
    fmt = "safetensors" if weights.suffix == ".safetensors" else "pt"
    return load(weights, format=fmt), config_json


# ----------------------------------------------------------------------------- commands


def cmd_export(checkpoint, out_dir, fmt: str = "hf", overwrite: bool = False, *,
               tokenizer: Tokenizer | None = None) -> Path:
    """``fffjax export CHECKPOINT OUT_DIR``: a checkpoint's model as a folder in the published HF layout
    that also loads in transformers (see the module docstring), a causal decoder's as a decoder
    folder, a BERT encoder's as a BERT folder, with ``tokenizer``'s files if given (the command passes
    the tokenizer stored with the checkpoint)."""
    step_dir = resolve_checkpoint(checkpoint)
    stored_kind = read_config(step_dir).get("model")
    if stored_kind == BERT_KIND:
        bert = load_bert_checkpoint(step_dir)
        state_dict, config, kind = export_bert(bert), bert_checkpoint_config(bert), BERT_KIND
    elif stored_kind == DECODER_KIND:
        params, stored, _ = load_params(step_dir)
        config = DecoderConfig.from_dict(stored)
        state_dict, kind = export_decoder(causal_lm_from_params(config, params)), DECODER_KIND
    else:
        model, info = load_checkpoint(step_dir)
        state_dict, config, kind = export_ultrafastbert(model), info["config"], info["kind"]
    return write_hf_dir(state_dict, config, out_dir, kind=kind, fmt=fmt, tokenizer=tokenizer, overwrite=overwrite)


def cmd_import(src_dir, out, overwrite: bool = False) -> Path:
    """``fffjax import DIR OUT``: a published-layout directory (or an exported decoder's or BERT's) into an
    fffjax orbax checkpoint."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    state_dict, config_json = read_hf_dir(src_dir)
    if is_bert_hf_config(config_json):
        return save_bert_checkpoint(out, import_bert(state_dict, config_json), overwrite=overwrite)
    if is_decoder_config(config_json):
        model = import_decoder(state_dict, config_json)
    else:
        model = import_ultrafastbert(state_dict, config_json["arch"])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_checkpoint(out, params, model.config.to_dict(), overwrite=overwrite)
