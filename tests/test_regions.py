"""Region inspection and leaf-only editing on a hand-built tree whose regions are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import regions, v1
from fffjax.train import flat as C

DEPTH = 2


def quadrant_params():
    """Depth 2 on 2-D inputs: root splits on x0 (>=0 right), both children split on x1."""
    params = v1.init(jax.random.key(0), 2, 3, 4, DEPTH)
    params["node_weights"] = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    params["node_biases"] = jnp.zeros(3)
    return params


def quadrant_points():
    x = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1], [2, 3], [-2, -0.5]], np.float32)
    expected = np.array([0, 1, 2, 3, 3, 0])   # leaf = 2*(x0 >= 0) + (x1 >= 0)
    return x, expected


def test_leaf_assignments_follow_the_hyperplanes():
    x, expected = quadrant_points()
    np.testing.assert_array_equal(regions.leaf_assignments(quadrant_params(), x, depth=DEPTH), expected)
    with pytest.raises(ValueError, match="do not match depth=3"):
        regions.leaf_assignments(quadrant_params(), x, depth=3)
    with pytest.raises(ValueError, match=r"x must be \(batch, 2\)"):
        regions.leaf_assignments(quadrant_params(), np.zeros((2, 3), np.float32), depth=DEPTH)


def test_usage_counts_and_purity():
    x, _ = quadrant_points()
    y = np.array([0, 1, 1, 2, 2, 1])
    report = regions.inspect_regions(quadrant_params(), x, y, depth=DEPTH, n_classes=3)
    np.testing.assert_array_equal(report.usage, [2, 1, 1, 2])
    np.testing.assert_array_equal(report.counts[0], [1, 1, 0])
    np.testing.assert_allclose(report.purity, [0.5, 1.0, 1.0, 1.0])
    assert report.weighted_purity == pytest.approx(5 / 6)
    unused = regions.class_purity(np.array([[0, 0], [3, 1]]))
    assert np.isnan(unused[0]) and unused[1] == pytest.approx(0.75)
    # The shape check (jaxtyping's under the test hook, ours otherwise) names the argument.
    with pytest.raises((ValueError, TypeError), match="labels"):
        regions.class_counts(np.zeros(3, int), np.zeros(2, int), 4, 2)


def test_level_entropy_is_zero_for_crisp_and_log2_for_undecided_nodes():
    x, _ = quadrant_points()
    crisp = quadrant_params()
    crisp["node_weights"] = crisp["node_weights"] * 1e3
    np.testing.assert_allclose(regions.level_decision_entropy(crisp, x, depth=DEPTH), [0, 0], atol=1e-4)
    flat = quadrant_params()
    flat["node_weights"] = flat["node_weights"] * 0
    np.testing.assert_allclose(regions.level_decision_entropy(flat, x, depth=DEPTH), [np.log(2)] * 2, rtol=1e-5)


def test_plot_has_three_panels():
    import matplotlib

    matplotlib.use("Agg")
    x, _ = quadrant_points()
    report = regions.inspect_regions(quadrant_params(), x, np.arange(6) % 3, depth=DEPTH, n_classes=3)
    fig = regions.plot_regions(report, title="t")
    assert len(fig.axes) == 3
    assert [p.get_height() for p in fig.axes[0].patches] == [2, 1, 1, 2]


def test_leaf_gradient_mask_selects_the_routed_leaves():
    params = quadrant_params()
    x, _ = quadrant_points()
    mask = regions.leaf_gradient_mask(params, x[[2, 3]], depth=DEPTH)    # leaves 2 and 3
    np.testing.assert_array_equal(mask["b1s"][:, 0], [0, 0, 1, 1])
    assert mask["w1s"].shape == params["w1s"].shape
    assert float(mask["node_weights"].sum()) == 0 and float(mask["node_biases"].sum()) == 0
    np.testing.assert_array_equal(regions.routed_leaves(params, x, depth=DEPTH, min_share=0.25), [0, 3])
    with pytest.raises(ValueError, match="leaves must be in"):
        regions.leaf_gradient_mask(params, depth=DEPTH, leaves=[4])
    with pytest.raises(ValueError, match="give x"):
        regions.leaf_gradient_mask(params, depth=DEPTH)


def test_leaf_only_training_keeps_other_regions_exact():
    params = quadrant_params()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    new = x[(x[:, 0] >= 0) & (x[:, 1] >= 0)]                      # all in leaf 3
    spec = C.ModelSpec("fff", 2, 4, depth=DEPTH, width=3)
    mask = regions.leaf_gradient_mask(params, new, depth=DEPTH)
    cfg = C.FlatTrainConfig(epochs=3, hard_epochs=3, batch_size=8, learning_rate=1e-2, weight_decay=0.01)
    edited = C.train(spec, cfg, new, np.full(len(new), 2, np.int32), params=params, grad_mask=mask).params
    others = regions.leaf_assignments(params, x, depth=DEPTH) != 3
    before = C.predict_logits(spec, params, x[others])
    np.testing.assert_array_equal(C.predict_logits(spec, edited, x[others]), before)
    assert not np.allclose(edited["w2s"][3], params["w2s"][3])
    np.testing.assert_array_equal(edited["node_weights"], params["node_weights"])


def _walk_v2(x, w_in, b_in, depth, n_trees):
    """Each token's node rows, walked one token, tree and level at a time."""
    per_tree = 2 ** (depth + 1) - 1
    visits = np.zeros(n_trees * per_tree, np.int64)
    for token in np.asarray(x, np.float64):
        for k in range(n_trees):
            node = 0
            for _ in range(depth + 1):
                row = k * per_tree + node
                visits[row] += 1
                node = 2 * node + 1 + int(token @ w_in[row] + b_in[row] > 0)
    return visits


