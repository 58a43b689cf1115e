"""Crammed BERT with UltraFastBERT's FFF-v2 feedforward (or a dense one), as Flax NNX modules.

The forward pass is the published ``ScriptableLMForPreTraining`` / ``ScriptableLMForSequenceClassification``
(``pbelcak/UltraFastBERT``, ``training/cramming/architectures/crammed_bert.py``; see
``docs/conventions.md``, "Crammed BERT"), batch-first::

    h = Dropout(LayerNorm(E[ids] + s * PE[:S]))                    embedding
    h = h + Dropout(Attn(LN1(h)));  h = h + Dropout(FFN(LN2(h)))    each pre-LN layer
    h = final_norm(h)
    MLM logits = h @ E.T                                            tied decoder, no bias
    class logits = head(Dropout(tanh(pooler(mean_s h))))            classifier

Module tree (attribute names follow the published state_dict, so the exporter's map is short)::

    encoder.embedding.{word_embedding.embedding (V, H), pos_embedding.scale_factor (1,), norm}
    encoder.layers[i].{norm1, norm2, attn.query_key_value.kernel (H, 3H), attn.dense.kernel (H, H),
                       ffn.{w_in, b_in, w_out} | ffn.{dense_in, dense_out}.kernel}
    encoder.final_norm;   classifier only: pooler.dense.{kernel, bias}, head.{kernel, bias}

Norms are :class:`LayerNorm` (an ``nnx.LayerNorm``: ``scale``, ``bias``), linears ``nnx.Linear`` (``kernel (in, out)``,
the transpose of torch's ``weight``). Layer norm, attention, GELU and the FFF layers run through
:mod:`fffjax.ops`, which picks each kernel; ``fffjax.ops.set_implementation(model, op, name)``
switches one op for the whole model. Parameters are float32; ``dtype`` sets the compute dtype
(e.g. bfloat16; LayerNorm statistics stay float32, Flax's rule) and the MLM and class logits come
out in float32 (:func:`cast_parameters` stores the weights in the compute dtype for inference).
A new model is in train mode (dropout on); ``model.eval()`` / ``model.train()`` switch it. Dropout
draws from the ``dropout`` stream of the ``rngs`` given at construction: run training steps under
``nnx.jit`` (or split/merge and keep the returned state) so the stream advances.
"""

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import ops
from fffjax._typing import Array, Float, Int
from fffjax.models.config import ModelConfig
from fffjax.nn import UltraFastFF

MASK_BIAS = -10000.0  # the published additive padding bias (not -inf: a fully padded row stays finite)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """``(length, dim)`` float32 table, sin and cos **interleaved**: ``PE[t, 2i] = sin(t w_i)``,
    ``PE[t, 2i+1] = cos(t w_i)``, ``w_i = exp(-2i ln(10000) / dim)``.

    Computed in float32 in the same order as cramming's ``SinusoidalPositional`` buffer, so the
    table agrees with torch's to float32 rounding of ``sin``/``cos``.
    """
    position = np.arange(length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)
    return table


def additive_mask(attention_mask, dtype) -> Float[Array, "batch seq"]:
    """``(B, S)`` 1 = token / 0 = padding -> the additive bias per key ``(1 - mask) * -10000``, ``(B, S)``."""
    mask = jnp.asarray(attention_mask).astype(dtype)
    return ((1.0 - mask) * MASK_BIAS).astype(dtype)


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm``'s parameters (``scale``, ``bias``) computed by :func:`fffjax.ops.layer_norm`
    (two-pass variance, as torch's: ``E[x^2] - E[x]^2`` loses digits at eps 1e-12), with the residual
    add fused in.

    ``norm(x)`` is the layer norm of ``x``; ``norm(x, residual)`` returns ``(norm(x + residual),
    x + residual)`` from one pass. Inputs are cast to the compute dtype; ``implementation`` picks the
    kernel (``fffjax.ops.set_implementation(model, "layer_norm", name)``).
    """

    kernel_op: ClassVar[str] = "layer_norm"

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        super().__init__(config.hidden_size, epsilon=config.norm_eps, dtype=dtype, use_fast_variance=False,
                         rngs=rngs)
        self.implementation: str | None = None

    def __call__(self, x: Float[Array, "*lead hidden"], residual=None):
        return ops.layer_norm(x.astype(self.dtype), self.scale[...], self.bias[...],
                              None if residual is None else residual.astype(self.dtype), eps=self.epsilon,
                              implementation=self.implementation)


