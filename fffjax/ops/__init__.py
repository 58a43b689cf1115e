"""Hard (conditional) inference ops with an ``implementation=`` switch.

* ``"xla"``: row gathers, jitted; available everywhere, the CPU path, differentiable.
* ``"reference"``: the masked dense computation, for testing.
* ``"pallas"``: GPU kernels from ``pallas_kernels`` (registered when that package imports).

``implementation=None`` picks the first available implementation preferred for the platform.
"""

from fffjax.ops.api import (
    available_implementations,
    fff_v1_hard,
    fff_v2_hard,
    register_implementation,
)

__all__ = ["available_implementations", "fff_v1_hard", "fff_v2_hard", "register_implementation"]