def test_v2_node_visits_match_a_token_by_token_walk():
    rng = np.random.default_rng(0)
    depth, n_trees = 3, 2
    x = rng.standard_normal((50, 6)).astype(np.float32)
    w_in = rng.standard_normal((n_trees * 15, 6)).astype(np.float32)
    b_in = rng.standard_normal(n_trees * 15).astype(np.float32)
    visits = regions.v2_node_visits(x, w_in, b_in, depth=depth, n_trees=n_trees)
    np.testing.assert_array_equal(visits, _walk_v2(x, w_in, b_in, depth, n_trees))
    usage = regions.v2_tree_usage(visits, depth=depth, n_trees=n_trees)
    assert usage.tokens == 50 and usage.dead_fraction[0] == 0.0


def test_v2_tree_usage_of_a_collapsed_and_of_a_balanced_tree():
    depth = 3
    always_left = np.zeros(15, np.int64)
    always_left[[0, 1, 3, 7]] = 8                       # every token takes the leftmost path
    collapsed = regions.v2_tree_usage(always_left, depth=depth, n_trees=1)
    np.testing.assert_allclose(collapsed.dead_fraction, [0.0, 0.5, 0.75, 0.875])
    np.testing.assert_allclose(collapsed.visit_entropy, 0.0)
    balanced = np.concatenate([np.full(2 ** level, 8 // 2 ** level) for level in range(depth + 1)])
    even = regions.v2_tree_usage(balanced, depth=depth, n_trees=1)
    np.testing.assert_allclose(even.dead_fraction, 0.0)
    np.testing.assert_allclose(even.visit_entropy, [0.0, 1.0, 2.0, 3.0])
    both = regions.v2_tree_usage(np.concatenate([always_left, balanced]), depth=depth, n_trees=2)
    np.testing.assert_allclose(both.visit_entropy, [0.0, 0.5, 1.0, 1.5])


def test_v2_tree_usage_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"visits must have shape \(30,\)"):
        regions.v2_tree_usage(np.zeros(15, np.int64), depth=3, n_trees=2)