def _layer_norm(config: ModelConfig, dtype, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(config, dtype, rngs)


class ScaledSinusoidal(nnx.Module):
    """``s * PE[:S]`` with a learnable scalar ``scale_factor (1,)`` initialised to ``1/sqrt(H)``.

    ``PE`` is not a parameter (the published buffer is non-persistent): it is rebuilt from
    ``max_seq_length`` and ``H``, and a longer input is refused, as the published 128-row buffer
    would fail.
    """

    def __init__(self, hidden_size: int, max_seq_length: int):
        self.hidden_size, self.max_seq_length = hidden_size, max_seq_length
        self.scale_factor = nnx.Param(jnp.full((1,), 1.0 / math.sqrt(hidden_size), jnp.float32))

    def __call__(self, seq_length: int, dtype) -> Float[Array, "seq hidden"]:
        if seq_length > self.max_seq_length:
            raise ValueError(
                f"input_ids has {seq_length} positions; this model's position table has max_seq_length="
                f"{self.max_seq_length}")
        table = jnp.asarray(sinusoidal_positions(seq_length, self.hidden_size))
        return (self.scale_factor[...].astype(jnp.float32) * table).astype(dtype)


class Embedding(nnx.Module):
    """Word embedding (pad row zero at init) + scaled sinusoidal positions, LayerNorm, dropout."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.pad_token_id = config.pad_token_id
        self.dtype = dtype
        self.word_embedding = nnx.Embed(config.vocab_size, config.hidden_size,
                                        embedding_init=_normal(config.init_std), rngs=rngs)
        # torch's nn.Embedding(padding_idx=...) zeroes that row at init (cramming's _init_module too).
        table = self.word_embedding.embedding[...]
        self.word_embedding.embedding[...] = table.at[config.pad_token_id].set(0.0)
        self.pos_embedding = ScaledSinusoidal(config.hidden_size, config.max_seq_length)
        self.norm = _layer_norm(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, input_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq hidden"]:
        table = self.word_embedding.embedding[...]
        words = jnp.take(table, input_ids, axis=0)
        # torch's padding_idx: the pad row gets no gradient through the lookup (the tied decoder
        # still trains it, as in the published model).
        words = jnp.where((input_ids == self.pad_token_id)[..., None], jax.lax.stop_gradient(words), words)
        h = words.astype(self.dtype) + self.pos_embedding(input_ids.shape[1], self.dtype)
        return self.dropout(self.norm(h))


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with crammed BERT's per-head interleaved QKV, no biases
    (``use_bias=True`` adds a bias to both projections: ``query_key_value.bias (3H,)`` in the same
    interleave, ``dense.bias (H,)``, as BERT has).

    ``query_key_value.kernel (H, 3H)``: output column ``h*3d + [0:d]`` is head h's query,
    ``[d:2d]`` its key, ``[2d:3d]`` its value (d = H / heads), i.e. the (B, S, 3H) projection is
    viewed as (B, S, heads, 3, d). Scores ``q.k * norm_factor + key_bias``, softmax, dropout on the
    probabilities, then the output projection ``dense``.

    Without active dropout (eval mode, or rate 0) the scores go through :func:`fffjax.ops.attention`
    (float32 softmax), whose kernel ``implementation`` picks
    (``fffjax.ops.set_implementation(model, "attention", name)``). Attention dropout needs the
    probabilities, which the fused kernels never write: with it, the explicit einsum form runs
    (softmax in the compute dtype).
    """

    kernel_op: ClassVar[str] = "attention"

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, use_bias: bool = False):
        self.num_heads, self.head_width = config.num_heads, config.attention_head_width
        self.norm_factor = config.norm_factor
        self.implementation: str | None = None
        h = config.hidden_size
        self.query_key_value = nnx.Linear(h, 3 * h, use_bias=use_bias, dtype=dtype,
                                          kernel_init=_normal(config.init_std), rngs=rngs)
        self.dense = nnx.Linear(h, h, use_bias=use_bias, dtype=dtype, kernel_init=_normal(config.init_std),
                                rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "batch seq hidden"], key_bias: Float[Array, "batch seq"] | None
                 ) -> Float[Array, "batch seq hidden"]:
        b, s, h = x.shape
        qkv = self.query_key_value(x)
        if self.dropout.deterministic or self.dropout.rate == 0:
            context = ops.attention(qkv, key_bias, num_heads=self.num_heads, scale=float(self.norm_factor),
                                    implementation=self.implementation)
            return self.dense(context)
        q, k, v = ops.split_heads(qkv, self.num_heads)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * jnp.asarray(self.norm_factor, q.dtype)
        if key_bias is not None:
            scores = scores + key_bias.astype(scores.dtype)[:, None, None, :]
        probs = self.dropout(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, h)
        return self.dense(context)


