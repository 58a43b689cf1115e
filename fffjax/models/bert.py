"""A plain BERT encoder (post-LN, learned absolute positions, token types, exact GELU) that loads a
Hugging Face ``BertModel`` folder exactly, with a replaceable feedforward in every layer.

The forward pass, batch-first (``transformers.BertModel`` without its pooler)::

    h = Dropout(LayerNorm(W[ids] + T[token_types] + P[:S]))             embeddings
    y = LayerNorm(h + Dropout(Attn(h)))                                  attend      (each layer)
    h = LayerNorm(y + Dropout(ffn(y)))                                   feedforward (each layer)

``ffn`` is a :class:`DenseFfn` (``w_out GELU(w_in y + b_in) + b_out``) by default; any module
mapping ``(..., H) -> (..., H)`` may be assigned to ``layer.ffn``, among them
:class:`fffjax.nn.FFF` (FFF-v1, built with ``activation=gelu`` of this module for BERT's leaves) and
:class:`fffjax.nn.UltraFastFF` (FFF-v2). An FFF-v1 slot follows the model's mode: ``bert.eval()``
makes it descend hard (one leaf per token), ``bert.train()`` makes it the soft mixture of its
leaves; a slot assigned after ``bert.eval()`` keeps its own mode (a new FFF starts in train mode), so
call ``bert.eval()`` again after replacing slots. :func:`ffn_spec` records what sits in a slot, so
that checkpoints rebuild it (:func:`bert_checkpoint_config`, :func:`bert_from_params`).

The blocks are crammed BERT's (:mod:`fffjax.models.crammed_bert`): attention through
:func:`fffjax.ops.attention` from a fused QKV projection, here with biases, its columns per-head
interleaved (head ``n``'s query, key and value at ``3dn + [0, d)``, ``[d, 2d)``, ``[2d, 3d)``);
:class:`~fffjax.models.crammed_bert.LayerNorm` through :func:`fffjax.ops.layer_norm` with the
residual add fused in; the exact GELU through :func:`fffjax.ops.gelu`; the padding bias of
:func:`~fffjax.models.crammed_bert.additive_mask`.

Module tree (``nnx.to_pure_dict`` paths) and the ``BertModel`` keys they hold (:func:`bert_key_map`)::

    embeddings.word_embeddings.embedding (V, H)          embeddings.word_embeddings.weight
    embeddings.position_embeddings.embedding (P, H)      embeddings.position_embeddings.weight
    embeddings.token_type_embeddings.embedding (T, H)    embeddings.token_type_embeddings.weight
    embeddings.norm.{scale, bias}                        embeddings.LayerNorm.{weight, bias}
    layers[i].attn.query_key_value.{kernel (H, 3H), bias} encoder.layer.i.attention.self.{query,key,value}.*
    layers[i].attn.dense.{kernel, bias}                  encoder.layer.i.attention.output.dense.*
    layers[i].attention_norm.{scale, bias}               encoder.layer.i.attention.output.LayerNorm.*
    layers[i].ffn.{w_in (H, F), b_in}                    encoder.layer.i.intermediate.dense.*
    layers[i].ffn.{w_out (F, H), b_out}                  encoder.layer.i.output.dense.*
    layers[i].output_norm.{scale, bias}                  encoder.layer.i.output.LayerNorm.*

A torch ``weight (out, in)`` is the transpose of the kernel ``(in, out)``. ``embeddings.position_ids``
(a buffer) and ``pooler.dense.*`` (unused by sentence embeddings) are read and dropped.
"""

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import ops, tree, v2
from fffjax._typing import Array, Float, Int
from fffjax.models.config import ModelConfig, TransformerShape
from fffjax.models.crammed_bert import (
    LayerNorm,
    SelfAttention,
    additive_mask,
    check_token_inputs,
    module_from_params,
)
from fffjax.nn import FFF, USAGE_MODES, UltraFastFF

MODEL_NAME = "bert"   # the "model" entry of a BERT checkpoint's config dict
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


# The exact (erf) GELU, BERT's ``hidden_act "gelu"``: the leaf activation to give fffjax.nn.FFF in a BERT
# layer (jax.nn.gelu's default is the tanh form). It is fffjax.v2.gelu itself, the function the cpu_ffi
# FFF-v1 kernel recognises and compiles.
gelu = v2.gelu


