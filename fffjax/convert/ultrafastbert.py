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
from fffjax.models.config import ModelConfig
from fffjax.models.crammed_bert import MODEL_KINDS, CrammedBertClassifier, CrammedBertMLM, model_from_params

WORD_EMBEDDING_KEY = "encoder.embedding.word_embedding.weight"
DECODER_KEY = "decoder.weight"
NORM_FACTOR = None  # marks the norm_factor buffers, which are constants here, not parameters
HEAD_PATHS = ("pooler", "head")


def _norm(torch_prefix: str, path: tuple) -> list:
    return [(f"{torch_prefix}.weight", (*path, "scale"), False), (f"{torch_prefix}.bias", (*path, "bias"), False)]


def key_map(config: ModelConfig, kind: str = "mlm") -> list[tuple[str, tuple | None, bool]]:
    """``[(torch key, our parameter path or None for norm_factor, transposed?)]`` in the published order.

    The MLM map ends with ``decoder.weight``, which maps to the word embedding (tied).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    emb = ("encoder", "embedding")
    entries = [
        (WORD_EMBEDDING_KEY, (*emb, "word_embedding", "embedding"), False),
        ("encoder.embedding.pos_embedding.scale_factor", (*emb, "pos_embedding", "scale_factor"), False),
        *_norm("encoder.embedding.norm", (*emb, "norm")),
    ]
    for i in range(config.num_layers):
        t, ours = f"encoder.layers.{i}", ("encoder", "layers", i)
        entries += _norm(f"{t}.norm1", (*ours, "norm1")) + _norm(f"{t}.norm2", (*ours, "norm2"))
        entries += [
            (f"{t}.attn.self_attention.norm_factor", NORM_FACTOR, False),
            (f"{t}.attn.self_attention.query_key_value.weight", (*ours, "attn", "query_key_value", "kernel"), True),
            (f"{t}.attn.dense.weight", (*ours, "attn", "dense", "kernel"), True),
        ]
        if config.ffn == "fff":
            entries += [
                (f"{t}.ffn.linear_in.weight", (*ours, "ffn", "w_in"), False),
                (f"{t}.ffn.linear_in.bias", (*ours, "ffn", "b_in"), False),
                (f"{t}.ffn.linear_out.weight", (*ours, "ffn", "w_out"), True),
            ]
        else:
            entries += [
                (f"{t}.ffn.dense_in.weight", (*ours, "ffn", "dense_in", "kernel"), True),
                (f"{t}.ffn.dense_out.weight", (*ours, "ffn", "dense_out", "kernel"), True),
            ]
    entries += _norm("encoder.final_norm", ("encoder", "final_norm"))
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


def _get(tree: Any, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


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
    config = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for key, path, transposed in key_map(config, kind):
        if path is NORM_FACTOR:
            out[key] = np.array(config.norm_factor, np.float32)
            continue
        array = np.array(_get(params, path), np.float32)  # a writable copy (torch.from_numpy warns otherwise)
        out[key] = np.ascontiguousarray(array.T) if transposed else array
    return out


def _expected_shapes(config: ModelConfig, kind: str) -> dict[str, tuple]:
    cls = MODEL_KINDS[kind]
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), nnx.Param))
    shapes = {}
    for key, path, transposed in key_map(config, kind):
        if path is NORM_FACTOR:
            shapes[key] = ()
        else:
            shape = tuple(_get(abstract, path).shape)
            shapes[key] = shape[::-1] if transposed else shape
    return shapes


def _epsilon(dtype) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).eps)


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

    arrays = dict(arrays)
    if WORD_EMBEDDING_KEY in arrays and DECODER_KEY in arrays:
        emb, dec = arrays[WORD_EMBEDDING_KEY], arrays[DECODER_KEY]
        if emb.shape != dec.shape or not np.array_equal(emb, dec):
            diff = (float(np.abs(emb.astype(np.float32) - dec.astype(np.float32)).max())
                    if emb.shape == dec.shape else None)
            raise ValueError(
                f"state_dict[{WORD_EMBEDDING_KEY!r}] {emb.shape} and state_dict[{DECODER_KEY!r}] {dec.shape} differ "
                f"(max abs difference {diff}); the model ties them, so they must be equal")
        del arrays[DECODER_KEY]
    elif DECODER_KEY in arrays:  # the published loader's space-saving form keeps only the decoder
        arrays[WORD_EMBEDDING_KEY] = arrays.pop(DECODER_KEY)

    entries = [e for e in key_map(config, kind) if e[0] != DECODER_KEY]
    fresh_head = kind == "classifier" and not has_head
    required = [key for key, path, _ in entries
                if path is not NORM_FACTOR and not (fresh_head and path[0] in HEAD_PATHS)]
    optional = {key for key, path, _ in entries if path is NORM_FACTOR}
    missing = [k for k in required if k not in arrays]
    unexpected = [k for k in arrays if k not in required and k not in optional]
    if missing or unexpected:
        parts = (([f"missing keys {missing}"] if missing else [])
                 + ([f"unexpected keys {unexpected}"] if unexpected else []))
        raise ValueError(
            f"UltraFastBERT {kind} state_dict does not fit the config "
            f"({config.num_layers} layers, ffn {config.ffn!r}): {'; '.join(parts)}")

    shapes = _expected_shapes(config, kind)
    params: dict = {}
    for key, path, transposed in entries:
        if key not in arrays:
            continue
        array = arrays[key]
        if tuple(array.shape) != shapes[key]:
            raise ValueError(f"state_dict[{key!r}]: expected shape {shapes[key]} for this config, "
                             f"found {tuple(array.shape)}")
        if not np.issubdtype(np.asarray(array).dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"state_dict[{key!r}]: expected a floating dtype, found {array.dtype}")
        stored_eps = _epsilon(array.dtype)
        array = np.asarray(array).astype(np.float32)
        if path is NORM_FACTOR:
            # A half-precision file holds the scale rounded to its own precision.
            if not np.isclose(float(array), config.norm_factor, rtol=max(1e-6, stored_eps), atol=0):
                raise ValueError(
                    f"state_dict[{key!r}] = {float(array)} but this config's attention scale is "
                    f"1/sqrt({config.attention_head_width}) = {config.norm_factor}")
            continue
        _set(params, path, array.T if transposed else array)
    if fresh_head:
        rng = np.random.default_rng(seed)
        for key, path, transposed in entries:
            if path is not NORM_FACTOR and path[0] in HEAD_PATHS:
                shape = shapes[key][::-1] if transposed else shapes[key]
                init = rng.normal(0.0, config.init_std, shape) if path[-1] == "kernel" else np.zeros(shape)
                _set(params, path, init.astype(np.float32))
    return model_from_params(config, params, kind=kind, dtype=dtype, implementation=implementation, seed=seed)
