"""The BERT encoder (:class:`fffjax.models.bert.Bert`, feedforward slots and all) to and from the PyTorch
state dict of ``modeling_fff_bert.FffBertModel``, a transformers ``BertModel`` whose FFF layers hold their
FFF module in place of ``intermediate`` and ``output.dense``.

Keys in the torch module's order: a ``BertModel``'s without the pooler (:func:`fffjax.models.bert.bert_key_map`),
a dense slot of any width under ``intermediate.dense`` and ``output.dense`` as in ``BertModel``, and an FFF
slot after its layer's ``output.LayerNorm`` under ``encoder.layer.{i}.ffn.`` with the keys of the torch FFF
modules (:mod:`fffjax.convert.layers`)::

    ffn.node_weights (2**D - 1, H)  ffn.node_biases (2**D - 1, 1)  ffn.w1s (2**D, H, L)  ffn.b1s (2**D, L)
    ffn.w2s (2**D, L, H)  ffn.b2s (2**D, H)  ffn.depth () int64           FFF-v1 (fastfeedforward.FFF's)
    ffn.linear_in.weight (K*N, H)  ffn.linear_in.bias (K*N,)  ffn.linear_out.weight (H, K*N)   FFF-v2

The export folder's ``config.json`` is transformers' ``BertConfig`` dict (:meth:`BertConfig.to_hf_dict`)
with ``model_type "fff_bert"`` (so that no plain ``BertModel`` loads it with random feedforwards) and
``ffn_layers``, the :func:`fffjax.models.bert.ffn_spec` of every layer. FFF-v1 usage counters are not
exported (a checkpoint does not keep them either). Exports are float32 numpy arrays (``depth`` int64);
imports take numpy arrays or torch tensors of any floating dtype.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax.convert.io import to_numpy_dict
from fffjax.convert.keymap import check_keys, get_path, set_path
from fffjax.models.bert import (
    IGNORED_KEYS,
    MODEL_NAME,
    Bert,
    BertConfig,
    bert_checkpoint_config,
    bert_from_params,
    bert_key_map,
    bert_params,
    params_from_bert_state_dict,
)

MODEL_TYPE = "fff_bert"   # config.json's "model_type" of an exported BERT folder
SPECS_FIELD = "ffn_layers"

# (torch key under the slot, parameter name, how): "copy", "transpose" (torch weight (out, in) = kernel.T),
# "column" (torch (n, 1) = our (n,)), "depth" (the int64 tree depth, a constant here).
FFF_V1_KEYS = (("node_weights", "node_weights", "copy"), ("node_biases", "node_biases", "column"),
               ("w1s", "w1s", "copy"), ("b1s", "b1s", "copy"), ("w2s", "w2s", "copy"), ("b2s", "b2s", "copy"),
               ("depth", None, "depth"))
FFF_V2_KEYS = (("linear_in.weight", "w_in", "copy"), ("linear_in.bias", "b_in", "copy"),
               ("linear_out.weight", "w_out", "transpose"))

Entry = tuple[str, "tuple | None", str]


def slot_entries(prefix: str, layer: tuple, spec: Mapping[str, Any]) -> list[Entry]:
    """The entries ``(torch key, parameter path, how)`` of an FFF slot of the layer at ``layer``, keys
    under ``{prefix}.ffn.``; none for a dense slot (its keys are ``BertModel``'s)."""
    kind = spec.get("kind")
    if kind == "dense":
        return []
    if kind not in ("fff_v1", "fff_v2"):
        raise ValueError(f"spec: expected 'kind' 'dense', 'fff_v1' or 'fff_v2', got {spec!r}")
    keys = FFF_V1_KEYS if kind == "fff_v1" else FFF_V2_KEYS
    return [(f"{prefix}.ffn.{key}", None if name is None else (*layer, "ffn", name), how) for key, name, how in keys]


def key_map(config: BertConfig, ffn_specs: Sequence[Mapping[str, Any]]) -> list[Entry]:
    """``[(torch key, parameter path, how)]`` of ``FffBertModel`` for ``config`` and one :func:`ffn_spec`
    per layer, in the torch module's order; ``how`` as in :func:`fffjax.models.bert.bert_key_map`, or
    "column" or "depth" (see the module docstring)."""
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
    entries = []
    for key, (path, how) in bert_key_map(config, ffn_specs).items():
        entries.append((key, path, how))
        if path[0] == "layers" and key == f"encoder.layer.{path[1]}.output.LayerNorm.bias":   # its FFF slot follows
            i = path[1]
            entries += slot_entries(f"encoder.layer.{i}", ("layers", i), ffn_specs[i])
    return entries


def bert_keys(config: BertConfig, ffn_specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The state_dict keys of ``FffBertModel`` for ``config`` and ``ffn_specs``, in order."""
    return [key for key, _, _ in key_map(config, ffn_specs)]


def _depths(entries: list[Entry], ffn_specs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {key: int(ffn_specs[int(key.split(".")[2])]["depth"]) for key, _, how in entries if how == "depth"}


def _qkv_part(array: np.ndarray, part: str, config: BertConfig) -> np.ndarray:
    """One of q, k, v out of the per-head interleaved ``(..., 3H)`` kernel or bias, ``(..., H)``."""
    heads, width = config.num_heads, config.attention_head_width
    split = array.reshape(*array.shape[:-1], heads, 3, width)
    return split[..., "qkv".index(part), :].reshape(*array.shape[:-1], config.hidden_size)


def export_bert(model: Bert) -> dict[str, np.ndarray]:
    """The PyTorch ``state_dict`` of ``model`` (float32 numpy, ``depth`` int64, the torch module's key
    order; no pooler). Loads with ``load_state_dict(strict=True)`` into ``modeling_fff_bert.FffBertModel``
    built from :func:`bert_hf_config`; a model whose slots are all dense of the config's width is a
    ``BertModel`` state dict (``add_pooling_layer=False``)."""
    if not isinstance(model, Bert):
        raise TypeError(f"model must be a fffjax.models.bert.Bert, got {type(model).__name__}")
    specs = bert_checkpoint_config(model)[SPECS_FIELD]
    params, config = bert_params(model), model.config
    entries = key_map(config, specs)
    depths = _depths(entries, specs)
    out = {}
    for key, path, how in entries:
        if how == "depth":
            out[key] = np.array(depths[key], np.int64)
            continue
        array = np.array(get_path(params, path), np.float32)
        if how in ("q_weight", "k_weight", "v_weight"):
            array = _qkv_part(array, how[0], config).T
        elif how in ("q_bias", "k_bias", "v_bias"):
            array = _qkv_part(array, how[0], config)
        elif how == "transpose":
            array = array.T
        elif how == "column":
            array = array[:, None]
        out[key] = np.ascontiguousarray(array)
    return out


# ------------------------------------------------------------------------------------------ configs


def bert_hf_config(checkpoint_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of an exported folder (less ``auto_map``) for a BERT checkpoint's config
    item (:func:`fffjax.models.bert.bert_checkpoint_config`)."""
    config, specs = split_config(checkpoint_config)
    return {**config.to_hf_dict(), "model_type": MODEL_TYPE, "architectures": ["FffBertModel"],
            SPECS_FIELD: [dict(spec) for spec in specs], "dtype": "float32"}


def is_bert_hf_config(config_json: Any) -> bool:
    """Whether a ``config.json`` dict is an exported BERT folder's (its ``model_type``)."""
    return isinstance(config_json, Mapping) and config_json.get("model_type") == MODEL_TYPE


def split_config(config: "BertConfig | Mapping[str, Any]") -> tuple[BertConfig, list[dict[str, Any]]]:
    """``(BertConfig, one ffn spec per layer)`` of a :class:`BertConfig` (every slot dense), a BERT
    checkpoint's config item, or an exported folder's ``config.json`` dict."""
    if isinstance(config, BertConfig):
        return config, [{"kind": "dense", "width": config.intermediate_size}] * config.num_layers
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a BertConfig, a BERT checkpoint's config or an exported folder's "
                        f"config.json dict, got {type(config).__name__}")
    config = dict(config)
    specs = config.pop(SPECS_FIELD, None)
    if config.get("model") == MODEL_NAME:
        bert_config = BertConfig.from_dict(config)
    elif is_bert_hf_config(config):
        bert_config = BertConfig.from_hf_dict({**config, "model_type": "bert"})
    else:
        raise ValueError(f"config: expected a BERT checkpoint's config ('model': {MODEL_NAME!r}) or an exported "
                         f"folder's config.json ('model_type': {MODEL_TYPE!r}), got keys {sorted(config)}")
    if specs is None:
        specs = [{"kind": "dense", "width": bert_config.intermediate_size}] * bert_config.num_layers
    if not isinstance(specs, Sequence) or len(specs) != bert_config.num_layers:
        raise ValueError(f"config[{SPECS_FIELD!r}] must hold one ffn spec per layer ({bert_config.num_layers}), "
                         f"got {specs!r}")
    return bert_config, [dict(spec) for spec in specs]


# ------------------------------------------------------------------------------------------- import


def _torch_shape(shape: tuple, how: str) -> tuple:
    return shape[::-1] if how == "transpose" else (*shape, 1) if how == "column" else shape


def import_bert(
    state_dict: Mapping[str, Any],
    config: "BertConfig | Mapping[str, Any]",
    *,
    dtype=jnp.float32,
    implementation: str | None = None,
    seed: int = 0,
) -> Bert:
    """A :class:`Bert` holding an ``FffBertModel`` state dict (or a ``BertModel``'s, for all-dense
    slots), in eval mode.

    Args:
        state_dict: key -> numpy array or torch tensor (any floating dtype; cast to float32).
            ``embeddings.position_ids`` and the pooler's keys may be present and are dropped; an FFF-v1
            slot's ``depth`` may be absent and must equal the spec's depth when present.
        config: an exported folder's ``config.json`` dict, a BERT checkpoint's config item, or a
            :class:`BertConfig` (every slot dense); see :func:`split_config`.
        dtype: compute dtype of the model.
        implementation: FFF implementation of every FFF slot (``None``: fastest available).
        seed: seeds the dropout streams.

    Raises:
        ValueError: naming missing or unexpected keys, or a key whose shape or value does not fit ``config``.
    """
    bert_config, specs = split_config(config)
    arrays = to_numpy_dict(state_dict)
    entries = key_map(bert_config, specs)
    depths = _depths(entries, specs)
    check_keys(arrays, [key for key, _, how in entries if how != "depth"], set(depths) | set(IGNORED_KEYS),
               f"BERT state_dict does not fit the config ({bert_config.num_layers} layers, feedforwards "
               f"{[spec['kind'] for spec in specs]})")
    dense_keys = set(bert_key_map(bert_config, specs)) | set(IGNORED_KEYS)
    params = params_from_bert_state_dict({k: v for k, v in arrays.items() if k in dense_keys}, bert_config, specs)
    abstract = bert_params(nnx.eval_shape(lambda: Bert(bert_config, ffn_specs=specs, rngs=nnx.Rngs(0))))
    for key, path, how in entries:
        if key in dense_keys or key not in arrays:
            continue
        array = arrays[key]
        if how == "depth":
            if array.shape != () or not np.issubdtype(array.dtype, np.integer) or int(array) != depths[key]:
                raise ValueError(f"state_dict[{key!r}]: expected the integer depth {depths[key]} of this slot, "
                                 f"found {array!r}")
            continue
        expected = _torch_shape(tuple(get_path(abstract, path).shape), how)
        if tuple(array.shape) != expected:
            raise ValueError(f"state_dict[{key!r}]: expected shape {expected} for this config, "
                             f"found {tuple(array.shape)}")
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            raise ValueError(f"state_dict[{key!r}]: expected a floating dtype, found {array.dtype}")
        array = np.asarray(array).astype(np.float32)
        set_path(params, path, array.T if how == "transpose" else array[:, 0] if how == "column" else array)
    checkpoint_config = {**bert_config.to_dict(), SPECS_FIELD: specs}
    params = jax.tree.map(jnp.asarray, params)
    return bert_from_params(checkpoint_config, params, dtype=dtype, implementation=implementation, seed=seed)
