"""fffjax.convert.dense_to_fff: a dense GELU feedforward converted into FFF-v1 and FFF-v2, stage by stage
(init from the dense neurons, fitted routing, layer-wise distillation), on tiny layers."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import nn, v1
from fffjax.convert import dense_to_fff as d2f

H, F = 16, 64


def dense_layer(seed=0, h=H, f=F):
    rng = np.random.default_rng(seed)
    return {
        "w_in": jnp.asarray(rng.standard_normal((h, f)) / np.sqrt(h), jnp.float32),
        "b_in": jnp.asarray(rng.standard_normal(f) * 0.5 - 0.5, jnp.float32),
        "w_out": jnp.asarray(rng.standard_normal((f, h)) / np.sqrt(f), jnp.float32),
        "b_out": jnp.asarray(rng.standard_normal(h) * 0.3, jnp.float32),
    }


def mixture_inputs(n=3000, seed=1, h=H, clusters=8):
    """Tokens from well-separated clusters (the same clusters for every ``seed``): which neurons are active
    depends on the cluster, so routing matters."""
    centers = np.random.default_rng(0).standard_normal((clusters, h)) * 2.0
    rng = np.random.default_rng(seed)
    return jnp.asarray(centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, h)), jnp.float32)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_v1_with_full_leaves_reproduces_the_dense_layer(depth):
    dense, x = dense_layer(), mixture_inputs(500)
    spec = {"kind": "fff_v1", "depth": depth, "leaf_width": F}
    params = d2f.init_from_dense(dense, spec)
    want = d2f.dense_forward(dense, x)
    np.testing.assert_allclose(d2f.apply(params, spec, x), want, rtol=1e-6, atol=1e-6)
    module = d2f.to_module(params, spec)
    assert isinstance(module, nn.FFF) and module.deterministic
    np.testing.assert_allclose(module(x), want, rtol=1e-6, atol=1e-6)
    errors = d2f.relative_error(dense, params, spec, x)
    assert errors["relative_error"] < 1e-6 and errors["residual_error"] < 1e-6 and errors["cosine"] > 1 - 1e-6


def test_v1_leaves_partition_the_dense_neurons():
    dense, x = dense_layer(), mixture_inputs(200)
    spec = {"kind": "fff_v1", "depth": 2, "leaf_width": F // 4}
    params = d2f.init_from_dense(dense, spec)
    groups, _, _ = d2f.neuron_tree(dense, 2)
    assert sorted(groups.ravel().tolist()) == list(range(F))
    for leaf, group in enumerate(groups):
        np.testing.assert_array_equal(params["w1s"][leaf], dense["w_in"][:, group])
        np.testing.assert_array_equal(params["w2s"][leaf], dense["w_out"][group])
    # The leaves' neuron groups add up to the dense layer (each leaf repeats b_out once).
    leaves = v1.leaf_outputs(x, params["w1s"], params["b1s"], params["w2s"], params["b2s"], activation=d2f._gelu)
    summed = jnp.sum(leaves, axis=1) - 3 * dense["b_out"]
    np.testing.assert_allclose(summed, d2f.dense_forward(dense, x), rtol=1e-5, atol=1e-5)


def test_balanced_two_means_splits_in_halves_along_the_clusters():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(-3, 0.1, (5, 2)), rng.normal(3, 0.1, (5, 2))])[rng.permutation(10)]
    right = d2f.balanced_two_means(features)
    assert right.sum() == 5
    assert len(set((features[:, 0] > 0)[right].tolist())) == 1


def test_v2_init_takes_distinct_dense_neurons_and_the_module_adds_b_out():
    dense, x = dense_layer(), mixture_inputs(500)
    spec = {"kind": "fff_v2", "depth": 2, "n_trees": 4}
    params = d2f.init_from_dense(dense, spec, x)
    assignment = d2f.v2_neuron_assignment(dense, spec, x)
    assert len(set(assignment.tolist())) == 4 * 7
    np.testing.assert_array_equal(params["w_in"], dense["w_in"].T[assignment])
    np.testing.assert_array_equal(params["w_out"], dense["w_out"][assignment])
    # No FFF-v2 init is exact (a token computes K (D+1) of the neurons), but routing by the node's own
    # sign keeps more than computing the same number of neurons of the dense layer at random.
    err = d2f.relative_error(dense, params, spec, x)["relative_error"]
    assert 0.05 < err < 1.0
    with_tree = d2f.to_module(params, spec)
    assert isinstance(with_tree, nn.UltraFastFF) and with_tree.n_trees == 5
    np.testing.assert_allclose(with_tree(x), d2f.apply(params, spec, x), rtol=1e-5, atol=1e-5)
    dropped = d2f.to_module(params, spec, output_bias="drop")
    np.testing.assert_allclose(dropped(x), d2f.apply(params, spec, x) - dense["b_out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [
    {"kind": "fff_v1", "depth": 3, "leaf_width": F // 8},
    {"kind": "fff_v2", "depth": 2, "n_trees": 4},
    {"kind": "dense", "width": 12},
])
def test_each_stage_lowers_the_error(spec):
    dense, x = dense_layer(), mixture_inputs()
    held_out = mixture_inputs(1000, seed=2)
    stage_a = d2f.init_from_dense(dense, spec, x)
    stage_b = d2f.fit_routers(dense, stage_a, spec, x)
    seen = []
    stage_c, curve = d2f.distill_layer(dense, stage_b, spec, x, steps=300, batch_size=128, log_every=100,
                                       callback=lambda step, loss: seen.append(step))
    assert seen == [100, 200, 300] and curve.shape == (300,)
    errors = [d2f.relative_error(dense, p, spec, held_out)["relative_error"] for p in (stage_a, stage_b, stage_c)]
    assert errors[1] < 0.95 * errors[0] and errors[2] < 0.95 * errors[1], errors
    assert d2f.relative_error(dense, stage_c, spec, held_out)["cosine"] > 0.9


def expert_layer(clusters=4, per_cluster=16, h=H, seed=3):
    """A dense layer whose neurons come in groups, each active on one cluster of tokens only (a mixture
    of experts in disguise), and tokens from those clusters: routed right, one group is the layer."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((h, clusters)))[0].T * 3.0
    w_in = np.concatenate([np.repeat(c[:, None], per_cluster, 1) + 0.1 * rng.standard_normal((h, per_cluster))
                           for c in centers], axis=1)
    dense = {"w_in": jnp.asarray(w_in, jnp.float32), "b_in": jnp.full((clusters * per_cluster,), -4.0, jnp.float32),
             "w_out": jnp.asarray(rng.standard_normal((clusters * per_cluster, h)) / 4, jnp.float32),
             "b_out": jnp.zeros((h,), jnp.float32)}
    x = centers[rng.integers(0, clusters, 2000)] + 0.3 * rng.standard_normal((2000, h))
    return dense, jnp.asarray(x, jnp.float32)


