"""FFF-v2 hard inference with the deep levels of the trees in host memory (weight streaming).

With balanced routing a node at level ``l`` serves ``2**-l`` of the tokens, so the top levels are the
best static cache: :func:`stream_v2` keeps levels ``0 .. hot_levels - 1`` of every tree in device
memory and the ``cold_levels = depth + 1 - hot_levels`` levels below in ``pinned_host`` memory. No
predictor decides which rows are hot.

The cold levels are stored as one subtree per (tree, level-``hot_levels`` node), and each node as one
bundle row ``[w_in row | w_out row | b_in]`` (``din + dout + 1`` values): a token's whole cold subtree
is one contiguous block of ``subtree_nodes x (din + dout + 1)`` values, so a single read fetches it.

:func:`fff_v2_streamed` walks the hot levels on the device (row gathers, as ``implementation="xla"``
of :func:`fffjax.fff_v2_hard`), then serves the cold levels one of two ways (``serve=``):

* ``"fetch"``: each token's cold subtree block is gathered in host memory and copied to the device in
  one transfer, and the walk finishes there (it reads ``2**cold_levels - 1`` bundle rows per token and
  tree to use ``cold_levels`` of them).
* ``"host"``: the tokens go to the host, the cold levels are walked there on the rows themselves
  (``compute_on("device_host")``) and only the partial outputs come back.

Both are exact: the same per-node arithmetic as :func:`fffjax.v2.conditional_forward`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import compute_on as _compute_on

from fffjax import tree, v2
from fffjax._typing import Array, Float, Int

SERVE = ("fetch", "host")
COLD_MEMORY_KIND = "pinned_host"

# The function form of compute_on: ``compute_on2`` in jax 0.10, ``compute_on`` itself from jax 0.11 on
# (where the context-manager form is gone).
_function_form = getattr(_compute_on, "compute_on2", None) or _compute_on.compute_on


def on_host(fn):
    """``fn`` run on the host (``compute_type="device_host"``), its outputs left in host memory."""
    return _function_form(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["hot_w_in", "hot_b_in", "hot_w_out", "cold"],
                   meta_fields=["depth", "n_trees", "hot_levels"])
@dataclasses.dataclass(frozen=True)
class StreamedV2:
    """An FFF-v2 layer split between device and host memory (a pytree: pass it to ``jax.jit``).

    Attributes:
        hot_w_in, hot_b_in, hot_w_out: ``(K * (2**hot_levels - 1), din)``, ``(K * (2**hot_levels - 1),)``,
            ``(K * (2**hot_levels - 1), dout)``: the top ``hot_levels`` levels of every tree, tree-major,
            level order inside a tree (a layer of depth ``hot_levels - 1``), in device memory.
        cold: ``(K * 2**hot_levels, subtree_nodes, din + dout + 1)``, in host memory: block
            ``tree * 2**hot_levels + r`` is the subtree under node ``r`` of level ``hot_levels``, its
            nodes in level order, each row ``[w_in row | w_out row | b_in]``.
        depth, n_trees, hot_levels: the layer's ``D`` and ``K``; levels kept on the device.
    """

    hot_w_in: Float[Array, "hot_nodes din"]
    hot_b_in: Float[Array, " hot_nodes"]
    hot_w_out: Float[Array, "hot_nodes dout"]
    cold: Float[Array, "blocks subtree_nodes bundle"]
    depth: int
    n_trees: int
    hot_levels: int

    @property
    def din(self) -> int:
        return self.hot_w_in.shape[1]

    @property
    def dout(self) -> int:
        return self.cold.shape[2] - self.din - 1

    @property
    def cold_levels(self) -> int:
        return self.depth + 1 - self.hot_levels

    @property
    def subtree_nodes(self) -> int:
        return 2**self.cold_levels - 1


def check_hot_levels(hot_levels: int, depth: int) -> None:
    """Refuse a ``hot_levels`` outside ``0 .. depth`` (at least the leaf level stays in host memory)."""
    if not isinstance(hot_levels, int | np.integer) or not 0 <= hot_levels <= depth:
        raise ValueError(f"hot_levels must be an int in 0..depth={depth} (levels kept on the device; the "
                         f"levels below stay in host memory), got {hot_levels!r}")


def cold_subtree_nodes(depth: int, hot_levels: int) -> Int[np.ndarray, "roots subtree_nodes"]:
    """``(2**hot_levels, 2**(depth + 1 - hot_levels) - 1)``: the node index within one tree of each cold
    subtree's nodes, subtree ``r`` rooted at node ``r`` of level ``hot_levels``, nodes in level order."""
    tree.check_depth(depth)
    check_hot_levels(hot_levels, depth)
    roots = np.arange(2**hot_levels)[:, None]
    levels = [(2 ** (hot_levels + j) - 1) + roots * 2**j + np.arange(2**j)[None, :]
              for j in range(depth + 1 - hot_levels)]
    return np.concatenate(levels, axis=1).astype(np.int64)


