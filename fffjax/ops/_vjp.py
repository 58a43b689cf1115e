"""Fast forward kernels whose backward is the VJP of a plain jnp reference."""

import functools

import jax

from fffjax._vma import vary_like


def with_reference_vjp(kernel, reference):
    """``f(static, *arrays)``: ``kernel(*arrays, **dict(static))`` in the forward pass, the VJP of
    ``reference(*arrays, **dict(static))`` (same arguments and results) in the backward, recomputing
    the reference's forward. ``static`` is a tuple of ``(name, value)`` pairs (hashable, not
    differentiated); an array argument may be ``None``. Inside ``shard_map`` the cotangents take the
    varying mesh axes of the inputs (see :mod:`fffjax._vma`)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(static, *arrays):
        return kernel(*arrays, **dict(static))

    def fwd(static, *arrays):
        return kernel(*arrays, **dict(static)), arrays

    def bwd(static, residuals, g):
        _, vjp = jax.vjp(functools.partial(reference, **dict(static)), *residuals)
        inputs = jax.tree.leaves(residuals)
        return vjp(jax.tree.map(lambda t: vary_like(t, *inputs), g))

    f.defvjp(fwd, bwd)
    return f