def test_fit_routers_alone_finds_the_leaf_that_holds_each_tokens_neurons():
    dense, x = expert_layer()
    spec = {"kind": "fff_v1", "depth": 2, "leaf_width": 16}
    params = d2f.init_from_dense(dense, spec)
    assert d2f.relative_error(dense, params, spec, x)["relative_error"] < 0.05   # 2-means found the groups
    scrambled = {**params, "node_weights": jnp.asarray(np.random.default_rng(0).standard_normal((3, H)), jnp.float32)}
    before = d2f.relative_error(dense, scrambled, spec, x)["relative_error"]
    routed = d2f.fit_routers(dense, scrambled, spec, x, refit=False)
    np.testing.assert_array_equal(routed["w2s"], params["w2s"])
    after = d2f.relative_error(dense, routed, spec, x)["relative_error"]
    assert before > 0.5 and after < 0.05, (before, after)


def test_refit_outputs_lowers_the_error_of_v1_leaves():
    dense, x = dense_layer(), mixture_inputs()
    spec = {"kind": "fff_v1", "depth": 2, "leaf_width": F // 4}
    routed = d2f.fit_routers(dense, d2f.init_from_dense(dense, spec), spec, x, refit=False)
    refit = d2f.refit_outputs(dense, routed, spec, x)
    np.testing.assert_array_equal(refit["w1s"], routed["w1s"])
    assert (d2f.relative_error(dense, refit, spec, x)["relative_error"]
            < 0.8 * d2f.relative_error(dense, routed, spec, x)["relative_error"])


def test_token_weights_follow_the_residual_sums_variance():
    x = jnp.asarray([[1.0, -1.0, 0.0], [10.0, -10.0, 0.0]], jnp.float32)
    target = jnp.zeros_like(x)
    np.testing.assert_allclose(d2f.token_weights(x, target, "residual"), [200 / 101, 2 / 101], rtol=1e-6)
    np.testing.assert_array_equal(d2f.token_weights(x, target, "uniform"), [1.0, 1.0])
    with pytest.raises(ValueError, match="weighting must be one of"):
        d2f.token_weights(x, target, "loud")


def test_prune_dense_keeps_the_most_energetic_neurons():
    dense, x = dense_layer(), mixture_inputs(500)
    narrow = d2f.prune_dense(dense, 8, x)
    assert narrow["w_in"].shape == (H, 8) and narrow["w_out"].shape == (8, H)
    z = np.asarray(x @ dense["w_in"] + dense["b_in"])
    energy = (np.asarray(d2f._gelu(jnp.asarray(z))) ** 2).sum(0) * (np.asarray(dense["w_out"]) ** 2).sum(1)
    np.testing.assert_array_equal(narrow["b_in"], dense["b_in"][np.sort(np.argsort(-energy)[:8])])
    by_norms = d2f.init_from_dense(dense, {"kind": "dense", "width": 8})
    norms = np.linalg.norm(np.asarray(dense["w_in"]), axis=0) * np.linalg.norm(np.asarray(dense["w_out"]), axis=1)
    np.testing.assert_array_equal(by_norms["b_in"], dense["b_in"][np.sort(np.argsort(-norms)[:8])])


def test_spec_for_fraction_at_minilm_width():
    assert d2f.spec_for_fraction("fff_v1", 1536, 0.25) == {"kind": "fff_v1", "depth": 2, "leaf_width": 384}
    assert d2f.spec_for_fraction("fff_v1", 1536, 0.0625) == {"kind": "fff_v1", "depth": 4, "leaf_width": 96}
    for fraction in (0.05, 0.1, 0.25):
        spec = d2f.spec_for_fraction("fff_v2", 1536, fraction)
        assert spec["n_trees"] * (2 ** (spec["depth"] + 1) - 1) <= 1536
        assert fraction * 1536 - (spec["depth"] + 1) < d2f.active_neurons(spec) <= fraction * 1536
        d2f.check_spec(spec, 1536)
    assert d2f.spec_for_fraction("fff_v2", 1536, 0.1) == {"kind": "fff_v2", "depth": 4, "n_trees": 30}
    assert d2f.spec_for_fraction("dense", 1536, 0.1) == {"kind": "dense", "width": 153}


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "fff_v1", "depth": 7, "leaf_width": 1}, "spec['depth']=7: the dense width F=64 must be divisible"),
    ({"kind": "fff_v1", "depth": 2, "leaf_width": 10}, "spec['leaf_width'] must be F / 2**depth = 16"),
    ({"kind": "fff_v1", "depth": -1, "leaf_width": 16}, "spec['depth'] must be an int >= 0"),
    ({"kind": "fff_v2", "depth": 3, "n_trees": 5}, "n_trees * (2**(depth+1) - 1) = 75 nodes"),
    ({"kind": "fff_v2", "depth": 1, "n_trees": 0}, "spec['n_trees'] must be an int >= 1"),
    ({"kind": "dense", "width": 65}, "spec['width'] must be <= the dense width F=64"),
    ({"kind": "moe"}, "spec['kind'] must be one of"),
])
def test_bad_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        d2f.init_from_dense(dense_layer(), spec, mixture_inputs(50))


