import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import tree


def test_sizes():
    assert tree.v1_sizes(3) == (7, 8)
    assert tree.v1_sizes(0) == (0, 1)
    assert tree.v2_nodes_per_tree(11) == 4095
    assert tree.num_nodes(12) == 4095
    with pytest.raises(ValueError, match="depth"):
        tree.v1_sizes(-1)


def test_explain_v2_rows_names_the_depth_or_tree_count_the_rows_are():
    assert tree.explain_v2_rows(15, depth=4, n_trees=1) == (
        "15 rows is a depth-3 tree (2**(depth+1)-1 = 15 nodes per tree x n_trees=1); depth=4 expects 31")
    assert tree.explain_v2_rows(14, depth=2, n_trees=1) == (
        "14 rows is 2 trees of depth 2 (7 nodes each); n_trees=1 expects 7")
    assert tree.explain_v2_rows(21, depth=0, n_trees=3) == (  # either reading fits: both are given
        "21 rows is 3 depth-2 trees (2**(depth+1)-1 = 7 nodes per tree x n_trees=3) or 21 trees of depth 0 "
        "(1 node each); depth=0, n_trees=3 expect 3")
    assert tree.explain_v2_rows(10, depth=2, n_trees=1, unit=("entry", "entries")) == (
        "10 entries is not 1 whole tree of any depth (2**(depth+1)-1 nodes per tree); depth=2, n_trees=1 expect 7")


def test_explain_v1_count_names_the_depth_the_count_is():
    assert tree.explain_v1_count(4, depth=3, leaves=True) == (
        "4 leaves is a depth-2 tree (2**depth = 4 leaves); depth=3 expects 8")
    assert tree.explain_v1_count(1, depth=2, leaves=False) == (
        "1 node row is a depth-1 tree (2**depth - 1 = 1 node); depth=2 expects 3")
    assert tree.explain_v1_count(5, depth=3, leaves=True) == (
        "5 leaves is not 2**depth leaves for any depth; depth=3 expects 8")


def test_children_and_parents_are_inverse():
    nodes = np.arange(100)
    for right in (0, 1):
        kids = tree.child(nodes, np.full(100, right))
        assert np.all(tree.parent(kids) == nodes)
        assert np.all((kids % 2 == 0) == bool(right))


def test_levels_and_offsets():
    nodes = np.arange(2**10 - 1)
    levels = tree.level_of(nodes)
    assert all(tree.level_of(int(n)) == int(lv) for n, lv in zip(nodes, levels))
    for level in range(10):
        assert levels[tree.level_offset(level)] == level
        assert tree.level_of(tree.level_offset(level) - 1) == level - 1 if level else True


def test_leaf_path_roundtrip_and_example():
    # Depth 3, leaf 5 = 101b: right at 0 -> node 2, left -> node 5, right -> flat 12 (docs/conventions.md).
    assert list(tree.leaf_to_path(5, 3)) == [1, 0, 1]
    assert list(tree.leaf_ancestors(3)[5]) == [0, 2, 5]
    assert tree.leaf_to_node(5, 3) == 12
    node = 0
    for bit in tree.leaf_to_path(5, 3):
        node = tree.child(node, int(bit))
    assert node == 12 and tree.node_to_leaf(node, 3) == 5
    leaves = np.arange(2**7)
    assert np.all(tree.path_to_leaf(tree.leaf_to_path(leaves, 7)) == leaves)


def test_vectorised_and_jit_safe():
    @jax.jit
    def walk(bits):
        node = jnp.zeros(bits.shape[:1], jnp.int32)
        for k in range(bits.shape[1]):
            node = tree.child(node, bits[:, k])
        return tree.node_to_leaf(node, bits.shape[1]), tree.path_to_leaf(bits), tree.level_of(node)

    bits = jnp.asarray(tree.leaf_decisions(5))
    leaf_a, leaf_b, level = walk(bits)
    assert np.all(np.asarray(leaf_a) == np.arange(32)) and np.all(np.asarray(leaf_b) == np.arange(32))
    assert np.all(np.asarray(level) == 5)


def test_k_trees():
    offsets = tree.tree_offsets(4, tree.v2_nodes_per_tree(2))
    assert list(offsets) == [0, 7, 14, 21]
    assert tree.global_node(2, 3, 7) == 17
