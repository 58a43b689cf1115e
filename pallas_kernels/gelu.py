"""Exact (erf) GELU as an elementwise Pallas-Triton kernel, beside its jnp reference.

The dense twin's feedforward is ``dense_out(GELU(dense_in(x)))`` with crammed BERT's exact GELU. XLA
compiles ``jax.nn.gelu(approximate=False)`` on a GPU into an elementwise pass that is far from the copy
rate (see ``experiments/results/dense_ff_gpu.md``); this kernel computes the same function from the
float32 rational erf of :mod:`pallas_kernels._common`, in one read and one write of HBM. So the dense
baseline the FFF model is compared with does not pay for XLA's erf.

The backward is a second elementwise kernel, ``dx = g * GELU'(x)`` in float32 (so the dense twin's
training step gets no slow XLA ``erfc`` either), tested against ``jax.vjp`` of :func:`gelu_reference`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeluConfig:
    """``block`` elements per program (a power of two), ``num_warps`` Triton warps per program."""

    block: int = 16384
    num_warps: int = 8

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block",))


DEFAULT_CONFIG = GeluConfig()   # the fastest tiles of the sweep in experiments/results/dense_ff_gpu.md


def _kernel(*refs, n, block, backward):
    out_ref = refs[-1]
    idx = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    ok = idx < n
    x = cm.load(refs[0].at[idx], mask=ok, other=0.0).astype(jnp.float32)
    if backward:
        g = cm.load(refs[1].at[idx], mask=ok, other=0.0).astype(jnp.float32)
        out = g * cm.gelu_grad(x)
    else:
        out = cm.gelu(x)
    cm.store(out_ref.at[idx], out.astype(out_ref.dtype), mask=ok)


def _elementwise(*arrays, backward: bool, interpret: bool, config: GeluConfig):
    """The kernel over ``arrays`` (``x``, or ``x`` and the cotangent ``g``), flattened; result shaped and
    typed as the first."""
    x = arrays[0]
    n = x.size
    out = pl.pallas_call(
        functools.partial(_kernel, n=n, block=config.block, backward=backward),
        out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
        grid=(pl.cdiv(n, config.block),),
        compiler_params=cm.compiler_params(config.num_warps, 1),
        interpret=interpret,
        name="gelu_backward" if backward else "gelu",
    )(*(a.reshape(-1) for a in arrays))
    return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gelu(x, interpret, config):
    return _elementwise(x, backward=False, interpret=interpret, config=config)


def _gelu_fwd(x, interpret, config):
    return _elementwise(x, backward=False, interpret=interpret, config=config), x


def _gelu_bwd(interpret, config, x, g):
    return (_elementwise(x, g.astype(x.dtype), backward=True, interpret=interpret, config=config),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_reference(x):
    """``jax.nn.gelu(x, approximate=False)`` computed in float32, returned in ``x.dtype``."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def gelu(x, *, interpret: bool = False, config: GeluConfig = DEFAULT_CONFIG):
    """Exact GELU of ``x`` (any shape, float32/bfloat16/float16), computed in float32 and returned in
    ``x.dtype``. Differentiable (the backward kernel computes ``g * GELU'(x)`` in float32)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array, got {x.dtype}")
    if x.size == 0:
        return gelu_reference(x)
    return _gelu(x, interpret, config)