def test_bad_arguments_are_refused_by_name():
    dense, x = dense_layer(), mixture_inputs(50)
    spec = {"kind": "fff_v1", "depth": 1, "leaf_width": 32}
    with pytest.raises(ValueError, match=re.escape("dense is missing keys ['b_out']")):
        d2f.init_from_dense({k: v for k, v in dense.items() if k != "b_out"}, spec)
    with pytest.raises(ValueError, match=re.escape("dense['w_out'] must have shape (64, 16)")):
        d2f.init_from_dense({**dense, "w_out": dense["w_out"].T}, spec)
    with pytest.raises(ValueError, match=re.escape("x must be an array of shape (N, 16)")):
        d2f.fit_routers(dense, d2f.init_from_dense(dense, spec), spec, x[:, :8])
    params = d2f.init_from_dense(dense, spec)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        d2f.distill_layer(dense, params, spec, x, steps=0, batch_size=8)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        d2f.distill_layer(dense, params, spec, x, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="output_bias must be 'tree' or 'drop'"):
        d2f.to_module(d2f.init_from_dense(dense, {"kind": "fff_v2", "depth": 1, "n_trees": 2}, x),
                      {"kind": "fff_v2", "depth": 1, "n_trees": 2}, output_bias="keep")
    with pytest.raises(ValueError, match="fraction must be in"):
        d2f.spec_for_fraction("fff_v2", 64, 0.0)
