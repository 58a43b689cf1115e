"""FFF-v1 (the ``fastfeedforward`` package, arXiv 2308.14711) as pure functions.

Parameters are a dict of arrays in the package's layouts, except ``node_biases`` which is 1-D::

    node_weights (n_nodes, in)      node_biases (n_nodes,)
    w1s (n_leaves, in, leaf_width)  b1s (n_leaves, leaf_width)
    w2s (n_leaves, leaf_width, out) b2s (n_leaves, out)

with ``n_nodes = 2**depth - 1`` and ``n_leaves = 2**depth`` (depth 0: one leaf, a plain MLP).

Tie rules, as in the package: the soft forward with hard decisions rounds the sigmoid
half-to-even, so an exactly-zero logit goes **left**; the hard descent uses ``z >= 0``, so it
goes **right**.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import tree
from fffjax._typing import Activation, Array, Float, Int, PRNGKeyArray

HIGHEST = jax.lax.Precision.HIGHEST
ENTROPY_CLAMP = 1e-6
PARAM_NAMES = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")


# Jitted: one compiled program per shape instead of one per random draw.
@functools.partial(jax.jit, static_argnames=("in_features", "leaf_width", "out_features", "depth", "dtype"))
def init(
    key: PRNGKeyArray,
    in_features: int,
    leaf_width: int,
    out_features: int,
    depth: int,
    *,
    dtype=jnp.float32,
) -> dict[str, Array]:
    """The package's initialisation: ``U(-k, k)`` with ``k = 1/sqrt(in)`` for node and first leaf
    layers and ``k = 1/sqrt(leaf_width)`` for the second leaf layer."""
    n_nodes, n_leaves = tree.v1_sizes(depth)
    k1, k2 = 1.0 / np.sqrt(in_features), 1.0 / np.sqrt(leaf_width)
    keys = jax.random.split(key, 6)
    shapes = {
        "node_weights": ((n_nodes, in_features), k1),
        "node_biases": ((n_nodes,), k1),
        "w1s": ((n_leaves, in_features, leaf_width), k1),
        "b1s": ((n_leaves, leaf_width), k1),
        "w2s": ((n_leaves, leaf_width, out_features), k2),
        "b2s": ((n_leaves, out_features), k2),
    }
    return {
        name: jax.random.uniform(k, shape, dtype, -bound, bound)
        for k, (name, (shape, bound)) in zip(keys, shapes.items())
    }


def node_logits(
    x: Float[Array, "batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes"],
) -> Float[Array, "batch nodes"]:
    """Logits of every node for every sample: ``x @ node_weights.T + node_biases``."""
    return jnp.matmul(x, node_weights.T, precision=HIGHEST) + node_biases


def leak_decisions(
    p: Float[Array, "batch nodes"], region_leak: float, key: PRNGKeyArray
) -> Float[Array, "batch nodes"]:
    """Region leak: swap the children (``p -> 1 - p``) with probability ``region_leak`` per sample and node."""
    swap = jax.random.uniform(key, p.shape) < region_leak
    # |swap - p| is the package's expression; it rounds exactly like its 1 - p.
    return jnp.abs(swap.astype(p.dtype) - p)


def node_entropies(p: Float[Array, "batch nodes"]) -> Float[Array, " nodes"]:
    """Bernoulli entropy (nats) of each node's decision, clamped as the package does, batch mean."""
    q = jnp.clip(1 - p, ENTROPY_CLAMP, 1 - ENTROPY_CLAMP)
    pc = jnp.clip(p, ENTROPY_CLAMP, 1 - ENTROPY_CLAMP)
    return jnp.mean(-pc * jnp.log(pc) - q * jnp.log(q), axis=0)


def level_modifiers(p: Float[Array, "batch nodes"], depth: int) -> list[Array]:
    """Per level ``k``, the ``(batch, 2 * 2**k)`` interleaved ``[1 - p, p]`` child weights."""
    out = []
    for level in range(depth):
        lo, hi = tree.level_offset(level), tree.level_offset(level + 1)
        pl = p[:, lo:hi]
        out.append(jnp.stack([1 - pl, pl], axis=-1).reshape(p.shape[0], -1))
    return out


def leaf_mixture(modifiers: list[Array], batch: int, dtype) -> Float[Array, "batch leaves"]:
    """Probability of reaching each leaf: the product of the decisions on its path, root first."""
    mixture = jnp.ones((batch, 1), dtype)
    for mod in modifiers:
        mixture = (jnp.repeat(mixture, 2, axis=1)) * mod
    return mixture


