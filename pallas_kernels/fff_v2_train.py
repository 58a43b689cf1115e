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
from fffjax._vma import out_struct, vary_like
from pallas_kernels import _common as cm
from pallas_kernels.fff_v2_forward import (
    DEFAULT_CONFIG as FORWARD_CONFIG,
)
from pallas_kernels.fff_v2_forward import (
    FffV2ForwardConfig,
    GroupedResiduals,
    block_tokens,
    check_shapes,
    descend_table,
    fff_v2_forward,
    grouped_split,
    operand_config,
    subtree_table,
    walk_config,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FffV2TrainConfig:
    """Block sizes of the training kernels.

    Attributes:
        forward: config of the forward kernel (which also saves the residuals).
        token_block_t, token_chunk, token_num_warps: the per-token backward kernel (dx, dz).
        weight_block_t, weight_chunk, weight_num_warps: the sorted weight-gradient kernel; a larger
            ``weight_block_t`` means fewer atomic adds.
        grouped_chunk, grouped_num_warps: the two backward kernels used after the grouped forward
            (``forward.split_level > 0``): the per-block ``dx`` kernel and the per-subtree
            weight-gradient kernel, whose accumulators are ``(n_cols, grouped_chunk)``.
        num_stages: Triton pipelining stages of the backward kernels; above 1 the grouped ``dx``
            kernel also runs its column chunks as loops (widths that are a multiple of the chunk).
    """

    forward: FffV2ForwardConfig = FORWARD_CONFIG
    token_block_t: int = 16
    token_chunk: int = 256
    token_num_warps: int = 8
    weight_block_t: int = 64
    weight_chunk: int = 128
    weight_num_warps: int = 4
    grouped_chunk: int = 64
    grouped_num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        cm.check_powers_of_two(
            self, ("token_block_t", "token_chunk", "weight_block_t", "weight_chunk", "grouped_chunk"))


DEFAULT_CONFIG = FffV2TrainConfig()


def _token_kernel(dy_ref, nodes_ref, z_ref, w_in_ref, w_out_ref, dx_ref, dz_ref, *, n_tokens, width_in,
                  width_out, levels, n_trees, block_t, chunk):
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    row_ok = rows < n_tokens
    c_in, n_in = cm.column_chunks(width_in, chunk)
    c_out, n_out = cm.column_chunks(width_out, chunk)
    dy = []
    for c in range(n_out):
        cols, ok = cm.chunk_indices(c, c_out, width_out)
        dy.append(cm.load_rows(dy_ref, rows, cols, ok, row_ok).astype(jnp.float32))

    def tree_body(k, dx_chunks):
        dx_chunks = list(dx_chunks)
        for level in range(levels):
            p = k * levels + level
            node = cm.load(nodes_ref.at[p, rows], mask=row_ok, other=0)
            z = cm.load(z_ref.at[p, rows], mask=row_ok, other=0.0)
            d_act = jnp.zeros((block_t,), jnp.float32)
            for c in range(n_out):
                cols, ok = cm.chunk_indices(c, c_out, width_out)
                d_act += jnp.sum(dy[c] * cm.load_rows(w_out_ref, node, cols, ok).astype(jnp.float32), axis=1)
            dz = d_act * cm.gelu_grad(z)
            cm.store(dz_ref.at[p, rows], dz, mask=row_ok)
            for c in range(n_in):
                cols, ok = cm.chunk_indices(c, c_in, width_in)
                dx_chunks[c] += dz[:, None] * cm.load_rows(w_in_ref, node, cols, ok).astype(jnp.float32)
        return tuple(dx_chunks)

    init = tuple(jnp.zeros((block_t, c_in), jnp.float32) for _ in range(n_in))
    dx = tree_body(0, init) if n_trees == 1 else jax.lax.fori_loop(0, n_trees, tree_body, init)
    for c in range(n_in):
        cols, ok = cm.chunk_indices(c, c_in, width_in)
        cm.store_rows(dx_ref, rows, cols, dx[c], ok, row_ok)


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
                   dw_in_ref, db_in_ref, dw_out_ref, *, n_tokens, width_in, width_out, levels, block_t, chunk,
                   interpret):
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
    for _level, (node, first, last, dz, _act) in enumerate(per_level):
        def bias_body(j, carry, node=node, dz=dz):
            part = jnp.sum(jnp.where((node == j) & tok_ok, dz, 0.0))
            plgpu_triton.atomic_add(db_in_ref, (j,), part)
            return carry

        jax.lax.fori_loop(first, last + 1, bias_body, 0)
    for c in range(n_in):
        cols, ok = cm.chunk_indices(c, c_in, width_in)
        xs = cm.load_rows(x_ref, tok, cols, ok).astype(jnp.float32)
        for node, first, last, dz, _act in per_level:
            _segment_add(dw_in_ref, node, first, last, dz, xs, cols, ok, tok_ok, interpret)
    for c in range(n_out):
        cols, ok = cm.chunk_indices(c, c_out, width_out)
        dys = cm.load_rows(dy_ref, tok, cols, ok).astype(jnp.float32)
        for node, first, last, _dz, act in per_level:
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
    inputs = (x, w_in, w_out, nodes, z, dy)
    cfg = config
    token_kernel = functools.partial(
        _token_kernel, n_tokens=n_tokens, width_in=width_in, width_out=width_out, levels=levels,
        n_trees=n_trees, block_t=cfg.token_block_t, chunk=cfg.token_chunk)
    dx, dz = pl.pallas_call(
        token_kernel,
        out_shape=(out_struct((n_tokens, width_in), x.dtype, *inputs),
                   out_struct(z.shape, jnp.float32, *inputs)),
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
    # The outputs alias these buffers and take their type: inside shard_map they vary like the inputs.
    zeros = tuple(vary_like(jnp.zeros(shape, jnp.float32), *inputs)
                  for shape in ((n_rows, width_in), (n_rows,), (n_rows, width_out)))
    dw_in, db_in, dw_out = pl.pallas_call(
        weight_kernel,
        out_shape=tuple(out_struct(a.shape, a.dtype, *inputs) for a in zeros),
        grid=(n_trees, pl.cdiv(n_tokens, cfg.weight_block_t)),
        input_output_aliases={6: 0, 7: 1, 8: 2},
        compiler_params=cm.compiler_params(cfg.weight_num_warps, cfg.num_stages),
        interpret=interpret,
        name="fff_v2_backward_weights",
    )(perm, nodes, z, dz, x, dy, *zeros)
    return dx, dw_in, db_in, dw_out


def _grouped_dx_kernel(slots_ref, block_sub_ref, logits_ref, dy_ref, w_in_ref, w_out_ref, dx_ref, dz_ref, act_ref, *,
                       n_tokens, width_in, width_out, depth, split, block_t, chunk, loop):
    """One grouped block: ``d act = dy W_out[rows]^T`` and ``dx = dz W_in[rows]`` on the tensor cores;
    stores the block's ``dz`` and ``gelu(z)`` tables (zero off the path and on empty slots). ``loop``:
    column chunks as loops (see :func:`pallas_kernels._common.table_dot`)."""
    b = pl.program_id(0)
    slot_rows, tok, tok_ok = block_tokens(slots_ref, b, block_t, n_tokens)
    col, rows, col_ok = subtree_table(block_sub_ref[b], split=split, depth=depth)
    logits = cm.load(logits_ref.at[slot_rows[:, None], col[None, :]])
    on_path, _ = descend_table(logits, col, split=split, depth=depth)
    on_path = on_path & tok_ok[:, None]
    d_act = cm.table_dot(dy_ref, tok, tok_ok, w_out_ref, rows, col_ok, width_out, chunk, loop=loop)
    dz = jnp.where(on_path, d_act * cm.gelu_grad(logits), 0.0).astype(dz_ref.dtype)
    cm.store(dz_ref.at[slot_rows[:, None], col[None, :]], dz)
    act = jnp.where(on_path, cm.gelu(logits), 0.0).astype(act_ref.dtype)
    cm.store(act_ref.at[slot_rows[:, None], col[None, :]], act)
    cm.store_table_product(dx_ref, tok, tok_ok, dz, w_in_ref, rows, col_ok, width_in, chunk, loop=loop)


def _grouped_weight_kernel(block_start_ref, slots_ref, dz_ref, act_ref, x_ref, dy_ref, dw_in_ref, dw_out_ref,
                           db_in_ref, top_in_ref, top_out_ref, top_b_ref, *, n_tokens, width_in, width_out, depth,
                           split, block_t, chunk):
    """Program ``(s, c)``: loops over the blocks of subtree ``s`` and sums ``dz^T x`` and
    ``gelu(z)^T dy`` for column chunk ``c`` in registers. The subtree's own rows are stored once
    (no other program writes them); the rows of its ``split`` ancestors, shared by all subtrees
    below them, go to per-subtree partials that the caller sums."""
    s, c = pl.program_id(0), pl.program_id(1)
    col, rows, col_ok = subtree_table(s, split=split, depth=depth)
    n_cols = col.shape[0]
    cols = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    in_ok, out_ok = cols < width_in, cols < width_out

    def body(blk, carry):
        acc_in, acc_out, acc_b = carry
        slot_rows, tok, tok_ok = block_tokens(slots_ref, blk, block_t, n_tokens)
        dz = cm.load(dz_ref.at[slot_rows[:, None], col[None, :]])
        act = cm.load(act_ref.at[slot_rows[:, None], col[None, :]])
        xc = cm.load_rows(x_ref, tok, cols, in_ok, tok_ok).astype(dz.dtype)
        dyc = cm.load_rows(dy_ref, tok, cols, out_ok, tok_ok).astype(act.dtype)
        acc_in += cm.dot(dz, xc, trans_a=True)
        acc_out += cm.dot(act, dyc, trans_a=True)
        acc_b += jnp.sum(dz.astype(jnp.float32), axis=0)
        return acc_in, acc_out, acc_b

    init = (jnp.zeros((n_cols, chunk), jnp.float32), jnp.zeros((n_cols, chunk), jnp.float32),
            jnp.zeros((n_cols,), jnp.float32))
    acc_in, acc_out, acc_b = jax.lax.fori_loop(block_start_ref[s], block_start_ref[s + 1], body, init)
    deep = col_ok & (col >= split)
    top = col < split
    cm.store(dw_in_ref.at[rows[:, None], cols[None, :]], acc_in, mask=deep[:, None] & in_ok[None, :])
    cm.store(dw_out_ref.at[rows[:, None], cols[None, :]], acc_out, mask=deep[:, None] & out_ok[None, :])
    part = s * n_cols + col
    cm.store(top_in_ref.at[part[:, None], cols[None, :]], acc_in, mask=top[:, None] & in_ok[None, :])
    cm.store(top_out_ref.at[part[:, None], cols[None, :]], acc_out, mask=top[:, None] & out_ok[None, :])
    first = c == 0
    cm.store(db_in_ref.at[rows], acc_b, mask=deep & first)
    cm.store(top_b_ref.at[part], acc_b, mask=top & first)


def grouped_backward(x, w_in, w_out, residuals: GroupedResiduals, dy, *, depth: int, interpret: bool,
                     config: FffV2TrainConfig = DEFAULT_CONFIG):
    """Gradients ``(dx, d w_in, d b_in, d w_out)`` (weights' in float32) after the grouped forward.

    Two kernels over the forward's token layout: per block, ``dx`` and the ``dz`` / ``gelu(z)``
    tables; per (subtree, column chunk), the weight gradients as tensor-core sums over the
    subtree's blocks. Only the ``2**split - 1`` shared top rows are then summed in XLA.
    """
    n_tokens, width_in = x.shape
    width_out = w_out.shape[1]
    slots, block_sub, logits = residuals
    split = grouped_split(config.forward, depth, 1)
    bt = config.forward.block_t
    n_blocks, n_sub, n_top = block_sub.shape[0], 2**split, 2**split - 1
    n_cols = logits.shape[1]
    table_dtype = x.dtype          # the tensor-core operand dtype of the weight-gradient sums
    inputs = (x, w_in, w_out, slots, block_sub, logits, dy)
    common = dict(n_tokens=n_tokens, width_in=width_in, width_out=width_out, depth=depth, split=split,
                  block_t=bt, chunk=config.grouped_chunk)
    params = cm.compiler_params(config.grouped_num_warps, config.num_stages)
    dx, dz, act = pl.pallas_call(
        functools.partial(_grouped_dx_kernel, loop=config.num_stages > 1, **common),
        out_shape=(out_struct((n_tokens, width_in), x.dtype, *inputs),
                   out_struct(logits.shape, table_dtype, *inputs), out_struct(logits.shape, table_dtype, *inputs)),
        grid=(n_blocks,), compiler_params=params, interpret=interpret, name="fff_v2_backward_grouped_dx",
    )(slots, block_sub, logits, dy, w_in, w_out)
    counts = jnp.bincount(block_sub, length=n_sub).astype(jnp.int32)
    # Trailing all-empty blocks carry block_sub = n_sub - 1: the last subtree loops over them (zeros).
    block_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    n_chunks = pl.cdiv(max(width_in, width_out), config.grouped_chunk)
    f32 = jnp.float32
    dw_in, dw_out, db_in, top_in, top_out, top_b = pl.pallas_call(
        functools.partial(_grouped_weight_kernel, **common),
        out_shape=(out_struct(w_in.shape, f32, *inputs), out_struct(w_out.shape, f32, *inputs),
                   out_struct((w_in.shape[0],), f32, *inputs),
                   out_struct((n_sub * n_cols, width_in), f32, *inputs),
                   out_struct((n_sub * n_cols, width_out), f32, *inputs),
                   out_struct((n_sub * n_cols,), f32, *inputs)),
        grid=(n_sub, n_chunks), compiler_params=params, interpret=interpret, name="fff_v2_backward_grouped_weights",
    )(block_start, slots, dz, act, x, dy)
    # Ancestor at level l of subtree s is flat node 2**l - 1 + (s >> (split - l)).
    sub = jnp.arange(n_sub, dtype=jnp.int32)[:, None]
    level = jnp.arange(split, dtype=jnp.int32)[None, :]
    ancestor = (jnp.left_shift(1, level) - 1 + jnp.right_shift(sub, split - level)).reshape(-1)

    def top_rows(part, width):
        part = part.reshape(n_sub, n_cols, *width)[:, :split].reshape(n_sub * split, *width)
        return jax.ops.segment_sum(part, ancestor, num_segments=n_top)

    dw_in = dw_in.at[:n_top].set(top_rows(top_in, (width_in,)))
    dw_out = dw_out.at[:n_top].set(top_rows(top_out, (width_out,)))
    db_in = db_in.at[:n_top].set(top_rows(top_b, ()))
    return dx, dw_in, db_in, dw_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fff_v2_train(x, w_in, b_in, w_out, depth, n_trees, interpret, config):
    return fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret,
                          config=config.forward)


