"""fffjax: exact, fast Fast Feedforward networks (FFF-v1 and UltraFastBERT's FFF-v2) in JAX."""

from fffjax import convert, nn, ops, tree, v1, v2
from fffjax.nn import FFF, UltraFastFF
from fffjax.ops import fff_v1_hard, fff_v2_hard
from fffjax.pretrained import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "FFF",
    "UltraFastFF",
    "convert",
    "fff_v1_hard",
    "fff_v2_hard",
    "from_pretrained",
    "nn",
    "ops",
    "tree",
    "v1",
    "v2",
]
