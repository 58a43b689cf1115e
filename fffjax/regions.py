"""Inspect the regions an FFF tree carves out of its input space, and edit single regions.

All functions take the :mod:`fffjax.v1` parameter dict (or ``FFF.params()``) and ``depth``::

    report = inspect_regions(params, x, y, depth=3, n_classes=10)
    report.usage, report.purity, report.level_entropy
    plot_regions(report)                               # a matplotlib Figure

    mask = leaf_gradient_mask(params, x_new, depth=3)  # train only the leaves x_new reaches
    fffjax.train.flat.train(spec, config, x_new, y_new, params=params, grad_mask=mask)

Regions are those of the hard (deployed) descent: right when ``z >= 0``.

For FFF-v2 (:mod:`fffjax.v2`, K trees of single-neuron nodes) the same question is asked of each
level: how many nodes no token reaches (dead subtrees) and how evenly tokens spread::

    visits = v2_node_visits(x, w_in, b_in, depth=11, n_trees=1)   # tokens through each node row
    usage = v2_tree_usage(visits, depth=11, n_trees=1)
    usage.dead_fraction, usage.visit_entropy                       # per level, (depth + 1,)

FFF-v2 routes right when ``z > 0`` (:func:`fffjax.v2.path_from_logits`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import tree, v1, v2
from fffjax._typing import Array, Float, Int

LEAF_PARAMS = ("w1s", "b1s", "w2s", "b2s")
Inputs = Float[Array, "batch din"] | Float[np.ndarray, "batch din"]


def _check_params(params: dict, depth: int) -> None:
    n_nodes, n_leaves = tree.v1_sizes(depth)
    if params["node_weights"].shape[0] != n_nodes or params["w1s"].shape[0] != n_leaves:
        raise ValueError(
            f"params do not match depth={depth}: node_weights {params['node_weights'].shape}, "
            f"w1s {params['w1s'].shape} (expected {n_nodes} nodes, {n_leaves} leaves)")


def leaf_assignments(params: dict, x: Inputs, *, depth: int) -> Int[np.ndarray, " batch"]:
    """The leaf each input reaches in the hard descent, ``(batch,)`` in ``[0, 2**depth)``."""
    _check_params(params, depth)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[1] != params["node_weights"].shape[1]:
        raise ValueError(f"x must be (batch, {params['node_weights'].shape[1]}), got {x.shape}")
    return np.asarray(v1.hard_leaves(x, params["node_weights"], params["node_biases"], depth))


def leaf_usage(leaves: Int[np.ndarray, " batch"], n_leaves: int) -> Int[np.ndarray, " leaves"]:
    """How many inputs reach each leaf, ``(n_leaves,)``."""
    return np.bincount(np.asarray(leaves), minlength=n_leaves)[:n_leaves]


def class_counts(
    leaves: Int[np.ndarray, " batch"], labels: Int[np.ndarray, " batch"], n_leaves: int, n_classes: int
) -> Int[np.ndarray, "leaves classes"]:
    """``counts[l, c]``: inputs of class ``c`` reaching leaf ``l``."""
    leaves, labels = np.asarray(leaves), np.asarray(labels)
    if leaves.shape != labels.shape:
        raise ValueError(f"leaves and labels must have one shape, got {leaves.shape} and {labels.shape}")
    counts = np.zeros((n_leaves, n_classes), np.int64)
    np.add.at(counts, (leaves, labels), 1)
    return counts


def class_purity(counts: Int[np.ndarray, "leaves classes"]) -> Float[np.ndarray, " leaves"]:
    """Share of each leaf's inputs that belong to its majority class (NaN for an unused leaf)."""
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts.max(axis=1) / np.maximum(totals, 1), np.nan)


