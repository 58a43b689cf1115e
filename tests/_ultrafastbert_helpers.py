"""Crammed-BERT models in JAX and in the PyTorch reference (`crammed_bert_reference.py`), randomised,
with a padded batch and each side's logits: the shared pieces of the UltraFastBERT conversion tests.
Needs torch: import it after ``pytest.importorskip("torch")``."""

import crammed_bert_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from fffjax.models import get_config

TINY = get_config("tiny")
ATOL = 1e-4


def padded_batch(config, seed=0, batch=3, seq=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(batch, seq))
    lengths = np.array([seq, seq - 7, 5, 11])[:batch]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, config.pad_token_id), mask


def randomise_jax(model, seed):
    """Noise on every parameter: LayerNorm scales away from 1, biases away from 0, FFF biases that route."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def randomise_torch(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def torch_logits(module, ids, mask):
    with torch.no_grad():
        out = module(torch.from_numpy(ids), torch.from_numpy(mask))
    return (
        out.numpy().reshape(ids.shape[0], -1, out.shape[-1])
        if out.ndim == 2 and out.shape[0] == ids.size
        else out.numpy()
    )


def jax_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def torch_mlm(state_dict, config_json):
    module = ref.ScriptableLMForPreTraining(config_json["arch"]).eval()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    return module
