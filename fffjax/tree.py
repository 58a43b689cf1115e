"""Heap-ordered binary trees: the index arithmetic shared by FFF-v1 and FFF-v2.

Conventions (both variants, and the published PyTorch code):

* Node ``(level m, position j)`` has flat index ``2**m - 1 + j``; the root is 0.
* Children of node ``n``: left ``2n + 1``, right ``2n + 2``, i.e. ``2n + 1 + go_right``.
* A token goes right when its node's logit is positive (the tie rule is the caller's).
* A tree with ``levels`` levels has ``2**levels - 1`` nodes. FFF-v1 of depth ``d`` has ``d``
  routing levels and ``2**d`` leaves; FFF-v2 of depth ``d`` has ``d + 1`` levels of neurons.
* With K trees, tree ``t`` owns flat indices ``[t*N, (t+1)*N)`` of the node dimension.

Every function works on Python ints, numpy arrays and traced jax arrays alike.
"""

import jax.numpy as jnp
import numpy as np


def check_count(value, name: str, minimum: int) -> int:
    """``value`` if it is a Python int (not a bool) ``>= minimum``; a ``ValueError`` naming ``name`` otherwise.

    The one check behind every depth, tree count and width argument of the package, so that each
    refusal reads the same: ``depth must be an int >= 0, got -1``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_depth(depth, name: str = "depth", minimum: int = 0) -> int:
    """``depth`` if it is an int ``>= minimum`` (a ``ValueError`` naming ``name`` otherwise)."""
    return check_count(depth, name, minimum)


def check_n_trees(n_trees, name: str = "n_trees") -> int:
    """``n_trees`` if it is an int ``>= 1`` (a ``ValueError`` naming ``name`` otherwise)."""
    return check_count(n_trees, name, 1)


def check_inputs(x, width: int, width_name: str) -> None:
    """Refuse ``x`` unless it is a floating array of shape ``(..., width)`` (``width_name`` says where
    ``width`` comes from, e.g. ``"w_in.shape[1]"``)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if not np.issubdtype(np.dtype(x.dtype), np.floating) and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"x must have shape (..., {width}) to match {width_name}, got {tuple(x.shape)}")


def check_shape(name: str, a, expected: tuple, detail: str = "", *, explain_count=None) -> None:
    """Refuse array ``a`` (argument ``name``) unless its shape is ``expected`` (``detail`` is appended
    to the message, e.g. which depth the shape follows from).

    ``explain_count(n) -> str`` (:func:`explain_v2_rows`, :func:`explain_v1_count`) takes the place of
    ``detail`` when the leading axis, a node or leaf count, is what differs: it says which depth or
    tree count ``n`` is.
    """
    if tuple(a.shape) != tuple(expected):
        if explain_count is not None and a.ndim == len(expected) and a.shape[0] != expected[0]:
            detail = f": {explain_count(a.shape[0])}"
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}{detail}")


def _depth_of(count: int, sizes) -> int | None:
    """The depth ``d >= 0`` with ``sizes(d) == count``, or None (``sizes`` grows with ``d``)."""
    depth = 0
    while sizes(depth) < count:
        depth += 1
    return depth if sizes(depth) == count else None