def level_decision_entropy(params: dict, x: Inputs, *, depth: int) -> Float[np.ndarray, " levels"]:
    """Mean Bernoulli entropy (nats) of the sigmoid decision each input meets at each level of its
    hard path, ``(depth,)``: 0 means crisp routing (soft = hard), ``log 2 = 0.693`` a coin flip."""
    _check_params(params, depth)
    x = jnp.asarray(x, jnp.float32)
    p = jax.nn.sigmoid(v1.node_logits(x, params["node_weights"], params["node_biases"]))
    node = jnp.zeros((x.shape[0],), jnp.int32)
    out = []
    for _ in range(depth):
        pn = jnp.clip(jnp.take_along_axis(p, node[:, None], axis=1)[:, 0], v1.ENTROPY_CLAMP, 1 - v1.ENTROPY_CLAMP)
        out.append(jnp.mean(-pn * jnp.log(pn) - (1 - pn) * jnp.log(1 - pn)))
        node = tree.child(node, pn >= 0.5)
    return np.asarray(jnp.stack(out)) if out else np.zeros((0,), np.float32)


class RegionReport(NamedTuple):
    """Result of :func:`inspect_regions`.

    Attributes:
        leaves: ``(batch,)`` leaf of each input.
        usage: ``(n_leaves,)`` inputs per leaf.
        counts: ``(n_leaves, n_classes)`` class counts per leaf.
        purity: ``(n_leaves,)`` majority-class share per leaf (NaN if unused).
        weighted_purity: usage-weighted mean purity (the accuracy of predicting a leaf's majority class).
        level_entropy: ``(depth,)`` mean decision entropy along the hard path, per level.
    """

    leaves: np.ndarray
    usage: np.ndarray
    counts: np.ndarray
    purity: np.ndarray
    weighted_purity: float
    level_entropy: np.ndarray


def inspect_regions(
    params: dict, x: Inputs, y: Int[np.ndarray, " batch"], *, depth: int, n_classes: int
) -> RegionReport:
    """Leaf of each input, usage histogram, class purity per leaf, per-level decision entropy."""
    leaves = leaf_assignments(params, x, depth=depth)
    n_leaves = 2 ** depth
    counts = class_counts(leaves, np.asarray(y), n_leaves, n_classes)
    return RegionReport(
        leaves=leaves,
        usage=leaf_usage(leaves, n_leaves),
        counts=counts,
        purity=class_purity(counts),
        weighted_purity=float(counts.max(axis=1).sum() / max(1, counts.sum())),
        level_entropy=level_decision_entropy(params, x, depth=depth),
    )


