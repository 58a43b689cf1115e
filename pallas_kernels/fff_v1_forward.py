"""FFF-v1 (fastfeedforward) hard forward as two Pallas-Triton GPU kernels, beside its jnp reference.

1. :func:`_descent_kernel`, one program per ``block_t`` tokens: the descent (``depth`` gathered node
   rows, right when ``z >= 0``, as the package's hard forward), then the reached leaf's first layer
   ``x . w1s[leaf] + b1s[leaf]``, one input feature at a time against the gathered rows of the
   flattened ``(leaves * in, width)`` table. Writes the pre-activation hidden ``(T, width)``.
2. The leaf activation runs in XLA (elementwise; any jax activation works, erf included).
3. :func:`_leaf_out_kernel`: ``hidden . w2s[leaf] (+ b2s[leaf])`` the same way.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fffjax import tree, v1
from fffjax._vma import out_struct
from pallas_kernels import _common as cm

MAX_LEAF_WIDTH = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class FffV1ForwardConfig:
    """Block sizes of the FFF-v1 kernels.

    Attributes:
        block_t: tokens per program (power of two).
        chunk: columns per chunk of ``in`` and ``out`` (power of two).
        num_warps, num_stages: Triton launch parameters.
    """

    block_t: int = 16
    chunk: int = 256
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        cm.check_powers_of_two(self, ("block_t", "chunk"))


DEFAULT_CONFIG = FffV1ForwardConfig()


def _descent_kernel(x_ref, nw_ref, nb_ref, w1_ref, b1_ref, hidden_ref, leaf_ref, *, n_tokens, width_in,
                    leaf_width, depth, cfg: FffV1ForwardConfig):
    bt = cfg.block_t
    rows = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
    row_ok = rows < n_tokens
    rows_safe = jnp.where(row_ok, rows, 0)
    c_in, n_in = cm.column_chunks(width_in, cfg.chunk)
    x32 = []
    for c in range(n_in):
        cols, ok = cm.chunk_indices(c, c_in, width_in)
        x32.append(cm.load_rows(x_ref, rows, cols, ok, row_ok).astype(jnp.float32))
    node = jnp.zeros((bt,), jnp.int32)
    for _ in range(depth):
        z = cm.load(nb_ref.at[node]).astype(jnp.float32)
        for c in range(n_in):
            cols, ok = cm.chunk_indices(c, c_in, width_in)
            z += jnp.sum(x32[c] * cm.load_rows(nw_ref, node, cols, ok).astype(jnp.float32), axis=1)
        node = 2 * node + 1 + (z >= 0).astype(jnp.int32)
    leaf = node - (2**depth - 1)
    cm.store(leaf_ref.at[rows], leaf, mask=row_ok)
    w_pad = cm.next_pow2(leaf_width)
    wcols, wok = cm.chunk_indices(0, w_pad, leaf_width)
    hidden = cm.load_rows(b1_ref, leaf, wcols, wok).astype(jnp.float32)

    def feature(i, acc):
        xi = cm.load(x_ref.at[rows_safe, i]).astype(jnp.float32)
        return acc + xi[:, None] * cm.load_rows(w1_ref, leaf * width_in + i, wcols, wok).astype(jnp.float32)

    hidden = jax.lax.fori_loop(0, width_in, feature, hidden)
    cm.store_rows(hidden_ref, rows, wcols, hidden, wok, row_ok)


def _leaf_out_kernel(hidden_ref, leaf_ref, w2_ref, b2_ref, y_ref, *, n_tokens, leaf_width, width_out,
                     output_bias, cfg: FffV1ForwardConfig):
    bt = cfg.block_t
    rows = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
    row_ok = rows < n_tokens
    rows_safe = jnp.where(row_ok, rows, 0)
    leaf = cm.load(leaf_ref.at[rows_safe])
    c_out, n_out = cm.column_chunks(width_out, cfg.chunk)
    for c in range(n_out):
        cols, ok = cm.chunk_indices(c, c_out, width_out)
        if output_bias:
            acc = cm.load_rows(b2_ref, leaf, cols, ok).astype(jnp.float32)
        else:
            acc = jnp.zeros((bt, c_out), jnp.float32)

        def unit(w, acc, cols=cols, ok=ok):
            hw = cm.load(hidden_ref.at[rows_safe, w])
            return acc + hw[:, None] * cm.load_rows(w2_ref, leaf * leaf_width + w, cols, ok).astype(jnp.float32)

        acc = jax.lax.fori_loop(0, leaf_width, unit, acc)
        cm.store_rows(y_ref, rows, cols, acc, ok, row_ok)


@functools.partial(jax.jit, static_argnames=("depth", "activation", "leaf_output_bias", "interpret", "config"))
def fff_v1_hard(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int,
                activation=jax.nn.relu, leaf_output_bias: bool = True, interpret: bool = False,
                config: FffV1ForwardConfig = DEFAULT_CONFIG):
    """FFF-v1 hard forward through the Pallas kernels (argument layout of :func:`fffjax.ops.fff_v1_hard`).

    Args:
        x: ``(T, in)`` float32 or bfloat16.
        node_weights: ``(2**depth - 1, in)``; node_biases: ``(2**depth - 1,)``.
        w1s: ``(2**depth, in, width)``; b1s: ``(2**depth, width)``; width <= 256.
        w2s: ``(2**depth, width, out)``; b2s: ``(2**depth, out)``.
        depth: routing levels; activation: leaf hidden activation (applied in XLA between the kernels).
        leaf_output_bias: add ``b2s``; interpret: Pallas interpret mode; config: block sizes.

    Returns:
        ``(T, out)`` in ``x.dtype``, accumulated in float32.
    """
    n_nodes, n_leaves = tree.v1_sizes(depth)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (tokens, in), got {tuple(x.shape)}")
    n_tokens, width_in = x.shape
    if w1s.ndim != 3 or w1s.shape[:2] != (n_leaves, width_in):
        raise ValueError(f"w1s must have shape ({n_leaves}, {width_in}, width), got {tuple(w1s.shape)}")
    leaf_width = w1s.shape[2]
    if leaf_width > MAX_LEAF_WIDTH:
        raise NotImplementedError(f"leaf width must be <= {MAX_LEAF_WIDTH} for the Pallas kernel, got {leaf_width}")
    if tuple(node_weights.shape) != (n_nodes, width_in):
        raise ValueError(f"node_weights must have shape ({n_nodes}, {width_in}), got {tuple(node_weights.shape)}")
    if tuple(node_biases.shape) != (n_nodes,):
        raise ValueError(f"node_biases must have shape ({n_nodes},), got {tuple(node_biases.shape)}")
    width_out = w2s.shape[2]
    if depth == 0:   # Empty node tables: keep the kernel's refs non-empty; they are never read.
        node_weights = jnp.zeros((1, width_in), x.dtype)
        node_biases = jnp.zeros((1,), x.dtype)
    inputs = (x, node_weights, node_biases, w1s, b1s, w2s, b2s)
    params = cm.compiler_params(config.num_warps, config.num_stages)
    grid = (pl.cdiv(n_tokens, config.block_t),)
    hidden, leaf = pl.pallas_call(
        functools.partial(_descent_kernel, n_tokens=n_tokens, width_in=width_in, leaf_width=leaf_width,
                          depth=depth, cfg=config),
        out_shape=(out_struct((n_tokens, leaf_width), jnp.float32, *inputs),
                   out_struct((n_tokens,), jnp.int32, *inputs)),
        grid=grid, compiler_params=params, interpret=interpret, name="fff_v1_descent",
    )(x, node_weights, node_biases, w1s.reshape(n_leaves * width_in, leaf_width), b1s)
    hidden = activation(hidden).astype(jnp.float32)
    return pl.pallas_call(
        functools.partial(_leaf_out_kernel, n_tokens=n_tokens, leaf_width=leaf_width, width_out=width_out,
                          output_bias=leaf_output_bias, cfg=config),
        out_shape=out_struct((n_tokens, width_out), x.dtype, *inputs),
        grid=grid, compiler_params=params, interpret=interpret, name="fff_v1_leaf_out",
    )(hidden, leaf, w2s.reshape(n_leaves * leaf_width, width_out), b2s)


def fff_v1_hard_reference(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int,
                          activation=jax.nn.relu, leaf_output_bias: bool = True):
    """The jnp reference the kernels are tested against: fffjax's row-gather hard forward on float32
    copies of the inputs, returned in ``x.dtype``."""
    f32 = [a.astype(jnp.float32) for a in (x, node_weights, node_biases, w1s, b1s, w2s, b2s)]
    return v1.hard_forward(*f32, depth=depth, activation=activation,
                           leaf_output_bias=leaf_output_bias).astype(x.dtype)
