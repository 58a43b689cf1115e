"""UltraFastBERT / crammed BERT for PyTorch and transformers, without cramming.

A self-contained modeling file: it imports only torch and transformers. ``fffjax export``
(:mod:`fffjax.convert.hf`) copies it into every folder it writes, and ``config.json``'s ``auto_map``
points the transformers Auto classes at it, so that in a process with only torch and transformers::

    AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)    # CrammedBertForMaskedLM
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    AutoModel.from_pretrained(folder, trust_remote_code=True)               # CrammedBertModel, the encoder
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)           # the tokenizer files beside it

(``AutoTokenizer`` reads ``config.json`` too, and without ``trust_remote_code`` asks before it
runs the code the ``auto_map`` names.) fffjax never imports this module.

The configuration is the published ``config.json``: its ``arch`` block (crammed BERT's resolved
architecture config) says everything the model needs, and the ``state_dict`` keys are those of the
published ``ScriptableLMForPreTraining`` / ``ScriptableLMForSequenceClassification`` (fffjax's
``docs/conventions.md``, "Crammed BERT state dict"), so the published weights load here too. The
forward pass is fffjax's ``fffjax.models.crammed_bert`` in eval mode, batch-first::

    h = Dropout(LayerNorm(E[ids] + s * PE[:S]))                    PE: sin and cos interleaved
    h = h + Dropout(Attn(LN1(h)));  h = h + Dropout(FFN(LN2(h)))    each pre-LN layer
    h = final_norm(h)
    MLM logits (B, S, V) = h @ E.T                                  the decoder is tied to E
    class logits = head(Dropout(tanh(pooler.dense(mean_s h))))      padding positions averaged too

Attention projects with one per-head interleaved ``query_key_value`` (head ``n``'s query, key and
value are outputs ``n*3d + [0:d], [d:2d], [2d:3d]``), scales scores by ``norm_factor = 1/sqrt(d)``
and adds ``(1 - attention_mask) * -10000`` per key. The FFF-v2 feedforward walks each of its K
trees of depth D from the root, going right where the node's logit is strictly positive, and sums
``gelu(z) * w_out`` over the ``D + 1`` neurons it visits; training takes the same path (gradients
reach only the visited rows, as in the published masked form). The dense twin is
``dense_out(gelu(dense_in(x)))``. GELU is the exact erf form. The only biases are the FFF input
layer's, the layer norms' and the classifier's (pooler and head).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

MASK_BIAS = -10000.0  # the published additive padding bias (not -inf: a fully padded row stays finite)

# arch entries whose other values ask for a model this file does not build: (section, key, built value)
_BUILT = [
    (None, "norm", "LayerNorm"), (None, "norm_scheme", "pre"), (None, "nonlin", "GELU"),
    (None, "decoder_bias", False), (None, "skip_head_transform", True), (None, "use_bias", False),
    (None, "final_norm", True), (None, "ffn_layer_frequency", 1),
    ("embedding", "pos_embedding", "scaled-sinusoidal"), ("embedding", "normalization", True),
    ("attention", "type", "self-attention"), ("attention", "causal_attention", False),
    ("attention", "skip_output_projection", False), ("attention", "qkv_bias", False),
    ("attention", "rotary_embedding", False), ("attention", "sequence_op", "torch-softmax"),
    ("classification_head", "pooler", "avg"), ("classification_head", "include_ff_layer", True),
    ("classification_head", "nonlin", "Tanh"), ("init", "type", "normal"),
]


def check_arch(arch) -> None:
    """Raises ``ValueError`` naming the first ``arch`` entry that asks for a model this file does not build."""
    if not isinstance(arch, dict):
        raise ValueError(f"config.arch must be the published arch dict, got {type(arch).__name__}")
    for section, key, built in _BUILT:
        block = arch if section is None else (arch.get(section) or {})
        if block.get(key) is not None and block[key] != built:
            name = key if section is None else f"{section}.{key}"
            raise ValueError(f"arch[{name!r}] = {block[key]!r} is not supported (this model builds {built!r})")
    if arch.get("intermed_type", "ff") not in ("fff", "ff"):
        raise ValueError(f"arch['intermed_type'] = {arch['intermed_type']!r} is not supported ('fff' or 'ff')")
    if arch["embedding"].get("embedding_dim", arch["hidden_size"]) != arch["hidden_size"]:
        raise ValueError("arch['embedding.embedding_dim'] must equal arch['hidden_size']")


class CrammedBertConfig(PreTrainedConfig):
    """The published ``config.json``: ``arch`` holds the architecture, the rest is transformers'.

    ``num_labels`` defaults to ``arch["num_labels"]`` when that is set (the published MLM files
    store null; a classifier then gets transformers' default of 2 labels).
    """

    model_type = "crammedBERT"
    arch: dict | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if (self.arch is not None and self.arch.get("num_labels") is not None and self.id2label is None
                and kwargs.get("num_labels") is None):
            kwargs["num_labels"] = int(self.arch["num_labels"])
        super().__post_init__(**kwargs)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """``(length, dim)`` float32: ``PE[t, 2i] = sin(t w_i)``, ``PE[t, 2i+1] = cos(t w_i)``,
    ``w_i = exp(-2i ln(10000) / dim)``, computed in float32 in the published order."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class ScaledSinusoidal(nn.Module):
    """``scale_factor * PE[:S]``; the table is computed per call (no buffer to initialise or load)."""

    def __init__(self, hidden_size: int, max_seq_length: int):
        super().__init__()
        self.hidden_size, self.max_seq_length = hidden_size, max_seq_length
        self.scale_factor = nn.Parameter(torch.full((1,), 1.0 / math.sqrt(hidden_size)))

    def forward(self, seq_length: int) -> torch.Tensor:
        if seq_length > self.max_seq_length:
            raise ValueError(f"input_ids has {seq_length} positions; this model's max_seq_length is "
                             f"{self.max_seq_length}")
        table = sinusoidal_positions(seq_length, self.hidden_size, self.scale_factor.device)
        return self.scale_factor * table.to(self.scale_factor.dtype)


class Embedding(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        emb = arch["embedding"]
        self.word_embedding = nn.Embedding(emb["vocab_size"], arch["hidden_size"], padding_idx=emb["pad_token_id"])
        self.pos_embedding = ScaledSinusoidal(arch["hidden_size"], emb["max_seq_length"])
        self.norm = nn.LayerNorm(arch["hidden_size"], eps=arch["norm_eps"])
        self.dropout = nn.Dropout(emb["dropout_prob"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embedding(input_ids) + self.pos_embedding(input_ids.shape[1])
        return self.dropout(self.norm(h))


class SelfAttention(nn.Module):
    """Per-head interleaved QKV without bias; scores scaled by the ``norm_factor`` buffer."""

    def __init__(self, hidden_size: int, attention: dict):
        super().__init__()
        self.num_heads = attention["num_attention_heads"]
        self.head_width = hidden_size // self.num_heads
        self.register_buffer("norm_factor", torch.tensor(1.0 / math.sqrt(self.head_width)))
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.dropout_prob = attention["dropout_prob"]

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_width)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))                    # (B, n, S, d)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_bias, dropout_p=self.dropout_prob if self.training else 0.0,
            scale=float(self.norm_factor))
        return context.transpose(1, 2).reshape(b, s, h)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, attention: dict):
        super().__init__()
        self.self_attention = SelfAttention(hidden_size, attention)
        self.dense = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        return self.dense(self.self_attention(x, key_bias))


