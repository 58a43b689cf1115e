"""Loading a trained crammed-BERT / UltraFastBERT model and its tokenizer from one path.

``from_pretrained(path)`` takes any of:

- a Hugging Face folder in the published layout (``config.json`` with the ``arch`` block, then
  ``model.safetensors`` or ``pytorch_model.bin`` read with ``weights_only=True``, and the tokenizer
  files): ``pbelcak/UltraFastBERT-1x11-long`` as downloaded, or an ``fffjax export``;
- an fffjax checkpoint (``fffjax import`` output, a step folder of a run) or a training run folder
  (its latest step);
- a Hugging Face ``BertModel`` folder (``config.json`` with ``model_type "bert"``, ``model.safetensors``,
  the tokenizer files; all-MiniLM-L6-v2 as shipped) or a BERT checkpoint
  (``fffjax.train.checkpoint.save_bert_checkpoint``) or an ``fffjax export`` of one (``config.json`` with
  ``model_type "fff_bert"``): a :class:`fffjax.models.bert.Bert`, FFF slots and all.

The model always comes back in eval mode (dropout off; call ``.train()`` to fine-tune). The
tokenizer is looked up beside the weights: in the folder itself, then in the run folder that holds
the checkpoint (``<run>/tokenizer/``, or the tokenizer the run recorded). A causal decoder's
checkpoint or exported folder is refused with a pointer to ``fffjax.generate.load_causal_lm``, which
loads it; :func:`find_tokenizer` finds its tokenizer the same way.
"""

import json
from pathlib import Path

import jax.numpy as jnp

from fffjax.convert.bert import import_bert, is_bert_hf_config
from fffjax.convert.hf import is_decoder_config, is_hf_config, read_hf_dir
from fffjax.convert.ultrafastbert import import_ultrafastbert
from fffjax.data.tokenizer import TOKENIZER_FILE, Tokenizer
from fffjax.models.bert import bert_from_params, is_bert_checkpoint_config, is_bert_folder, load_pretrained_bert
from fffjax.models.crammed_bert import cast_parameters, model_from_params, model_kind
from fffjax.train.checkpoint import crammed_bert_config, load_params, run_record

RUN_TOKENIZER_DIR = "tokenizer"  # where pretrain and finetune save the tokenizer inside a run folder


def is_hf_folder(path: Path | str) -> bool:
    """Whether ``path`` is a folder in the published layout (a ``config.json`` with an ``arch`` block)
    or an exported causal decoder's or BERT's."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return is_hf_config(json.loads(config.read_text()))
    except json.JSONDecodeError:
        return False


def load_model(path: Path | str, *, dtype=jnp.float32, kind: str | None = None, implementation: str | None = None):
    """The crammed-BERT model or BERT encoder stored at ``path`` (see the module docstring), in eval mode.

    Args:
        path: a published-layout folder, an fffjax checkpoint or a run folder.
        dtype: compute and parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
        kind: ``"mlm"``, ``"classifier"`` or ``None`` (what the weights hold). A published MLM folder
            loaded with ``kind="classifier"`` starts a classifier with a fresh head.
        implementation: the FFF-v2 implementation of every layer (``None``: the fastest available).

    Returns:
        A `CrammedBertMLM` or `CrammedBertClassifier` in eval mode, or a `Bert` for a BERT folder or
        checkpoint (``kind`` must then be None).

    Raises:
        ValueError: when ``path`` holds a causal decoder (``fffjax.generate.load_causal_lm`` loads it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {path} does not exist")
    if is_bert_folder(path):
        _check_no_kind(kind, path)
        model = load_pretrained_bert(path, dtype=dtype, implementation=implementation)
    elif is_hf_folder(path):
        state_dict, config_json = read_hf_dir(path)
        if is_decoder_config(config_json):
            raise ValueError(f"path {path} holds a causal language model, not crammed BERT; load it with "
                             "fffjax.generate.load_causal_lm")
        if is_bert_hf_config(config_json):
            _check_no_kind(kind, path)
            model = import_bert(state_dict, config_json, dtype=dtype, implementation=implementation)
        else:
            model = import_ultrafastbert(state_dict, config_json, kind=kind, dtype=dtype, implementation=implementation)
    else:
        params, config, record = load_params(path)
        if is_bert_checkpoint_config(config):
            _check_no_kind(kind, record["path"])
            model = bert_from_params(config, params, dtype=dtype, implementation=implementation)
        else:
            stored = model_kind(params)
            if kind is not None and kind != stored:
                raise ValueError(f"kind: the checkpoint {record['path']} holds a {stored} model, not a {kind}")
            model = model_from_params(crammed_bert_config(config, record["path"]), params, kind=stored, dtype=dtype,
                                      implementation=implementation)
    if dtype != jnp.float32:
        model = cast_parameters(model, dtype)
    model.eval()
    return model


def _check_no_kind(kind: str | None, path) -> None:
    if kind is not None:
        raise ValueError(f"kind: {path} holds a BERT encoder, which has no {kind!r} head; pass kind=None")


def _tokenizer_candidates(path: Path) -> list[Path]:
    if is_hf_folder(path) or (path / TOKENIZER_FILE).is_file():
        return [path]
    record = run_record(path)
    step_dir = Path(record["path"])
    candidates = [step_dir / RUN_TOKENIZER_DIR, step_dir.parent.parent / RUN_TOKENIZER_DIR]
    if record["run"].get("tokenizer"):
        candidates.append(Path(record["run"]["tokenizer"]))
    return candidates


def find_tokenizer(path: Path | str) -> Tokenizer | None:
    """The tokenizer stored with the model at ``path`` (see the module docstring), or ``None``."""
    for candidate in _tokenizer_candidates(Path(path)):
        if (candidate.is_dir() and (candidate / TOKENIZER_FILE).is_file()) or (
                candidate.is_file() and candidate.suffix == ".json"):
            return Tokenizer.from_pretrained(candidate)
    return None


def from_pretrained(path: Path | str, *, tokenizer: Path | str | None = None, dtype=jnp.float32,
                    kind: str | None = None, implementation: str | None = None) -> tuple:
    """``(model, tokenizer)`` stored at ``path``: the model as :func:`load_model` returns it (eval
    mode), the tokenizer found beside it (or read from ``tokenizer``, a folder or ``tokenizer.json``).

    Raises:
        FileNotFoundError: when no tokenizer is stored with the model and none is given.
    """
    model = load_model(path, dtype=dtype, kind=kind, implementation=implementation)
    found = Tokenizer.from_pretrained(tokenizer) if tokenizer is not None else find_tokenizer(path)
    if found is None:
        raise FileNotFoundError(
            f"path {path} holds no tokenizer (tokenizer.json beside the weights or in its run folder); "
            "pass tokenizer=<folder or tokenizer.json>")
    if found.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: {found.vocab_size} tokens do not fit the model's vocab_size "
                         f"{model.config.vocab_size}")
    return model, found
