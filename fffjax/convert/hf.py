"""The published Hugging Face layout of UltraFastBERT, and the ``fffjax export|import|inspect`` commands.

A model directory as published (``pbelcak/UltraFastBERT-1x11-long``)::

    config.json         {"arch": {...crammed BERT's resolved arch block...}, "architectures": [...],
                         "model_type": "crammedBERT", "torch_dtype": "float32", "transformers_version"}
    model.safetensors   the state dict (metadata {"format": "pt"}, which transformers requires)
    pytorch_model.bin   instead, with format "pt" (a torch.save'd dict; read with weights_only=True)

The published ``crammed_bert.py`` (its ``crammedBertConfig`` and ``ScriptableLM*`` classes,
registered with the transformers Auto classes) loads such a directory with ``from_pretrained``.

fffjax checkpoints are orbax directories with a ``params`` item (the model's ``nnx.Param`` state
as a pure dict) and a ``config`` item (``ModelConfig.to_dict()``), as written by
:func:`fffjax.train.checkpoint.save_checkpoint`; a training run's ``<run>/checkpoints/<step>/``
has the same two items plus ``opt_state``, ``run`` (with the step) and ``metrics``.
"""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fffjax.convert.io import KEY_ORDER_METADATA, load
from fffjax.models.config import ModelConfig

FORMATS = {"safetensors": "model.safetensors", "pt": "pytorch_model.bin"}
ARCHITECTURES = {"mlm": "ScriptableLMForPreTraining", "classifier": "ScriptableLMForSequenceClassification"}
# The transformers release named in the published config.json (docs/conventions.md).
TRANSFORMERS_VERSION = "4.49.0"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")


# ----------------------------------------------------------------------------- HF directories


def hf_config(config: ModelConfig, kind: str) -> dict[str, Any]:
    """The published ``config.json`` contents for ``config``."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"kind must be one of {sorted(ARCHITECTURES)}, got {kind!r}")
    arch = config.to_arch()
    if kind == "mlm":
        arch["num_labels"] = None  # as published: the pretraining model has no label count
    return {
        "arch": arch,
        "architectures": [ARCHITECTURES[kind]],
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
                 fmt: str = "safetensors", overwrite: bool = False) -> Path:
    """Write ``config.json`` and the weights file into ``out_dir`` (atomically: a temporary sibling
    directory renamed into place). An existing ``out_dir`` is refused unless ``overwrite``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(config, kind), indent=2) + "\n")
        # np.array(order="C"), not np.ascontiguousarray: the latter turns the 0-d norm_factor into (1,).
        arrays = {k: np.array(v, dtype=np.float32, order="C") for k, v in state_dict.items()}
        if fmt == "safetensors":
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


# ----------------------------------------------------------------------------- fffjax checkpoints


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory (holding ``params/``) that ``path`` names: itself, or the latest step
    of a training run (``path/<step>/`` or ``path/checkpoints/<step>/``)."""
    path = Path(path).absolute()
    if (path / "params").is_dir():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = [p for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir()]
            if steps:
                return max(steps, key=lambda p: int(p.name))
    raise FileNotFoundError(
        f"CHECKPOINT {path} is neither an fffjax checkpoint (no params/) nor a run directory with step checkpoints")


def _read_json_items(step_dir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON items of a checkpoint step that exist, read as plain files (orbax's JSON handler
    writes ``<item>/metadata``; a ``CheckpointManager`` writes its reserved ``metrics`` item as
    ``metrics/metrics``)."""
    items = {}
    for name in names:
        for candidate in (step_dir / name / "metadata", step_dir / name / name):
            if candidate.is_file():
                items[name] = json.loads(candidate.read_text())
                break
    return items


def _model_config(config: dict) -> ModelConfig:
    config = config.get("model", config) if isinstance(config.get("model"), dict) else config
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if "vocab_size" not in config and "arch" in config:
        return ModelConfig.from_arch(config)
    return ModelConfig.from_dict({k: v for k, v in config.items() if k in names})


def load_checkpoint(checkpoint, *, implementation: str | None = None):
    """``(model, info)`` from an fffjax checkpoint or run directory.

    ``info``: ``{"path", "kind", "config", "step", "metrics"}`` (step and metrics ``None`` when the
    checkpoint does not record them). The model is in eval mode.
    """
    from fffjax.models.crammed_bert import model_from_params, model_kind
    from fffjax.train.checkpoint import restore_checkpoint

    step_dir = resolve_checkpoint(checkpoint)
    params, config_dict = restore_checkpoint(step_dir)
    config = _model_config(config_dict)
    kind = model_kind(params)
    model = model_from_params(config, params, kind=kind, implementation=implementation)
    model.eval()
    extra = _read_json_items(step_dir, ("run", "metrics"))
    run = extra.get("run") or {}
    step = run.get("step", int(step_dir.name) if step_dir.name.isdigit() else None)
    return model, {"path": str(step_dir), "kind": kind, "config": config, "step": step,
                   "metrics": extra.get("metrics")}


# ----------------------------------------------------------------------------- commands


def cmd_export(checkpoint, out_dir, fmt: str = "safetensors", overwrite: bool = False) -> Path:
    """``fffjax export CHECKPOINT OUT_DIR``: write the published HF layout of a checkpoint's model."""
    from fffjax.convert.ultrafastbert import export_ultrafastbert

    model, info = load_checkpoint(checkpoint)
    return write_hf_dir(export_ultrafastbert(model), info["config"], out_dir, kind=info["kind"], fmt=fmt,
                        overwrite=overwrite)


def cmd_import(src_dir, out, overwrite: bool = False) -> Path:
    """``fffjax import DIR OUT``: a published-layout directory into an fffjax orbax checkpoint."""
    from flax import nnx

    from fffjax.convert.ultrafastbert import import_ultrafastbert
    from fffjax.train.checkpoint import save_checkpoint

    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out} already exists (pass --overwrite / overwrite=True to replace it)")
    state_dict, config_json = read_hf_dir(src_dir)
    model = import_ultrafastbert(state_dict, config_json["arch"])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_checkpoint(out, params, model.config.to_dict(), overwrite=overwrite)


def cmd_inspect(checkpoint) -> dict[str, Any]:
    """``fffjax inspect CHECKPOINT``: config, parameter counts, step and metrics (no model is built)."""
    from fffjax.train.checkpoint import read_config

    import orbax.checkpoint as ocp

    step_dir = resolve_checkpoint(checkpoint)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "params").item_metadata
    tree = getattr(tree, "tree", tree)
    counts: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, prefix + (str(key),))
        elif hasattr(node, "shape"):
            group = ".".join(prefix[:2]) if prefix[:1] == ("encoder",) else prefix[0]
            counts[group] = counts.get(group, 0) + int(np.prod(node.shape))

    walk(tree, ())
    config = _model_config(read_config(step_dir))
    extra = _read_json_items(step_dir, ("run", "metrics"))
    run = extra.get("run") or {}
    return {
        "path": str(step_dir),
        "kind": "classifier" if "head" in tree or "pooler" in tree else "mlm",
        "config": config.to_dict(),
        "parameters": {"total": sum(counts.values()), **dict(sorted(counts.items()))},
        "step": run.get("step", int(step_dir.name) if step_dir.name.isdigit() else None),
        "metrics": extra.get("metrics"),
    }
