"""Whole crammed-BERT / UltraFastBERT models to and from the published PyTorch state dicts.

``ScriptableLMForPreTraining`` (MLM; 167 keys for UltraFastBERT-1x11-long) and
``ScriptableLMForSequenceClassification`` (classifier: the encoder keys plus ``pooler.dense.*``
and ``head.*``), keys in the published order (``docs/conventions.md``, "Crammed BERT state dict")::

    encoder.embedding.word_embedding.weight (V, H)   encoder.embedding.pos_embedding.scale_factor (1,)
    encoder.embedding.norm.{weight, bias} (H,)
    encoder.layers.{i}.norm1.{weight, bias}, .norm2.{weight, bias} (H,)
    encoder.layers.{i}.attn.self_attention.norm_factor ()           1/sqrt(H/heads), a buffer
    encoder.layers.{i}.attn.self_attention.query_key_value.weight (3H, H)   per-head [q|k|v]
    encoder.layers.{i}.attn.dense.weight (H, H)
    encoder.layers.{i}.ffn.linear_in.weight (K*N, H), .linear_in.bias (K*N,), .linear_out.weight (H, K*N)
        (dense twin: encoder.layers.{i}.ffn.dense_in.weight (W, H), .dense_out.weight (H, W))
    encoder.final_norm.{weight, bias} (H,)
    decoder.weight (V, H)                                           MLM: the tied embedding again
    pooler.dense.weight (head_dim, H), .bias; head.weight (labels, head_dim), .bias   classifier

torch ``weight`` = our ``kernel.T`` for every ``nn.Linear``; the QKV interleave is the same on both
sides, so no row permutation is needed. Exports are float32 numpy arrays; imports take numpy or
torch values (``safetensors.{numpy,torch}.load_file`` output) of any floating dtype.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax.convert.io import to_numpy_dict
from fffjax.convert.keymap import (
    NORM_FACTOR,
    Entry,
    check_keys,
    expected_shapes,
    export_params,
    merge_tied,
    norm_entries,
    params_from_arrays,
    set_path,
)
from fffjax.models.config import ModelConfig
from fffjax.models.crammed_bert import MODEL_KINDS, CrammedBertClassifier, CrammedBertMLM, model_from_params

WORD_EMBEDDING_KEY = "encoder.embedding.word_embedding.weight"
DECODER_KEY = "decoder.weight"
HEAD_PATHS = ("pooler", "head")


def layer_entries(torch_prefix: str, path: tuple, ffn: str) -> list[Entry]:
    """The entries of one pre-LN layer of crammed BERT's blocks in torch's order (``norm1``, ``norm2``,
    ``attn``, ``ffn``), ``ffn`` ``"fff"`` or a dense kind (``"dense"``, ``"narrow"``), or ``"none"``
    (neither ``norm2`` nor ``ffn``)."""
    t, ours = torch_prefix, path
    entries = norm_entries(f"{t}.norm1", (*ours, "norm1"))
    if ffn != "none":
        entries += norm_entries(f"{t}.norm2", (*ours, "norm2"))
    entries += [
        (f"{t}.attn.self_attention.norm_factor", NORM_FACTOR, False),
        (f"{t}.attn.self_attention.query_key_value.weight", (*ours, "attn", "query_key_value", "kernel"), True),
        (f"{t}.attn.dense.weight", (*ours, "attn", "dense", "kernel"), True),
    ]
    if ffn == "fff":
        entries += [
            (f"{t}.ffn.linear_in.weight", (*ours, "ffn", "w_in"), False),
            (f"{t}.ffn.linear_in.bias", (*ours, "ffn", "b_in"), False),
            (f"{t}.ffn.linear_out.weight", (*ours, "ffn", "w_out"), True),
        ]
    elif ffn != "none":
        entries += [
            (f"{t}.ffn.dense_in.weight", (*ours, "ffn", "dense_in", "kernel"), True),
            (f"{t}.ffn.dense_out.weight", (*ours, "ffn", "dense_out", "kernel"), True),
        ]
    return entries


def key_map(config: ModelConfig, kind: str = "mlm") -> list[Entry]:
    """``[(torch key, our parameter path or None for norm_factor, transposed?)]`` in the published order.

    The MLM map ends with ``decoder.weight``, which maps to the word embedding (tied).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    emb = ("encoder", "embedding")
    entries = [
        (WORD_EMBEDDING_KEY, (*emb, "word_embedding", "embedding"), False),
        ("encoder.embedding.pos_embedding.scale_factor", (*emb, "pos_embedding", "scale_factor"), False),
        *norm_entries("encoder.embedding.norm", (*emb, "norm")),
    ]
    for i in range(config.num_layers):
        entries += layer_entries(f"encoder.layers.{i}", ("encoder", "layers", i), config.ffn)
    entries += norm_entries("encoder.final_norm", ("encoder", "final_norm"))
    if kind == "mlm":
        entries.append((DECODER_KEY, (*emb, "word_embedding", "embedding"), False))
    else:
        entries += [
            ("pooler.dense.weight", ("pooler", "dense", "kernel"), True),
            ("pooler.dense.bias", ("pooler", "dense", "bias"), False),
            ("head.weight", ("head", "kernel"), True),
            ("head.bias", ("head", "bias"), False),
        ]
    return entries


