"""fffjax: exact, fast Fast Feedforward networks (FFF-v1 and UltraFastBERT's FFF-v2) in JAX.

The public names load on first use (a module ``__getattr__``, PEP 562), as does any submodule
reached as an attribute (``fffjax.parallel``). Importing one module of the package therefore loads
only what that module imports: :mod:`pallas_kernels`' references import :mod:`fffjax.tree`,
:mod:`fffjax.v1` and :mod:`fffjax.v2` without loading :mod:`fffjax.ops`, which imports the kernels
to register them, so the two packages import one way.
"""

import importlib

__version__ = "0.1.0"

# A public name -> the module that defines it.
_EXPORTS = {
    "FFF": "fffjax.nn",
    "UltraFastFF": "fffjax.nn",
    "fff_v1_hard": "fffjax.ops",
    "fff_v2_hard": "fffjax.ops",
    "fff_v2_streamed": "fffjax.ops.streaming",
    "from_pretrained": "fffjax.pretrained",
    "stream_v2": "fffjax.ops.streaming",
}
_SUBMODULES = ("convert", "nn", "ops", "tree", "v1", "v2")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):   # dunder lookups by tools (``__wrapped__``) are never submodules
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