class DenseFF(nnx.Module):
    """Crammed BERT's ``FFNComponent`` without biases: ``dense_out(GELU(dense_in(x)))``, the exact GELU
    through :func:`fffjax.ops.gelu` (``fffjax.ops.set_implementation(model, "gelu", name)``)."""

    kernel_op: ClassVar[str] = "gelu"

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        h, w = config.hidden_size, config.dense_width
        self.implementation: str | None = None
        self.dense_in = nnx.Linear(h, w, use_bias=False, dtype=dtype, kernel_init=_normal(config.init_std), rngs=rngs)
        self.dense_out = nnx.Linear(w, h, use_bias=False, dtype=dtype, kernel_init=_normal(config.init_std), rngs=rngs)

    def __call__(self, x: Float[Array, "*lead hidden"]) -> Float[Array, "*lead hidden"]:
        return self.dense_out(ops.gelu(self.dense_in(x), implementation=self.implementation))


def _make_ffn(config: ModelConfig, *, dtype, implementation, rngs: nnx.Rngs):
    if config.ffn == "dense":
        return DenseFF(config, dtype=dtype, rngs=rngs)
    return fff_feedforward(config, implementation=implementation, rngs=rngs)


def fff_feedforward(config, *, implementation, rngs: nnx.Rngs) -> UltraFastFF:
    """The FFF-v2 feedforward of a transformer config (``hidden_size``, ``fff_depth``, ``fff_trees``,
    ``init_std``): the published "crammed" init, rescaled to ``init_std``."""
    ffn = UltraFastFF(config.hidden_size, config.fff_depth, n_trees=config.fff_trees, init="crammed",
                      implementation=implementation, rngs=rngs)
    if config.init_std != 0.02:  # the "crammed" scheme draws N(0, 0.02)
        for p in (ffn.w_in, ffn.w_out):
            p[...] = p[...] * (config.init_std / 0.02)
    return ffn


class TransformerLayer(nnx.Module):
    """Pre-LN: ``h + drop(attn(norm1(h)))``, then ``h + drop(ffn(norm2(h)))``.

    Called as ``layer(h, key_bias, update)``, it returns ``(h', update')`` whose sum is its output:
    the pending ``update`` of the layer before (None for the first) is added to ``h`` by ``norm1`` in
    the pass that normalises the sum, as the attention output is by ``norm2``; so every residual
    add rides on a layer norm (the last one on the encoder's final norm).
    """

    def __init__(self, config: ModelConfig, *, dtype, implementation, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config, dtype, rngs)
        self.norm2 = _layer_norm(config, dtype, rngs)
        self.attn = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.ffn = _make_ffn(config, dtype=dtype, implementation=implementation, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, h, key_bias, update=None):
        normed, h = (self.norm1(h), h) if update is None else self.norm1(update, h)   # one pass adds and norms
        normed, h = self.norm2(self.dropout(self.attn(normed, key_bias)), h)
        return h, self.dropout(self.ffn(normed))


class Encoder(nnx.Module):
    """Embedding, the layers and the final LayerNorm (the published ``ScriptableLM``)."""

    def __init__(self, config: ModelConfig, *, dtype, implementation, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embedding = Embedding(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            TransformerLayer(config, dtype=dtype, implementation=implementation, rngs=rngs)
            for _ in range(config.num_layers)])
        self.final_norm = _layer_norm(config, dtype, rngs)

    def __call__(self, input_ids, attention_mask=None) -> Float[Array, "batch seq hidden"]:
        input_ids = check_token_inputs(input_ids, attention_mask, self.config.max_seq_length)
        key_bias = None if attention_mask is None else additive_mask(attention_mask, self.dtype)
        h, update = self.embedding(input_ids), None
        for layer in self.layers:
            h, update = layer(h, key_bias, update)
        return self.final_norm(update, h)[0]