def published_keys(config: ModelConfig, kind: str = "mlm") -> list[str]:
    """The state_dict keys of the published model for ``config``, in order."""
    return [key for key, _, _ in key_map(config, kind)]


def _kind_of(model) -> str:
    if isinstance(model, CrammedBertClassifier):
        return "classifier"
    if isinstance(model, CrammedBertMLM):
        return "mlm"
    raise TypeError(f"model must be a CrammedBertMLM or CrammedBertClassifier, got {type(model).__name__}")


def export_ultrafastbert(model) -> dict[str, np.ndarray]:
    """The published PyTorch ``state_dict`` of ``model`` (float32 numpy, published key order).

    MLM: both ``encoder.embedding.word_embedding.weight`` and ``decoder.weight`` (the same matrix,
    as in the published ``model.safetensors``). Classifier: the encoder keys, ``pooler.dense.*`` and
    ``head.*``. Every layer gets its ``norm_factor`` buffer, ``1/sqrt(head width)`` as 0-d float32.
    Loads with ``load_state_dict(strict=True)`` into the published classes.
    """
    kind = _kind_of(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return export_params(params, key_map(model.config, kind), model.config)


def _expected_shapes(config: ModelConfig, kind: str) -> dict[str, tuple]:
    return expected_shapes(lambda: MODEL_KINDS[kind](config, rngs=nnx.Rngs(0)), key_map(config, kind))


def _resolve_config(config, arrays: Mapping[str, np.ndarray]) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a ModelConfig or the published arch dict, got {type(config).__name__}")
    resolved = ModelConfig.from_arch(config)
    arch = config.get("arch", config)
    # The published MLM config.json stores num_labels null; a classifier file says how many it has.
    if arch.get("num_labels") is None and "head.weight" in arrays and arrays["head.weight"].ndim == 2:
        resolved = ModelConfig.from_dict({**resolved.to_dict(), "num_labels": int(arrays["head.weight"].shape[0])})
    return resolved


def import_ultrafastbert(
    state_dict: Mapping[str, Any],
    config,
    *,
    kind: str | None = None,
    dtype=jnp.float32,
    implementation: str | None = None,
    seed: int = 0,
):
    """A :class:`CrammedBertMLM` or :class:`CrammedBertClassifier` holding a published state dict.

    Args:
        state_dict: published key -> numpy array or torch tensor (any floating dtype; cast to float32).
            An MLM file may hold ``decoder.weight``, ``encoder.embedding.word_embedding.weight`` or
            both (then they must be equal: the model ties them). ``norm_factor`` buffers are optional
            and must equal ``1/sqrt(head width)`` when present.
        config: a :class:`ModelConfig`, or the published ``arch`` block (or the whole ``config.json``
            dict). With an ``arch`` whose ``num_labels`` is null, a classifier takes the number of
            labels from ``head.weight``.
        kind: ``"mlm"``, ``"classifier"`` or ``None`` (classifier when ``head.*``/``pooler.*`` keys are
            present). ``kind="classifier"`` on an MLM file starts a fine-tuning model: the encoder is
            imported, ``decoder.weight`` is dropped, and the pooler and head are initialised as the
            published ``_init_weights`` does (normal ``init_std``, zero bias) from ``seed``.
        dtype: compute dtype of the model.
        implementation: FFF-v2 implementation of every layer (``None``: fastest available).
        seed: seeds the dropout streams (and a fresh classification head).

    Returns:
        The model, in eval mode like every loader (call ``.train()`` to fine-tune it).

    Raises:
        ValueError: naming missing or unexpected keys, or a key whose shape does not fit ``config``
            (expected and found shapes).
    """
    arrays = to_numpy_dict(state_dict)
    config = _resolve_config(config, arrays)
    has_head = any(k.startswith(("pooler.", "head.")) for k in arrays)
    if kind is None:
        kind = "classifier" if has_head else "mlm"
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)} or None, got {kind!r}")

    # The published loader's space-saving form keeps only the decoder.
    arrays = merge_tied(arrays, WORD_EMBEDDING_KEY, DECODER_KEY)

    entries = [e for e in key_map(config, kind) if e[0] != DECODER_KEY]
    fresh_head = kind == "classifier" and not has_head
    required = [key for key, path, _ in entries
                if path is not NORM_FACTOR and not (fresh_head and path[0] in HEAD_PATHS)]
    optional = {key for key, path, _ in entries if path is NORM_FACTOR}
    check_keys(arrays, required, optional, f"UltraFastBERT {kind} state_dict does not fit the config "
                                           f"({config.num_layers} layers, ffn {config.ffn!r})")

    shapes = _expected_shapes(config, kind)
    params = params_from_arrays(arrays, entries, shapes, config)
    if fresh_head:
        rng = np.random.default_rng(seed)
        for key, path, transposed in entries:
            if path is not NORM_FACTOR and path[0] in HEAD_PATHS:
                shape = shapes[key][::-1] if transposed else shapes[key]
                init = rng.normal(0.0, config.init_std, shape) if path[-1] == "kernel" else np.zeros(shape)
                set_path(params, path, init.astype(np.float32))
    return model_from_params(config, params, kind=kind, dtype=dtype, implementation=implementation, seed=seed)