def saving_forward(forward: FffV2ForwardConfig, n_tokens: int, n_trees: int) -> FffV2ForwardConfig:
    """``forward``, or for a ``tree_rows`` walk (which writes no residuals) the walk over tree programs
    with the same tiles, whose residuals the backward reads."""
    if not forward.tree_rows:
        return forward
    return walk_config(n_tokens, n_trees, dataclasses.replace(forward, tree_rows=False))


def _fff_v2_train_fwd(x, w_in, b_in, w_out, depth, n_trees, interpret, config):
    saved = fff_v2_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, interpret=interpret,
                           config=saving_forward(config.forward, x.shape[0], n_trees), save_residuals=True)
    return saved[0], (x, w_in, b_in, w_out, saved)


def backward_from_residuals(x, w_in, b_in, w_out, residuals, dy, *, depth: int, n_trees: int, interpret: bool,
                            config: FffV2TrainConfig):
    """``(dx, d w_in, d b_in, d w_out)`` in the dtypes of the inputs, from what
    ``fff_v2_forward(..., save_residuals=True)`` returned (``residuals``)."""
    _, saved = residuals
    if isinstance(saved, GroupedResiduals):
        dx, dw_in, db_in, dw_out = grouped_backward(x, w_in, w_out, saved, dy, depth=depth, interpret=interpret,
                                                    config=config)
    else:
        dx, dw_in, db_in, dw_out = backward(x, w_in, w_out, saved.nodes, saved.logits, dy, depth=depth,
                                            n_trees=n_trees, interpret=interpret, config=config)
    return dx, dw_in.astype(w_in.dtype), db_in.astype(b_in.dtype), dw_out.astype(w_out.dtype)