def leaf_outputs(
    x: Float[Array, "batch din"],
    w1s: Float[Array, "leaves din width"],
    b1s: Float[Array, "leaves width"],
    w2s: Float[Array, "leaves width dout"],
    b2s: Float[Array, "leaves dout"],
    *,
    activation: Activation,
    dropout: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
) -> Float[Array, "batch leaves dout"]:
    """Every leaf's MLP on every sample (the soft path's cost: ``2**depth * leaf_width``)."""
    hidden = activation(jnp.einsum("bi,liw->blw", x, w1s, precision=HIGHEST) + b1s)
    if dropout > 0.0:
        if dropout_key is None:
            raise ValueError("dropout > 0 needs a dropout_key")
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout, hidden.shape)
        hidden = jnp.where(keep, hidden / (1.0 - dropout), 0.0).astype(hidden.dtype)
    return jnp.einsum("blw,lwo->blo", hidden, w2s, precision=HIGHEST) + b2s


class SoftForward(NamedTuple):
    """Result of :func:`soft_forward`.

    Attributes:
        y: ``(batch, out)`` mixture output.
        entropies: ``(n_nodes,)`` batch-mean decision entropies (after the leak, before rounding).
        modifiers: per level, the ``(batch, 2 * 2**k)`` child weights actually used.
        mixture: ``(batch, n_leaves)`` leaf weights.
    """

    y: Array
    entropies: Array
    modifiers: list
    mixture: Array


def check_arguments(x, node_weights, node_biases, w1s, b1s, w2s, b2s, *, depth: int):
    """Refuse FFF-v1 arguments that do not fit the layout above, naming the argument, the expected
    shape and the ``depth`` it follows from; returns ``node_biases`` 1-D (the package's ``(n, 1)``
    biases are accepted). ``x`` is ``(..., in)`` (None: not checked)."""
    tree.check_depth(depth)
    n_nodes, n_leaves = tree.v1_sizes(depth)
    detail = f" (depth={depth})"
    nodes = functools.partial(tree.explain_v1_count, depth=depth, leaves=False)
    leaves = functools.partial(tree.explain_v1_count, depth=depth, leaves=True)
    if getattr(w1s, "ndim", None) != 3:
        raise ValueError(f"w1s must have shape ({n_leaves}, in, width), got {tuple(getattr(w1s, 'shape', ()))}{detail}")
    if w1s.shape[0] != n_leaves:
        raise ValueError(f"w1s must have shape ({n_leaves}, in, width), got {tuple(w1s.shape)}: {leaves(w1s.shape[0])}")
    din, width = w1s.shape[1], w1s.shape[2]
    if x is not None:
        tree.check_inputs(x, din, "w1s.shape[1]")
    tree.check_shape("node_weights", node_weights, (n_nodes, din), detail, explain_count=nodes)
    if node_biases.ndim == 2:
        tree.check_shape("node_biases", node_biases, (n_nodes, 1), detail, explain_count=nodes)
        node_biases = node_biases[:, 0]
    tree.check_shape("node_biases", node_biases, (n_nodes,), detail, explain_count=nodes)
    tree.check_shape("b1s", b1s, (n_leaves, width), detail, explain_count=leaves)
    if getattr(w2s, "ndim", None) != 3 or w2s.shape[:2] != (n_leaves, width):
        shape = tuple(getattr(w2s, "shape", ()))
        why = f": {leaves(shape[0])}" if len(shape) == 3 and shape[0] != n_leaves else detail
        raise ValueError(f"w2s must have shape ({n_leaves}, {width}, out), got {shape}{why}")
    tree.check_shape("b2s", b2s, (n_leaves, w2s.shape[2]), detail, explain_count=leaves)
    return node_biases