# Leaf activations an FFF-v1 slot may have, by the name a checkpoint records.
FFN_ACTIVATIONS = {"gelu": gelu, "relu": jax.nn.relu}


# ------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(TransformerShape):
    """Shape and regularisation of a :class:`Bert`.

    Attributes:
        vocab_size: word-piece vocabulary size V.
        hidden_size: model width H.
        num_layers: encoder layers.
        num_heads: attention heads; H must be divisible by it.
        intermediate_size: width F of the dense feedforward.
        max_positions: rows of the learned position table: the longest input.
        type_vocab_size: rows of the token-type table.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: the feedforward activation; only ``"gelu"`` (exact, erf) is built.
        hidden_dropout: dropout of the embeddings and of each sub-layer's output (train mode only).
        attention_dropout: dropout of the attention probabilities (train mode only).
        pad_token_id: the padding id (its embedding row gets no gradient through the lookup).
        init_std: standard deviation of the normal init of every linear and embedding.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions",
                     "type_vocab_size"):
            tree.check_count(getattr(self, name), name, 1)
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (the exact GELU), got {self.hidden_act!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        self.block_config()   # the checks the encoder's blocks share (heads divide H, eps, dropout, pad id)

    def block_config(self, dropout: float | None = None) -> ModelConfig:
        """The `ModelConfig` that parameterises the shared blocks (layer norm, attention) at this width,
        head count, epsilon and init; ``dropout`` defaults to ``hidden_dropout``."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, max_seq_length=self.max_positions, ffn="dense",
                           dense_width=self.intermediate_size, norm_eps=self.layer_norm_eps,
                           dropout=self.hidden_dropout if dropout is None else dropout,
                           pad_token_id=self.pad_token_id, init_std=self.init_std)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """All fields and ``"model": "bert"``, JSON-serialisable."""
        return {"model": MODEL_NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        """Inverse of :meth:`to_dict` (``"model"`` may be absent); an unknown key raises ``ValueError`` naming it."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        d = dict(d)
        model = d.pop("model", MODEL_NAME)
        if model != MODEL_NAME:
            raise ValueError(f"d['model'] must be {MODEL_NAME!r} for a BertConfig, got {model!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown BertConfig fields {unknown}; known fields {sorted(names)}")
        return cls(**d)

    # ------------------------------------------------------------------ transformers' config.json

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        """The config of a transformers ``BertConfig`` dict (a ``config.json``).

        Fields that would change the architecture away from this encoder (``model_type`` other than
        ``"bert"``, ``hidden_act`` other than ``"gelu"``, ``position_embedding_type`` other than
        ``"absolute"``, a decoder or cross-attention) raise ``ValueError`` naming the field; fields
        about other things (``architectures``, ``use_cache``, versions, ...) are ignored.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        required = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                    "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
                    "max_positions": "max_position_embeddings"}
        missing = sorted(key for key in required.values() if key not in d)
        if missing:
            raise ValueError(f"config.json: missing BERT fields {missing}")
        unsupported = {"model_type": ("bert", MODEL_NAME), "hidden_act": ("gelu", "gelu"),
                       "position_embedding_type": ("absolute", "absolute"), "is_decoder": (False, False),
                       "add_cross_attention": (False, False)}
        for key, (default, expected) in unsupported.items():
            if d.get(key, default) != expected:
                raise ValueError(f"config.json: {key}={d[key]!r} is not supported (this BERT needs {expected!r})")
        optional = {"type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
                    "hidden_dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
                    "pad_token_id": "pad_token_id", "init_std": "initializer_range"}
        fields = {name: d[key] for name, key in required.items()}
        fields.update({name: d[key] for name, key in optional.items() if d.get(key) is not None})
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``BertConfig`` dict of this config (``from_hf_dict`` reads it back)."""
        return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_positions, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps, "hidden_act": self.hidden_act,
                "hidden_dropout_prob": self.hidden_dropout, "attention_probs_dropout_prob": self.attention_dropout,
                "pad_token_id": self.pad_token_id, "initializer_range": self.init_std,
                "position_embedding_type": "absolute"}


# ------------------------------------------------------------------------------------------ modules


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class DenseFfn(nnx.Module):
    """BERT's feedforward ``GELU(y @ w_in + b_in) @ w_out + b_out`` (exact GELU through
    :func:`fffjax.ops.gelu`; ``fffjax.ops.set_implementation(model, "gelu", name)`` switches it).

    Parameters ``w_in (H, F)``, ``b_in (F,)``, ``w_out (F, H)``, ``b_out (H,)``, cast to the dtype of
    the input at each call. ``width`` F may differ from the config's (a narrow dense student).
    """

    kernel_op: ClassVar[str] = "gelu"

    def __init__(self, hidden_size: int, width: int, *, init_std: float = 0.02, rngs: nnx.Rngs):
        tree.check_count(hidden_size, "hidden_size", 1)
        tree.check_count(width, "width", 1)
        self.hidden_size, self.width = hidden_size, width
        self.implementation: str | None = None
        init = _normal(init_std)
        self.w_in = nnx.Param(init(rngs.params(), (hidden_size, width), jnp.float32))
        self.b_in = nnx.Param(jnp.zeros((width,), jnp.float32))
        self.w_out = nnx.Param(init(rngs.params(), (width, hidden_size), jnp.float32))
        self.b_out = nnx.Param(jnp.zeros((hidden_size,), jnp.float32))

    def __call__(self, x: Float[Array, "*lead hidden"]) -> Float[Array, "*lead hidden"]:
        w_in, b_in, w_out, b_out = (p[...].astype(x.dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out))
        inner = ops.gelu(x @ w_in + b_in, implementation=self.implementation)
        return inner @ w_out + b_out


class BertEmbeddings(nnx.Module):
    """Word + token-type + position embeddings (positions ``0..S-1``), LayerNorm, dropout."""

    def __init__(self, config: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype, self.pad_token_id = dtype, config.pad_token_id
        init, h = _normal(config.init_std), config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, h, embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_positions, h, embedding_init=init, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, h, embedding_init=init, rngs=rngs)
        self.norm = LayerNorm(config.block_config(), dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids: Int[Array, "batch seq"], token_type_ids: Int[Array, "batch seq"]
                 ) -> Float[Array, "batch seq hidden"]:
        words = jnp.take(self.word_embeddings.embedding[...], input_ids, axis=0)
        # torch's padding_idx: the pad row gets no gradient through the lookup.
        words = jnp.where((input_ids == self.pad_token_id)[..., None], jax.lax.stop_gradient(words), words)
        types = jnp.take(self.token_type_embeddings.embedding[...], token_type_ids, axis=0)
        places = self.position_embeddings.embedding[: input_ids.shape[1]]
        return self.dropout(self.norm((words + types + places).astype(self.dtype)))


class BertLayer(nnx.Module):
    """Post-LN: ``y = attention_norm(h + drop(attn(h)))``, then ``output_norm(y + drop(ffn(y)))``.

    ``attend`` and ``feedforward`` are the two halves, so that a caller can read or replace what
    goes into ``ffn`` (layer-wise distillation); ``layer(h, key_bias) == feedforward(attend(h, key_bias))``.
    """

    def __init__(self, config: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.attn = SelfAttention(config.block_config(config.attention_dropout), dtype=dtype, rngs=rngs, use_bias=True)
        self.attention_norm = LayerNorm(config.block_config(), dtype, rngs)
        self.ffn = DenseFfn(config.hidden_size, config.intermediate_size, init_std=config.init_std, rngs=rngs)
        self.output_norm = LayerNorm(config.block_config(), dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)

    def attend(self, h: Float[Array, "batch seq hidden"], key_bias: Float[Array, "batch seq"] | None
               ) -> Float[Array, "batch seq hidden"]:
        """Self-attention, residual add and LayerNorm: the input of ``ffn``."""
        return self.attention_norm(self.dropout(self.attn(h, key_bias)), h)[0]

    def feedforward(self, y: Float[Array, "batch seq hidden"]) -> Float[Array, "batch seq hidden"]:
        """``ffn``, residual add and LayerNorm: the layer's output."""
        out = self.ffn(y)
        return self.output_norm(self.dropout(out.astype(y.dtype)), y)[0]

    def __call__(self, h, key_bias):
        return self.feedforward(self.attend(h, key_bias))