def _fff_v2_train_bwd(depth, n_trees, interpret, config, residuals, dy):
    x, w_in, b_in, w_out, saved = residuals
    return backward_from_residuals(x, w_in, b_in, w_out, saved, dy, depth=depth, n_trees=n_trees,
                                   interpret=interpret, config=config)


_fff_v2_train.defvjp(_fff_v2_train_fwd, _fff_v2_train_bwd)


def fff_v2_hard_trainable(x, w_in, b_in, w_out, *, depth: int, n_trees: int = 1, interpret: bool = False,
                          config: FffV2TrainConfig | None = None):
    """FFF-v2 hard forward through the Pallas kernel, differentiable by the conditional backward kernels.

    Same arguments and result as :func:`pallas_kernels.fff_v2_hard`; ``jax.grad`` through it gives
    ``dx``, ``d w_in``, ``d b_in``, ``d w_out`` equal to those of :func:`fffjax.v2.masked_forward`.
    """
    check_shapes(x, w_in, b_in, w_out, depth, n_trees)
    if config is None:
        config = dataclasses.replace(DEFAULT_CONFIG, forward=operand_config(x, w_out, depth=depth, n_trees=n_trees))
    # Inside shard_map the backward kernels' gradients vary over every axis any input varies over; the
    # custom VJP needs inputs of that same type (an input replicated over an axis then gets its
    # gradient summed over that axis by the transpose of this cast).
    x, w_in, b_in, w_out = (vary_like(a, x, w_in, b_in, w_out) for a in (x, w_in, b_in, w_out))
    return _fff_v2_train(x, w_in, b_in, w_out, depth, n_trees, interpret, config)


def reference_vjp(x, w_in, b_in, w_out, dy, *, depth: int, n_trees: int = 1):
    """``(dx, d w_in, d b_in, d w_out)`` of ``sum(masked_forward(...) * dy)``: what the backward must equal."""
    _, vjp = jax.vjp(functools.partial(v2.masked_forward, depth=depth, n_trees=n_trees), x, w_in, b_in, w_out)
    return vjp(dy)