class FastFeedforward(nn.Module):
    """FFF-v2: K trees of ``N = 2**(D+1) - 1`` GELU neurons in heap order, ``linear_in.weight (K*N, H)``,
    ``linear_in.bias (K*N,)``, ``linear_out.weight (H, K*N)``; each token visits ``D + 1`` neurons per tree."""

    def __init__(self, hidden_size: int, depth: int, n_trees: int):
        super().__init__()
        self.depth, self.n_trees = depth, n_trees
        self.n_nodes = 2 ** (depth + 1) - 1
        self.linear_in = nn.Linear(hidden_size, n_trees * self.n_nodes, bias=True)
        self.linear_out = nn.Linear(n_trees * self.n_nodes, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                               # (T, H)
        roots = torch.arange(self.n_trees, device=x.device) * self.n_nodes               # (K,)
        node = torch.zeros(tokens.shape[0], self.n_trees, dtype=torch.long, device=x.device)
        w_out = self.linear_out.weight.t()                                                # (K*N, H)
        y = torch.zeros(tokens.shape[0], w_out.shape[1], dtype=tokens.dtype, device=x.device)
        for _ in range(self.depth + 1):
            rows = roots + node                                                           # (T, K)
            z = torch.einsum("th,tkh->tk", tokens, self.linear_in.weight[rows]) + self.linear_in.bias[rows]
            y = y + torch.einsum("tk,tkh->th", F.gelu(z), w_out[rows])
            node = 2 * node + 1 + (z > 0).long()                                           # right iff z > 0
        return y.reshape(*x.shape[:-1], w_out.shape[1])


class DenseFeedforward(nn.Module):
    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.dense_in = nn.Linear(hidden_size, width, bias=False)
        self.dense_out = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_out(F.gelu(self.dense_in(x)))


class TransformerLayer(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        h = arch["hidden_size"]
        self.dropout = nn.Dropout(arch["hidden_dropout_prob"])
        self.norm1 = nn.LayerNorm(h, eps=arch["norm_eps"])
        self.norm2 = nn.LayerNorm(h, eps=arch["norm_eps"])
        self.attn = Attention(h, arch["attention"])
        if arch.get("intermed_type", "ff") == "fff":
            self.ffn = FastFeedforward(h, arch["intermed_depth"], arch["intermed_size"])
        else:
            self.ffn = DenseFeedforward(h, arch["intermed_size"])

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        h = h + self.dropout(self.attn(self.norm1(h), key_bias))
        return h + self.dropout(self.ffn(self.norm2(h)))


def init_block_weights(module: nn.Module, std: float) -> None:
    """Crammed BERT's init of one module of the blocks: linears and embeddings normal(``std``) with zero
    biases and a zero pad row, layer norms one and zero, ``norm_factor`` ``1/sqrt(head width)``."""
    if isinstance(module, nn.Linear):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        if not getattr(module.weight, "_is_hf_initialized", False):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, SelfAttention):
        init.constant_(module.norm_factor, 1.0 / math.sqrt(module.head_width))


class CrammedBertPreTrainedModel(PreTrainedModel):
    """Weight initialisation as crammed BERT's: every linear and the embedding normal(``init.std``)
    with zero biases and a zero pad row, layer norms one and zero, ``scale_factor`` ``1/sqrt(H)``."""

    config_class = CrammedBertConfig
    base_model_prefix = "encoder"
    _no_split_modules = ["TransformerLayer"]

    def __init__(self, config: CrammedBertConfig):
        super().__init__(config)
        check_arch(config.arch)
        self.arch = config.arch

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ScaledSinusoidal):
            init.constant_(module.scale_factor, 1.0 / math.sqrt(module.hidden_size))
        else:
            init_block_weights(module, self.arch["init"]["std"])


