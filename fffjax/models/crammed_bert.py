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
the transpose of torch's ``weight``). Parameters are float32; ``dtype`` sets the compute dtype
(e.g. bfloat16; LayerNorm statistics stay float32, Flax's rule) and the MLM and class logits come
out in float32 (:func:`cast_parameters` stores the weights in the compute dtype for inference).
A new model is in train mode (dropout on); ``model.eval()`` / ``model.train()`` switch it. Dropout
draws from the ``dropout`` stream of the ``rngs`` given at construction: run training steps under
``nnx.jit`` (or split/merge and keep the returned state) so the stream advances.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import ops, parallel
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


def additive_mask(attention_mask, dtype) -> Array:
    """``(B, S)`` 1 = token / 0 = padding -> ``(B, 1, 1, S)`` bias ``(1 - mask) * -10000``."""
    mask = jnp.asarray(attention_mask).astype(dtype)
    return ((1.0 - mask) * MASK_BIAS).astype(dtype)[:, None, None, :]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def _kernel_choice(what: str, choices: tuple[str, ...], implementation: str | None, dtype) -> str:
    """``implementation`` if it is one of ``choices`` (a ``ValueError`` naming ``what`` otherwise); for
    ``None``, ``choices[1]`` on a GPU with 16-bit inputs and ``choices[0]`` (XLA) elsewhere."""
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        return choices[1] if on_gpu and jnp.dtype(dtype).itemsize == 2 else choices[0]
    if implementation not in choices:
        raise ValueError(f"{what} implementation must be one of {choices} or None, got {implementation!r}")
    return implementation


def _set_implementation(model: nnx.Module, module_type: type, implementation: str | None) -> None:
    for _, module in nnx.iter_graph(model):
        if isinstance(module, module_type):
            module.implementation = implementation


NORM_IMPLEMENTATIONS = ("xla", "pallas")


def norm_implementation(implementation: str | None, dtype) -> str:
    """The layer-norm kernel to run: ``implementation``, or for ``None`` the one-pass Pallas kernel
    (``pallas_kernels.layer_norm``) on a GPU with 16-bit inputs and XLA's otherwise (float32 keeps
    XLA's, whose rounding the torch parity tests pin)."""
    return _kernel_choice("norm", NORM_IMPLEMENTATIONS, implementation, dtype)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (``scale``, ``bias``; two-pass variance, as torch's: ``E[x^2] - E[x]^2`` loses
    digits at eps 1e-12) with a kernel switch and the residual add fused in.

    ``norm(x)`` is the layer norm of ``x``; ``norm(x, residual)`` returns ``(norm(x + residual),
    x + residual)`` from one pass. ``implementation`` as :func:`norm_implementation` (switch it with
    :func:`set_norm_implementation`); on the CPU ``"pallas"`` runs in interpret mode (tests).
    """

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        super().__init__(config.hidden_size, epsilon=config.norm_eps, dtype=dtype, use_fast_variance=False,
                         rngs=rngs)
        self.implementation: str | None = None

    def __call__(self, x: Float[Array, "*lead hidden"], residual=None):
        if norm_implementation(self.implementation, self.dtype) == "xla":
            h = x if residual is None else x + residual
            with jax.numpy_dtype_promotion("standard"):   # flax's statistics promote 16-bit inputs to float32
                y = super().__call__(h)
            return y if residual is None else (y, h)
        from pallas_kernels.layer_norm import layer_norm

        def norm(*arrays):   # (x[, residual], scale, bias): per device on a data mesh (parallel.rows_per_device)
            *rows, scale, bias = arrays
            return layer_norm(rows[0], scale, bias, rows[1] if len(rows) == 2 else None, eps=self.epsilon,
                              interpret=jax.default_backend() != "gpu")

        rows = (x.astype(self.dtype),) + (() if residual is None else (residual.astype(self.dtype),))
        return parallel.rows_per_device(norm, rows, (self.scale[...], self.bias[...]))


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


ATTENTION_IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


def attention_implementation(implementation: str | None, dtype, seq_len: int | None = None) -> str:
    """The fused attention kernel to run: ``implementation``, or for ``None`` on a GPU with 16-bit
    inputs ``"pallas"`` (``pallas_kernels.attention``, which reads the fused QKV projection as it is:
    2.5x cuDNN with its q/k/v copies at ``base`` shapes on the H200) up to its
    ``MAX_SEQ`` tokens and cuDNN's flash attention beyond; XLA's fused softmax elsewhere (float32
    keeps it: the torch parity tests pin its rounding). Off a GPU ``"pallas"`` runs in interpret mode."""
    choice = _kernel_choice("attention", ATTENTION_IMPLEMENTATIONS, implementation, dtype)
    if implementation is None and choice == "pallas" and seq_len is not None:
        from pallas_kernels.attention import MAX_SEQ

        return "pallas" if seq_len <= MAX_SEQ else "cudnn"
    return choice


def fused_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dim"],
    mask_bias,
    scale: float,
    implementation: str | None = None,
) -> Float[Array, "batch seq heads dim"]:
    """``softmax(q.k * scale + mask_bias) v`` per head through ``jax.nn.dot_product_attention``
    (float32 softmax; ``implementation`` ``"xla"``, ``"cudnn"`` or ``None``: cuDNN on a GPU with
    16-bit inputs, XLA otherwise). ``mask_bias`` is ``(B, 1, 1, S)`` or None; it is broadcast to the
    ``(B, 1, S, S)`` that cuDNN requires. (The Pallas kernel takes the fused projection instead:
    ``pallas_kernels.attention.attention``.)"""
    if implementation == "pallas":
        raise ValueError("fused_attention takes implementation 'xla', 'cudnn' or None; the Pallas kernel reads "
                         "the fused projection: pallas_kernels.attention.attention(qkv, ...)")
    implementation = _kernel_choice("attention", ("xla", "cudnn"), implementation, q.dtype)
    b, s = q.shape[:2]
    bias = None if mask_bias is None else jnp.broadcast_to(mask_bias, (b, 1, s, s)).astype(q.dtype)
    with jax.numpy_dtype_promotion("standard"):   # jax's XLA attention promotes 16-bit logits to float32 implicitly
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with crammed BERT's per-head interleaved QKV, no biases.

    ``query_key_value.kernel (H, 3H)``: output column ``h*3d + [0:d]`` is head h's query,
    ``[d:2d]`` its key, ``[2d:3d]`` its value (d = H / heads), i.e. the (B, S, 3H) projection is
    viewed as (B, S, heads, 3, d). Scores ``q.k * norm_factor + mask``, softmax, dropout on the
    probabilities, then the output projection ``dense``.

    Without active dropout (eval mode, or rate 0) the scores go through a fused kernel (float32
    softmax) picked by ``implementation`` (``"xla"`` or ``"cudnn"``: ``jax.nn.dot_product_attention``
    on ``q, k, v`` from :meth:`project_qkv`; ``"pallas"``: ``pallas_kernels.attention`` on the fused
    ``(B, S, 3H)`` projection; ``None``: see :func:`attention_implementation`; switch it with
    :func:`set_attention_implementation`). Attention dropout needs the probabilities, which the
    fused kernels never write: with it, the explicit einsum form runs (softmax in the compute dtype).
    """

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_width = config.num_heads, config.attention_head_width
        self.norm_factor = config.norm_factor
        self.implementation: str | None = None
        h = config.hidden_size
        self.query_key_value = nnx.Linear(h, 3 * h, use_bias=False, dtype=dtype,
                                          kernel_init=_normal(config.init_std), rngs=rngs)
        self.dense = nnx.Linear(h, h, use_bias=False, dtype=dtype, kernel_init=_normal(config.init_std), rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def project_qkv(self, x: Float[Array, "batch seq hidden"]) -> tuple[Array, Array, Array]:
        """``q, k, v`` ``(B, S, heads, d)``: one matmul each, against the kernel's query, key and value
        columns, so that no per-head slicing of one ``(B, S, 3H)`` product is needed. (On the H200,
        XLA's dot merger still joins the three into one GEMM followed by two slice copies: 1.0 ms of a
        10.0 ms ``base`` encode at 256 x 128 bf16 tokens, against 1.5 ms of slices for the per-head
        view of the fused product; ``experiments/results/bert_gpu.md``.)"""
        linear = self.query_key_value
        kernel = linear.kernel[...].reshape(x.shape[-1], self.num_heads, 3, self.head_width)
        x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=linear.dtype)
        return tuple(jnp.einsum("bsh,hnd->bsnd", x, kernel[:, :, i, :], precision=linear.precision)
                     for i in range(3))

    def __call__(self, x: Float[Array, "batch seq hidden"], mask_bias) -> Float[Array, "batch seq hidden"]:
        b, s, h = x.shape
        fused = self.dropout.deterministic or self.dropout.rate == 0
        kernel = attention_implementation(self.implementation, self.query_key_value.dtype or x.dtype, s)
        if fused and kernel == "pallas":
            from pallas_kernels.attention import attention

            def attend(qkv, *key_bias):   # per device on a data mesh (parallel.rows_per_device)
                return attention(qkv, key_bias[0] if key_bias else None, num_heads=self.num_heads,
                                 scale=float(self.norm_factor), interpret=jax.default_backend() != "gpu")

            rows = (self.query_key_value(x),) + (() if mask_bias is None else (mask_bias.reshape(b, s),))
            return self.dense(parallel.rows_per_device(attend, rows))
        q, k, v = self.project_qkv(x)
        if fused:
            context = fused_attention(q, k, v, mask_bias, float(self.norm_factor), kernel)
            return self.dense(context.reshape(b, s, h))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * jnp.asarray(self.norm_factor, q.dtype)
        if mask_bias is not None:
            scores = scores + mask_bias.astype(scores.dtype)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, h)
        return self.dense(context)


