"""Varying-manual-axes bookkeeping for custom calls inside ``jax.shard_map``.

An FFI call or a Pallas kernel returns values typed as invariant across the mesh axes even when its
inputs vary; a ``psum`` of such a value, or a custom VJP whose cotangent lacks the axes, would then be
typed wrongly. :func:`vary_like` gives an output the varying axes of its inputs (a no-op outside
``shard_map``).
"""

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
