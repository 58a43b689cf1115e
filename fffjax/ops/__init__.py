"""Every kernelled op, with one ``implementation=`` switch and one rule for picking it.

The ops: :func:`fff_v2_hard`, :func:`fff_v1_hard`, :func:`layer_norm`, :func:`attention`,
:func:`cached_attention` (a decoder's key/value cache), :func:`gelu`. Implementations: ``"xla"``
(always available, last resort), ``"reference"`` (masked dense FFF), ``"cpu_ffi"`` (C++ CPU
kernels), ``"cudnn"`` (attention), ``"pallas"`` (GPU kernels from :mod:`pallas_kernels`),
``"pallas_tpu"`` (FFF-v2 on a TPU, opt-in).
``implementation=None`` picks the fastest available for the platform and falls back on
``NotImplementedError``; :mod:`fffjax.ops.registry` states the rule, and :func:`set_implementation`
switches a model's modules.
"""

from fffjax.ops.api import attention, cached_attention, fff_v1_hard, fff_v2_hard, gelu, layer_norm
from fffjax.ops.per_device import rows_per_device
from fffjax.ops.registry import (
    DENSE_PATH_FRACTION,
    OPS,
    available_implementations,
    register_implementation,
    set_implementation,
)
from fffjax.ops.xla import split_heads

__all__ = [
    "DENSE_PATH_FRACTION",
    "OPS",
    "attention",
    "available_implementations",
    "cached_attention",
    "fff_v1_hard",
    "fff_v2_hard",
    "gelu",
    "layer_norm",
    "register_implementation",
    "rows_per_device",
    "set_implementation",
    "split_heads",
]
