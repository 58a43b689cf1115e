"""The small BERT of the BERT export tests, every kind of feedforward slot in it, and its FFF routing margins."""

import jax
import numpy as np
import pytest
from flax import nnx

from fffjax import v2
from fffjax.models.bert import Bert, BertConfig, DenseFfn, gelu
from fffjax.nn import FFF, UltraFastFF

# A large init spreads the routing logits, so that few tokens sit near a routing boundary.
SMALL = BertConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, max_positions=48,
                   hidden_dropout=0.0, attention_dropout=0.0, init_std=0.3)
SAFE_MARGIN = 1e-4   # far above float32 rounding of these logits: a routing decision this clear cannot flip


def mixed_bert(config: BertConfig = SMALL, seed: int = 0) -> Bert:
    """``config``'s Bert, in eval mode, with slots dense (the config's width), FFF-v1 (depth 2, leaves of 8
    exact-GELU neurons), FFF-v2 (2 trees of depth 2) and narrow dense (width 12), biases made non-zero."""
    rngs = nnx.Rngs(seed)
    model = Bert(config, rngs=rngs)
    h = config.hidden_size
    model.layers[1].ffn = FFF(h, 8, h, 2, activation=gelu, rngs=rngs)
    model.layers[2].ffn = UltraFastFF(h, 2, n_trees=2, rngs=rngs)
    model.layers[3].ffn = DenseFfn(h, 12, init_std=config.init_std, rngs=rngs)
    noise = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(np.float32),
                                   nnx.state(model, nnx.Param)))
    model.eval()
    return model


def padded_batch(config: BertConfig, seed: int = 0, seq: int = 12):
    """Four rows of ids (none, 3, 8 and 10 pads on the right), their mask and random token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(4, seq))
    lengths = np.array([seq, seq - 3, seq - 8, 2])
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    types = rng.integers(0, config.type_vocab_size, size=ids.shape)
    return np.where(mask == 1, ids, config.pad_token_id), mask, types


def fff_margins(model: Bert, *inputs) -> np.ndarray:
    """The smallest routing margin ``|z|`` of every token over all FFF slots and levels, ``(B, S)``."""
    seen = []
    v1_call, v2_call = FFF.__call__, UltraFastFF.__call__

    def spy_v2(layer, x):
        flat = x.reshape(-1, x.shape[-1])
        margin = v2.routing_margin(flat, layer.w_in[...], layer.b_in[...], depth=layer.depth, n_trees=layer.n_trees)
        seen.append(np.asarray(margin).reshape(x.shape[:-1]))
        return v2_call(layer, x)

    def spy_v1(layer, x, **kwargs):
        flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        weights, biases = np.asarray(layer.node_weights[...]), np.asarray(layer.node_biases[...]).reshape(-1)
        node, margin = np.zeros(len(flat), np.int64), np.full(len(flat), np.inf)
        for _ in range(layer.depth):
            z = (flat * weights[node]).sum(-1) + biases[node]
            margin, node = np.minimum(margin, np.abs(z)), 2 * node + 1 + (z >= 0)
        seen.append(margin.reshape(x.shape[:-1]))
        return v1_call(layer, x, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UltraFastFF, "__call__", spy_v2)
        patch.setattr(FFF, "__call__", spy_v1)
        model(*inputs)
    return np.min(seen, axis=0) if seen else np.full(inputs[0].shape, np.inf)


def safe_rows(model: Bert, ids, mask, types=None) -> np.ndarray:
    """``(B,)``: whether every real token of a row routes with a safe margin in every FFF slot (attention
    is bidirectional, so one flip anywhere in a row may move all of its hidden states)."""
    margins = fff_margins(model, ids, mask, types)
    return ((margins >= SAFE_MARGIN) | (np.asarray(mask) == 0)).all(axis=1)


def torch_modeling_package():
    """The package of the modeling files a BERT export carries (``modeling_fff_bert.py`` and
    ``modeling_crammed_bert.py``, which the former imports relatively), loaded as transformers loads an
    exported folder: a package of its own, outside fffjax. Needs torch and transformers."""
    import importlib
    import sys
    import types

    from fffjax.convert.hf import BERT_MODELING_FILE

    name = "fffjax_exported_bert_modeling"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(BERT_MODELING_FILE.parent)]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.{BERT_MODELING_FILE.stem}")
