"""The causal decoder (:class:`fffjax.models.CausalLM`) to and from the PyTorch state dict of
``modeling_fff_decoder.FffDecoderForCausalLM``.

Keys in the torch module's order (H width, V vocabulary, P ``max_seq_length``)::

    model.embedding.word_embedding.weight (V, H)      model.embedding.position_embedding.weight (P, H)
    model.layers.{i}.norm1.{weight, bias} (H,)
    model.layers.{i}.norm2.{weight, bias} (H,)                            not for ffn "none"
    model.layers.{i}.attn.self_attention.norm_factor ()                   1/sqrt(H/heads), a buffer
    model.layers.{i}.attn.self_attention.query_key_value.weight (3H, H)   per-head [q|k|v]
    model.layers.{i}.attn.dense.weight (H, H)
    model.layers.{i}.ffn.linear_in.weight (K*N, H), .linear_in.bias (K*N,), .linear_out.weight (H, K*N)   "fff"
    model.layers.{i}.ffn.dense_in.weight (W, H), .dense_out.weight (H, W)                     "dense", "narrow"
    model.final_norm.{weight, bias} (H,)
    lm_head.weight (V, H)                                                 the tied word embedding again

The layers are the encoder's (:func:`fffjax.convert.ultrafastbert.layer_entries`) under other prefixes: torch
``weight`` = our ``kernel.T`` for every ``nn.Linear``, the QKV interleave the same on both sides.
Exports are float32 numpy arrays; imports take numpy or torch values of any floating dtype.
"""

import dataclasses
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
)
from fffjax.convert.ultrafastbert import layer_entries
from fffjax.models.decoder import CausalLM, DecoderConfig, causal_lm_from_params

WORD_EMBEDDING_KEY = "model.embedding.word_embedding.weight"
LM_HEAD_KEY = "lm_head.weight"


def key_map(config: DecoderConfig) -> list[Entry]:
    """``[(torch key, our parameter path or NORM_FACTOR, transposed?)]`` in the torch module's order;
    the last entry, ``lm_head.weight``, maps to the word embedding (tied)."""
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
    words = ("embedding", "word_embedding", "embedding")
    entries = [
        (WORD_EMBEDDING_KEY, words, False),
        ("model.embedding.position_embedding.weight", ("embedding", "position_embedding", "embedding"), False),
    ]
    for i in range(config.num_layers):
        entries += layer_entries(f"model.layers.{i}", ("layers", i), config.ffn)
    return entries + norm_entries("model.final_norm", ("final_norm",)) + [(LM_HEAD_KEY, words, False)]


def decoder_keys(config: DecoderConfig) -> list[str]:
    """The state_dict keys of ``FffDecoderForCausalLM`` for ``config``, in order."""
    return [key for key, _, _ in key_map(config)]


def export_decoder(model: CausalLM) -> dict[str, np.ndarray]:
    """The PyTorch ``state_dict`` of ``model`` (float32 numpy, the torch module's key order): both
    ``model.embedding.word_embedding.weight`` and ``lm_head.weight`` (the same matrix), and every
    layer's ``norm_factor`` buffer ``1/sqrt(head width)`` as 0-d float32. Loads with
    ``load_state_dict(strict=True)`` into ``modeling_fff_decoder.FffDecoderForCausalLM``."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a CausalLM, got {type(model).__name__}")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return export_params(params, key_map(model.config), model.config)


def decoder_config(config: "DecoderConfig | Mapping[str, Any]") -> DecoderConfig:
    """``config`` itself, or the :class:`DecoderConfig` whose fields a ``config.json`` dict holds (its
    other entries, transformers' own, are ignored). Raises ``ValueError`` naming missing fields."""
    if isinstance(config, DecoderConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a DecoderConfig or a decoder's config.json dict, got {type(config).__name__}")
    fields = [f for f in dataclasses.fields(DecoderConfig)]
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(f"config: a decoder's config.json needs the DecoderConfig fields {missing}")
    return DecoderConfig.from_dict({f.name: config[f.name] for f in fields if f.name in config})


def import_decoder(
    state_dict: Mapping[str, Any],
    config: "DecoderConfig | Mapping[str, Any]",
    *,
    dtype=jnp.float32,
    implementation: str | None = None,
    seed: int = 0,
) -> CausalLM:
    """A :class:`CausalLM` holding a ``FffDecoderForCausalLM`` state dict, in eval mode.

    Args:
        state_dict: key -> numpy array or torch tensor (any floating dtype; cast to float32). It may
            hold ``model.embedding.word_embedding.weight``, ``lm_head.weight`` or both (then they must
            be equal: the model ties them). ``norm_factor`` buffers are optional and must equal
            ``1/sqrt(head width)`` when present.
        config: a :class:`DecoderConfig` or the ``config.json`` dict of an exported folder.
        dtype: compute dtype of the model.
        implementation: FFF-v2 implementation of every layer (``None``: fastest available).
        seed: seeds the dropout streams.

    Raises:
        ValueError: naming missing or unexpected keys, or a key whose shape does not fit ``config``
            (expected and found shapes).
    """
    config = decoder_config(config)
    arrays = merge_tied(to_numpy_dict(state_dict), WORD_EMBEDDING_KEY, LM_HEAD_KEY)
    entries = [e for e in key_map(config) if e[0] != LM_HEAD_KEY]
    check_keys(arrays, [key for key, path, _ in entries if path is not NORM_FACTOR],
               {key for key, path, _ in entries if path is NORM_FACTOR},
               f"causal LM state_dict does not fit the config ({config.num_layers} layers, ffn {config.ffn!r})")
    shapes = expected_shapes(lambda: CausalLM(config, rngs=nnx.Rngs(0)), entries)
    params = params_from_arrays(arrays, entries, shapes, config)
    return causal_lm_from_params(config, params, dtype=dtype, implementation=implementation, seed=seed)
