"""FFF-v2 conditional training: a ``jax.custom_vjp`` whose backward touches only the visited rows.

Forward: the forward kernel, which also saves each (tree, level)'s node and logit (``P = K (D+1)``
rows of ``T`` each). Backward, two kernels:

* :func:`_token_kernel`, one program per ``block_t`` tokens (like the forward): for each visited
  node ``d_act = dy . w_out[node]``, ``dz = d_act * gelu'(z)`` (saved), and
  ``dx = sum dz * w_in[node]``.
* :func:`_weight_kernel`, grid ``(K, T / block_t)``: each tree's tokens sorted by the node they
  reach last. In that order the tokens of one node form one contiguous run at *every* level
  (an ancestor is the leaf shifted right), so a block of sorted tokens meets only a few nodes per
  level. For each node met, the block's partial sums ``sum dz x``, ``sum gelu(z) dy``, ``sum dz``
  are computed in registers and added once into ``d w_in``, ``d w_out``, ``d b_in`` with atomic
  adds. Work is balanced (every program has ``block_t`` tokens) and costs what the path costs.

The jnp reference is ``jax.grad`` of :func:`fffjax.v2.masked_forward` (:func:`reference_vjp`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from fffjax import v2
from pallas_kernels import _common as cm
from pallas_kernels.fff_v2_forward import (
    DEFAULT_CONFIG as FORWARD_CONFIG,
    FffV2ForwardConfig,
    _chunk_indices,
    _load_rows,
    check_shapes,
    default_config,
    fff_v2_forward,
)


@dataclasses.dataclass(frozen=True)
class FffV2TrainConfig:
    """Block sizes of the training kernels.

    Attributes:
        forward: config of the forward kernel (which also saves the residuals).
        token_block_t, token_chunk, token_num_warps: the per-token backward kernel (dx, dz).
        weight_block_t, weight_chunk, weight_num_warps: the sorted weight-gradient kernel; a larger
            ``weight_block_t`` means fewer atomic adds.
        num_stages: Triton pipelining stages of both backward kernels.
    """

    forward: FffV2ForwardConfig = FORWARD_CONFIG
    token_block_t: int = 16
    token_chunk: int = 256
    token_num_warps: int = 8
    weight_block_t: int = 64
    weight_chunk: int = 128
    weight_num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("token_block_t", "token_chunk", "weight_block_t", "weight_chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value}")


DEFAULT_CONFIG = FffV2TrainConfig()


def _token_kernel(dy_ref, nodes_ref, z_ref, w_in_ref, w_out_ref, dx_ref, dz_ref, *, n_tokens, width_in,
                  width_out, levels, n_trees, block_t, chunk):
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    row_ok = rows < n_tokens
    c_in, n_in = cm.column_chunks(width_in, chunk)
    c_out, n_out = cm.column_chunks(width_out, chunk)
    dy = []
    for c in range(n_out):
        cols, ok = _chunk_indices(c, c_out, width_out)
        dy.append(_load_rows(dy_ref, rows, cols, ok, row_ok).astype(jnp.float32))

    def tree_body(k, dx_chunks):
        dx_chunks = list(dx_chunks)
        for level in range(levels):
            p = k * levels + level
            node = cm.load(nodes_ref.at[p, rows], mask=row_ok, other=0)
            z = cm.load(z_ref.at[p, rows], mask=row_ok, other=0.0)
            d_act = jnp.zeros((block_t,), jnp.float32)
            for c in range(n_out):
                cols, ok = _chunk_indices(c, c_out, width_out)
                d_act += jnp.sum(dy[c] * _load_rows(w_out_ref, node, cols, ok).astype(jnp.float32), axis=1)
            dz = d_act * cm.gelu_grad(z)
            cm.store(dz_ref.at[p, rows], dz, mask=row_ok)
            for c in range(n_in):
                cols, ok = _chunk_indices(c, c_in, width_in)
                dx_chunks[c] += dz[:, None] * _load_rows(w_in_ref, node, cols, ok).astype(jnp.float32)
        return tuple(dx_chunks)

    init = tuple(jnp.zeros((block_t, c_in), jnp.float32) for _ in range(n_in))
    dx = tree_body(0, init) if n_trees == 1 else jax.lax.fori_loop(0, n_trees, tree_body, init)
    for c in range(n_in):
        cols, ok = _chunk_indices(c, c_in, width_in)
        mask = jnp.broadcast_to(row_ok[:, None], (block_t, c_in))
        if ok is not None:
            mask = mask & ok[None, :]
        cm.store(dx_ref.at[rows[:, None], cols[None, :]], dx[c].astype(dx_ref.dtype), mask=mask)


def _segment_add(out_ref, node, first, last, weights, values, cols, col_ok, tok_ok, interpret):
    """For each node ``j`` in ``[first, last]``: ``out[j, cols] += sum_t [node_t == j] weights_t values_t``.

    Interpret mode cannot discharge a masked atomic, but drops out-of-range updates by itself; on
    the GPU the mask keeps the ragged last chunk in bounds.
    """
    mask = None if interpret else col_ok

    def body(j, carry):
        hit = (node == j) & tok_ok
        part = jnp.sum(jnp.where(hit[:, None], weights[:, None] * values, 0.0), axis=0)
        plgpu_triton.atomic_add(out_ref, (j, cols), part, mask=mask)
        return carry

    jax.lax.fori_loop(first, last + 1, body, 0)


def _weight_kernel(perm_ref, nodes_ref, z_ref, dz_ref, x_ref, dy_ref, _w_in0, _b_in0, _w_out0,
                   dw_in_ref, db_in_ref, dw_out_ref, *, n_tokens, width_in, width_out, levels, block_t, chunk, interpret):
    k = pl.program_id(0)
    pos = pl.program_id(1) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    tok_ok = pos < n_tokens
    tok = cm.load(perm_ref.at[k, pos], mask=tok_ok, other=0)
    c_in, n_in = cm.column_chunks(width_in, chunk)
    c_out, n_out = cm.column_chunks(width_out, chunk)
    per_level = []
    for level in range(levels):
        p = k * levels + level
        node = cm.load(nodes_ref.at[p, tok])
        z = cm.load(z_ref.at[p, tok])
        dz = cm.load(dz_ref.at[p, tok])
        # Sorted by the last node, so each level's nodes are non-decreasing along the block.
        first = jnp.min(jnp.where(tok_ok, node, jnp.iinfo(jnp.int32).max))
        last = jnp.max(jnp.where(tok_ok, node, -1))
        per_level.append((node, first, last, dz, cm.gelu(z)))
    for level, (node, first, last, dz, act) in enumerate(per_level):
        def bias_body(j, carry, node=node, dz=dz):
            part = jnp.sum(jnp.where((node == j) & tok_ok, dz, 0.0))
            plgpu_triton.atomic_add(db_in_ref, (j,), part)
            return carry

        jax.lax.fori_loop(first, last + 1, bias_body, 0)
    for c in range(n_in):
        cols, ok = _chunk_indices(c, c_in, width_in)
        xs = _load_rows(x_ref, tok, cols, ok).astype(jnp.float32)
        for node, first, last, dz, act in per_level:
            _segment_add(dw_in_ref, node, first, last, dz, xs, cols, ok, tok_ok, interpret)
    for c in range(n_out):
        cols, ok = _chunk_indices(c, c_out, width_out)
        dys = _load_rows(dy_ref, tok, cols, ok).astype(jnp.float32)
        for node, first, last, dz, act in per_level:
            _segment_add(dw_out_ref, node, first, last, act, dys, cols, ok, tok_ok, interpret)


def backward(x, w_in, w_out, nodes, z, dy, *, depth: int, n_trees: int, interpret: bool,
             config: FffV2TrainConfig = DEFAULT_CONFIG):
    """Gradients ``(dx, d w_in, d b_in, d w_out)`` from the saved nodes and logits (float32 weights' grads).

    Args:
        x: ``(T, H)``; w_in: ``(K*N, H)``; w_out: ``(K*N, H_out)``.
        nodes, z: ``(K*(D+1), T)`` visited flat nodes and their logits, from the forward kernel.
        dy: ``(T, H_out)`` cotangent of the output.
    """
    n_tokens, width_in = x.shape
    width_out = w_out.shape[1]
    levels = depth + 1
    n_rows = w_in.shape[0]
    cfg = config
    token_kernel = functools.partial(
        _token_kernel, n_tokens=n_tokens, width_in=width_in, width_out=width_out, levels=levels,
        n_trees=n_trees, block_t=cfg.token_block_t, chunk=cfg.token_chunk)
    dx, dz = pl.pallas_call(
        token_kernel,
        out_shape=(jax.ShapeDtypeStruct((n_tokens, width_in), x.dtype),
                   jax.ShapeDtypeStruct(z.shape, jnp.float32)),
        grid=(pl.cdiv(n_tokens, cfg.token_block_t),),
        compiler_params=cm.compiler_params(cfg.token_num_warps, cfg.num_stages),
        interpret=interpret,
        name="fff_v2_backward_tokens",
    )(dy, nodes, z, w_in, w_out)
    leaf = nodes.reshape(n_trees, levels, n_tokens)[:, -1, :]
    perm = jnp.argsort(leaf, axis=1).astype(jnp.int32)              # (K, T)
    weight_kernel = functools.partial(
        _weight_kernel, n_tokens=n_tokens, width_in=width_in, width_out=width_out, levels=levels,
        block_t=cfg.weight_block_t, chunk=cfg.weight_chunk, interpret=bool(interpret))
    zeros = (jnp.zeros((n_rows, width_in), jnp.float32), jnp.zeros((n_rows,), jnp.float32),
             jnp.zeros((n_rows, width_out), jnp.float32))
    dw_in, db_in, dw_out = pl.pallas_call(
        weight_kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in zeros),
        grid=(n_trees, pl.cdiv(n_tokens, cfg.weight_block_t)),
        input_output_aliases={6: 0, 7: 1, 8: 2},
        compiler_params=cm.compiler_params(cfg.weight_num_warps, cfg.num_stages),
        interpret=interpret,
        name="fff_v2_backward_weights",
    )(perm, nodes, z, dz, x, dy, *zeros)
    return dx, dw_in, db_in, dw_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fff_v2_train(x, w_in, b_in, w_out, depth, n_trees, interpret, config):
    return fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret,
                          config=config.forward)


def _fff_v2_train_fwd(x, w_in, b_in, w_out, depth, n_trees, interpret, config):
    y, nodes, z = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret,
                                 config=config.forward, save_residuals=True)
    return y, (x, w_in, b_in, w_out, nodes, z)


def _fff_v2_train_bwd(depth, n_trees, interpret, config, residuals, dy):
    x, w_in, b_in, w_out, nodes, z = residuals
    dx, dw_in, db_in, dw_out = backward(x, w_in, w_out, nodes, z, dy, depth=depth, n_trees=n_trees,
                                        interpret=interpret, config=config)
    return dx, dw_in.astype(w_in.dtype), db_in.astype(b_in.dtype), dw_out.astype(w_out.dtype)


_fff_v2_train.defvjp(_fff_v2_train_fwd, _fff_v2_train_bwd)


def fff_v2_hard_trainable(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, interpret: bool = False,
                          config: FffV2TrainConfig | None = None):
    """FFF-v2 hard forward through the Pallas kernel, differentiable by the conditional backward kernels.

    Same arguments and result as :func:`pallas_kernels.fff_v2_hard`; ``jax.grad`` through it gives
    ``dx``, ``d w_in``, ``d b_in``, ``d w_out`` equal to those of :func:`fffjax.v2.masked_forward`.
    """
    check_shapes(x, w_in, b_in, w_out, depth, n_trees)
    if config is None:
        config = dataclasses.replace(DEFAULT_CONFIG, forward=default_config(depth, n_trees))
    return _fff_v2_train(x, w_in, b_in, w_out, depth, n_trees, interpret, config)


def reference_vjp(x, w_in, b_in, w_out, dy, *, depth: int, n_trees: int = 1):
    """``(dx, d w_in, d b_in, d w_out)`` of ``sum(masked_forward(...) * dy)``: what the backward must equal."""
    _, vjp = jax.vjp(functools.partial(v2.masked_forward, depth=depth, n_trees=n_trees), x, w_in, b_in, w_out)
    return vjp(dy)
