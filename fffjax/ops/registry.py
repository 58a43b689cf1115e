"""How a kernel is picked: every implementation of every op, the one fallback rule, the one setter.

Ops (:data:`OPS`) and their implementations:

==================== =============================================================================
``fff_v2_hard``       ``"xla"`` row gathers, ``"reference"`` masked dense, ``"cpu_ffi"`` C++, ``"pallas"``,
                      ``"pallas_tpu"`` (Mosaic TPU; opt-in, never an automatic choice)
``fff_v1_hard``       ``"xla"`` row gathers, ``"reference"`` masked dense, ``"cpu_ffi"`` C++, ``"pallas"``
``layer_norm``        ``"xla"``, ``"pallas"`` (one pass, residual add fused)
``attention``         ``"xla"``, ``"cudnn"`` (GPU), ``"pallas"`` and ``"cpu_ffi"`` (read the fused QKV
                      projection; bidirectional only)
``cached_attention``  ``"xla"``, ``"cpu_ffi"``, ``"pallas"`` (opt-in) (queries over a decoder's key/value cache)
``gelu``              ``"xla"`` (``jax.nn.gelu``), ``"pallas"`` (elementwise kernels)
==================== =============================================================================

**The rule.** ``implementation="name"`` runs exactly that implementation; whatever it raises
propagates. ``implementation=None`` tries the platform's preference (:func:`preference`) in order:
an implementation raises ``NotImplementedError`` for a case it does not cover (a dtype, a depth,
a sequence length, a missing compiler) and the next one is tried. ``"xla"`` is last and covers
everything.

**Under a mesh.** Implementations registered with ``per_device=True`` (the custom calls: Pallas,
FFI) run through :func:`fffjax.ops.per_device.rows_per_device`, device by device on the data axis.

**On a model.** A module that runs an op names it in a class attribute ``kernel_op`` and keeps its
choice in ``implementation``; :func:`set_implementation` switches every such module of a model.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fffjax import tree
from fffjax.ops import cpu_ffi, xla
from fffjax.ops.per_device import rows_per_device

try:   # Pallas-Triton ships with jax; a build without it simply has no "pallas" implementation.
    from fffjax.ops import pallas
except ImportError:
    pallas = None

OPS = ("fff_v2_hard", "fff_v1_hard", "layer_norm", "attention", "cached_attention", "gelu")
GPU_PLATFORMS = ("gpu", "cuda")

# On a GPU, an FFF-v2 layer whose path holds more than this fraction of its neurons runs faster as
# the masked dense form on the tensor cores (128 trees of depth 4: 5 of 31 neurons per tree), one
# tree of depth 11 (12 of 4095) through Pallas; experiments/results/bench_gpu.md has the figures.
DENSE_PATH_FRACTION = 1 / 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implementation:
    """``fn(*rows, *replicated, **static)``; ``per_device``: a custom call GSPMD cannot partition."""

    fn: Callable
    per_device: bool = False


def _builtin() -> dict[str, dict[str, Implementation]]:
    table = {
        "fff_v2_hard": {"xla": Implementation(fn=xla.fff_v2_hard),
                        "reference": Implementation(fn=xla.fff_v2_hard_masked),
                        "cpu_ffi": Implementation(fn=cpu_ffi.registered_fn, per_device=True)},
        "fff_v1_hard": {"xla": Implementation(fn=xla.fff_v1_hard),
                        "reference": Implementation(fn=xla.fff_v1_hard_masked),
                        "cpu_ffi": Implementation(fn=cpu_ffi.registered_fn_v1, per_device=True)},
        "layer_norm": {"xla": Implementation(fn=xla.layer_norm)},
        "attention": {"xla": Implementation(fn=xla.attention), "cudnn": Implementation(fn=xla.attention_cudnn),
                      "cpu_ffi": Implementation(fn=cpu_ffi.registered_fn_attention, per_device=True)},
        "cached_attention": {"xla": Implementation(fn=xla.cached_attention),
                             "cpu_ffi": Implementation(fn=cpu_ffi.registered_fn_cached_attention, per_device=True)},
        "gelu": {"xla": Implementation(fn=xla.gelu)},
    }
    if pallas is not None:
        for op in OPS:
            if hasattr(pallas, op):
                table[op]["pallas"] = Implementation(fn=getattr(pallas, op), per_device=True)
        table["fff_v2_hard"]["pallas_tpu"] = Implementation(fn=pallas.fff_v2_hard_tpu, per_device=True)
    return table


_REGISTRY: dict[str, dict[str, Implementation]] = _builtin()


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def register_implementation(op: str, name: str, fn: Callable, *, per_device: bool = False) -> None:
    """Make ``fn`` available as ``implementation=name`` for ``op``.

    ``fn`` takes the op's row arguments, then its replicated ones, then its keyword arguments (as
    the functions of :mod:`fffjax.ops.xla`), and may raise ``NotImplementedError`` for a case it does
    not cover. ``per_device=True`` runs it device by device under a data mesh (for custom calls).
    """
    _check_op(op)
    _REGISTRY[op][name] = Implementation(fn=fn, per_device=per_device)


def available_implementations(op: str = "fff_v2_hard") -> tuple[str, ...]:
    """The implementation names registered for ``op``."""
    _check_op(op)
    return tuple(_REGISTRY[op])


def preference(op: str, platform: str, dtype, static: dict) -> tuple[str, ...]:
    """The implementations ``implementation=None`` tries, in order, for ``op`` on ``platform`` with
    inputs of ``dtype`` and the op's keyword arguments ``static``.

    * FFF ops: the C++ kernel on the CPU, Pallas on a GPU (for FFF-v2 the masked dense form first
      when the path holds more than :data:`DENSE_PATH_FRACTION` of each tree's neurons), XLA on a
      TPU (``"pallas_tpu"`` runs only when named: it has not yet run on a TPU).
    * layer norm, attention, GELU: the Pallas kernels (attention: then cuDNN) on a GPU for 16-bit
      inputs; XLA otherwise (float32 keeps XLA's rounding, which the torch parity tests pin).
    * cached attention: the C++ kernel on the CPU (XLA's batched matrix-vector products over the cache
      are several times slower, ``experiments/results/cached_attention_cpu.md``), XLA elsewhere. The
      one-launch Pallas kernel runs only when named (``implementation="pallas"``): on a GPU it is
      slower than XLA's at the small caches of a batch-1 decode step and faster only at large ones
      (``experiments/results/cached_attention_gpu.md``).
    """
    on_gpu = platform in GPU_PLATFORMS
    if op in ("fff_v2_hard", "fff_v1_hard"):
        if on_gpu:
            names = ("pallas", "xla")
            if (op == "fff_v2_hard"
                    and (static["depth"] + 1) / tree.v2_nodes_per_tree(static["depth"]) > DENSE_PATH_FRACTION):
                names = ("reference",) + names
            return names
        return ("cpu_ffi", "xla") if platform == "cpu" else ("xla",)
    if op == "cached_attention":
        return ("cpu_ffi", "xla") if platform == "cpu" else ("xla",)
    if on_gpu and jnp.dtype(dtype).itemsize == 2:
        return ("pallas", "cudnn", "xla") if op == "attention" else ("pallas", "xla")
    return ("xla",)


def candidates(op: str, implementation: str | None, dtype, static: dict) -> tuple[str, ...]:
    """The implementations a call tries: ``(implementation,)``, or the registered ones of
    :func:`preference` for ``None`` (a ``ValueError`` for an unknown name)."""
    _check_op(op)
    impls = _REGISTRY[op]
    if implementation is not None:
        if implementation not in impls:
            raise ValueError(f"implementation must be one of {sorted(impls)} or None, got {implementation!r}")
        return (implementation,)
    names = tuple(n for n in preference(op, jax.default_backend(), dtype, static) if n in impls)
    return names if "xla" in names else names + ("xla",)


def dispatch(op: str, implementation: str | None, rows: tuple, replicated: tuple = (), **static):
    """Run ``op`` on ``rows`` (arrays split by token, or None) and ``replicated`` (weights) by the rule
    in the module docstring."""
    names = candidates(op, implementation, rows[0].dtype, static)
    for i, name in enumerate(names):
        impl = _REGISTRY[op][name]
        try:
            if impl.per_device:
                return rows_per_device(functools.partial(impl.fn, **static), rows, replicated)
            return impl.fn(*rows, *replicated, **static)
        except NotImplementedError:
            if implementation is not None or i == len(names) - 1:
                raise
    raise AssertionError("unreachable: 'xla' is always a candidate")


def set_implementation(model: nnx.Module, op: str, implementation: str | None) -> nnx.Module:
    """Switch every module of ``model`` that runs ``op`` (``kernel_op == op``) to ``implementation``
    (a registered name, or None for the automatic choice); in place, returns ``model``."""
    _check_op(op)
    if implementation is not None and implementation not in _REGISTRY[op]:
        raise ValueError(f"implementation must be one of {sorted(_REGISTRY[op])} or None for {op}, "
                         f"got {implementation!r}")
    for _, module in nnx.iter_graph(model):
        if getattr(type(module), "kernel_op", None) == op:
            module.implementation = implementation
    return model