def check_token_inputs(input_ids, attention_mask, max_seq_length: int | None) -> Int[Array, "batch seq"]:
    """``input_ids`` as a jax array after checking it is ``(batch, seq)`` integer ids, that
    ``attention_mask`` (or None) has its shape and that ``seq`` fits ``max_seq_length`` (None: any)."""
    if not hasattr(input_ids, "shape") or len(input_ids.shape) != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {getattr(input_ids, 'shape', type(input_ids))}")
    input_ids = jnp.asarray(input_ids)
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} "
            f"(1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
    if max_seq_length is not None and input_ids.shape[1] > max_seq_length:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions; max_seq_length is {max_seq_length}")
    return input_ids


class _EncoderModel(nnx.Module):
    """A crammed-BERT encoder and its config: what the MLM and the classifier share."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, implementation: str | None = None,
                 rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config, dtype=dtype, implementation=implementation, rngs=rngs)

    def encode(self, input_ids, attention_mask=None) -> Float[Array, "batch seq hidden"]:
        """Final-normed hidden states ``(B, S, H)`` in the compute dtype."""
        return self.encoder(input_ids, attention_mask)


class CrammedBertMLM(_EncoderModel):
    """UltraFastBERT / crammed BERT for masked language modelling (``ScriptableLMForPreTraining``).

    Args:
        config: the model configuration.
        dtype: compute dtype (default float32); parameters stay float32.
        implementation: FFF-v2 implementation for every layer (``"xla"`` conditional gathers,
            ``"reference"`` the published masked dense form, ``"pallas"``, ``None`` = fastest).
        rngs: ``nnx.Rngs``; ``params`` initialises (normal ``init_std``, as the published
            ``_init_weights``), ``dropout`` drives dropout.

    Call ``model(input_ids (B, S) int, attention_mask (B, S) or None)`` -> logits ``(B, S, V)``
    (float32); ``attention_mask`` is 1 for a token and 0 for padding (additive -10000).
    """


    def decode(self, hidden: Float[Array, "*lead hidden"]) -> Float[Array, "*lead vocab"]:
        """The tied decoder ``hidden @ E.T`` (no bias), float32 logits."""
        table = self.encoder.embedding.word_embedding.embedding[...].astype(hidden.dtype)
        return jnp.einsum("...h,vh->...v", hidden, table, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None) -> Float[Array, "batch seq vocab"]:
        return self.decode(self.encode(input_ids, attention_mask))


def mlm_logits_at(
    model: CrammedBertMLM,
    input_ids,
    attention_mask,
    positions: Int[Array, "batch predictions"],
) -> Float[Array, "batch predictions vocab"]:
    """Sparse prediction: the decoder only at ``positions`` (B, P) of each row -> ``(B, P, V)``.

    The published trainer decodes a fixed number of masked positions (``round(0.25 B S)``) to keep
    shapes static; here the caller picks ``P`` positions per row.
    """
    hidden = model.encode(input_ids, attention_mask)
    if positions.ndim != 2 or positions.shape[0] != hidden.shape[0]:
        raise ValueError(f"positions must have shape ({hidden.shape[0]}, P), got {tuple(positions.shape)}")
    picked = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
    return model.decode(picked)


class Pooler(nnx.Module):
    """``Dropout(tanh(dense(mean over all positions)))``; padding positions are averaged too, as published."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, config.head_dim, dtype=dtype,
                                kernel_init=_normal(config.init_std), rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, hidden: Float[Array, "batch seq hidden"]) -> Float[Array, "batch head"]:
        return self.dropout(jnp.tanh(self.dense(jnp.mean(hidden, axis=1))))


