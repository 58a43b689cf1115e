"""Helpers shared by the kernels: Triton compiler params, power-of-two sizes, erf/GELU that lower in Triton."""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu_triton

# Eigen's / XLA's rational erf for float32 on [-4, 4] (outside, erf is +-1 in float32): odd numerator,
# even denominator, both in x**2. Max |error| 4e-7 against float64 erf (jax's own: 3e-7).
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def erf(x: jax.Array) -> jax.Array:
    """float32 erf from a rational polynomial (Triton has no ``erf``); exact to a few float32 ulps."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    num = jnp.full_like(x, _ERF_NUM[0])
    for c in _ERF_NUM[1:]:
        num = num * x2 + c
    den = jnp.full_like(x, _ERF_DEN[0])
    for c in _ERF_DEN[1:]:
        den = den * x2 + c
    return x * num / den


def gelu(z: jax.Array) -> jax.Array:
    """Exact (erf) GELU of float32 ``z``."""
    return 0.5 * z * (1.0 + erf(z * _SQRT_HALF))


def gelu_grad(z: jax.Array) -> jax.Array:
    """d gelu / dz = Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_extent(n: int) -> int:
    """``n`` padded to a power of two of at least 16: every dimension of a Triton dot needs that."""
    return max(16, next_pow2(n))


def column_chunks(width: int, chunk: int) -> tuple[int, int]:
    """``(chunk_size, n_chunks)``: a power-of-two chunk no wider than needed, and how many cover ``width``."""
    size = min(next_pow2(chunk), next_pow2(width))
    return size, math.ceil(width / size)


def compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton params: without them jax 0.10 sends a GPU ``pallas_call`` to Mosaic GPU."""
    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for 16-bit inputs, else the input dtype."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


def on_gpu() -> bool:
    """Whether jax's default backend is a GPU (else the wrappers run in interpret mode)."""
    return jax.default_backend() == "gpu"


def load(ref, mask=None, other=None):
    """Masked load (``other`` fills masked-out elements; ignored without a mask, which Triton's
    lowering would refuse)."""
    return plgpu_triton.load(ref, mask=mask, other=None if mask is None else other)


def store(ref, value, mask=None):
    """Masked store."""
    plgpu_triton.store(ref, value, mask=mask)


def chunk_indices(c: int, chunk: int, width: int):
    """Column indices of chunk ``c`` and their validity mask (None if all are in range).

    Masked loads and stores keep the out-of-range indices as they are: a masked lane touches no
    memory on the GPU, and interpret mode drops out-of-range scatter updates (clamping them instead
    would make a masked store overwrite a real element with its old value).
    """
    cols = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    if (c + 1) * chunk <= width:
        return cols, None
    return cols, cols < width


def load_rows(ref, rows, cols, col_ok, row_ok=None):
    """``ref[rows, cols]`` as a ``(len(rows), len(cols))`` block, zero where a mask is off."""
    mask = None
    if col_ok is not None:
        mask = jnp.broadcast_to(col_ok[None, :], (rows.shape[0], cols.shape[0]))
    if row_ok is not None:
        rmask = jnp.broadcast_to(row_ok[:, None], (rows.shape[0], cols.shape[0]))
        mask = rmask if mask is None else mask & rmask
    block = ref.at[rows[:, None], cols[None, :]]
    return load(block, mask=mask, other=0.0 if mask is not None else None)


def store_rows(ref, rows, cols, value, col_ok, row_ok):
    """``ref[rows, cols] = value`` for the ``(len(rows), len(cols))`` block, where both masks are on
    (``col_ok`` None: every column)."""
    mask = jnp.broadcast_to(row_ok[:, None], value.shape)
    if col_ok is not None:
        mask = mask & col_ok[None, :]
    store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def dot(a, b, *, trans_a=False, trans_b=False):
    """Tensor-core dot with float32 accumulation; float32 operands stay IEEE (no tf32 rounding)."""
    exact = a.dtype == jnp.float32 or b.dtype == jnp.float32
    return plgpu_triton.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                            allow_tf32=False if exact else None).astype(jnp.float32)


def fold_chunks(step, init, width: int, chunk: int, *, loop: bool = False):
    """``step(cols, col_ok, carry) -> carry`` over the power-of-two column chunks covering ``width``;
    returns the last carry. ``loop``: run them as a ``lax.fori_loop`` (which Triton software-pipelines
    when ``num_stages > 1``) rather than unrolled, when there is more than one chunk and no ragged
    tail (a dynamic chunk index cannot pick the tail's mask statically)."""
    size, n_chunks = column_chunks(width, chunk)
    if loop and n_chunks > 1 and n_chunks * size == width:
        offsets = jnp.arange(size, dtype=jnp.int32)
        return jax.lax.fori_loop(0, n_chunks, lambda c, carry: step(c * size + offsets, None, carry), init)
    carry = init
    for c in range(n_chunks):
        carry = step(*chunk_indices(c, size, width), carry)
    return carry


def table_dot(src_ref, src_rows, src_ok, w_ref, w_rows, w_ok, width: int, chunk: int, *, loop: bool = False):
    """``src[src_rows] @ w[w_rows]^T`` as a ``(len(src_rows), len(w_rows))`` float32 block, summed
    over ``width`` columns chunk by chunk on the tensor cores (masked rows count as zero; ``loop``:
    see :func:`fold_chunks`)."""
    def step(cols, ok, acc):
        s = load_rows(src_ref, src_rows, cols, ok, src_ok)
        return acc + dot(s, load_rows(w_ref, w_rows, cols, ok, w_ok).astype(s.dtype), trans_b=True)

    return fold_chunks(step, jnp.zeros((src_rows.shape[0], w_rows.shape[0]), jnp.float32), width, chunk, loop=loop)


def store_table_product(out_ref, out_rows, out_ok, table, w_ref, w_rows, w_ok, width: int, chunk: int, *,
                        loop: bool = False):
    """``out[out_rows] = table @ w[w_rows]`` for ``table (len(out_rows), len(w_rows))``, written chunk
    by chunk of the ``width`` output columns (rows where ``out_ok`` is off are not written; ``loop``:
    see :func:`fold_chunks`)."""
    def step(cols, ok, carry):
        w = load_rows(w_ref, w_rows, cols, ok, w_ok).astype(table.dtype)
        store_rows(out_ref, out_rows, cols, dot(table, w), ok, out_ok)
        return carry

    fold_chunks(step, jnp.int32(0), width, chunk, loop=loop)


def check_powers_of_two(config, names) -> None:
    """Raise ``ValueError`` naming the first field of ``config`` in ``names`` that is not a power of two >= 1."""
    for name in names:
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 1, got {value}")
