"""Varying-manual-axes bookkeeping for custom calls inside ``jax.shard_map``.

Inside a ``shard_map`` with ``check_vma=True`` every value is typed by the manual mesh axes it
varies over. An FFI call returns values typed as invariant even when its inputs vary, and a
``pallas_call`` refuses an ``out_shape`` that does not say how it varies; a ``psum`` of a wrongly
typed value, or a custom VJP whose cotangent lacks the axes, would be typed wrongly too.
:func:`vary_like` gives an output the varying axes of its inputs, and :func:`out_struct` builds a
kernel's ``out_shape`` that declares them (both no-ops outside ``shard_map``).

jax spells the type differently across versions: ``aval.mat.varying`` and
``ShapeDtypeStruct(..., manual_axis_type=ManualAxisType(varying=...))`` (jax 0.10), or
``aval.vma`` and ``ShapeDtypeStruct(..., vma=...)``; both are found by feature detection.
"""

import functools
import inspect

import jax


def varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes ``a`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)           # jax 0.10: aval.mat.varying; elsewhere aval.vma
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_like(out: jax.Array, *inputs: jax.Array) -> jax.Array:
    """``out`` marked varying over every manual mesh axis that any of ``inputs`` varies over."""
    want = frozenset().union(*(varying_axes(a) for a in inputs))
    missing = tuple(sorted(want - varying_axes(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


@functools.cache
def _struct_keyword() -> str | None:
    """The ``jax.ShapeDtypeStruct`` keyword that declares varying axes in this jax, if any."""
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    for name in ("manual_axis_type", "vma"):
        if name in params:
            return name
    return None


def out_struct(shape: tuple[int, ...], dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` ``out_shape`` entry varying over every manual mesh axis any of ``inputs``
    varies over: what a kernel computing each device's output from that device's inputs returns.

    Inside a ``shard_map`` with ``check_vma=True`` Pallas needs this declaration; elsewhere it is
    ignored.
    """
    axes = frozenset().union(*(varying_axes(a) for a in inputs))
    keyword = _struct_keyword()
    if keyword == "manual_axis_type":
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
    if keyword == "vma":
        return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
    return jax.ShapeDtypeStruct(shape, dtype)
