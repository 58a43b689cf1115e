"""The classifier training loop: specs, FLOPs, learning on separable data, seeds, hard epochs, masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import v1
from fffjax.train import flat as C


def blobs(n_per_class=40, n_classes=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, dim))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per_class, dim)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class).astype(np.int32)
    return x, y


def test_spec_and_config_validation():
    with pytest.raises(ValueError, match="kind must be"):
        C.ModelSpec("mlp", 4, 2)
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        C.ModelSpec("ff", 4, 2, width=0)
    with pytest.raises(ValueError, match="depth must be an int >= 0, got -1"):
        C.ModelSpec("fff", 4, 2, depth=-1)
    with pytest.raises(ValueError, match="region_leak"):
        C.ModelSpec("fff", 4, 2, depth=1, region_leak=1.5)
    with pytest.raises(ValueError, match="hard_epochs"):
        C.FlatTrainConfig(epochs=2, hard_epochs=3)
    with pytest.raises(ValueError, match="schedule"):
        C.FlatTrainConfig(schedule="linear")
    spec = C.ModelSpec("ff", 6, 4, width=8)
    with pytest.raises(ValueError, match=r"x_train must be \(n, 6\)"):
        C.train(spec, C.FlatTrainConfig(epochs=1), np.zeros((4, 5), np.float32), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="mode must be"):
        C.predict_logits(spec, C.init_params(spec, jax.random.key(0)), np.zeros((2, 6)), mode="fuzzy")


def test_inference_flops_and_widths():
    fff = C.ModelSpec("fff", 784, 10, depth=3, width=16)
    assert C.inference_flops(fff) == 2 * (3 * 784 + 784 * 16 + 16 * 10)
    assert C.training_width(fff) == 128
    ff = C.ModelSpec("ff", 784, 10, width=19)
    assert C.inference_flops(ff) == 2 * (784 * 19 + 19 * 10)
    fff2 = C.ModelSpec("fff2", 784, 10, depth=2, n_trees=4)
    assert C.inference_flops(fff2) == 2 * 4 * 3 * (784 + 10)
    assert C.training_width(fff2) == 4 * 7
    assert C.n_params(C.init_params(ff, jax.random.key(0))) == 784 * 19 + 19 + 19 * 10 + 10


@pytest.mark.parametrize("spec", [
    C.ModelSpec("ff", 6, 4, width=16),
    C.ModelSpec("fff", 6, 4, depth=2, width=8, region_leak=0.05),
    C.ModelSpec("fff2", 6, 4, depth=2, n_trees=4),
])
def test_learns_separable_blobs(spec):
    x, y = blobs()
    cfg = C.FlatTrainConfig(epochs=25, hard_epochs=5, batch_size=32, learning_rate=1e-2, hardening=0.1)
    result = C.train(spec, cfg, x, y)
    assert C.accuracy(spec, result.params, x, y, mode="hard") > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert len(result.history) == 25


def test_train_seeds_matches_single_runs_and_seeds_differ():
    x, y = blobs()
    spec = C.ModelSpec("fff", 6, 4, depth=2, width=4)
    cfg = C.FlatTrainConfig(epochs=1, batch_size=32, seed=1)
    many = C.train_seeds(spec, cfg, x, y, seeds=(0, 1))
    one = C.train(spec, cfg, x, y)
    for name in one.params:
        np.testing.assert_allclose(many[1].params[name], one.params[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(many[0].params["w1s"], many[1].params["w1s"])


def test_hard_epochs_leave_the_nodes_alone():
    x, y = blobs()
    spec = C.ModelSpec("fff", 6, 4, depth=2, width=4)
    start = C.init_params(spec, jax.random.key(3))
    cfg = C.FlatTrainConfig(epochs=2, hard_epochs=2, batch_size=32)
    out = C.train(spec, cfg, x, y, params=start).params
    np.testing.assert_array_equal(out["node_weights"], start["node_weights"])
    assert not np.allclose(out["w1s"], start["w1s"])
    soft = C.train(spec, dataclasses.replace(cfg, hard_epochs=0), x, y, params=start).params
    assert not np.allclose(soft["node_weights"], start["node_weights"])


def test_zero_grad_mask_freezes_everything_even_with_weight_decay():
    x, y = blobs()
    spec = C.ModelSpec("ff", 6, 4, width=8)
    start = C.init_params(spec, jax.random.key(0))
    mask = {k: 0.0 for k in start}
    mask["b2"] = 1.0
    cfg = C.FlatTrainConfig(epochs=2, batch_size=32, weight_decay=0.1)
    out = C.train(spec, cfg, x, y, params=start, grad_mask=mask).params
    for k in ("w1", "b1", "w2"):
        np.testing.assert_array_equal(out[k], start[k])
    assert not np.allclose(out["b2"], start["b2"])


def test_soft_and_hard_predictions_agree_when_decisions_are_crisp():
    spec = C.ModelSpec("fff", 6, 4, depth=2, width=4)
    params = C.init_params(spec, jax.random.key(1))
    params = dict(params, node_weights=params["node_weights"] * 1e6, node_biases=params["node_biases"] * 1e6)
    x, _ = blobs()
    soft = C.predict_logits(spec, params, x, mode="soft")
    hard = C.predict_logits(spec, params, x, mode="hard", chunk=7)   # chunking with padding
    ref = v1.hard_forward_reference(jnp.asarray(x), params["node_weights"], params["node_biases"], params["w1s"],
                                    params["b1s"], params["w2s"], params["b2s"], depth=2)
    np.testing.assert_allclose(hard, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(soft, hard, rtol=1e-4, atol=1e-4)


def test_hardening_lowers_node_entropy():
    x, y = blobs()
    spec = C.ModelSpec("fff", 6, 4, depth=2, width=4)
    ent = []
    for h in (0.0, 3.0):
        p = C.train(spec, C.FlatTrainConfig(epochs=10, batch_size=32, learning_rate=1e-2, hardening=h), x, y).params
        ent.append(float(v1.soft_forward(p, jnp.asarray(x), depth=2).entropies.mean()))
    assert ent[1] < ent[0]


@pytest.mark.parametrize(
    "spec", [C.ModelSpec("fff", 6, 4, depth=2, width=3), C.ModelSpec("fff2", 6, 4, depth=2, n_trees=2)]
)
def test_to_module_reproduces_hard_predictions(spec):
    params = C.init_params(spec, jax.random.key(5))
    x, _ = blobs()
    module = C.to_module(spec, params)
    np.testing.assert_allclose(module(jnp.asarray(x)), C.predict_logits(spec, params, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fff or fff2"):
        C.to_module(C.ModelSpec("ff", 6, 4), C.init_params(C.ModelSpec("ff", 6, 4), jax.random.key(0)))