class Bert(nnx.Module):
    """A BERT encoder: ``bert(input_ids (B, S) int, attention_mask (B, S) | None, token_type_ids (B, S) |
    None)`` -> the last hidden states ``(B, S, H)`` in the compute dtype.

    Args:
        config: the model configuration.
        dtype: compute dtype (default float32); parameters stay float32.
        implementation: the FFF implementation of the feedforwards ``ffn_specs`` builds (``None``: fastest).
        ffn_specs: one :func:`ffn_spec` dict per layer (``None``: every layer a :class:`DenseFfn` of the
            config's width), what :func:`bert_from_params` rebuilds a checkpoint's slots from.
        rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` drives dropout.

    ``attention_mask`` is 1 for a token and 0 for padding (an additive -10000 per padded key);
    ``token_type_ids`` default to 0. A new model is in train mode (dropout on); ``bert.eval()``
    switches dropout off and every FFF-v1 slot to its hard descent.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, implementation: str | None = None,
                 ffn_specs: Sequence[Mapping[str, Any]] | None = None, rngs: nnx.Rngs):
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        if ffn_specs is not None and len(ffn_specs) != config.num_layers:
            raise ValueError(f"ffn_specs must hold one spec per layer ({config.num_layers}), got {len(ffn_specs)}")
        self.config, self.dtype = config, dtype
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        for layer, spec in zip(self.layers, ffn_specs or (), strict=False):
            layer.ffn = ffn_from_spec(spec, config, implementation=implementation, rngs=rngs)

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        input_ids = check_token_inputs(input_ids, attention_mask, self.config.max_positions)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(token_type_ids.shape)}")
        key_bias = None if attention_mask is None else additive_mask(attention_mask, self.dtype)
        return input_ids, jnp.asarray(token_type_ids), key_bias

    def embed(self, input_ids, token_type_ids=None) -> Float[Array, "batch seq hidden"]:
        """The embeddings' output ``(B, S, H)``: word + position + token-type embeddings, LayerNorm."""
        input_ids, token_type_ids, _ = self._inputs(input_ids, None, token_type_ids)
        return self.embeddings(input_ids, token_type_ids)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> Float[Array, "batch seq hidden"]:
        return layer_outputs(self, input_ids, attention_mask, token_type_ids)[-1]

    def encode(self, input_ids, attention_mask=None) -> Float[Array, "batch seq hidden"]:
        """The last hidden states (token types 0), the name :mod:`fffjax.text` calls encoders by."""
        return self(input_ids, attention_mask)