def hot_rows(depth: int, n_trees: int, hot_levels: int) -> Int[np.ndarray, " hot_nodes"]:
    """Flat indices in the ``(K * N, ...)`` node table of the hot levels' rows, tree-major."""
    per_tree = tree.v2_nodes_per_tree(depth)
    return (np.arange(n_trees)[:, None] * per_tree + np.arange(2**hot_levels - 1)[None, :]).reshape(-1)


def bundle_cold_levels(w_in, b_in, w_out, *, depth: int, n_trees: int,
                       hot_levels: int) -> Float[np.ndarray, "blocks subtree_nodes bundle"]:
    """The cold levels of a ``(K * N, ...)`` node table as :attr:`StreamedV2.cold` (numpy, on the host)."""
    w_in, b_in, w_out = (np.asarray(a) for a in (w_in, b_in, w_out))
    nodes = cold_subtree_nodes(depth, hot_levels)
    flat = (np.arange(n_trees)[:, None, None] * tree.v2_nodes_per_tree(depth) + nodes[None]).reshape(
        n_trees * nodes.shape[0], nodes.shape[1])
    return np.concatenate([w_in[flat], w_out[flat], b_in[flat][..., None]], axis=-1)


def stream_v2(w_in: Float[Array, "nodes din"], b_in: Float[Array, " nodes"], w_out: Float[Array, "nodes dout"],
              *, depth: int, n_trees: int = 1, hot_levels: int, device=None) -> StreamedV2:
    """Split an FFF-v2 layer (the :mod:`fffjax.v2` layout) into its hot levels on ``device`` (default: the
    first device) and its cold levels in that device's ``pinned_host`` memory, bundled by subtree.

    The weights pass through host numpy arrays, so a layer built here has to fit in host memory twice;
    :class:`StreamedV2` can also be built from arrays placed by the caller (``experiments/bench_streaming.py``
    fills a layer larger than the device's memory chunk by chunk).
    """
    v2.check_arguments(None, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    check_hot_levels(hot_levels, depth)
    dtypes = {jnp.dtype(a.dtype) for a in (w_in, b_in, w_out)}
    if len(dtypes) != 1:
        raise ValueError("w_in, b_in and w_out must share one dtype (a node's rows and bias are stored as one "
                         f"bundle row), got {w_in.dtype}, {b_in.dtype} and {w_out.dtype}")
    device = device or jax.devices()[0]
    hot = hot_rows(depth, n_trees, hot_levels)
    on_device = jax.sharding.SingleDeviceSharding(device)
    on_host = jax.sharding.SingleDeviceSharding(device, memory_kind=COLD_MEMORY_KIND)
    w_in_np, b_in_np, w_out_np = (np.asarray(a) for a in (w_in, b_in, w_out))
    cold = bundle_cold_levels(w_in_np, b_in_np, w_out_np, depth=depth, n_trees=n_trees, hot_levels=hot_levels)
    return StreamedV2(hot_w_in=jax.device_put(w_in_np[hot], on_device),
                      hot_b_in=jax.device_put(b_in_np[hot], on_device),
                      hot_w_out=jax.device_put(w_out_np[hot], on_device),
                      cold=jax.device_put(cold, on_host), depth=depth, n_trees=n_trees, hot_levels=hot_levels)


def _accumulator(dtype):
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def _level(x, rows_in, bias, rows_out, y, acc):
    """One level of every tree: logits of the ``(B, K)`` current nodes and their outputs added to ``y``."""
    # 16-bit products are exact in the float32 accumulator without HIGHEST, which would have XLA convert a
    # whole gathered-from table to float32 first (a copy as large as the hot levels themselves).
    precision = v2.HIGHEST if x.dtype == jnp.float32 else None
    z = jnp.einsum("bh,bkh->bk", x, rows_in, precision=precision, preferred_element_type=acc)
    z = z + bias.astype(acc)
    y = y + jnp.einsum("bk,bkh->bh", v2.gelu(z).astype(x.dtype), rows_out, precision=precision,
                       preferred_element_type=acc)
    return z, y


def hot_walk(x: Float[Array, "batch din"], layer: StreamedV2) -> tuple[Float[Array, "batch dout"],
                                                                      Int[Array, "batch trees"]]:
    """The hot levels on the device: the output summed over them (float32 for 16-bit inputs) and each
    token's cold block per tree (``tree * 2**hot_levels + r``, the index into :attr:`StreamedV2.cold`)."""
    acc = _accumulator(x.dtype)
    per_tree = 2**layer.hot_levels - 1
    offsets = jnp.asarray(np.arange(layer.n_trees) * per_tree, jnp.int32)
    node = jnp.zeros((x.shape[0], layer.n_trees), jnp.int32)
    y = jnp.zeros((x.shape[0], layer.dout), acc)
    for _ in range(layer.hot_levels):
        flat = node + offsets
        z, y = _level(x, layer.hot_w_in[flat], layer.hot_b_in[flat], layer.hot_w_out[flat], y, acc)
        node = tree.child(node, z > 0)
    block = jnp.arange(layer.n_trees, dtype=jnp.int32) * 2**layer.hot_levels + (node - per_tree)
    return y, block


def _cold_walk(x, rows_of, layer: StreamedV2, s, y):
    """The cold levels from the ``(B, K)`` subtree-local nodes ``s`` (zeros: the subtree roots), adding to
    ``y``; ``rows_of(s)`` gives the ``(B, K, bundle)`` rows of the nodes ``s``. ``s`` and ``y`` are passed
    in, not created here, so that on the host they carry host memory like the other operands."""
    din, dout, acc = layer.din, layer.dout, y.dtype
    for _ in range(layer.cold_levels):
        rows = rows_of(s)
        z, y = _level(x, rows[..., :din], rows[..., din + dout], rows[..., din:din + dout], y, acc)
        s = tree.child(s, z > 0)
    return y


def walk_fetched(x: Float[Array, "batch din"], blocks: Float[Array, "batch trees subtree_nodes bundle"],
                 y: Float[Array, "batch dout"], layer: StreamedV2) -> Float[Array, "batch dout"]:
    """The cold levels on the device from each token's fetched subtree blocks (``layer.cold`` rows of the
    blocks :func:`hot_walk` names), added to the hot levels' output ``y`` (float32 for 16-bit inputs).
    ``layer.cold`` itself is not read: a caller may fetch the blocks its own way."""
    s = jnp.zeros(blocks.shape[:2], jnp.int32)
    return _cold_walk(x, lambda s: jnp.take_along_axis(blocks, s[..., None, None], axis=2)[:, :, 0], layer, s, y)


@functools.partial(jax.jit, static_argnames=("serve",))
def fff_v2_streamed(x: Float[Array, "batch din"], layer: StreamedV2, *,
                    serve: str = "fetch") -> Float[Array, "batch dout"]:
    """FFF-v2 hard forward of a :class:`StreamedV2` layer; equals :func:`fffjax.v2.conditional_forward`
    of the unsplit layer. ``serve``: ``"fetch"`` (cold subtrees copied to the device, one block per token
    and tree) or ``"host"`` (cold levels computed in host memory)."""
    if serve not in SERVE:
        raise ValueError(f"serve must be one of {SERVE}, got {serve!r}")
    tree.check_inputs(x, layer.din, "layer.din")
    y, block = hot_walk(x, layer)
    block_on_host = jax.device_put(block, jax.memory.Space.Host)
    if serve == "fetch":
        blocks = on_host(lambda cold, b: cold[b])(layer.cold, block_on_host)   # (B, K, subtree_nodes, bundle)
        y = walk_fetched(x, jax.device_put(blocks, jax.memory.Space.Device), y, layer)
    else:
        x_on_host, s_on_host, y_on_host = jax.device_put(
            (x, jnp.zeros_like(block), jnp.zeros_like(y)), jax.memory.Space.Host)
        y_cold = on_host(lambda xh, cold, b, s, yh: _cold_walk(xh, lambda s: cold[b, s], layer, s, yh))(
            x_on_host, layer.cold, block_on_host, s_on_host, y_on_host)
        y = y + jax.device_put(y_cold, jax.memory.Space.Device)
    return y.astype(x.dtype)
