"""A small FFF-v1 module with counted usage, for the layer-conversion and file tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import nn

IN, WIDTH, OUT = 6, 4, 3


def trained_fff(depth, usage_mode="none"):
    """An FFF-v1 module whose usage counters (if any) are non-zero."""
    module = nn.FFF(IN, WIDTH, OUT, depth, usage_mode=usage_mode, rngs=nnx.Rngs(0))
    if usage_mode != "none":
        for seed in range(2):
            module(jnp.asarray(np.random.default_rng(seed).standard_normal((5, IN)), jnp.float32))
    return module
