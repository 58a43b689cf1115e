"""Tree-parallel FFF layers over one mesh axis: ``shard_map`` + ``all_to_all`` token routing.

An FFF tree is a natural unit of parallelism: below its top levels the subtrees are disjoint
and a token visits exactly one of them. On a mesh axis of size ``P = 2**p``:

* the top ``p`` levels of every tree are **replicated** on all devices of the axis;
* device ``d`` owns, in every tree, the subtree rooted at node ``(level p, position d)``;
* each device walks its own tokens down the top levels, sends every (token, tree) item to the
  device owning the subtree it reached (``jax.lax.all_to_all``), the owner walks the rest of the
  path, and the outputs come back the same way.

**Capacity and the exact overflow path.** A round ships at most ``capacity`` items from each
device to each other device (``capacity = ceil(capacity_factor * items / P)``). Items beyond it
are shipped by further rounds of the same exchange, inside a ``lax.scan`` of ``lax.cond``s that
run only while some device of the mesh still holds unshipped items (the predicate is a ``pmax``,
so every device takes the same branch). Any routing skew, including every token in one subtree,
is therefore computed exactly; nothing is dropped or altered. Skew costs extra rounds, not
accuracy. Reverse-mode AD stores the residuals of every possible round (memory grows with
``P / capacity_factor`` rounds of ``P * capacity`` rows); the collectives of skipped rounds are
not run.

**Weight layout.** The public functions take the usual heap layout (FFF-v2: ``w_in (K*N, H)``,
tree ``k`` in rows ``[k*N, (k+1)*N)``, heap order inside a tree) and permute rows with constant
index tables (:func:`subtree_rows`), a differentiable gather, so gradients come back in the heap
layout. The permuted layout is:

* ``top``: ``(K * T, ...)`` with ``T = 2**p - 1``; row ``k*T + n`` is heap node ``n`` of tree
  ``k`` (the top levels keep their heap indices); replicated (``P()``).
* ``sub``: ``(P * K * M, ...)`` with ``M`` nodes per subtree; row ``(d*K + k)*M + m`` is local
  heap node ``m`` (heap order inside the subtree) of device ``d``'s subtree of tree ``k``. Each
  device's block of ``K*M`` rows is contiguous, so ``P(axis)`` on the row dimension gives device
  ``d`` exactly its subtrees.

A model that keeps its weights in the permuted layout (:func:`to_tree_parallel_layout`,
:func:`from_tree_parallel_layout`) can call :func:`fff_v2_subtree_parallel` directly and skip the
gathers. FFF-v1 leaves (``w1s (2**depth, ...)``) are already contiguous per subtree; only its
routing nodes are permuted.

**Tokens.** In ``mode="subtree"`` tokens are sharded over every mesh axis (the other axes, e.g.
``"data"``, first, then ``axis``); in ``mode="trees"`` and in the FFF-v1 soft forward tokens are
sharded over the other axes and replicated over ``axis``, whose devices each compute a part of
the output and ``psum`` it. Token counts that do not divide are padded with zero rows whose
outputs are discarded.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fffjax import ops, tree, v1, v2
from fffjax._typing import Activation, Array, Float, Int

HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("subtree", "trees")


# ----------------------------------------------------------------------------- layout


def check_axis(mesh, axis: str) -> int:
    """Size ``P`` of ``mesh``'s ``axis``; raises unless it exists and is a power of two."""
    if mesh is None or not hasattr(mesh, "shape"):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must name an axis of mesh {tuple(mesh.axis_names)}, got {axis!r}")
    size = mesh.shape[axis]
    if size & (size - 1):
        raise ValueError(f"mesh axis {axis!r} must have a power-of-two size, got {size}")
    return size