def ffn_inputs(bert: Bert, input_ids, attention_mask=None, token_type_ids=None
               ) -> list[Float[Array, "batch seq hidden"]]:
    """What each layer's ``ffn`` receives for a batch: one ``(B, S, H)`` array per layer (the output of
    its ``attend``), computed by the model as it stands (its own feedforwards feed the next layer)."""
    input_ids, token_type_ids, key_bias = bert._inputs(input_ids, attention_mask, token_type_ids)
    h, inputs = bert.embeddings(input_ids, token_type_ids), []
    for layer in bert.layers:
        y = layer.attend(h, key_bias)
        inputs.append(y)
        h = layer.feedforward(y)
    return inputs


def layer_outputs(bert: Bert, input_ids, attention_mask=None, token_type_ids=None
                  ) -> list[Float[Array, "batch seq hidden"]]:
    """Every layer's output for a batch: one ``(B, S, H)`` array per layer; the last is ``bert(...)``."""
    input_ids, token_type_ids, key_bias = bert._inputs(input_ids, attention_mask, token_type_ids)
    h, outputs = bert.embeddings(input_ids, token_type_ids), []
    for layer in bert.layers:
        h = layer(h, key_bias)
        outputs.append(h)
    return outputs


def masked_mean(hidden: Float[Array, "batch seq hidden"], attention_mask: Int[Array, "batch seq"]
                ) -> Float[Array, "batch hidden"]:
    """The mean of ``hidden`` over each row's tokens (``attention_mask`` 1), float32; 0 for a row of padding."""
    weights = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def sentence_embedding(hidden: Float[Array, "batch seq hidden"], attention_mask: Int[Array, "batch seq"]
                       ) -> Float[Array, "batch hidden"]:
    """sentence-transformers' mean pooling and ``Normalize``: :func:`masked_mean`, divided by its L2 norm
    (at least 1e-12), float32 ``(B, H)``."""
    if hidden.ndim != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be (batch, seq, hidden) and attention_mask (batch, seq) of its batch and seq, "
                         f"got {tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    mean = masked_mean(hidden, attention_mask)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ feedforward slots


