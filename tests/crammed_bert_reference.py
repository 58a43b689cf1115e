"""PyTorch crammed BERT written from ``docs/conventions.md``, "Crammed BERT" (the published
``cramming/architectures/crammed_bert.py`` and the components it imports), for parity tests.

Same module names, parameter/buffer registration order and hence the same ``state_dict`` keys
and order as the published ``ScriptableLMForPreTraining`` (167 keys for UltraFastBERT-1x11-long)
and ``ScriptableLMForSequenceClassification``. Internally sequence-first (``[S, B, H]``), as the
published ``SeqFirstSelfAttention``. Built from an ``arch`` dict (the published ``config.json``
block), so the exporter's ``config.json`` is exercised too. A plain module of classes, imported by
tests after ``pytest.importorskip("torch")``.
"""

import math

import torch
from torch_reference import UltraFastFFReference  # FFF-v2, the published masked form


class SinusoidalPositional(torch.nn.Module):
    """``scale_factor * pe[:S]``; ``pe`` interleaved sin/cos, a non-persistent buffer."""

    def __init__(self, embedding_dim: int, max_seq_length: int):
        super().__init__()
        pe = torch.zeros(max_seq_length, embedding_dim)
        position = torch.arange(0, max_seq_length, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, embedding_dim, 2).float() * (-math.log(10000.0) / embedding_dim))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.scale_factor = torch.nn.Parameter(torch.tensor([1.0 / embedding_dim**0.5]))
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, input_ids):
        return self.scale_factor * self.pe[:, : input_ids.shape[1], :]