GELU_IMPLEMENTATIONS = ("xla", "pallas")


def gelu_implementation(implementation: str | None, dtype) -> str:
    """The dense feedforward's exact-GELU kernel: ``implementation``, or for ``None`` the elementwise
    Pallas kernel (``pallas_kernels.gelu``) on a GPU with 16-bit inputs and ``jax.nn.gelu`` otherwise.
    On the H200, XLA compiles ``jax.nn.gelu(approximate=False)`` of a ``base`` layer's 32768 x 3072
    bf16 activations into a 0.30 ms pass, the Pallas kernel takes 0.13 ms (the copy rate: 0.095 ms;
    ``experiments/results/dense_ff_gpu.md``): without it the dense twin would pay for XLA's ``erfc``
    and every FFF speed-up would be inflated by 2.7 ms per ``base`` encode. Float32 keeps XLA's,
    whose rounding the torch parity tests pin."""
    return _kernel_choice("gelu", GELU_IMPLEMENTATIONS, implementation, dtype)


class DenseFF(nnx.Module):
    """Crammed BERT's ``FFNComponent`` without biases: ``dense_out(GELU(dense_in(x)))``, exact GELU
    through the kernel picked by ``implementation`` (see :func:`gelu_implementation`; switch it with
    :func:`set_gelu_implementation`)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        h, w = config.hidden_size, config.dense_width
        self.implementation: str | None = None
        self.dense_in = nnx.Linear(h, w, use_bias=False, dtype=dtype, kernel_init=_normal(config.init_std), rngs=rngs)
        self.dense_out = nnx.Linear(w, h, use_bias=False, dtype=dtype, kernel_init=_normal(config.init_std), rngs=rngs)

    def __call__(self, x: Float[Array, "*lead hidden"]) -> Float[Array, "*lead hidden"]:
        pre = self.dense_in(x)
        if gelu_implementation(self.implementation, pre.dtype) == "xla":
            return self.dense_out(jax.nn.gelu(pre, approximate=False))
        from pallas_kernels.gelu import gelu

        act = parallel.rows_per_device(lambda h: gelu(h, interpret=jax.default_backend() != "gpu"), (pre,))
        return self.dense_out(act)


def _fff_forward(ffn: UltraFastFF, x):
    # UltraFastFF with its parameters cast to the compute dtype (a bf16 model routes on bf16 logits).
    w_in, b_in, w_out = (p[...].astype(x.dtype) for p in (ffn.w_in, ffn.b_in, ffn.w_out))
    if ffn.mesh is not None and ffn.tree_parallel_axis is not None:   # see parallel.set_tree_parallel
        return parallel.fff_v2_tree_parallel(x, w_in, b_in, w_out, depth=ffn.depth, n_trees=ffn.n_trees,
                                             mesh=ffn.mesh, axis=ffn.tree_parallel_axis,
                                             implementation=ffn.implementation)
    # Per device on a data mesh: the Pallas and FFI implementations are custom calls GSPMD cannot split.
    return parallel.rows_per_device(
        lambda x, w_in, b_in, w_out: ops.fff_v2_hard(x, w_in, b_in, w_out, depth=ffn.depth, n_trees=ffn.n_trees,
                                                     implementation=ffn.implementation),
        (x,), (w_in, b_in, w_out))


def _make_ffn(config: ModelConfig, *, dtype, implementation, rngs: nnx.Rngs):
    if config.ffn == "dense":
        return DenseFF(config, dtype=dtype, rngs=rngs)
    ffn = UltraFastFF(config.hidden_size, config.fff_depth, n_trees=config.fff_trees, init="crammed",
                      implementation=implementation, rngs=rngs)
    if config.init_std != 0.02:  # the "crammed" scheme draws N(0, 0.02)
        for p in (ffn.w_in, ffn.w_out):
            p[...] = p[...] * (config.init_std / 0.02)
    return ffn


class TransformerLayer(nnx.Module):
    """Pre-LN: ``h + drop(attn(norm1(h)))``, then ``h + drop(ffn(norm2(h)))``.

    Called as ``layer(h, mask_bias, update)``, it returns ``(h', update')`` whose sum is its output:
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

    def __call__(self, h, mask_bias, update=None):
        normed, h = (self.norm1(h), h) if update is None else self.norm1(update, h)   # one pass adds and norms
        normed, h = self.norm2(self.dropout(self.attn(normed, mask_bias)), h)
        out = _fff_forward(self.ffn, normed) if isinstance(self.ffn, UltraFastFF) else self.ffn(normed)
        return h, self.dropout(out)


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
        input_ids = _check_inputs(input_ids, attention_mask, self.config)
        mask_bias = None if attention_mask is None else additive_mask(attention_mask, self.dtype)
        h, update = self.embedding(input_ids), None
        for layer in self.layers:
            h, update = layer(h, mask_bias, update)
        return self.final_norm(update, h)[0]