def subtree_rows(levels: int, top_levels: int, n_trees: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Heap rows of the replicated top and of each device's subtrees (the permuted layout).

    Args:
        levels: levels of each tree (FFF-v2: ``depth + 1``; FFF-v1 routing nodes: ``depth``).
        top_levels: ``p = log2(P)`` replicated levels (``0 <= p <= levels``).
        n_trees: K trees of ``2**levels - 1`` rows each, tree ``k`` at rows ``[k*N, (k+1)*N)``.

    Returns:
        ``top (K*T,)`` and ``sub (P*K*M,)`` int32 heap row indices, ``T = 2**p - 1``,
        ``M = 2**(levels - p) - 1``; ``sub[(d*K + k)*M + m]`` is local node ``m`` of device
        ``d``'s subtree of tree ``k``.
    """
    if not 0 <= top_levels <= levels:
        raise ValueError(f"top_levels must be in [0, {levels}], got {top_levels}")
    per_tree = tree.num_nodes(levels)
    n_top, n_shards, per_sub = tree.num_nodes(top_levels), 2**top_levels, tree.num_nodes(levels - top_levels)
    trees = np.arange(n_trees)
    top = (trees[:, None] * per_tree + np.arange(n_top)[None, :]).reshape(-1)
    local = np.arange(per_sub)
    local_level = np.floor(np.log2(local + 1)).astype(np.int64)
    position = local - (2**local_level - 1)
    shard = np.arange(n_shards)[:, None]
    heap = 2 ** (top_levels + local_level)[None, :] - 1 + shard * 2 ** local_level[None, :] + position[None, :]
    sub = trees[None, :, None] * per_tree + heap[:, None, :]                 # (P, K, M)
    return top.astype(np.int32), sub.reshape(-1).astype(np.int32)


def to_tree_parallel_layout(w: Array, *, levels: int, top_levels: int, n_trees: int = 1) -> tuple[Array, Array]:
    """Split a heap-layout table ``(K*N, ...)`` into ``(top (K*T, ...), sub (P*K*M, ...))``."""
    top, sub = subtree_rows(levels, top_levels, n_trees)
    return w[top], w[sub]


def from_tree_parallel_layout(top_w: Array, sub_w: Array, *, levels: int, top_levels: int,
                              n_trees: int = 1) -> Array:
    """Inverse of :func:`to_tree_parallel_layout`: the heap-layout ``(K*N, ...)`` table."""
    top, sub = subtree_rows(levels, top_levels, n_trees)
    out = jnp.zeros((n_trees * tree.num_nodes(levels),) + top_w.shape[1:], top_w.dtype)
    return out.at[top].set(top_w).at[sub].set(sub_w)


# ----------------------------------------------------------------------------- routing


def _explicit(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _placed(mesh, specs, *arrays):
    """On a mesh with Explicit axes, reshard ``arrays`` to ``specs`` (shard_map asserts them there)."""
    if not _explicit(mesh):
        return arrays
    return tuple(jax.sharding.reshard(a, jax.NamedSharding(mesh, s)) for a, s in zip(arrays, specs, strict=True))


def _unpadded(y: Array, n_rows: int, mesh) -> Array:
    """Drop padding rows; on an Explicit mesh, gather first (a ragged slice of a sharded array is refused)."""
    if y.shape[0] == n_rows:
        return y
    if _explicit(mesh):
        y = jax.sharding.reshard(y, jax.NamedSharding(mesh, P()))
    return y[:n_rows]


def _varying(arrays, axes):
    """Mark replicated weights device-varying once, so their gradient is one ``psum`` of the
    weight-sized cotangent (not of the token-sized rows gathered by the invariant first level)."""
    if not axes:
        return tuple(arrays)
    return tuple(jax.lax.pcast(a, tuple(axes), to="varying") for a in arrays)


def _pad_rows(x: Array, multiple: int) -> Array:
    extra = (-x.shape[0]) % multiple
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def _ranks(dest: Int[Array, " items"], n_shards: int) -> tuple[Array, Array]:
    """Each item's position among the items bound for the same device, and the per-device counts."""
    onehot = (dest[:, None] == jnp.arange(n_shards)[None, :]).astype(jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    return rank, onehot.sum(axis=0)


def _routed_apply(
    items: Float[Array, "items din"],
    meta: Int[Array, " items"],
    dest: Int[Array, " items"],
    compute: Callable[[Array, Array], Array],
    *,
    out_features: int,
    axis: str,
    all_axes: tuple[str, ...],
    n_shards: int,
    capacity: int,
) -> Float[Array, "items dout"]:
    """Send each item to device ``dest`` over ``axis``, apply ``compute`` there, bring the result back.

    ``compute(rows (P*C, din), meta (P*C,)) -> (P*C, dout)`` sees ``meta = -1`` in empty slots and
    must return zeros there. Rounds of ``capacity`` items per destination repeat until every item
    has been shipped (see the module docstring); the result is exact for any ``dest``.
    """
    n_items = items.shape[0]
    rank, counts = _ranks(dest, n_shards)
    slots = n_shards * capacity

    def one_round(first_rank):
        in_round = (rank >= first_rank) & (rank < first_rank + capacity)
        slot = jnp.where(in_round, dest * capacity + rank - first_rank, slots)
        send = jnp.zeros((slots, items.shape[1]), items.dtype).at[slot].set(items, mode="drop")
        send_meta = jnp.full((slots,), -1, jnp.int32).at[slot].set(meta, mode="drop")
        recv = jax.lax.all_to_all(send.reshape(n_shards, capacity, -1), axis, 0, 0)
        recv_meta = jax.lax.all_to_all(send_meta.reshape(n_shards, capacity), axis, 0, 0)
        out = compute(recv.reshape(slots, -1), recv_meta.reshape(slots))
        back = jax.lax.all_to_all(out.reshape(n_shards, capacity, out_features), axis, 0, 0)
        return back.reshape(slots, out_features).at[slot].get(mode="fill", fill_value=0)

    result = one_round(0)
    n_rounds = -(-n_items // capacity)
    if n_rounds > 1:
        # Same predicate on every device of the mesh: the busiest (source, destination) pair.
        busiest = jax.lax.pmax(jnp.max(counts), all_axes)

        def overflow_round(acc, r):
            first = r * capacity
            acc = jax.lax.cond(busiest > first, lambda a: a + one_round(first), lambda a: a, acc)
            return acc, None

        result, _ = jax.lax.scan(overflow_round, result, jnp.arange(1, n_rounds))
    return result


def _capacity(n_items: int, n_shards: int, capacity_factor: float) -> int:
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    return max(1, min(n_items, math.ceil(capacity_factor * n_items / n_shards)))


# ----------------------------------------------------------------------------- FFF-v2


def _v2_walk(x, w_in, b_in, w_out, node, offsets, levels, acc):
    """``levels`` hard steps of FFF-v2 from local ``node (B, K)``; returns (output, final node)."""
    y = jnp.zeros((x.shape[0], w_out.shape[1]), acc)
    for _ in range(levels):
        flat = node + offsets
        z = jnp.einsum("bh,bkh->bk", x, w_in[flat], precision=HIGHEST, preferred_element_type=acc)
        z = z + b_in[flat].astype(acc)
        y = y + jnp.einsum("bk,bkh->bh", v2.gelu(z).astype(x.dtype), w_out[flat], precision=HIGHEST,
                           preferred_element_type=acc)
        node = tree.child(node, z > 0)
    return y, node


def _checks_vma(implementation: str | None) -> bool:
    """Whether the tree-parallel ``shard_map`` types its values by the mesh axes they vary over.

    Compiled, the Pallas kernels declare how their outputs vary (:func:`fffjax._vma.out_struct`), so
    the ``shard_map`` is checked. In Pallas interpret mode (off a GPU) jax evaluates a kernel's body
    with per-device blocks beside invariant grid indices and rejects it under the check; there the
    ``shard_map`` runs unchecked. Each device's output depends only on its own inputs either way,
    and the unchecked transpose sums the cotangents of replicated inputs over the devices, so the
    gradients are the same.
    """
    return not (implementation == "pallas" and jax.default_backend() != "gpu")


def _v2_subtree_body(x, top_w_in, top_b_in, top_w_out, sub_w_in, sub_b_in, sub_w_out, *,
                     depth, n_trees, top_levels, axis, all_axes, capacity_factor, implementation):
    n_shards = 2**top_levels
    acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else x.dtype
    top_w_in, top_b_in, top_w_out = _varying((top_w_in, top_b_in, top_w_out), all_axes)
    data_axes = tuple(a for a in all_axes if a != axis)
    sub_w_in, sub_b_in, sub_w_out = _varying((sub_w_in, sub_b_in, sub_w_out), data_axes)
    n_top, per_sub = tree.num_nodes(top_levels), tree.num_nodes(depth + 1 - top_levels)
    node0 = jnp.zeros((x.shape[0], n_trees), jnp.int32)
    top_offsets = jnp.asarray(np.arange(n_trees) * n_top, jnp.int32)
    y, node = _v2_walk(x, top_w_in, top_b_in, top_w_out, node0, top_offsets, top_levels, acc)
    dest = (node - n_top).reshape(-1)                                   # (B*K,) owning device
    items = jnp.broadcast_to(x[:, None, :], (x.shape[0], n_trees, x.shape[1])).reshape(-1, x.shape[1])
    trees = jnp.broadcast_to(jnp.arange(n_trees, dtype=jnp.int32), (x.shape[0], n_trees)).reshape(-1)

    def compute(rows, tree_of_row):
        valid = tree_of_row >= 0
        if n_trees == 1:
            # The device's subtree is one whole FFF-v2 tree in heap order: any registered kernel runs it.
            out = ops.fff_v2_hard(rows, sub_w_in, sub_b_in, sub_w_out, depth=depth - top_levels,
                                  implementation=implementation)
        else:   # each row walks its own tree's subtree
            offsets = (jnp.maximum(tree_of_row, 0) * per_sub)[:, None]
            start = jnp.zeros((rows.shape[0], 1), jnp.int32)
            out, _ = _v2_walk(rows, sub_w_in, sub_b_in, sub_w_out, start, offsets, depth + 1 - top_levels, acc)
        return jnp.where(valid[:, None], out, 0).astype(rows.dtype)

    capacity = _capacity(items.shape[0], n_shards, capacity_factor)
    routed = _routed_apply(items, trees, dest, compute, out_features=sub_w_out.shape[1], axis=axis,
                           all_axes=all_axes, n_shards=n_shards, capacity=capacity)
    y = y + routed.reshape(x.shape[0], n_trees, -1).sum(axis=1, dtype=acc)
    return y.astype(x.dtype)


def fff_v2_subtree_parallel(
    x: Float[Array, "tokens din"],
    top_w_in: Float[Array, "top din"],
    top_b_in: Float[Array, " top"],
    top_w_out: Float[Array, "top dout"],
    sub_w_in: Float[Array, "sub din"],
    sub_b_in: Float[Array, " sub"],
    sub_w_out: Float[Array, "sub dout"],
    *,
    depth: int,
    n_trees: int = 1,
    mesh,
    axis: str = "model",
    capacity_factor: float = 1.25,
    implementation: str | None = None,
) -> Float[Array, "tokens dout"]:
    """FFF-v2 subtree-parallel forward on weights already in the permuted layout (module docstring).

    Args:
        x: ``(tokens, H)``.
        top_w_in, top_b_in, top_w_out: ``(K*T, H)``, ``(K*T,)``, ``(K*T, H_out)``, replicated.
        sub_w_in, sub_b_in, sub_w_out: ``(P*K*M, H)``, ``(P*K*M,)``, ``(P*K*M, H_out)``, sharded
            (or to be sharded) ``P(axis)`` on the rows.
        depth, n_trees, mesh, axis, capacity_factor, implementation: as :func:`fff_v2_tree_parallel`.

    Returns:
        ``(tokens, H_out)``.
    """
    n_shards = check_axis(mesh, axis)
    if implementation == "pallas" and n_trees > 1:
        raise NotImplementedError(
            f"implementation='pallas' runs a device's subtrees in mode='subtree' only for n_trees=1 (with "
            f"n_trees={n_trees} each item walks its own tree's subtree in jnp); use mode='trees' or "
            "implementation=None")
    top_levels = n_shards.bit_length() - 1
    other = tuple(a for a in mesh.axis_names if a != axis)
    token_spec = P((*other, axis))
    n_tokens = x.shape[0]
    x = _pad_rows(x, math.prod(mesh.shape.values()))
    body = functools.partial(_v2_subtree_body, depth=depth, n_trees=n_trees, top_levels=top_levels,
                             axis=axis, all_axes=tuple(mesh.axis_names), capacity_factor=capacity_factor,
                             implementation=implementation)
    specs = (token_spec, P(), P(), P(), P(axis), P(axis), P(axis))
    args = _placed(mesh, specs, x, top_w_in, top_b_in, top_w_out, sub_w_in, sub_b_in, sub_w_out)
    y = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=token_spec,
                      check_vma=_checks_vma(implementation))(*args)
    return _unpadded(y, n_tokens, mesh)


def _v2_trees_body(x, w_in, b_in, w_out, *, depth, n_local_trees, axis, data_axes, implementation):
    w_in, b_in, w_out = _varying((w_in, b_in, w_out), data_axes)
    y = ops.fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_local_trees, implementation=implementation)
    return jax.lax.psum(y, axis)


def fff_v2_tree_parallel(
    x: Float[Array, "*batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    w_out: Float[Array, "nodes dout"],
    *,
    depth: int,
    n_trees: int = 1,
    mesh,
    axis: str = "model",
    mode: str = "subtree",
    capacity_factor: float = 1.25,
    implementation: str | None = None,
) -> Float[Array, "*batch dout"]:
    """FFF-v2 hard forward, tree-parallel over ``mesh``'s ``axis``; equals :func:`fffjax.ops.fff_v2_hard`.

    Args:
        x: ``(..., H)`` floating inputs.
        w_in: ``(K*N, H)``; b_in: ``(K*N,)``; w_out: ``(K*N, H_out)``; heap layout,
            ``N = 2**(depth+1) - 1`` (the layout of :func:`fffjax.ops.fff_v2_hard`).
        depth: descents per tree; n_trees: K.
        mesh: a ``jax.sharding.Mesh``; other axes than ``axis`` shard the tokens.
        axis: the mesh axis (power-of-two size P) the trees are split over.
        mode: ``"subtree"``: the top ``log2(P)`` levels replicated, each device owns one subtree
            per tree, tokens routed by ``all_to_all`` (needs ``depth + 1 > log2(P)``);
            ``"trees"``: each device owns ``K/P`` whole trees, outputs summed by ``psum`` (needs
            ``n_trees % P == 0``).
        capacity_factor: items per round and destination, as a multiple of the balanced share
            (``"subtree"`` only; any value is exact, smaller ones cost more rounds under skew).
        implementation: the :func:`fffjax.ops.fff_v2_hard` implementation each device runs on its
            whole trees (``"trees"``) or its subtree (``"subtree"`` with one tree; K > 1 subtrees
            walk in jnp, and ``"pallas"`` raises ``NotImplementedError`` there), any registered one;
            ``None``: the platform's choice, as outside ``shard_map`` (``"cpu_ffi"`` on the CPU,
            ``"pallas"`` or ``"reference"`` on a GPU).

    Returns:
        ``(..., H_out)`` in the dtype of ``x``; differentiable in ``x`` and the weights.
    """
    if implementation == "pallas_tpu":
        raise NotImplementedError("implementation='pallas_tpu' does not run inside the tree-parallel shard_map (its "
                                  "kernel does not declare the mesh axes its output varies over); use 'xla'")
    n_shards = check_axis(mesh, axis)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    v2.check_arguments(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    top_levels = n_shards.bit_length() - 1
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if mode == "subtree":
        if not depth + 1 > top_levels:
            raise ValueError(f"depth must satisfy depth + 1 > log2(P) = {top_levels} for mode='subtree' "
                             f"on axis {axis!r} of size {n_shards}, got depth={depth}")
        top, sub = subtree_rows(depth + 1, top_levels, n_trees)
        y = fff_v2_subtree_parallel(
            x2, w_in[top], b_in[top], w_out[top], w_in[sub], b_in[sub], w_out[sub], depth=depth,
            n_trees=n_trees, mesh=mesh, axis=axis, capacity_factor=capacity_factor, implementation=implementation)
    else:
        if n_trees % n_shards:
            raise ValueError(f"n_trees must be a multiple of the size {n_shards} of axis {axis!r} "
                             f"for mode='trees', got n_trees={n_trees}")
        other = tuple(a for a in mesh.axis_names if a != axis)
        token_spec = P(other if other else None)
        x2p = _pad_rows(x2, math.prod(mesh.shape[a] for a in other))
        body = functools.partial(_v2_trees_body, depth=depth, n_local_trees=n_trees // n_shards, axis=axis,
                                 data_axes=other, implementation=implementation)
        specs = (token_spec, P(axis), P(axis), P(axis))
        args = _placed(mesh, specs, x2p, w_in, b_in, w_out)
        y = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=token_spec,
                          check_vma=_checks_vma(implementation))(*args)
        y = _unpadded(y, x2.shape[0], mesh)
    return y.reshape(*lead, w_out.shape[1])


# ----------------------------------------------------------------------------- FFF-v1


def _v1_hard_body(x, top_nw, top_nb, sub_nw, sub_nb, w1s, b1s, w2s, b2s, *, depth, top_levels, axis,
                  all_axes, activation, leaf_output_bias, capacity_factor, implementation):
    n_shards = 2**top_levels
    top_nw, top_nb = _varying((top_nw, top_nb), all_axes)
    data_axes = tuple(a for a in all_axes if a != axis)
    sub_nw, sub_nb, w1s, b1s, w2s, b2s = _varying((sub_nw, sub_nb, w1s, b1s, w2s, b2s), data_axes)
    node = jnp.zeros((x.shape[0],), jnp.int32)
    for _ in range(top_levels):
        z = jnp.einsum("bi,bi->b", x, top_nw[node], precision=HIGHEST) + top_nb[node]
        node = tree.child(node, z >= 0)
    dest = node - tree.num_nodes(top_levels)
    sub_levels = depth - top_levels

    def compute(rows, meta):
        # The device's routing nodes and leaves are one whole FFF-v1 of sub_levels levels: any registered
        # kernel runs it.
        out = ops.fff_v1_hard(rows, sub_nw, sub_nb, w1s, b1s, w2s, b2s, depth=sub_levels, activation=activation,
                              leaf_output_bias=leaf_output_bias, implementation=implementation)
        return jnp.where((meta >= 0)[:, None], out, 0).astype(rows.dtype)

    capacity = _capacity(x.shape[0], n_shards, capacity_factor)
    meta = jnp.zeros((x.shape[0],), jnp.int32)
    return _routed_apply(x, meta, dest, compute, out_features=w2s.shape[2], axis=axis, all_axes=all_axes,
                         n_shards=n_shards, capacity=capacity)


def _v1_soft_body(x, nw, nb, w1s, b1s, w2s, b2s, *, depth, axis, data_axes, activation):
    nw, nb = _varying((nw, nb), (*data_axes, axis))
    w1s, b1s, w2s, b2s = _varying((w1s, b1s, w2s, b2s), data_axes)
    leaves_per_device = w1s.shape[0]
    p = jax.nn.sigmoid(v1.node_logits(x, nw, nb))
    mixture = v1.leaf_mixture(v1.level_modifiers(p, depth), x.shape[0], x.dtype)
    start = jax.lax.axis_index(axis) * leaves_per_device
    own = jax.lax.dynamic_slice_in_dim(mixture, start, leaves_per_device, axis=1)
    outputs = v1.leaf_outputs(x, w1s, b1s, w2s, b2s, activation=activation)
    return jax.lax.psum(jnp.sum(outputs * own[:, :, None], axis=1), axis)


def fff_v1_tree_parallel(
    x: Float[Array, "*batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes *one"],
    w1s: Float[Array, "leaves din width"],
    b1s: Float[Array, "leaves width"],
    w2s: Float[Array, "leaves width dout"],
    b2s: Float[Array, "leaves dout"],
    *,
    depth: int,
    mesh,
    axis: str = "model",
    soft: bool = False,
    activation: Activation = jax.nn.relu,
    leaf_output_bias: bool = True,
    capacity_factor: float = 1.25,
    implementation: str | None = None,
) -> Float[Array, "*batch dout"]:
    """FFF-v1 forward with the ``2**depth`` leaves split over ``mesh``'s ``axis`` (size P, ``depth >= log2(P)``).

    ``soft=False``: the hard forward of :func:`fffjax.ops.fff_v1_hard` (right when ``z >= 0``),
    routed like :func:`fff_v2_tree_parallel` (top ``log2(P)`` routing levels replicated, each
    device owns ``2**depth / P`` contiguous leaves and their routing nodes, tokens moved by
    ``all_to_all`` with the exact overflow path). ``soft=True``: the training mixture of
    :func:`fffjax.v1.soft_forward` (no leak, dropout or rounding): every device evaluates the
    replicated nodes and its own leaves on all of its tokens and the partial mixtures are summed
    with ``psum``.

    Args:
        x: ``(..., in)``; node_weights ``(2**depth - 1, in)``; node_biases ``(2**depth - 1,)`` or ``(n, 1)``;
            w1s ``(2**depth, in, width)``; b1s ``(2**depth, width)``; w2s ``(2**depth, width, out)``;
            b2s ``(2**depth, out)``.
        depth: routing levels; mesh, axis: the mesh and the axis the leaves are split over.
        activation: leaf hidden activation; leaf_output_bias: add ``b2s`` (hard forward).
        capacity_factor: as :func:`fff_v2_tree_parallel` (hard forward only).
        implementation: the :func:`fffjax.ops.fff_v1_hard` implementation each device runs on its
            subtree (hard forward only: the soft mixture has no kernel and refuses anything but
            ``None``); ``None``: the platform's choice, as outside ``shard_map``.

    Returns:
        ``(..., out)``; differentiable.
    """
    n_shards = check_axis(mesh, axis)
    top_levels = n_shards.bit_length() - 1
    node_biases = v1.check_arguments(x, node_weights, node_biases, w1s, b1s, w2s, b2s, depth=depth)
    if depth < top_levels:
        raise ValueError(f"depth must be an int >= log2(P) = {top_levels} for axis {axis!r} of size "
                         f"{n_shards}, got {depth!r}")
    if soft and implementation is not None:
        raise ValueError(f"implementation must be None for soft=True (the soft mixture runs in jnp; kernels "
                         f"run the hard forward), got {implementation!r}")
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    other = tuple(a for a in mesh.axis_names if a != axis)
    leaf_specs = (P(axis),) * 4
    if soft:
        token_spec = P(other if other else None)
        x2p = _pad_rows(x2, math.prod(mesh.shape[a] for a in other))
        body = functools.partial(_v1_soft_body, depth=depth, axis=axis, data_axes=other, activation=activation)
        specs = (token_spec, P(), P()) + leaf_specs
        args = _placed(mesh, specs, x2p, node_weights, node_biases, w1s, b1s, w2s, b2s)
        y = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=token_spec)(*args)
    else:
        token_spec = P((*other, axis))
        x2p = _pad_rows(x2, math.prod(mesh.shape.values()))
        top, sub = subtree_rows(depth, top_levels)
        body = functools.partial(
            _v1_hard_body, depth=depth, top_levels=top_levels, axis=axis, all_axes=tuple(mesh.axis_names),
            activation=activation, leaf_output_bias=leaf_output_bias, capacity_factor=capacity_factor,
            implementation=implementation)
        specs = (token_spec, P(), P(), P(axis), P(axis)) + leaf_specs
        args = _placed(mesh, specs, x2p, node_weights[top], node_biases[top], node_weights[sub],
                       node_biases[sub], w1s, b1s, w2s, b2s)
        y = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=token_spec,
                          check_vma=_checks_vma(implementation))(*args)
    return _unpadded(y, x2.shape[0], mesh).reshape(*lead, w2s.shape[2])
