"""A causal language model (a GPT-style decoder) whose feedforward is dense, FFF-v2, narrow or absent.

The forward pass, batch-first::

    h = Dropout(E[ids] + P[positions])                                    embedding
    h = h + Dropout(CausalAttn(LN1(h)));  h = h + Dropout(FFN(LN2(h)))     each pre-LN layer
    logits = final_norm(h) @ E.T                                          tied output embedding, no bias

**Positions** are learned absolute embeddings ``P (max_seq_length, H)``, looked up by each token's
index among the real tokens of its row (``cumsum(attention_mask) - 1``): a left-padded prompt gets
the positions it has alone, and a key, once in the cache, never changes, so the cache is a plain
array of slots.

**The feedforward** (:attr:`DecoderConfig.ffn`):

========== ===========================================================================================
``dense``   crammed BERT's dense feedforward of width ``dense_width`` (4H by default)
``fff``     FFF-v2 (:class:`fffjax.nn.UltraFastFF`): ``fff_trees`` trees of depth ``fff_depth``
``narrow``  the dense feedforward of width ``K * (D + 1)``, the FFF's active neurons per token
``none``    no feedforward (and no second norm): attention only
========== ===========================================================================================

The blocks are the encoder's (:mod:`fffjax.models.crammed_bert`): the per-head interleaved QKV
projection without biases, :class:`~fffjax.models.crammed_bert.LayerNorm` through
:func:`fffjax.ops.layer_norm` with the residual add fused, the exact GELU, the crammed init (normal
``init_std``, zero FFF biases), one dropout rate, train mode on construction. Attention runs through
:func:`fffjax.ops.attention` with ``causal=True``; the decode step through
:func:`fffjax.ops.cached_attention`; ``fffjax.ops.set_implementation(model, op, name)`` switches each.

Module tree (``nnx.to_pure_dict`` paths, which the partition rules of :mod:`fffjax.train.sharding` read)::

    embedding.{word_embedding.embedding (V, H), position_embedding.embedding (max_seq_length, H)}
    layers[i].{norm1, attn.query_key_value.kernel (H, 3H), attn.dense.kernel (H, H),
               norm2, ffn.{w_in, b_in, w_out} | ffn.{dense_in, dense_out}.kernel}   (none: no norm2, ffn)
    final_norm

**Generation** keeps a :class:`KVCache` of a static number of slots: :meth:`CausalLM.prefill` runs a
(padded) prompt and fills the first slots, :meth:`CausalLM.decode_step` adds one token per row in the
next slot. :mod:`fffjax.generate` jits both, samples and streams.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fffjax import ops, tree, v2
from fffjax._typing import Array, Float, Int
from fffjax.models.config import ModelConfig, TransformerShape, check_transformer_fields
from fffjax.models.crammed_bert import (
    DenseFF,
    LayerNorm,
    SelfAttention,
    additive_mask,
    check_token_inputs,
    fff_feedforward,
    module_from_params,
)
from fffjax.nn import UltraFastFF

FFN_KINDS = ("dense", "fff", "narrow", "none")
MODEL_NAME = "causal_lm"   # the "model" entry of a decoder's config dict: what a checkpoint holds


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig(TransformerShape):
    """Shape and regularisation of a :class:`CausalLM`.

    Attributes:
        vocab_size: token vocabulary V (embedding rows, output logits).
        hidden_size: model width H.
        num_layers: decoder layers.
        num_heads: attention heads; H must be divisible by it.
        max_seq_length: rows of the position table: the most tokens a row holds, prompt and
            generated together.
        ffn: ``"dense"``, ``"fff"``, ``"narrow"`` or ``"none"`` (see the module docstring).
        dense_width: hidden width of the ``"dense"`` feedforward; None is 4H.
        fff_depth: descents per FFF tree D (``"fff"``; ``"narrow"`` takes its width from it).
        fff_trees: FFF trees K (``"fff"``; ``"narrow"`` takes its width from it).
        norm_eps: LayerNorm epsilon.
        dropout: one rate for embedding, attention and residual dropout (train mode only).
        pad_token_id: the id that fills padding (never a target of the loss).
        init_std: standard deviation of the normal init of every linear and embedding.
        load_balance: coefficient of the FFF-v2 load-balancing term in training
            (:meth:`CausalLM.logits_and_load_balance`, used by
            :func:`fffjax.train.objectives.causal_lm_objective`); 0 (default) leaves it out.
        load_balance_temperature: the term's soft decision is ``sigmoid(z / load_balance_temperature)``;
            well below the typical routing logit, it follows the hard split closely (with a temperature
            far above the logits the sigmoid is nearly linear and the term sees only their mean).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_seq_length: int
    ffn: str
    dense_width: int | None = None
    fff_depth: int = 11
    fff_trees: int = 1
    norm_eps: float = 1e-5
    dropout: float = 0.1
    pad_token_id: int = 0
    init_std: float = 0.02
    load_balance: float = 0.0
    load_balance_temperature: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_length", "fff_trees"):
            tree.check_count(getattr(self, name), name, 1)
        tree.check_depth(self.fff_depth, "fff_depth")
        if self.dense_width is not None:
            tree.check_count(self.dense_width, "dense_width", 1)
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if not 0.0 <= self.load_balance < float("inf"):
            raise ValueError(f"load_balance must be a finite coefficient >= 0, got {self.load_balance}")
        if not 0.0 < self.load_balance_temperature < float("inf"):
            raise ValueError(f"load_balance_temperature must be finite and > 0, got {self.load_balance_temperature}")
        check_transformer_fields(self)

    @property
    def active_neurons(self) -> int:
        """Feedforward neurons each token evaluates per layer: the dense width, ``K * (D + 1)`` for
        ``"fff"`` and ``"narrow"``, 0 for ``"none"``."""
        if self.ffn == "dense":
            return 4 * self.hidden_size if self.dense_width is None else self.dense_width
        return 0 if self.ffn == "none" else self.fff_trees * (self.fff_depth + 1)

    def block_config(self) -> ModelConfig:
        """The `ModelConfig` that parameterises the encoder's blocks (layer norm, attention, the dense
        feedforward of width :attr:`active_neurons`) at this width, head count, epsilon, dropout and init."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, max_seq_length=self.max_seq_length, ffn="dense",
                           dense_width=max(self.active_neurons, 1), norm_eps=self.norm_eps, dropout=self.dropout,
                           pad_token_id=self.pad_token_id, init_std=self.init_std)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """All fields and ``"model": "causal_lm"`` (what tells a checkpoint's config apart), JSON-serialisable."""
        return {"model": MODEL_NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        """Inverse of :meth:`to_dict` (the ``"model"`` entry may be absent); an unknown key, or a
        ``"model"`` other than ``"causal_lm"``, raises ``ValueError`` naming it."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        d = dict(d)
        model = d.pop("model", MODEL_NAME)
        if model != MODEL_NAME:
            raise ValueError(f"d['model'] must be {MODEL_NAME!r} for a DecoderConfig, got {model!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields {unknown}; known fields {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DecoderConfig":
        return cls.from_dict(json.loads(text))


# Sizes: "tiny" runs on 2 CPU cores in seconds; "small" is sized to the offline corpus (about 23M
# tokens); "base" is GPT-2 small's shape (H = 768, where the dense feedforward dominates a decode step);
# "medium" is GPT-2 medium's (H = 1024, 24 layers), where the vocabulary projection's share of a step is
# smaller still; "wide" has a 7B-class model's width (H = 4096, 8 layers), where a GPU's batch-1 decode step
# reads enough weight bytes per layer for the dense feedforward to outweigh the per-kernel fixed costs;
# "xwide" has a 70B-class model's width (H = 8192, 4 layers), where a GPU's batch-1 step reads four times the
# weight bytes per layer for about the same number of dependent row reads in an FFF walk.
_SIZES = {
    "tiny": dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=2, max_seq_length=128),
    "small": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, max_seq_length=256),
    "base": dict(vocab_size=32768, hidden_size=768, num_layers=12, num_heads=12, max_seq_length=1024),
    "medium": dict(vocab_size=32768, hidden_size=1024, num_layers=24, num_heads=16, max_seq_length=1024),
    "wide": dict(vocab_size=32768, hidden_size=4096, num_layers=8, num_heads=32, max_seq_length=1024),
    "xwide": dict(vocab_size=32768, hidden_size=8192, num_layers=4, num_heads=64, max_seq_length=1024),
}
# Feedforwards compared at each size: the dense twin (4H), attention only, and FFF-v2 K x D with the
# narrow dense feedforward of its active width K * (D + 1).
_TREE_SHAPES = ((1, 11), (4, 9), (16, 7))
_FFNS = {
    "dense": dict(ffn="dense"),
    "none": dict(ffn="none"),
    **{f"fff-{k}x{d}": dict(ffn="fff", fff_trees=k, fff_depth=d) for k, d in _TREE_SHAPES},
    **{f"narrow-{k}x{d}": dict(ffn="narrow", fff_trees=k, fff_depth=d) for k, d in _TREE_SHAPES},
}

DECODER_CONFIGS: dict[str, DecoderConfig] = {
    f"{size}-{ffn}": DecoderConfig(**shape, **ffn_fields)
    for size, shape in _SIZES.items() for ffn, ffn_fields in _FFNS.items()
}


def get_decoder_config(name_or_path: "str | Path") -> DecoderConfig:
    """A preset by name (``SIZE-FFN``: sizes ``tiny``, ``small``, ``base``, ``medium``, ``wide``, ``xwide``;
    feedforwards ``dense``, ``none``, ``fff-1x11``, ``fff-4x9``, ``fff-16x7``, ``narrow-1x11``, ...) or a JSON
    file holding :meth:`DecoderConfig.to_dict` output."""
    if isinstance(name_or_path, str) and name_or_path in DECODER_CONFIGS:
        return DECODER_CONFIGS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"config {str(name_or_path)!r} is neither a decoder preset {sorted(DECODER_CONFIGS)} "
                         "nor a JSON file")
    return DecoderConfig.from_json(path.read_text())


# ---------------------------------------------------------------------------------------------- cache


class KVCache(NamedTuple):
    """The keys and values of every layer in ``T`` static slots per row, and where each row stands.

    Attributes:
        keys, values: one ``(B, T, heads, d)`` array per layer, in the compute dtype.
        valid: ``(B, T)`` bool, whether a slot holds a token of its row (padding and empty slots do not).
        positions: ``(B,)`` int32 position id of each row's next token.
        length: int32 scalar, the next slot to write (shared by all rows).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    valid: Array
    positions: Array
    length: Array


def positions_from_mask(attention_mask: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Each token's index among the real tokens of its row, ``cumsum(mask) - 1`` (0 on leading padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


# --------------------------------------------------------------------------------------------- modules


class DecoderEmbedding(nnx.Module):
    """Word embedding plus learned absolute position embedding, then dropout (no norm: pre-LN layers)."""

    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=config.init_std)
        self.word_embedding = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_seq_length, config.hidden_size, embedding_init=init,
                                            rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, input_ids: Int[Array, "batch seq"], positions: Int[Array, "batch seq"]
                 ) -> Float[Array, "batch seq hidden"]:
        words = jnp.take(self.word_embedding.embedding[...], input_ids, axis=0)
        places = jnp.take(self.position_embedding.embedding[...], positions, axis=0)
        return self.dropout((words + places).astype(self.dtype))


class CachedAttention(nnx.Module):
    """Runs :func:`fffjax.ops.cached_attention` (the decode step's attention over the cache) with the
    implementation ``fffjax.ops.set_implementation(model, "cached_attention", name)`` picks."""

    kernel_op: ClassVar[str] = "cached_attention"

    def __init__(self):
        self.implementation: str | None = None

    def __call__(self, q, keys, values, key_bias, *, scale: float):
        return ops.cached_attention(q, keys, values, key_bias, scale=scale, implementation=self.implementation)


class CausalSelfAttention(SelfAttention):
    """The encoder's attention (per-head interleaved QKV without biases, output projection ``dense``)
    with a causal mask, and its decode step over a key/value cache.

    Without active dropout the scores go through ``fffjax.ops.attention(..., causal=True)``; with it,
    through the explicit einsum form (dropout needs the probabilities).
    """

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.cached = CachedAttention()

    def __call__(self, x: Float[Array, "batch seq hidden"], key_bias: Float[Array, "batch seq"] | None
                 ) -> Float[Array, "batch seq hidden"]:
        return self.attend(x, key_bias)[0]

    def attend(self, x: Float[Array, "batch seq hidden"], key_bias: Float[Array, "batch seq"] | None):
        """``(output (B, S, H), (keys, values) (B, S, heads, d))``: the output and what a cache keeps."""
        b, s, h = x.shape
        qkv = self.query_key_value(x)
        q, k, v = ops.split_heads(qkv, self.num_heads)
        if self.dropout.deterministic or self.dropout.rate == 0:
            context = ops.attention(qkv, key_bias, num_heads=self.num_heads, scale=float(self.norm_factor),
                                    causal=True, implementation=self.implementation)
            return self.dense(context), (k, v)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * jnp.asarray(self.norm_factor, q.dtype)
        if key_bias is not None:
            scores = scores + key_bias.astype(scores.dtype)[:, None, None, :]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, jnp.asarray(-jnp.inf, scores.dtype))
        probs = self.dropout(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, h)
        return self.dense(context), (k, v)

    def decode(self, x: Float[Array, "batch 1 hidden"], keys, values, slot, key_bias: Float[Array, "batch slots"]):
        """One new token per row: its key and value go into ``slot`` of the layer's cache ``keys``,
        ``values (B, T, heads, d)``, and its query attends over the slots ``key_bias`` leaves visible.
        Returns ``(output (B, 1, H), (keys, values))``."""
        q, k, v = ops.split_heads(self.query_key_value(x), self.num_heads)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), slot, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), slot, axis=1)
        context = self.cached(q.astype(keys.dtype), keys, values, key_bias.astype(keys.dtype),
                              scale=float(self.norm_factor))
        return self.dense(context), (keys, values)