def check_token_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raises ``ValueError`` unless ``input_ids`` is ``(B, S)`` and ``attention_mask`` None or of its shape."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} "
                         f"(1 = token, 0 = padding), got {tuple(attention_mask.shape)}")


def _key_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, S)`` 1 = token / 0 = padding -> the additive per-key bias ``(B, 1, 1, S)``."""
    if attention_mask is None:
        return None
    return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_BIAS).to(dtype)


class WordEmbeddingAccess:
    """transformers' input-embedding accessors for a model whose input embedding is ``embedding.word_embedding``."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embedding = value


class CrammedBertModel(WordEmbeddingAccess, CrammedBertPreTrainedModel):
    """The encoder (the published ``ScriptableLM``): embedding, layers, final layer norm.

    ``forward(input_ids (B, S), attention_mask (B, S) or None, token_type_ids=None)`` returns
    ``last_hidden_state (B, S, H)``. ``token_type_ids`` is accepted for tokenizers that return it
    and ignored (crammed BERT has no segment embedding).
    """

    def __init__(self, config: CrammedBertConfig):
        super().__init__(config)
        self.embedding = Embedding(self.arch)
        self.layers = nn.ModuleList([TransformerLayer(self.arch) for _ in range(self.arch["num_transformer_layers"])])
        self.final_norm = nn.LayerNorm(self.arch["hidden_size"], eps=self.arch["norm_eps"])
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BaseModelOutput:
        check_token_inputs(input_ids, attention_mask)
        h = self.embedding(input_ids)
        key_bias = _key_bias(attention_mask, h.dtype)
        for layer in self.layers:
            h = layer(h, key_bias)
        return BaseModelOutput(last_hidden_state=self.final_norm(h))


class CrammedBertForMaskedLM(CrammedBertPreTrainedModel):
    """The published ``ScriptableLMForPreTraining``: logits ``(B, S, V)`` from the decoder tied to the
    word embedding; with ``labels (B, S)`` (-100 = ignored) also the cross-entropy ``loss``."""

    _tied_weights_keys = {"decoder.weight": "encoder.embedding.word_embedding.weight"}

    def __init__(self, config: CrammedBertConfig):
        super().__init__(config)
        self.encoder = CrammedBertModel(config)
        self.decoder = nn.Linear(self.arch["hidden_size"], self.arch["embedding"]["vocab_size"], bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> MaskedLMOutput:
        logits = self.decoder(self.encoder(input_ids, attention_mask).last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class Pooler(nn.Module):
    """``Dropout(tanh(dense(mean over all positions)))``: padding positions are averaged too, as published."""

    def __init__(self, hidden_size: int, head: dict):
        super().__init__()
        self.dense = nn.Linear(hidden_size, head["head_dim"])
        self.dropout = nn.Dropout(head["classifier_dropout"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.tanh(self.dense(hidden.mean(dim=1))))


class CrammedBertForSequenceClassification(CrammedBertPreTrainedModel):
    """The published ``ScriptableLMForSequenceClassification``: logits ``(B, num_labels)``; with
    ``labels`` also the ``loss`` (mean squared error when ``num_labels == 1``, cross-entropy for
    integer labels, binary cross-entropy for float multi-label targets)."""

    def __init__(self, config: CrammedBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = CrammedBertModel(config)
        self.pooler = Pooler(self.arch["hidden_size"], self.arch["classification_head"])
        self.head = nn.Linear(self.arch["classification_head"]["head_dim"], self.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.head(self.pooler(self.encoder(input_ids, attention_mask).last_hidden_state))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                loss = F.cross_entropy(logits.float(), labels.reshape(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)
