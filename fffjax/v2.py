"""FFF-v2 (UltraFastBERT, arXiv 2311.10770) as pure functions.

K trees of depth D, ``N = 2**(D+1) - 1`` single-GELU-neuron nodes each, in one node table::

    w_in (K*N, H)   b_in (K*N,)   w_out (K*N, H_out)     (published linear_out.weight = w_out.T)

Per token: ``y = sum_trees sum_{k=0..D} gelu(z[n_k]) * w_out[n_k]``, with ``z = x @ w_in.T + b_in``,
``n_0 = 0`` and ``n_{k+1} = 2 n_k + 1 + (z[n_k] > 0)`` (strict), exact erf GELU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fffjax import tree
from fffjax._typing import Array, Float, Int, PRNGKeyArray

HIGHEST = jax.lax.Precision.HIGHEST
INIT_SCHEMES = ("published", "crammed")


def gelu(z: Array) -> Array:
    """Exact (erf) GELU, as torch ``nn.GELU()``; jax's default is the tanh approximation."""
    return jax.nn.gelu(z, approximate=False)


# Jitted: one compiled program per shape instead of one per random draw.
@functools.partial(jax.jit, static_argnames=("features", "depth", "n_trees", "out_features", "scheme", "dtype"))
def init(
    key: PRNGKeyArray,
    features: int,
    depth: int,
    *,
    n_trees: int = 1,
    out_features: int | None = None,
    scheme: str = "published",
    dtype=jnp.float32,
) -> dict[str, Array]:
    """``scheme="published"``: the layer's own init (``U(+-1/sqrt(H))`` in, ``U(+-1/sqrt((D+1)K))`` out);
    ``"crammed"``: crammed BERT's re-init of every linear (normal 0.02, zero bias)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    out_features = features if out_features is None else out_features
    n = n_trees * tree.v2_nodes_per_tree(depth)
    k_in, k_b, k_out = jax.random.split(key, 3)
    if scheme == "crammed":
        return {
            "w_in": 0.02 * jax.random.normal(k_in, (n, features), dtype),
            "b_in": jnp.zeros((n,), dtype),
            "w_out": 0.02 * jax.random.normal(k_out, (n, out_features), dtype),
        }
    a, b = 1.0 / np.sqrt(features), 1.0 / np.sqrt((depth + 1) * n_trees)
    return {
        "w_in": jax.random.uniform(k_in, (n, features), dtype, -a, a),
        "b_in": jax.random.uniform(k_b, (n,), dtype, -a, a),
        "w_out": jax.random.uniform(k_out, (n, out_features), dtype, -b, b),
    }


def check_arguments(x, w_in, b_in, w_out, *, depth: int, n_trees: int) -> None:
    """Refuse FFF-v2 arguments that do not fit the layout above, naming the argument, the expected
    shape and the ``depth`` / ``n_trees`` it follows from. ``x`` is ``(..., H)`` (None: not checked)."""
    tree.check_depth(depth)
    tree.check_n_trees(n_trees)
    n = n_trees * tree.v2_nodes_per_tree(depth)
    detail = f" (depth={depth}, n_trees={n_trees}: K * (2**(depth+1) - 1) = {n} node rows)"

    def explain(unit):
        return functools.partial(tree.explain_v2_rows, depth=depth, n_trees=n_trees, unit=unit)

    if getattr(w_in, "ndim", None) != 2:
        raise ValueError(f"w_in must have shape ({n}, H), got {tuple(getattr(w_in, 'shape', ()))}{detail}")
    tree.check_shape("w_in", w_in, (n, w_in.shape[1]), detail, explain_count=explain(("row", "rows")))
    if x is not None:
        tree.check_inputs(x, w_in.shape[1], "w_in.shape[1]")
    tree.check_shape("b_in", b_in, (n,), detail, explain_count=explain(("entry", "entries")))
    if getattr(w_out, "ndim", None) != 2:
        raise ValueError(f"w_out must have shape ({n}, H_out), got {tuple(getattr(w_out, 'shape', ()))}{detail}")
    if w_out.shape[0] != n:
        raise ValueError(f"w_out must have shape ({n}, H_out), got {tuple(w_out.shape)}: "
                         + explain(("row", "rows"))(w_out.shape[0]))


def path_from_logits(
    z: Float[Array, "batch nodes"], *, depth: int, n_trees: int
) -> Int[Array, "batch trees levels"]:
    """Flat node indices on each token's path in each tree, from the logits of every node."""
    per_tree = tree.v2_nodes_per_tree(depth)
    offsets = jnp.asarray(tree.tree_offsets(n_trees, per_tree))
    node = jnp.zeros((z.shape[0], n_trees), jnp.int32)
    path = []
    for _ in range(depth + 1):
        flat = node + offsets
        path.append(flat)
        node = tree.child(node, jnp.take_along_axis(z, flat, axis=1) > 0)
    return jnp.stack(path, axis=-1)


