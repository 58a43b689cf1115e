"""fffjax's causal decoder for PyTorch and transformers, without fffjax.

A modeling file that imports only torch, transformers and its sibling ``modeling_crammed_bert.py``,
whose blocks it shares as fffjax's decoder shares the encoder's. ``fffjax export`` copies both beside
the weights of a decoder checkpoint, and ``config.json``'s ``auto_map`` points the transformers Auto
classes here, so that in a process with only torch and transformers::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)   # FffDecoderForCausalLM
    AutoModel.from_pretrained(folder, trust_remote_code=True)              # FffDecoderModel
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)          # the tokenizer files beside it

fffjax never imports this module.

``config.json`` holds the fields of fffjax's ``DecoderConfig`` (``vocab_size``, ``hidden_size``,
``num_layers``, ``num_heads``, ``max_seq_length``, ``ffn``, ``dense_width``, ``fff_depth``,
``fff_trees``, ``norm_eps``, ``dropout``, ``pad_token_id``, ``init_std``). The forward pass is
``fffjax.models.decoder.CausalLM``'s in eval mode, batch-first::

    positions = max(cumsum(attention_mask) - 1, 0)        each token's index among the real tokens of its row
    h = Dropout(E[ids] + P[positions])                    learned absolute positions
    h = h + Dropout(Attn(LN1(h)));  h = h + Dropout(FFN(LN2(h)))    each pre-LN layer (ffn "none": no second half)
    logits (B, S, V) = final_norm(h) @ E.T                the output layer tied to E, no bias

so a left-padded prompt gets the positions it has alone. Attention is crammed BERT's (per-head
interleaved ``query_key_value`` without bias, scores scaled by ``norm_factor``) with a causal mask and
``(1 - attention_mask) * -10000`` added per key. The feedforward (``ffn``): ``dense``, width
``dense_width`` (4H when null); ``fff``, FFF-v2 with ``fff_trees`` trees of depth ``fff_depth``;
``narrow``, dense of width ``fff_trees * (fff_depth + 1)``; ``none``, no feedforward and no ``norm2``.

The model keeps no key/value cache: ``generate`` runs with ``use_cache=False`` (the exported folder's
``generation_config.json`` says so), every step over the whole sequence, whose attention mask gives
the positions; left-pad batched prompts (``tokenizer.padding_side = "left"``).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .modeling_crammed_bert import (
    MASK_BIAS,
    Attention,
    DenseFeedforward,
    FastFeedforward,
    WordEmbeddingAccess,
    check_token_inputs,
    init_block_weights,
)

FFN_KINDS = ("dense", "fff", "narrow", "none")


class FffDecoderConfig(PreTrainedConfig):
    """fffjax's ``DecoderConfig`` fields; transformers' names ``num_hidden_layers``,
    ``num_attention_heads`` and ``max_position_embeddings`` read ``num_layers``, ``num_heads`` and
    ``max_seq_length``."""

    model_type = "fff_decoder"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "max_seq_length"}
    vocab_size: int = 4096
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_seq_length: int = 128
    ffn: str = "fff"
    dense_width: int | None = None
    fff_depth: int = 11
    fff_trees: int = 1
    norm_eps: float = 1e-5
    dropout: float = 0.1
    pad_token_id: int | None = 0
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"config.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"config.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        super().__post_init__(**kwargs)


def feedforward(config: FffDecoderConfig) -> nn.Module | None:
    """The feedforward of one layer for ``config.ffn`` (None for ``"none"``)."""
    if config.ffn == "fff":
        return FastFeedforward(config.hidden_size, config.fff_depth, config.fff_trees)
    if config.ffn == "narrow":
        return DenseFeedforward(config.hidden_size, config.fff_trees * (config.fff_depth + 1))
    if config.ffn == "dense":
        return DenseFeedforward(config.hidden_size, config.dense_width or 4 * config.hidden_size)
    return None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's index among the real tokens of its row, ``max(cumsum(mask) - 1, 0)``, ``(B, S)`` long."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def attention_bias(attention_mask: torch.Tensor | None, seq_length: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """The additive attention bias ``(B or 1, 1, S, S)``: ``-inf`` on the keys after each query,
    ``-10000`` on padding keys (``attention_mask`` 0)."""
    causal = torch.full((seq_length, seq_length), float("-inf"), dtype=dtype, device=device).triu(1)
    if attention_mask is None:
        return causal[None, None]
    padding = (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_BIAS
    return causal + padding


class DecoderEmbedding(nn.Module):
    """``Dropout(E[ids] + P[positions])``: word and learned absolute position embeddings, no norm."""

    def __init__(self, config: FffDecoderConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_seq_length, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word_embedding(input_ids) + self.position_embedding(position_ids))


class DecoderLayer(nn.Module):
    """Pre-LN: ``h + drop(attn(norm1(h)))``, then ``h + drop(ffn(norm2(h)))`` (``ffn`` "none": the first half)."""

    def __init__(self, config: FffDecoderConfig):
        super().__init__()
        h, ffn = config.hidden_size, feedforward(config)
        self.dropout = nn.Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(h, eps=config.norm_eps)
        self.norm2 = None if ffn is None else nn.LayerNorm(h, eps=config.norm_eps)
        self.attn = Attention(h, {"num_attention_heads": config.num_heads, "dropout_prob": config.dropout})
        self.ffn = ffn

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = h + self.dropout(self.attn(self.norm1(h), bias))
        return h if self.ffn is None else h + self.dropout(self.ffn(self.norm2(h)))


class FffDecoderPreTrainedModel(PreTrainedModel):
    """Weight initialisation as fffjax's decoder: every linear and embedding normal(``init_std``), zero
    biases, layer norms one and zero."""

    config_class = FffDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        init_block_weights(module, self.config.init_std)


class FffDecoderModel(WordEmbeddingAccess, FffDecoderPreTrainedModel):
    """The decoder without its output layer: ``forward(input_ids (B, S), attention_mask (B, S) or None,
    position_ids (B, S) or None)`` returns the final-normed ``last_hidden_state (B, S, H)``. Without
    ``position_ids`` they come from ``attention_mask`` (see the module docstring), or count 0, 1, ...
    when there is no mask."""

    def __init__(self, config: FffDecoderConfig):
        super().__init__(config)
        self.embedding = DecoderEmbedding(config)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        check_token_inputs(input_ids, attention_mask)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("this model keeps no key/value cache: pass the whole sequence (use_cache=False)")
        batch, seq = input_ids.shape
        if seq > self.config.max_seq_length:
            raise ValueError(f"input_ids has {seq} positions; this model's max_seq_length is "
                             f"{self.config.max_seq_length}")
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(seq, device=input_ids.device).expand(batch, seq))
        h = self.embedding(input_ids, position_ids)
        bias = attention_bias(attention_mask, seq, h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, bias)
        return BaseModelOutput(last_hidden_state=self.final_norm(h))


class FffDecoderForCausalLM(FffDecoderPreTrainedModel, GenerationMixin):
    """``fffjax.models.decoder.CausalLM``: logits ``(B, S, V)`` from the output layer tied to the word
    embedding, position ``i`` predicting token ``i + 1``; with ``labels (B, S)`` (-100 = ignored) also
    the cross-entropy ``loss`` of each position's prediction of the next label."""

    _tied_weights_keys = {"lm_head.weight": "model.embedding.word_embedding.weight"}

    def __init__(self, config: FffDecoderConfig):
        super().__init__(config)
        self.model = FffDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