class EmbeddingComponent(torch.nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        emb = arch["embedding"]
        self.word_embedding = torch.nn.Embedding(
            emb["vocab_size"], emb["embedding_dim"], padding_idx=emb["pad_token_id"]
        )
        self.pos_embedding = SinusoidalPositional(emb["embedding_dim"], emb["max_seq_length"])
        self.dropout = torch.nn.Dropout(emb["dropout_prob"])
        self.norm = torch.nn.LayerNorm(emb["embedding_dim"], eps=arch["norm_eps"])

    def forward(self, input_ids):
        embeds = self.word_embedding(input_ids) + self.pos_embedding(input_ids)
        return self.dropout(self.norm(embeds))


class SeqFirstSelfAttention(torch.nn.Module):
    """Megatron layout: ``query_key_value`` output viewed ``[S, B, heads, 3*d]`` and split per head."""

    def __init__(self, hidden_size: int, attention: dict):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_attention_heads = attention["num_attention_heads"]
        self.hidden_per_head = hidden_size // self.num_attention_heads
        self.register_buffer("norm_factor", torch.tensor(self.hidden_per_head).rsqrt())
        self.query_key_value = torch.nn.Linear(hidden_size, 3 * hidden_size, bias=attention["qkv_bias"])
        self.output_dim = hidden_size
        self.attention_dropout = torch.nn.Dropout(attention["dropout_prob"])

    def forward(self, hidden_states, attention_mask=None):
        mixed = self.query_key_value(hidden_states)                                    # [S, B, 3H]
        mixed = mixed.view(mixed.size()[:-1] + (self.num_attention_heads, 3 * self.hidden_per_head))
        query, key, value = torch.split(mixed, [self.hidden_per_head] * 3, dim=3)     # [S, B, n, d]
        s_q, b, n, d = query.shape
        s_k = key.shape[0]
        query = query.reshape(s_q, b * n, d)
        key = key.reshape(s_k, b * n, d)
        scores = torch.baddbmm(
            torch.empty(b * n, s_q, s_k, dtype=query.dtype), query.transpose(0, 1),
            key.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=self.norm_factor).view(b, n, s_q, s_k)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.attention_dropout(torch.softmax(scores, dim=-1))
        value = value.reshape(s_k, b * n, d).transpose(0, 1)                          # [B n, S, d]
        context = torch.bmm(probs.view(b * n, s_q, s_k), value).view(b, n, s_q, d)
        context = context.permute(2, 0, 1, 3).contiguous()                              # [S, B, n, d]
        return context.view(s_q, b, self.hidden_size)


class AttentionComponent(torch.nn.Module):
    def __init__(self, hidden_size: int, attention: dict, use_bias: bool):
        super().__init__()
        self.self_attention = SeqFirstSelfAttention(hidden_size, attention)
        self.dense = torch.nn.Linear(hidden_size, hidden_size, bias=use_bias)

    def forward(self, hidden_states, attention_mask=None):
        return self.dense(self.self_attention(hidden_states, attention_mask))


class FFNComponent(torch.nn.Module):
    def __init__(self, hidden_size: int, intermed_size: int, use_bias: bool):
        super().__init__()
        self.dense_in = torch.nn.Linear(hidden_size, intermed_size, bias=use_bias)
        self.nonlin = torch.nn.GELU()
        self.dense_out = torch.nn.Linear(intermed_size, hidden_size, bias=use_bias)

    def forward(self, hidden_states):
        return self.dense_out(self.nonlin(self.dense_in(hidden_states)))


class TransformerLayer(torch.nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        h = arch["hidden_size"]
        self.dropout = torch.nn.Dropout(arch["hidden_dropout_prob"])
        self.norm1 = torch.nn.LayerNorm(h, eps=arch["norm_eps"])
        self.norm2 = torch.nn.LayerNorm(h, eps=arch["norm_eps"])
        self.attn = AttentionComponent(h, arch["attention"], arch["use_bias"])
        if arch.get("intermed_type", "ff") == "fff":
            self.ffn = UltraFastFFReference(h, h, arch["intermed_depth"], arch["intermed_size"])
        else:
            self.ffn = FFNComponent(h, arch["intermed_size"], arch["use_bias"])

    def forward(self, states, attention_mask=None):
        states = states + self.dropout(self.attn(self.norm1(states), attention_mask))
        return states + self.dropout(self.ffn(self.norm2(states)))


class ScriptableLM(torch.nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        self.embedding = EmbeddingComponent(arch)
        self.layers = torch.nn.ModuleList([TransformerLayer(arch) for _ in range(arch["num_transformer_layers"])])
        self.final_norm = torch.nn.LayerNorm(arch["hidden_size"], eps=arch["norm_eps"])

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is not None:
            attention_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        hidden = self.embedding(input_ids).transpose(0, 1).contiguous()
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
        return self.final_norm(hidden.transpose(0, 1).contiguous())


def _init_module(module, std: float) -> None:
    if isinstance(module, torch.nn.Linear):
        module.weight.data.normal_(mean=0.0, std=std)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, torch.nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, torch.nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)


class ScriptableLMForPreTraining(torch.nn.Module):
    """Returns flattened ``(B*S, vocab)`` logits, as the published ``outputs`` without labels."""

    def __init__(self, arch: dict):
        super().__init__()
        self.encoder = ScriptableLM(arch)
        self.prediction_head = torch.nn.Identity()
        emb = arch["embedding"]
        self.decoder = torch.nn.Linear(emb["embedding_dim"], emb["vocab_size"], bias=arch["decoder_bias"])
        self.decoder.weight = self.encoder.embedding.word_embedding.weight
        for module in self.modules():
            _init_module(module, arch["init"]["std"])

    def forward(self, input_ids, attention_mask=None):
        outputs = self.encoder(input_ids, attention_mask)
        return self.decoder(self.prediction_head(outputs.view(-1, outputs.shape[-1])))


class PoolingComponent(torch.nn.Module):
    def __init__(self, head: dict, hidden_size: int):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, head["head_dim"])
        self.activation = torch.nn.Tanh()
        self.dropout = torch.nn.Dropout(head["classifier_dropout"])

    def forward(self, hidden_states):
        return self.dropout(self.activation(self.dense(hidden_states.mean(dim=1))))


class ScriptableLMForSequenceClassification(torch.nn.Module):
    """Returns ``(B, num_labels)`` logits."""

    def __init__(self, arch: dict):
        super().__init__()
        self.num_labels = arch["num_labels"]
        self.encoder = ScriptableLM(arch)
        self.pooler = PoolingComponent(arch["classification_head"], arch["hidden_size"])
        self.head = torch.nn.Linear(arch["classification_head"]["head_dim"], self.num_labels)
        for module in self.modules():
            _init_module(module, arch["init"]["std"])

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.pooler(self.encoder(input_ids, attention_mask)))