def _plural(count: int, noun: str, nouns: str | None = None) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def explain_v2_rows(rows: int, *, depth: int, n_trees: int, unit: tuple[str, str] = ("row", "rows")) -> str:
    """Why ``rows`` node rows (``unit``: what is counted, singular and plural) do not fit ``depth``
    and ``n_trees``, in words: the depth or tree count they are, and the count ``depth`` and
    ``n_trees`` expect.

    Appended to a shape error, so that a depth-3 tree passed with ``depth=4`` is refused as such:
    ``15 rows is a depth-3 tree (2**(depth+1)-1 = 15 nodes per tree x n_trees=1); depth=4 expects 31``.
    """
    per_tree = v2_nodes_per_tree(depth)
    readings, disagree = [], []
    if rows > 0 and rows % n_trees == 0:
        found = _depth_of(rows // n_trees, v2_nodes_per_tree)
        if found is not None and found != depth:
            trees = "a depth-{0} tree" if n_trees == 1 else f"{n_trees} depth-{{0}} trees"
            readings.append(trees.format(found) + f" (2**(depth+1)-1 = {_plural(rows // n_trees, 'node')} per tree "
                            f"x n_trees={n_trees})")
            disagree.append(f"depth={depth}")
    if rows > 0 and rows % per_tree == 0 and rows // per_tree != n_trees:
        readings.append(f"{_plural(rows // per_tree, 'tree')} of depth {depth} ({_plural(per_tree, 'node')} each)")
        disagree.append(f"n_trees={n_trees}")
    if not readings:
        readings.append(f"not {_plural(n_trees, 'whole tree')} of any depth (2**(depth+1)-1 nodes per tree)")
        disagree = [f"depth={depth}", f"n_trees={n_trees}"]
    expect = "expects" if len(disagree) == 1 else "expect"
    return f"{_plural(rows, *unit)} is {' or '.join(readings)}; {', '.join(disagree)} {expect} {n_trees * per_tree}"


def explain_v1_count(count: int, *, depth: int, leaves: bool) -> str:
    """Why ``count`` FFF-v1 routing nodes (``leaves``: leaves) do not fit ``depth``, in words: the depth
    they are, and the count ``depth`` expects (``4 leaves is a depth-2 tree (2**depth = 4 leaves);
    depth=3 expects 8``)."""
    sizes = (lambda d: 2**d) if leaves else (lambda d: 2**d - 1)
    formula, noun = ("2**depth", ("leaf", "leaves")) if leaves else ("2**depth - 1", ("node", "nodes"))
    found = _depth_of(count, sizes) if count > 0 else None
    if found is None:
        reading = f"not {formula} {noun[1]} for any depth"
    else:
        reading = f"a depth-{found} tree ({formula} = {_plural(count, *noun)})"
    counted = _plural(count, *noun) if leaves else _plural(count, "node row")
    return f"{counted} is {reading}; depth={depth} expects {sizes(depth)}"


def num_nodes(levels: int) -> int:
    """Nodes in a complete binary tree of ``levels`` levels: ``2**levels - 1``."""
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    return 2**levels - 1


def v1_sizes(depth: int) -> tuple[int, int]:
    """``(n_nodes, n_leaves)`` of an FFF-v1 tree of ``depth`` routing levels."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return 2**depth - 1, 2**depth


def v2_nodes_per_tree(depth: int) -> int:
    """Neurons per FFF-v2 tree of ``depth`` descents: ``2**(depth + 1) - 1``."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return 2 ** (depth + 1) - 1


def level_offset(level):
    """Flat index of the first node of ``level``: ``2**level - 1``."""
    return (1 << level) - 1 if isinstance(level, int) else (2**level) - 1


def level_of(node):
    """Level of a flat node index (root is level 0)."""
    if isinstance(node, int):
        return (node + 1).bit_length() - 1
    xp = np if isinstance(node, np.ndarray) else jnp
    # log2 of an integer below 2**24 is exact in float32.
    return xp.floor(xp.log2((node + 1).astype(xp.float32))).astype(node.dtype)


def child(node, go_right):
    """Child of ``node``: ``2 * node + 1 + go_right`` (``go_right`` a bool or 0/1)."""
    if isinstance(go_right, bool):
        go_right = int(go_right)
    elif hasattr(go_right, "astype"):
        go_right = go_right.astype(getattr(node, "dtype", np.int32))
    return 2 * node + 1 + go_right


def parent(node):
    """Parent of a non-root ``node``: ``(node - 1) // 2``."""
    return (node - 1) // 2


def leaf_to_node(leaf, depth: int):
    """Flat node index that leaf ``leaf`` of a ``depth``-level tree would have: ``leaf + 2**depth - 1``."""
    return leaf + (2**depth - 1)


def node_to_leaf(node, depth: int):
    """Leaf index of the flat index reached after ``depth`` descents: ``node - (2**depth - 1)``."""
    return node - (2**depth - 1)


def leaf_to_path(leaf, depth: int):
    """Decisions ``(..., depth)`` (1 = right) leading to ``leaf``; the root decision comes first."""
    shifts = np.arange(depth - 1, -1, -1)
    if isinstance(leaf, int):
        leaf = np.asarray(leaf)
    xp = np if isinstance(leaf, np.ndarray) else jnp
    return (xp.asarray(leaf)[..., None] >> xp.asarray(shifts, dtype=xp.asarray(leaf).dtype)) & 1


def path_to_leaf(path):
    """Inverse of :func:`leaf_to_path`: ``(..., depth)`` decisions (1 = right) to leaf indices ``(...)``."""
    depth = path.shape[-1]
    xp = np if isinstance(path, np.ndarray) else jnp
    weights = xp.asarray(2 ** np.arange(depth - 1, -1, -1), dtype=path.dtype)
    return (path * weights).sum(axis=-1)


def leaf_ancestors(depth: int) -> np.ndarray:
    """``(2**depth, depth)`` int32 table: the node visited at each level on the way to each leaf.

    ``ancestors[l, k] = 2**k - 1 + (l >> (depth - k))``.
    """
    leaves = np.arange(2**depth)[:, None]
    levels = np.arange(depth)[None, :]
    return ((1 << levels) - 1 + (leaves >> (depth - levels))).astype(np.int32)


def leaf_decisions(depth: int) -> np.ndarray:
    """``(2**depth, depth)`` int32 table: the decision (1 = right) taken at each level towards each leaf."""
    return leaf_to_path(np.arange(2**depth, dtype=np.int32), depth).astype(np.int32)


def tree_offsets(n_trees: int, nodes_per_tree: int) -> np.ndarray:
    """``(n_trees,)`` int32: the flat index of each tree's root in a K-tree node table."""
    return (np.arange(n_trees) * nodes_per_tree).astype(np.int32)


def global_node(tree, node, nodes_per_tree: int):
    """Flat index in the ``(K * N, ...)`` node table of ``node`` of tree ``tree``."""
    return tree * nodes_per_tree + node
