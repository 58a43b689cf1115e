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
    margin is well above the summation error (e.g. ``> 1e-5`` for H = 768 in float32). Computes
    every node's logit, as :func:`masked_forward` does (``(batch, nodes)`` float32): a test-sized tool.
    """
    z = jnp.matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w_in, jnp.float32).T, precision=HIGHEST)
    z = z + jnp.asarray(b_in, jnp.float32)
    path = path_from_logits(z, depth=depth, n_trees=n_trees).reshape(z.shape[0], -1)
    return jnp.min(jnp.abs(jnp.take_along_axis(z, path, axis=1)), axis=1)


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
