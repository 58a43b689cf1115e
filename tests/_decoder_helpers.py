"""The small causal LM of the decoder and generation tests, jitted calls, and its FFF routing margins."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from fffjax import v2
from fffjax.models import CausalLM, DecoderConfig
from fffjax.nn import UltraFastFF

# A large init spreads the logits, so that greedy decoding of an untrained model does not repeat one token.
SMALL = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_seq_length=48, ffn="fff",
                      fff_depth=3, fff_trees=2, dropout=0.0, init_std=0.5)
SAFE_MARGIN = 1e-4   # far above float32 rounding of these logits: a routing decision this clear cannot flip


def small(ffn: str = "fff", **changes) -> DecoderConfig:
    return dataclasses.replace(SMALL, ffn=ffn, **changes)


def make(config: DecoderConfig, seed: int = 0) -> CausalLM:
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    model.eval()
    return model


forward = nnx.jit(lambda model, ids, mask=None: model(ids, mask))


def fff_margins(model: CausalLM, input_ids, attention_mask=None) -> np.ndarray:
    """The smallest FFF routing margin of every token over all layers, ``(B, S)`` (inf without FFF)."""
    seen = []
    layer_forward = UltraFastFF.__call__

    def spy(layer, x):
        flat = x.reshape(-1, x.shape[-1])
        margin = v2.routing_margin(flat, layer.w_in[...], layer.b_in[...], depth=layer.depth, n_trees=layer.n_trees)
        seen.append(np.asarray(margin).reshape(x.shape[:-1]))
        return layer_forward(layer, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UltraFastFF, "__call__", spy)
        model(input_ids, attention_mask)
    return np.min(seen, axis=0) if seen else np.full(input_ids.shape, np.inf)


def check_cached_tokens(model: CausalLM, prompts, generated) -> int:
    """Asserts that every generated token is the argmax of a full forward over the tokens before it,
    for the tokens whose whole prefix routes with a safe margin; returns how many it checked."""
    checked = 0
    for prompt, new in zip(prompts, generated):
        sequence = np.asarray([list(prompt) + list(new)], np.int32)
        logits = np.asarray(forward(model, sequence))[0]
        unsafe = np.flatnonzero(fff_margins(model, sequence)[0] < SAFE_MARGIN)
        safe_until = int(unsafe[0]) if unsafe.size else sequence.shape[1]
        for i in range(len(prompt), min(sequence.shape[1], safe_until + 1)):
            assert int(np.argmax(logits[i - 1])) == sequence[0, i], f"token {i} of {sequence[0].tolist()}"
            checked += 1
    return checked


def torch_modeling_package():
    """The package of the modeling files that every export carries (``modeling_crammed_bert.py`` and
    ``modeling_fff_decoder.py``, which imports the former relatively), loaded as transformers loads an
    exported folder: a package of its own, outside fffjax (and so outside the test run's jaxtyping
    import hook). Needs torch and transformers."""
    import importlib
    import sys
    import types

    from fffjax.convert.hf import DECODER_MODELING_FILE

    name = "fffjax_exported_modeling"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(DECODER_MODELING_FILE.parent)]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.{DECODER_MODELING_FILE.stem}")