def _activation_name(activation) -> str:
    for name, known in FFN_ACTIVATIONS.items():
        if activation is known:
            return name
    if (isinstance(activation, functools.partial) and activation.func is jax.nn.gelu and not activation.args
            and activation.keywords == {"approximate": False}):
        return "gelu"
    raise ValueError(f"activation: an FFF-v1 slot's leaf activation must be one of {sorted(FFN_ACTIVATIONS)} "
                     f"(fffjax.models.bert.FFN_ACTIVATIONS), got {activation!r}")


def ffn_spec(module: nnx.Module) -> dict[str, Any]:
    """What a feedforward slot holds, as a JSON dict :func:`ffn_from_spec` rebuilds it from:

    - ``{"kind": "dense", "width": F}`` for a :class:`DenseFfn`;
    - ``{"kind": "fff_v1", "leaf_width", "depth", "activation", "dropout", "region_leak",
      "train_hardened", "legacy_eval", "usage_mode"}`` for an :class:`fffjax.nn.FFF` (usage counters
      are not parameters: a rebuilt slot starts them at zero);
    - ``{"kind": "fff_v2", "depth", "n_trees"}`` for an :class:`fffjax.nn.UltraFastFF`.

    Any other module raises ``ValueError``, as does a slot whose output width is not its input width.
    """
    if isinstance(module, DenseFfn):
        return {"kind": "dense", "width": module.width}
    if isinstance(module, FFF):
        if module.out_features != module.in_features:
            raise ValueError(f"module: an FFF slot maps H to H, got {module.in_features} -> {module.out_features}")
        return {"kind": "fff_v1", "leaf_width": module.leaf_width, "depth": module.depth,
                "activation": _activation_name(module.activation), "dropout": module.dropout,
                "region_leak": module.region_leak, "train_hardened": module.train_hardened,
                "legacy_eval": module.legacy_eval, "usage_mode": module.usage_mode}
    if isinstance(module, UltraFastFF):
        if module.out_features != module.features:
            raise ValueError(f"module: an FFF slot maps H to H, got {module.features} -> {module.out_features}")
        return {"kind": "fff_v2", "depth": module.depth, "n_trees": module.n_trees}
    raise ValueError(f"module: a feedforward slot must be a DenseFfn, fffjax.nn.FFF or fffjax.nn.UltraFastFF to be "
                     f"recorded, got {type(module).__name__}")


def ffn_from_spec(spec: Mapping[str, Any], config: BertConfig, *, implementation: str | None = None,
                  rngs: nnx.Rngs) -> nnx.Module:
    """A fresh feedforward of width ``config.hidden_size`` as :func:`ffn_spec` describes it (random init)."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    h = config.hidden_size
    if kind == "dense":
        return DenseFfn(h, spec["width"], init_std=config.init_std, rngs=rngs)
    if kind == "fff_v1":
        activation = spec.get("activation", "gelu")
        if activation not in FFN_ACTIVATIONS:
            raise ValueError(f"spec['activation'] must be one of {sorted(FFN_ACTIVATIONS)}, got {activation!r}")
        usage_mode = spec.get("usage_mode", "none")
        if usage_mode not in USAGE_MODES:
            raise ValueError(f"spec['usage_mode'] must be one of {USAGE_MODES}, got {usage_mode!r}")
        return FFF(h, spec["leaf_width"], h, spec["depth"], activation=FFN_ACTIVATIONS[activation],
                   dropout=spec.get("dropout", 0.0), region_leak=spec.get("region_leak", 0.0),
                   train_hardened=spec.get("train_hardened", False), legacy_eval=spec.get("legacy_eval", False),
                   usage_mode=usage_mode, implementation=implementation, rngs=rngs)
    if kind == "fff_v2":
        return UltraFastFF(h, spec["depth"], n_trees=spec.get("n_trees", 1), implementation=implementation, rngs=rngs)
    raise ValueError(f"spec: expected a dict with 'kind' 'dense', 'fff_v1' or 'fff_v2', got {spec!r}")


# -------------------------------------------------------------------------------------- checkpoints


def bert_params(bert: Bert) -> dict:
    """The parameters as a nested dict of arrays (``nnx.to_pure_dict`` of the ``nnx.Param`` state)."""
    return nnx.to_pure_dict(nnx.state(bert, nnx.Param))


def bert_checkpoint_config(bert: Bert) -> dict[str, Any]:
    """The config item of a BERT checkpoint: :meth:`BertConfig.to_dict` and ``"ffn_layers"``, the
    :func:`ffn_spec` of every layer's slot (JSON)."""
    return {**bert.config.to_dict(), "ffn_layers": [ffn_spec(layer.ffn) for layer in bert.layers]}