def routing_margin(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    *,
    depth: int,
    n_trees: int = 1,
) -> Float[Array, " batch"]:
    """The smallest ``|z|`` over each token's routing decisions (all trees, all levels), float32.

    A logit this close to 0 can take the other branch under another summation order (another
    implementation, block size or device), and the token then reads different rows: an equally
    right answer. Comparing two implementations elementwise is meaningful only on tokens whose
    margin is well above the summation error (e.g. ``> 1e-5`` for H = 768 in float32). The logits
    are those of :func:`path_logits`, in float32.
    """
    f32 = jnp.float32
    _, logits = path_logits(jnp.asarray(x, f32), jnp.asarray(w_in, f32), jnp.asarray(b_in, f32), depth=depth,
                            n_trees=n_trees)
    return jnp.min(jnp.abs(logits).reshape(logits.shape[0], -1), axis=1)


def masked_forward(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    w_out: Float[Array, "nodes dout"],
    *,
    depth: int,
    n_trees: int = 1,
) -> Float[Array, "batch dout"]:
    """The published computation: every node densely, times a (gradient-free) path mask."""
    z = jnp.matmul(x, w_in.T, precision=HIGHEST) + b_in
    path = path_from_logits(jax.lax.stop_gradient(z), depth=depth, n_trees=n_trees)
    mask = jnp.zeros(z.shape, bool).at[jnp.arange(z.shape[0])[:, None], path.reshape(z.shape[0], -1)].set(True)
    return jnp.matmul(jnp.where(mask, gelu(z), 0.0).astype(x.dtype), w_out, precision=HIGHEST)


def conditional_forward(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    w_out: Float[Array, "nodes dout"],
    *,
    depth: int,
    n_trees: int = 1,
) -> Float[Array, "batch dout"]:
    """Touches only the ``K * (D + 1)`` rows on each token's paths (row gathers; scatter-add gradients).

    Per level, gathers each token's ``K`` node rows and contracts them with ``einsum``, accumulating
    in float32 for bf16/f16 inputs. This is ``implementation="xla"`` of :func:`fffjax.fff_v2_hard`.
    """
    per_tree = tree.v2_nodes_per_tree(depth)
    offsets = jnp.asarray(tree.tree_offsets(n_trees, per_tree), jnp.int32)
    acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else x.dtype
    node = jnp.zeros((x.shape[0], n_trees), jnp.int32)
    y = jnp.zeros((x.shape[0], w_out.shape[1]), acc)
    for _ in range(depth + 1):
        flat = node + offsets                                          # (B, K)
        rows_in = w_in.at[flat].get(mode="promise_in_bounds")          # (B, K, H)
        z = jnp.einsum("bh,bkh->bk", x, rows_in, precision=HIGHEST, preferred_element_type=acc)
        z = z + b_in.at[flat].get(mode="promise_in_bounds").astype(acc)
        rows_out = w_out.at[flat].get(mode="promise_in_bounds")        # (B, K, H_out)
        y = y + jnp.einsum("bk,bkh->bh", gelu(z).astype(x.dtype), rows_out, precision=HIGHEST,
                           preferred_element_type=acc)
        node = tree.child(node, z > 0)
    return y.astype(x.dtype)