class CrammedBertClassifier(_EncoderModel):
    """Sequence classification (``ScriptableLMForSequenceClassification``): encoder, average-pool
    head (dense ``head_dim`` + tanh + dropout) and a linear ``head`` to ``num_labels`` outputs.

    Arguments as :class:`CrammedBertMLM`. Call ``model(input_ids, attention_mask=None)`` ->
    ``(B, num_labels)`` float32 (``num_labels == 1``: a regression output).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, implementation: str | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, implementation=implementation, rngs=rngs)
        self.pooler = Pooler(config, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(config.head_dim, config.num_labels, dtype=dtype,
                               kernel_init=_normal(config.init_std), rngs=rngs)

    def __call__(self, input_ids, attention_mask=None) -> Float[Array, "batch labels"]:
        return self.head(self.pooler(self.encode(input_ids, attention_mask))).astype(jnp.float32)


def cast_parameters(model: nnx.Module, dtype) -> nnx.Module:
    """Store every parameter of ``model`` in ``dtype`` (in place; returns ``model``).

    For inference: a bfloat16 model (``dtype=jnp.bfloat16`` at construction) with bfloat16
    parameters skips the per-call float32 -> bfloat16 casts of every weight. Not for training
    (AdamW on bfloat16 parameters loses small updates).
    """
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), state))
    return model


def count_parameters(model: nnx.Module) -> int:
    """Number of trainable scalars (the tied decoder is the embedding, counted once)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


MODEL_KINDS = {"mlm": CrammedBertMLM, "classifier": CrammedBertClassifier}


def _lookup(tree, path: tuple):
    node = tree
    for key in path:
        # Orbax and JSON round trips turn the int keys of nnx.List items into strings.
        for candidate in (key, str(key)) + ((int(key),) if isinstance(key, str) and key.isdigit() else ()):
            if isinstance(node, dict) and candidate in node:
                node = node[candidate]
                break
        else:
            raise KeyError(".".join(map(str, path)))
    return node


def model_from_params(
    config: ModelConfig,
    params,
    *,
    kind: str = "mlm",
    dtype=jnp.float32,
    implementation: str | None = None,
    seed: int = 0,
):
    """A model holding ``params`` (a nested dict shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``;
    list indices may be ints or strings, leaves numpy or jax arrays), without a random init.

    The parameter tree is built abstractly (``nnx.eval_shape``), so a ``base`` model costs no
    initialisation. The dropout streams are seeded with ``seed``. The model comes back in eval mode,
    as from every loader (call ``.train()`` to fine-tune it). Raises ``ValueError`` naming a missing
    parameter or one whose shape does not fit ``config``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    cls = MODEL_KINDS[kind]
    return module_from_params(
        lambda rngs: cls(config, dtype=dtype, implementation=implementation, rngs=rngs), params, seed=seed)


def module_from_params(build, params, *, seed: int = 0) -> nnx.Module:
    """``build(rngs)``'s module holding ``params`` (as :func:`model_from_params` describes), in eval mode.

    ``build`` runs abstractly (``nnx.eval_shape``): no random init. Dropout streams get fresh keys
    from ``seed``. Raises ``ValueError`` naming a missing parameter or one of the wrong shape.
    """
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, param_state, other_state = nnx.split(abstract, nnx.Param, ...)

    def fill_param(path, spec):
        dotted = ".".join(str(getattr(k, "key", k)) for k in path)
        try:
            value = _lookup(params, tuple(getattr(k, "key", k) for k in path))
        except KeyError:
            raise ValueError(f"params has no entry {dotted!r} (expected shape {tuple(spec.shape)})") from None
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"params[{dotted!r}]: expected shape {tuple(spec.shape)}, found {tuple(value.shape)}")
        return jnp.asarray(value, spec.dtype)

    root = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def fill_other(spec):  # dropout streams: a fresh key each, counts at zero
        if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(root, next(counter))
        return jnp.zeros(spec.shape, spec.dtype)

    params_pure = jax.tree_util.tree_map_with_path(fill_param, nnx.to_pure_dict(param_state))
    other_pure = jax.tree.map(fill_other, nnx.to_pure_dict(other_state))
    nnx.replace_by_pure_dict(param_state, params_pure)
    nnx.replace_by_pure_dict(other_state, other_pure)
    model = nnx.merge(graphdef, param_state, other_state)
    model.eval()
    return model


def model_kind(params) -> str:
    """``"classifier"`` when the parameter dict has a pooler/head, else ``"mlm"``."""
    return "classifier" if isinstance(params, dict) and ("head" in params or "pooler" in params) else "mlm"
