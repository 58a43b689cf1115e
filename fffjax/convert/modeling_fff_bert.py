"""fffjax's BERT encoder with FFF feedforwards for PyTorch and transformers, without fffjax.

A modeling file that imports only torch, transformers and its sibling ``modeling_crammed_bert.py`` (whose
FFF-v2 layer it shares). ``fffjax export`` copies both beside the weights of a BERT checkpoint, and
``config.json``'s ``auto_map`` points the transformers Auto classes here, so that in a process with only
torch and transformers::

    AutoModel.from_pretrained(folder, trust_remote_code=True)       # FffBertModel: last_hidden_state (B, S, H)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)   # the tokenizer files beside it

fffjax never imports this module.

``FffBertModel`` is transformers' ``BertModel`` (post-LN, learned positions, token types, exact GELU; no
pooler), built from ``config.json``: a ``BertConfig`` dict with ``model_type "fff_bert"`` and
``ffn_layers``, one feedforward spec per layer:

- ``{"kind": "dense", "width": F}``: ``BertModel``'s ``intermediate`` and ``output.dense`` at width F;
- ``{"kind": "fff_v1", "depth": D, "leaf_width": L, "activation": "gelu" | "relu", "legacy_eval", ...}``:
  FFF-v1 (``fastfeedforward.FFF``'s keys), ``2**D`` leaves of ``L`` neurons, the hard descent: right
  where the node's logit is ``>= 0``, then the one leaf reached (``legacy_eval``: without its output bias);
- ``{"kind": "fff_v2", "depth": D, "n_trees": K}``: FFF-v2 (UltraFastBERT's), K trees of single GELU
  neurons, right where the logit is ``> 0``, ``gelu(z) * w_out`` summed over the visited neurons.

An FFF layer's module ``ffn`` replaces ``intermediate`` and ``output.dense``:
``output.LayerNorm(h + output.dropout(ffn(h)))``. Both FFF kinds take their hard path in training too
(fffjax's FFF-v1 soft mixture is not built here). GELU is the exact erf form.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertLayer

from .modeling_crammed_bert import FastFeedforward

FFN_KINDS = ("dense", "fff_v1", "fff_v2")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class FffBertConfig(BertConfig):
    """transformers' ``BertConfig`` and ``ffn_layers``: one feedforward spec per layer (``None``: every
    layer dense of ``intermediate_size``)."""

    model_type = "fff_bert"
    ffn_layers: list | None = None

    def __post_init__(self, **kwargs):
        if self.ffn_layers is not None:
            if len(self.ffn_layers) != self.num_hidden_layers:
                raise ValueError(f"config.ffn_layers must hold one spec per layer ({self.num_hidden_layers}), "
                                 f"got {len(self.ffn_layers)}")
            for i, spec in enumerate(self.ffn_layers):
                if not isinstance(spec, dict) or spec.get("kind") not in FFN_KINDS:
                    raise ValueError(f"config.ffn_layers[{i}] must be a dict with 'kind' one of {FFN_KINDS}, "
                                     f"got {spec!r}")
                if spec.get("activation", "gelu") not in ACTIVATIONS:
                    raise ValueError(f"config.ffn_layers[{i}]['activation'] must be one of {sorted(ACTIVATIONS)}, "
                                     f"got {spec['activation']!r}")
        super().__post_init__(**kwargs)


class HardFastFeedforward(nn.Module):
    """FFF-v1 in ``fastfeedforward.FFF``'s layout, its hard descent: ``node_weights (2**D - 1, H)``,
    ``node_biases (2**D - 1, 1)``, ``w1s (2**D, H, L)``, ``b1s (2**D, L)``, ``w2s (2**D, L, H_out)``,
    ``b2s (2**D, H_out)`` and the ``depth`` buffer (int64). A new module's weights are normal(``init_std``),
    its biases zero."""

    def __init__(self, hidden_size: int, leaf_width: int, depth: int, activation: str = "gelu",
                 leaf_output_bias: bool = True, init_std: float = 0.02):
        super().__init__()
        n_nodes, n_leaves = 2 ** depth - 1, 2 ** depth
        self.n_depth, self.activation, self.leaf_output_bias = depth, ACTIVATIONS[activation], leaf_output_bias
        self.init_std = init_std
        self.node_weights = nn.Parameter(torch.empty(n_nodes, hidden_size))
        self.node_biases = nn.Parameter(torch.empty(n_nodes, 1))
        self.w1s = nn.Parameter(torch.empty(n_leaves, hidden_size, leaf_width))
        self.b1s = nn.Parameter(torch.empty(n_leaves, leaf_width))
        self.w2s = nn.Parameter(torch.empty(n_leaves, leaf_width, hidden_size))
        self.b2s = nn.Parameter(torch.empty(n_leaves, hidden_size))
        self.register_buffer("depth", torch.tensor(depth, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.node_weights, self.w1s, self.w2s):
            init.normal_(weight, mean=0.0, std=self.init_std)
        for bias in (self.node_biases, self.b1s, self.b2s):
            init.zeros_(bias)
        init.constant_(self.depth, self.n_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                               # (T, H)
        node = torch.zeros(tokens.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.n_depth):
            z = (tokens * self.node_weights[node]).sum(-1) + self.node_biases[node, 0]
            node = 2 * node + 1 + (z >= 0).long()                                         # right iff z >= 0
        leaf = node - (2 ** self.n_depth - 1)
        hidden = self.activation(torch.einsum("ti,tiw->tw", tokens, self.w1s[leaf]) + self.b1s[leaf])
        y = torch.einsum("tw,two->to", hidden, self.w2s[leaf])
        if self.leaf_output_bias:
            y = y + self.b2s[leaf]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def fff_module(config: FffBertConfig, spec: dict) -> nn.Module:
    """The FFF module of an ``fff_v1`` or ``fff_v2`` spec."""
    if spec["kind"] == "fff_v1":
        return HardFastFeedforward(config.hidden_size, spec["leaf_width"], spec["depth"],
                                   spec.get("activation", "gelu"), not spec.get("legacy_eval", False),
                                   config.initializer_range)
    return FastFeedforward(config.hidden_size, spec["depth"], spec.get("n_trees", 1))


class FffBertLayer(BertLayer):
    """A ``BertLayer`` whose ``intermediate`` and ``output.dense`` are one FFF module, ``ffn``."""

    def __init__(self, config: FffBertConfig, spec: dict, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        del self.intermediate
        del self.output.dense
        self.ffn = fff_module(config, spec)

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.output.LayerNorm(self.output.dropout(self.ffn(attention_output)) + attention_output)


class FffBertModel(BertModel):
    """``BertModel`` without the pooler, each layer's feedforward as ``config.ffn_layers`` says:
    ``forward(input_ids, attention_mask, token_type_ids, ...)`` returns ``last_hidden_state (B, S, H)``,
    fffjax's ``Bert`` in eval mode."""

    config_class = FffBertConfig

    def __init__(self, config: FffBertConfig):
        super().__init__(config, add_pooling_layer=False)
        for i, spec in enumerate(config.ffn_layers or ()):
            layer = self.encoder.layer[i]
            if spec["kind"] == "dense":
                layer.intermediate.dense = nn.Linear(config.hidden_size, spec["width"])
                layer.output.dense = nn.Linear(spec["width"], config.hidden_size)
            else:
                self.encoder.layer[i] = FffBertLayer(config, spec, layer_idx=i)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, HardFastFeedforward):
            module.reset_parameters()
        else:
            super()._init_weights(module)
