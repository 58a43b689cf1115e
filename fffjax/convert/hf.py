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

from fffjax.convert.io import KEY_ORDER_METADATA, load
from fffjax.convert.ultrafastbert import export_ultrafastbert, import_ultrafastbert
from fffjax.data.tokenizer import Tokenizer
from fffjax.models.config import ModelConfig
from fffjax.train.checkpoint import load_checkpoint, save_checkpoint

FORMATS = {"hf": "model.safetensors", "safetensors": "model.safetensors", "pt": "pytorch_model.bin"}
ARCHITECTURES = {"mlm": "ScriptableLMForPreTraining", "classifier": "ScriptableLMForSequenceClassification"}
MODELING_FILE = Path(__file__).with_name("modeling_crammed_bert.py")
# The transformers Auto classes -> the classes of MODELING_FILE that implement them.
AUTO_MAP = {auto: f"{MODELING_FILE.stem}.{cls}" for auto, cls in [
    ("AutoConfig", "CrammedBertConfig"),
    ("AutoModel", "CrammedBertModel"),
    ("AutoModelForMaskedLM", "CrammedBertForMaskedLM"),
    ("AutoModelForSequenceClassification", "CrammedBertForSequenceClassification"),
]}
# The transformers release recorded in the published config.json (docs/conventions.md).
TRANSFORMERS_VERSION = "4.49.0"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")


# ----------------------------------------------------------------------------- HF directories


def hf_config(config: ModelConfig, kind: str) -> dict[str, Any]:
    """The published ``config.json`` contents for ``config``, with the ``auto_map`` of
    ``modeling_crammed_bert.py`` (which the published code ignores)."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"kind must be one of {sorted(ARCHITECTURES)}, got {kind!r}")
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


def write_hf_dir(state_dict: dict[str, np.ndarray], config: ModelConfig, out_dir, *, kind: str,
                 fmt: str = "hf", tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json``, the weights file, ``modeling_crammed_bert.py`` and, given a ``tokenizer``,
    its files into ``out_dir`` (atomically: a temporary sibling directory renamed into place).

    ``fmt`` picks the weights file (``FORMATS``). An existing ``out_dir`` is refused unless
    ``overwrite``; a tokenizer with more tokens than the model's ``vocab_size`` is refused.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                         f"{config.vocab_size}")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(config, kind), indent=2) + "\n")
        shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # np.array(order="C"), not np.ascontiguousarray: the latter turns the 0-d norm_factor into (1,).
        arrays = {k: np.array(v, dtype=np.float32, order="C") for k, v in state_dict.items()}
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
    """``(state_dict, config.json dict)`` of a published-layout directory.

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
    if not isinstance(config_json, dict) or not isinstance(config_json.get("arch"), dict):
        raise ValueError(f"{config_path} has no 'arch' block (is it a crammed-BERT / UltraFastBERT config?)")
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
    that also loads in transformers (see the module docstring), with ``tokenizer``'s files if given
    (the command passes the tokenizer stored with the checkpoint)."""
    model, info = load_checkpoint(checkpoint)
    return write_hf_dir(export_ultrafastbert(model), info["config"], out_dir, kind=info["kind"], fmt=fmt,
                        tokenizer=tokenizer, overwrite=overwrite)


def cmd_import(src_dir, out, overwrite: bool = False) -> Path:
    """``fffjax import DIR OUT``: a published-layout directory into an fffjax orbax checkpoint."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    state_dict, config_json = read_hf_dir(src_dir)
    model = import_ultrafastbert(state_dict, config_json["arch"])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_checkpoint(out, params, model.config.to_dict(), overwrite=overwrite)