def soft_forward(
    params: dict[str, Array],
    x: Float[Array, "batch din"],
    *,
    depth: int,
    activation: Activation = jax.nn.relu,
    hard_decisions: bool = False,
    region_leak: float = 0.0,
    dropout: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> SoftForward:
    """The package's ``training_forward``: a mixture over all leaves, the sigmoid weighting the right child.

    ``hard_decisions`` rounds each sigmoid half-to-even (zero logit -> left), so the nodes get no
    gradient. ``key`` drives the region leak and dropout and is needed only when they are on.
    """
    batch = x.shape[0]
    p = jax.nn.sigmoid(node_logits(x, params["node_weights"], params["node_biases"]))
    leak_key = dropout_key = None
    if region_leak > 0.0 or dropout > 0.0:
        if key is None:
            raise ValueError("region_leak or dropout > 0 needs a key")
        leak_key, dropout_key = jax.random.split(key)
    if region_leak > 0.0:
        p = leak_decisions(p, region_leak, leak_key)
    entropies = node_entropies(p)
    if hard_decisions:
        p = jnp.round(p)
    modifiers = level_modifiers(p, depth)
    mixture = leaf_mixture(modifiers, batch, x.dtype)
    leaves = leaf_outputs(
        x, params["w1s"], params["b1s"], params["w2s"], params["b2s"],
        activation=activation, dropout=dropout, dropout_key=dropout_key,
    )
    y = jnp.sum(leaves * mixture[:, :, None], axis=1)
    return SoftForward(y, entropies, modifiers, mixture)


def usage_increments(
    modifiers: list[Array], mixture: Array, *, batch: int, depth: int, mode: str
) -> tuple[Float[Array, " nodes"], Float[Array, " leaves"]]:
    """The package's ``usage_mode`` counters for one training forward.

    ``node_usage[0] += batch``; the children of level ``k < depth - 1`` add the batch sums of their
    *local* decision weights (not weighted by the chance of reaching the parent: the package's
    definition); ``leaf_usage`` adds the batch sums of the leaf mixture. ``mode="hard"`` rounds both.
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    n_nodes, _ = tree.v1_sizes(depth)
    rnd = jnp.round if mode == "hard" else (lambda a: a)
    parts = [jnp.full((1,), batch, mixture.dtype)] if depth > 0 else []
    for mod in modifiers[:-1]:
        parts.append(jnp.sum(rnd(mod), axis=0))
    node_inc = jnp.concatenate(parts) if parts else jnp.zeros((0,), mixture.dtype)
    node_inc = jnp.pad(node_inc, (0, n_nodes - node_inc.shape[0]))
    return node_inc, jnp.sum(rnd(mixture), axis=0)


def hard_leaves(
    x: Float[Array, "batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes"],
    depth: int,
) -> Int[Array, " batch"]:
    """Leaf reached by each sample: descend ``depth`` levels, right when ``z >= 0`` (one row gather per level)."""
    node = jnp.zeros((x.shape[0],), jnp.int32)
    for _ in range(depth):
        z = jnp.sum(x * node_weights[node], axis=-1, dtype=jnp.float32) + node_biases[node]
        node = tree.child(node, z >= 0)
    return tree.node_to_leaf(node, depth)


def hard_forward(
    x: Float[Array, "batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes"],
    w1s: Float[Array, "leaves din width"],
    b1s: Float[Array, "leaves width"],
    w2s: Float[Array, "leaves width dout"],
    b2s: Float[Array, "leaves dout"],
    *,
    depth: int,
    activation: Activation = jax.nn.relu,
    leaf_output_bias: bool = True,
) -> Float[Array, "batch dout"]:
    """Conditional hard forward: the descent, then only the reached leaf's MLP (row gathers)."""
    leaf = hard_leaves(x, node_weights, node_biases, depth)
    hidden = activation(jnp.einsum("bi,biw->bw", x, w1s[leaf], precision=HIGHEST) + b1s[leaf])
    y = jnp.einsum("bw,bwo->bo", hidden, w2s[leaf], precision=HIGHEST)
    return y + b2s[leaf] if leaf_output_bias else y


def hard_forward_reference(
    x: Float[Array, "batch din"],
    node_weights: Float[Array, "nodes din"],
    node_biases: Float[Array, " nodes"],
    w1s: Float[Array, "leaves din width"],
    b1s: Float[Array, "leaves width"],
    w2s: Float[Array, "leaves width dout"],
    b2s: Float[Array, "leaves dout"],
    *,
    depth: int,
    activation: Activation = jax.nn.relu,
    leaf_output_bias: bool = True,
) -> Float[Array, "batch dout"]:
    """Dense reference: every node's logit and every leaf's MLP, then a one-hot selection."""
    z = node_logits(x, node_weights, node_biases)
    decisions = (z >= 0).astype(jnp.int32)
    node = jnp.zeros((x.shape[0],), jnp.int32)
    for _ in range(depth):
        node = tree.child(node, jnp.take_along_axis(decisions, node[:, None], axis=1)[:, 0])
    leaf = tree.node_to_leaf(node, depth)
    b2 = b2s if leaf_output_bias else jnp.zeros_like(b2s)
    leaves = leaf_outputs(x, w1s, b1s, w2s, b2, activation=activation)
    onehot = jax.nn.one_hot(leaf, w1s.shape[0], dtype=leaves.dtype)
    return jnp.sum(leaves * onehot[:, :, None], axis=1)