def _check_inputs(input_ids, attention_mask, config: ModelConfig):
    if not hasattr(input_ids, "shape") or len(input_ids.shape) != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {getattr(input_ids, 'shape', type(input_ids))}")
    input_ids = jnp.asarray(input_ids)
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} "
            f"(1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
    if input_ids.shape[1] > config.max_seq_length:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions; max_seq_length is {config.max_seq_length}")
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


def set_fff_implementation(model: nnx.Module, implementation: str | None) -> None:
    """Switch every FFF-v2 layer of ``model`` to ``implementation`` (in place)."""
    _set_implementation(model, UltraFastFF, implementation)


def set_attention_implementation(model: nnx.Module, implementation: str | None) -> None:
    """Switch every attention block of ``model`` to ``implementation`` (``"xla"``, ``"cudnn"``,
    ``"pallas"`` or ``None``: see :func:`attention_implementation`; in place; used when dropout is off)."""
    attention_implementation(implementation, jnp.float32)   # refuse an unknown name here, not at call time
    _set_implementation(model, SelfAttention, implementation)


def set_norm_implementation(model: nnx.Module, implementation: str | None) -> None:
    """Switch every layer norm of ``model`` to ``implementation`` (``"xla"``, ``"pallas"`` or ``None`` =
    Pallas on a GPU for 16-bit compute; in place)."""
    norm_implementation(implementation, jnp.float32)   # refuse an unknown name here, not at call time
    _set_implementation(model, LayerNorm, implementation)


def set_gelu_implementation(model: nnx.Module, implementation: str | None) -> None:
    """Switch the exact GELU of every dense feedforward of ``model`` to ``implementation`` (``"xla"``,
    ``"pallas"`` or ``None`` = Pallas on a GPU for 16-bit compute; in place; FFF layers have none)."""
    gelu_implementation(implementation, jnp.float32)   # refuse an unknown name here, not at call time
    _set_implementation(model, DenseFF, implementation)


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
    initialisation. The dropout streams are seeded with ``seed``. Raises ``ValueError`` naming a
    missing parameter or one whose shape does not fit ``config``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    cls = MODEL_KINDS[kind]
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, implementation=implementation, rngs=nnx.Rngs(seed)))
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
    return nnx.merge(graphdef, param_state, other_state)


def model_kind(params) -> str:
    """``"classifier"`` when the parameter dict has a pooler/head, else ``"mlm"``."""
    return "classifier" if isinstance(params, dict) and ("head" in params or "pooler" in params) else "mlm"