def plot_regions(report: RegionReport, *, title: str | None = None):
    """Three panels: leaf usage, class make-up per leaf (stacked, with purity), entropy per level.

    Returns the matplotlib ``Figure`` (the Agg backend is enough).
    """
    import matplotlib.pyplot as plt

    n_leaves, n_classes = report.counts.shape
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    leaves = np.arange(n_leaves)
    axes[0].bar(leaves, report.usage, color="tab:blue")
    axes[0].set(xlabel="leaf", ylabel="inputs", title="leaf usage")
    shares = report.counts / np.maximum(report.counts.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(n_leaves)
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
    for c in range(n_classes):
        axes[1].bar(leaves, shares[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c), width=0.9)
        bottom += shares[:, c]
    axes[1].set(xlabel="leaf", ylabel="class share",
                title=f"classes per leaf (weighted purity {report.weighted_purity:.2f})")
    if n_classes <= 20:
        axes[1].legend(fontsize=6, ncol=2, loc="upper right", title="class", title_fontsize=6)
    levels = np.arange(len(report.level_entropy))
    axes[2].plot(levels, report.level_entropy, "o-")
    axes[2].axhline(np.log(2), color="grey", ls="--", lw=0.8, label="log 2 (coin flip)")
    axes[2].set(xlabel="level", ylabel="entropy (nats)", title="decision entropy on the hard path",
                ylim=(0, 0.75))
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def routed_leaves(params: dict, x: Inputs, *, depth: int, min_share: float = 0.0) -> np.ndarray:
    """Sorted leaves that more than ``min_share`` of the inputs ``x`` reach."""
    usage = leaf_usage(leaf_assignments(params, x, depth=depth), 2 ** depth)
    return np.flatnonzero(usage > min_share * usage.sum())


def leaf_gradient_mask(
    params: dict, x: Inputs | None = None, *, depth: int, leaves=None, min_share: float = 0.0
) -> dict[str, Array]:
    """A 0/1 mask pytree like ``params`` that lets only some leaves train.

    The selected leaves are ``leaves`` if given, else those that ``x`` reaches (more than
    ``min_share`` of it). Their rows of ``w1s, b1s, w2s, b2s`` get 1; the nodes and every other
    leaf get 0, so the routing, and thus every input that reaches another leaf, keeps its output
    exactly.
    """
    _check_params(params, depth)
    if leaves is None:
        if x is None:
            raise ValueError("give x (inputs whose leaves to train) or leaves (leaf indices)")
        leaves = routed_leaves(params, x, depth=depth, min_share=min_share)
    leaves = np.asarray(leaves, np.int64)
    n_leaves = 2 ** depth
    if leaves.size and (leaves.min() < 0 or leaves.max() >= n_leaves):
        raise ValueError(f"leaves must be in [0, {n_leaves}), got {leaves.tolist()}")
    selected = np.zeros((n_leaves,), np.float32)
    selected[leaves] = 1.0
    mask = {}
    for name, value in params.items():
        if name in LEAF_PARAMS:
            per_leaf = selected.reshape((n_leaves,) + (1,) * (value.ndim - 1))
            mask[name] = jnp.asarray(np.broadcast_to(per_leaf, value.shape))
        else:
            mask[name] = jnp.zeros(value.shape, jnp.float32)
    return mask


class TreeUsage(NamedTuple):
    """Result of :func:`v2_tree_usage`: how an FFF-v2 layer's tokens spread over its nodes.

    Attributes:
        visits: ``(K * N,)`` tokens through each node row.
        dead_fraction: ``(depth + 1,)`` share of each level's nodes (over all trees) that no token
            reaches; a dead node's subtree is dead too.
        visit_entropy: ``(depth + 1,)`` bits: entropy of the tokens' distribution over a level's
            ``2**level`` nodes, averaged over the trees; ``level`` bits when every node of the
            level gets the same share, 0 when all tokens take one path.
        tokens: tokens counted.
    """

    visits: np.ndarray
    dead_fraction: np.ndarray
    visit_entropy: np.ndarray
    tokens: int


def v2_node_visits(
    x: Inputs,
    w_in: Float[Array, "nodes din"] | Float[np.ndarray, "nodes din"],
    b_in: Float[Array, " nodes"] | Float[np.ndarray, " nodes"],
    *,
    depth: int,
    n_trees: int,
) -> Int[np.ndarray, " nodes"]:
    """``(K * N,)`` how many of the ``(batch, din)`` tokens ``x`` pass through each node row."""
    v2.check_arguments(x, w_in, b_in, w_in, depth=depth, n_trees=n_trees)
    z = jnp.asarray(x, jnp.float32) @ jnp.asarray(w_in, jnp.float32).T + jnp.asarray(b_in, jnp.float32)
    path = v2.path_from_logits(z, depth=depth, n_trees=n_trees)
    return np.bincount(np.asarray(path).ravel(), minlength=w_in.shape[0])


def v2_tree_usage(visits: Int[np.ndarray, " nodes"], *, depth: int, n_trees: int) -> TreeUsage:
    """Dead-node share and visit entropy per level from :func:`v2_node_visits` counts (which may
    be summed over batches first)."""
    per_tree = tree.v2_nodes_per_tree(depth)
    visits = np.asarray(visits)
    if visits.shape != (n_trees * per_tree,):
        raise ValueError(f"visits must have shape ({n_trees * per_tree},) for depth={depth}, n_trees={n_trees}, "
                         f"got {visits.shape}")
    by_tree = visits.reshape(n_trees, per_tree)
    tokens = int(by_tree[0, 0])
    dead, entropy = [], []
    for level in range(depth + 1):
        counts = by_tree[:, 2 ** level - 1: 2 ** (level + 1) - 1].astype(np.float64)
        dead.append(float(np.mean(counts == 0)))
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            bits = -np.where(share > 0, share * np.log2(share), 0.0).sum(axis=1)
        entropy.append(float(bits.mean()))
    return TreeUsage(visits=visits, dead_fraction=np.asarray(dead), visit_entropy=np.asarray(entropy), tokens=tokens)