def _make_ffn(config: DecoderConfig, *, dtype, implementation, rngs: nnx.Rngs):
    if config.ffn == "none":
        return None
    if config.ffn in ("dense", "narrow"):
        return DenseFF(config.block_config(), dtype=dtype, rngs=rngs)
    return fff_feedforward(config, implementation=implementation, rngs=rngs)


# attend(attention module, normed input) -> (attention output, what the caller keeps of that layer)
Attend = Callable[[CausalSelfAttention, Array], tuple[Array, Any]]


class DecoderLayer(nnx.Module):
    """Pre-LN: ``h + drop(attn(norm1(h)))``, then ``h + drop(ffn(norm2(h)))`` (``"none"``: no second half).

    As the encoder's layer, it returns ``(h', update')`` whose sum is its output, so that every
    residual add rides on the next layer norm; ``attend`` says how the attention runs (whole
    sequences, a prefill that keeps the keys, a decode step over the cache), and what it returns
    beside the output comes back as the third element.
    """

    def __init__(self, config: DecoderConfig, *, dtype, implementation, rngs: nnx.Rngs):
        blocks = config.block_config()
        self.norm1 = LayerNorm(blocks, dtype, rngs)
        self.attn = CausalSelfAttention(blocks, dtype=dtype, rngs=rngs)
        self.ffn = _make_ffn(config, dtype=dtype, implementation=implementation, rngs=rngs)
        self.norm2 = None if self.ffn is None else LayerNorm(blocks, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.balance_temperature = config.load_balance_temperature

    def __call__(self, h, update, attend: Attend, balance: "tuple[Array, list] | None" = None):
        """``balance = (weights (B, S), terms)`` (weights 1 for a token, 0 for padding): an FFF-v2
        feedforward also appends its :func:`fffjax.v2.load_balance_loss` to the list ``terms``."""
        normed, h = (self.norm1(h), h) if update is None else self.norm1(update, h)
        out, kept = attend(self.attn, normed)
        out = self.dropout(out)
        if self.ffn is None:
            return h, out, kept
        normed, h = self.norm2(out, h)
        if balance is not None and isinstance(self.ffn, UltraFastFF):
            balance[1].append(self._load_balance(normed, balance[0]))
        return h, self.dropout(self.ffn(normed)), kept

    def _load_balance(self, x, weights) -> Float[Array, ""]:
        ffn = self.ffn
        tokens = x.reshape(-1, x.shape[-1])
        # the rows cast as the layer casts them, so the term sees the paths the layer takes
        path, logits = v2.path_logits(tokens, ffn.w_in[...].astype(x.dtype), ffn.b_in[...].astype(x.dtype),
                                      depth=ffn.depth, n_trees=ffn.n_trees)
        return v2.load_balance_loss(path, logits, depth=ffn.depth, n_trees=ffn.n_trees,
                                    weights=weights.reshape(-1), temperature=self.balance_temperature)


class CausalLM(nnx.Module):
    """A pre-LN causal decoder with tied input/output embeddings (see the module docstring).

    Args:
        config: the model configuration.
        dtype: compute dtype (default float32); parameters stay float32, logits come out float32.
        implementation: FFF-v2 implementation of every layer (``None``: the fastest available).
        rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` drives dropout.

    Call ``model(input_ids (B, S) int, attention_mask (B, S) or None)`` -> logits ``(B, S, V)``
    float32, where position ``i`` predicts token ``i + 1``; ``attention_mask`` is 1 for a token and 0
    for padding (left or right). A new model is in train mode; ``model.eval()`` switches dropout off.
    """

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, implementation: str | None = None,
                 rngs: nnx.Rngs):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.embedding = DecoderEmbedding(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, implementation=implementation, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = LayerNorm(config.block_config(), dtype, rngs)

    # ------------------------------------------------------------------ whole sequences

    def _run(self, input_ids, positions, attends: Callable[[int], Attend], balance=None):
        h, update, kept = self.embedding(input_ids, positions), None, []
        for index, layer in enumerate(self.layers):
            h, update, layer_kept = layer(h, update, attends(index), balance)
            kept.append(layer_kept)
        hidden = self.final_norm(h) if update is None else self.final_norm(update, h)[0]
        return hidden, kept

    def hidden_states(self, input_ids, attention_mask=None) -> Float[Array, "batch seq hidden"]:
        """Final-normed hidden states ``(B, S, H)`` in the compute dtype."""
        return self._hidden_states(input_ids, attention_mask, balance_terms=None)

    def _hidden_states(self, input_ids, attention_mask, *, balance_terms: list | None):
        input_ids = check_token_inputs(input_ids, attention_mask, self.config.max_seq_length)
        if attention_mask is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
            key_bias = None
        else:
            positions, key_bias = positions_from_mask(attention_mask), additive_mask(attention_mask, self.dtype)
        balance = None
        if balance_terms is not None:
            weights = jnp.ones(input_ids.shape, jnp.float32) if attention_mask is None else \
                (jnp.asarray(attention_mask) > 0).astype(jnp.float32)
            balance = (weights, balance_terms)
        hidden, _ = self._run(input_ids, positions, lambda _: lambda attn, x: attn.attend(x, key_bias), balance)
        return hidden

    def logits_and_load_balance(
        self, input_ids, attention_mask=None
    ) -> tuple[Float[Array, "batch seq vocab"], Float[Array, ""]]:
        """The logits of ``model(input_ids, attention_mask)`` and the FFF-v2 load-balancing term:
        :func:`fffjax.v2.load_balance_loss` of each FFF-v2 layer's real tokens, summed over the
        layers (0 for a model without FFF-v2 layers), at :attr:`DecoderConfig.load_balance_temperature`.
        Not scaled by :attr:`DecoderConfig.load_balance`."""
        terms: list = []
        hidden = self._hidden_states(input_ids, attention_mask, balance_terms=terms)
        return self.logits(hidden), sum(terms, jnp.zeros((), jnp.float32))

    def logits(self, hidden: Float[Array, "*lead hidden"]) -> Float[Array, "*lead vocab"]:
        """The tied output layer ``hidden @ E.T`` (no bias), float32 logits."""
        table = self.embedding.word_embedding.embedding[...].astype(hidden.dtype)
        return jnp.einsum("...h,vh->...v", hidden, table, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None) -> Float[Array, "batch seq vocab"]:
        return self.logits(self.hidden_states(input_ids, attention_mask))

    # ------------------------------------------------------------------ generation

    def init_cache(self, batch: int, cache_length: int) -> KVCache:
        """An empty cache of ``cache_length`` slots for ``batch`` rows."""
        tree.check_count(batch, "batch", 1)
        tree.check_count(cache_length, "cache_length", 1)
        shape = (batch, cache_length, self.config.num_heads, self.config.attention_head_width)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in self.layers)
        return KVCache(keys=zeros, values=zeros, valid=jnp.zeros((batch, cache_length), bool),
                       positions=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32))

    def prefill(self, input_ids, attention_mask, cache_length: int) -> tuple[Float[Array, "batch vocab"], KVCache]:
        """Runs padded prompts ``(B, P)`` (``attention_mask`` 1 = token, None = no padding) and returns
        the logits after each row's last token ``(B, V)`` and a cache of ``cache_length >= P`` slots
        holding the prompts in slots ``[0, P)``; decoding continues at slot ``P`` for every row.

        Left padding keeps every row's last token in slot ``P - 1`` and wastes no slot after it.
        """
        input_ids = check_token_inputs(input_ids, attention_mask, None)
        prompt = input_ids.shape[1]
        if prompt > cache_length:
            raise ValueError(f"cache_length must be at least the prompt length {prompt}, got {cache_length}")
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        key_bias = additive_mask(mask, self.dtype)
        hidden, kept = self._run(input_ids, positions_from_mask(mask),
                                 lambda _: lambda attn, x: attn.attend(x, key_bias))
        last = prompt - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
        logits = self.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        empty = ((0, 0), (0, cache_length - prompt), (0, 0), (0, 0))
        cache = KVCache(keys=tuple(jnp.pad(k.astype(self.dtype), empty) for k, _ in kept),
                        values=tuple(jnp.pad(v.astype(self.dtype), empty) for _, v in kept),
                        valid=jnp.pad(mask > 0, empty[:2]),
                        positions=jnp.sum(mask > 0, axis=1).astype(jnp.int32),
                        length=jnp.asarray(prompt, jnp.int32))
        return logits, cache

    def decode_step(self, tokens: Int[Array, " batch"], cache: KVCache) -> tuple[Float[Array, "batch vocab"], KVCache]:
        """Appends one token per row in slot ``cache.length`` and returns the logits after it ``(B, V)``
        and the updated cache. The caller keeps ``cache.length`` below the number of slots (a full
        cache would overwrite its last slot)."""
        slot = cache.length
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((tokens.shape[0], 1), bool), slot, axis=1)
        key_bias = additive_mask(valid, self.dtype)

        hidden, kept = self._run(
            tokens[:, None], cache.positions[:, None],
            lambda i: lambda attn, x: attn.decode(x, cache.keys[i], cache.values[i], slot, key_bias))
        cache = KVCache(keys=tuple(k for k, _ in kept), values=tuple(v for _, v in kept), valid=valid,
                        positions=cache.positions + 1, length=cache.length + 1)
        return self.logits(hidden[:, 0]), cache


def causal_lm_from_params(
    config: DecoderConfig,
    params,
    *,
    dtype=jnp.float32,
    implementation: str | None = None,
    seed: int = 0,
) -> CausalLM:
    """A :class:`CausalLM` holding ``params`` (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``'s
    nested dict; list indices ints or strings, leaves numpy or jax arrays), without a random init,
    in eval mode. Raises ``ValueError`` naming a missing parameter or one whose shape does not fit."""
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
    return module_from_params(
        lambda rngs: CausalLM(config, dtype=dtype, implementation=implementation, rngs=rngs), params, seed=seed)