def is_bert_checkpoint_config(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config item describes a :class:`Bert`."""
    return isinstance(config, Mapping) and config.get("model") == MODEL_NAME


def bert_from_params(config: Mapping[str, Any], params, *, dtype=jnp.float32, implementation: str | None = None,
                     seed: int = 0) -> Bert:
    """The :class:`Bert` a checkpoint's config item (:func:`bert_checkpoint_config`) and parameter dict
    describe, in eval mode, built without a random init; a missing parameter or one of the wrong shape
    raises ``ValueError`` naming it."""
    config = dict(config)
    specs = config.pop("ffn_layers", None)
    bert_config = BertConfig.from_dict(config)
    return module_from_params(
        lambda rngs: Bert(bert_config, dtype=dtype, implementation=implementation, ffn_specs=specs, rngs=rngs),
        params, seed=seed)


# ------------------------------------------------------------------------- Hugging Face BertModel


def bert_key_map(config: BertConfig, ffn_specs: Sequence[Mapping[str, Any]] | None = None
                 ) -> dict[str, tuple[tuple, str]]:
    """``{BertModel key: (parameter path, how)}`` for every weight of a ``BertModel`` state dict.

    ``how`` is ``"copy"``, ``"transpose"`` (a torch ``weight (out, in)`` into a kernel ``(in, out)``),
    or ``"q"``, ``"k"``, ``"v"`` with ``"_weight"`` / ``"_bias"``: the part of the fused, per-head
    interleaved QKV kernel (transposed) or bias it fills. With ``ffn_specs`` (one :func:`ffn_spec` per
    layer) the ``intermediate.dense`` and ``output.dense`` keys of a layer whose slot is not dense are
    left out (:mod:`fffjax.convert.bert` maps those slots).
    """
    if ffn_specs is not None and len(ffn_specs) != config.num_layers:
        raise ValueError(f"ffn_specs must hold one spec per layer ({config.num_layers}), got {len(ffn_specs)}")
    keys: dict[str, tuple[tuple, str]] = {}

    def norm(torch_prefix: str, path: tuple):
        keys[f"{torch_prefix}.weight"] = (path + ("scale",), "copy")
        keys[f"{torch_prefix}.bias"] = (path + ("bias",), "copy")

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        keys[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), "copy")
    norm("embeddings.LayerNorm", ("embeddings", "norm"))
    for i in range(config.num_layers):
        prefix, layer = f"encoder.layer.{i}", ("layers", i)
        for part in ("query", "key", "value"):
            keys[f"{prefix}.attention.self.{part}.weight"] = (layer + ("attn", "query_key_value", "kernel"),
                                                              f"{part[0]}_weight")
            keys[f"{prefix}.attention.self.{part}.bias"] = (layer + ("attn", "query_key_value", "bias"),
                                                            f"{part[0]}_bias")
        keys[f"{prefix}.attention.output.dense.weight"] = (layer + ("attn", "dense", "kernel"), "transpose")
        keys[f"{prefix}.attention.output.dense.bias"] = (layer + ("attn", "dense", "bias"), "copy")
        norm(f"{prefix}.attention.output.LayerNorm", layer + ("attention_norm",))
        if ffn_specs is None or ffn_specs[i].get("kind") == "dense":
            keys[f"{prefix}.intermediate.dense.weight"] = (layer + ("ffn", "w_in"), "transpose")
            keys[f"{prefix}.intermediate.dense.bias"] = (layer + ("ffn", "b_in"), "copy")
            keys[f"{prefix}.output.dense.weight"] = (layer + ("ffn", "w_out"), "transpose")
            keys[f"{prefix}.output.dense.bias"] = (layer + ("ffn", "b_out"), "copy")
        norm(f"{prefix}.output.LayerNorm", layer + ("output_norm",))
    return keys


# BertModel keys read and dropped: the position-id buffer and the pooler (sentence embeddings do not use it).
IGNORED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def _torch_shape(config: BertConfig, how: str, shape: tuple) -> tuple:
    """The shape a BertModel tensor must have to fill a parameter of ``shape`` as ``how`` says."""
    h = config.hidden_size
    if how.endswith("_weight"):
        return (h, h)
    if how.endswith("_bias"):
        return (h,)
    return tuple(reversed(shape)) if how == "transpose" else tuple(shape)


def params_from_bert_state_dict(state_dict: Mapping[str, Any], config: BertConfig,
                                ffn_specs: Sequence[Mapping[str, Any]] | None = None) -> dict:
    """The parameter dict of a dense :class:`Bert` (as :func:`bert_params` gives) from a ``BertModel``
    state dict of numpy arrays (the keys of :func:`bert_key_map`, plus any of ``IGNORED_KEYS``).
    With ``ffn_specs`` the dense slots take the widths the specs give, and the parameters of the other
    slots are left out (as are their keys from the state dict).

    Raises ``ValueError`` naming every missing or unexpected key, or the first key whose shape does
    not fit ``config``.
    """
    key_map = bert_key_map(config, ffn_specs)
    missing = sorted(set(key_map) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(key_map) - set(IGNORED_KEYS))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match a BertModel of this config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    shapes = jax.tree.map(lambda x: tuple(x.shape), bert_params(
        nnx.eval_shape(lambda: Bert(config, ffn_specs=ffn_specs, rngs=nnx.Rngs(0)))))
    params: dict = {}
    qkv: dict[tuple, dict[str, np.ndarray]] = {}
    for key, (path, how) in key_map.items():
        value = np.asarray(state_dict[key])
        shape = shapes
        for part in path:
            shape = shape[part]
        expected = _torch_shape(config, how, shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"state_dict[{key!r}]: expected shape {expected}, found {tuple(value.shape)}")
        value = value.astype(np.float32)
        if how in ("copy", "transpose"):
            _set_path(params, path, value.T if how == "transpose" else value)
        else:
            qkv.setdefault(path, {})[how[0]] = value.T if how.endswith("_weight") else value
    heads, width = config.num_heads, config.attention_head_width
    for path, parts in qkv.items():
        # (..., H) per part -> (..., heads, 3, d): head n's [q | k | v] side by side.
        stacked = np.stack([parts[p].reshape(*parts[p].shape[:-1], heads, width) for p in "qkv"], axis=-2)
        _set_path(params, path, stacked.reshape(*stacked.shape[:-3], 3 * config.hidden_size))
    return params


def _set_path(tree_: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree_ = tree_.setdefault(part, {})
    tree_[path[-1]] = value


def read_bert_folder(folder: str | Path) -> tuple[dict[str, np.ndarray], BertConfig]:
    """``(state_dict, config)`` of a Hugging Face ``BertModel`` folder (``config.json`` and
    ``model.safetensors``, read with ``safetensors.numpy``: no torch)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"folder {folder} has no {name} (a Hugging Face BertModel folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config = BertConfig.from_hf_dict(json.loads((folder / CONFIG_FILE).read_text()))
    return load_file(str(folder / WEIGHTS_FILE)), config


def is_bert_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Hugging Face BERT (a ``config.json`` whose ``model_type`` is ``"bert"``)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(config, dict) and config.get("model_type") == "bert"


def load_pretrained_bert(folder: str | Path, *, dtype=jnp.float32, implementation: str | None = None) -> Bert:
    """The :class:`Bert` of a Hugging Face ``BertModel`` folder (e.g. all-MiniLM-L6-v2's), in eval mode.

    Raises ``ValueError`` naming a missing or unexpected key or a shape mismatch (see
    :func:`params_from_bert_state_dict`), or an unsupported ``config.json`` field.
    """
    state_dict, config = read_bert_folder(folder)
    params = params_from_bert_state_dict(state_dict, config)
    return module_from_params(lambda rngs: Bert(config, dtype=dtype, implementation=implementation, rngs=rngs),
                              params)