def path_logits(
    x: Float[Array, "batch din"],
    w_in: Float[Array, "nodes din"],
    b_in: Float[Array, " nodes"],
    *,
    depth: int,
    n_trees: int = 1,
) -> tuple[Int[Array, "batch trees levels"], Float[Array, "batch trees levels"]]:
    """Each token's hard path (flat node indices) and the logits ``z`` of the nodes on it.

    Descends as :func:`conditional_forward` does, gathering only the ``K * (D + 1)`` input rows on
    each path, so the logits are differentiable in ``x``, ``w_in`` and ``b_in`` (the path is not:
    it is the sign of the logits). Logits are float32 (accumulated in float32 for bf16/f16 inputs).
    """
    per_tree = tree.v2_nodes_per_tree(depth)
    offsets = jnp.asarray(tree.tree_offsets(n_trees, per_tree), jnp.int32)
    node = jnp.zeros((x.shape[0], n_trees), jnp.int32)
    path, logits = [], []
    for _ in range(depth + 1):
        flat = node + offsets                                          # (B, K)
        rows_in = w_in.at[flat].get(mode="promise_in_bounds")          # (B, K, H)
        z = jnp.einsum("bh,bkh->bk", x, rows_in, precision=HIGHEST, preferred_element_type=jnp.float32)
        z = z + b_in.at[flat].get(mode="promise_in_bounds").astype(jnp.float32)
        path.append(flat)
        logits.append(z)
        node = tree.child(node, z > 0)
    return jnp.stack(path, axis=-1), jnp.stack(logits, axis=-1)


def load_balance_loss(
    path: Int[Array, "batch trees levels"],
    logits: Float[Array, "batch trees levels"],
    *,
    depth: int,
    n_trees: int = 1,
    weights: Float[Array, " batch"] | None = None,
    temperature: float = 1.0,
) -> Float[Array, ""]:
    """A differentiable penalty on unbalanced routing, 0 when every routing node splits its tokens evenly.

    For each routing node ``n`` (levels ``0 .. D-1``; a leaf's sign routes nowhere) with visitor
    share ``c_n / W`` (token weights reaching ``n`` over all token weights) and mean soft decision
    ``p_n = mean over its visitors of sigmoid(z / temperature)``::

        loss = (1 / K) * sum_n (c_n / W) * (p_n - 1/2) ** 2

    Each level of each tree contributes at most 1/4, so the loss lies in ``[0, D / 4]``. Hard
    routing gives the logits no gradient from the task loss; this term moves each visited node's
    ``w_in`` / ``b_in`` so that its soft decisions centre on 1/2, i.e. it sends half of its tokens
    to each child. ``path`` and ``logits`` are :func:`path_logits`' output; ``weights (batch,)``
    (default all 1) leave out padding tokens with 0.
    """
    tree.check_depth(depth)
    tree.check_n_trees(n_trees)
    if path.shape != logits.shape or path.ndim != 3 or path.shape[1:] != (n_trees, depth + 1):
        raise ValueError(f"path and logits must both have shape (batch, {n_trees}, {depth + 1}) for "
                         f"n_trees={n_trees}, depth={depth}, got {path.shape} and {logits.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = jnp.ones(path.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if weights.shape != path.shape[:1]:
        raise ValueError(f"weights must have shape ({path.shape[0]},), got {weights.shape}")
    routing = path[:, :, :depth].reshape(-1)                   # the leaves' logits route nowhere
    decisions = jax.nn.sigmoid(logits[:, :, :depth].astype(jnp.float32) / temperature)
    per_token = jnp.broadcast_to(weights[:, None, None], decisions.shape)
    segments = n_trees * tree.v2_nodes_per_tree(depth)
    visits = jax.ops.segment_sum(per_token.reshape(-1), routing, segments)
    soft = jax.ops.segment_sum((per_token * decisions).reshape(-1), routing, segments)
    total = jnp.maximum(weights.sum(), 1e-9)
    # (c/W) (s/c - 1/2)^2 = (s - c/2)^2 / (c W), 0 for unvisited nodes
    per_node = jnp.where(visits > 0, (soft - visits / 2) ** 2 / (jnp.maximum(visits, 1e-9) * total), 0.0)
    return per_node.sum() / n_trees
