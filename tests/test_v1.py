"""FFF-v1 parity with the real ``fastfeedforward==0.2.1`` package (weights copied with the converter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fffjax import convert, nn, v1

torch = pytest.importorskip("torch")
fastfeedforward = pytest.importorskip("fastfeedforward")

pytestmark = pytest.mark.torch
TOL = 1e-6
# One set of widths and few depths: every new shape costs XLA compiles (init and forward).
IN, WIDTH, OUT = 6, 4, 3


def make_pair(in_features, leaf_width, out_features, depth, *, seed=0, **options):
    """An :class:`fffjax.nn.FFF` and a ``fastfeedforward.FFF`` with the same weights and options."""
    ours = nn.FFF(in_features, leaf_width, out_features, depth,
                  rngs=nnx.Rngs(params=seed, dropout=seed + 1), **options)
    theirs = fastfeedforward.FFF(in_features, leaf_width, out_features, depth, **options)
    load_into_torch(theirs, ours)
    return ours, theirs


def load_into_torch(theirs, ours):
    state = {k: torch.from_numpy(v) for k, v in convert.export_fastfeedforward(ours).items()}
    theirs.load_state_dict(state, strict=True)


def inputs(shape, seed=1):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), torch.from_numpy(x)


def assert_close(ours, theirs, tol=TOL):
    theirs = theirs.detach().numpy()
    assert np.asarray(ours).shape == theirs.shape
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=tol, atol=tol)


def leaf_mlp(ours, x, leaf, *, output_bias=True):
    """One leaf's MLP on every sample, straight from the parameters."""
    p = ours.params()
    hidden = jax.nn.relu(x @ p["w1s"][leaf] + p["b1s"][leaf])
    return hidden @ p["w2s"][leaf] + (p["b2s"][leaf] if output_bias else 0.0)


@pytest.mark.parametrize("depth,lead", [(0, (7,)), (1, (2, 5)), (3, (16,)), (5, (2, 5))])
def test_soft_forward_and_entropies(depth, lead):
    ours, theirs = make_pair(IN, WIDTH, OUT, depth)
    x, xt = inputs(lead + (IN,))
    y, entropies = ours(x, return_entropies=True)
    y_ref, entropies_ref = theirs.training_forward(xt, return_entropies=True)
    assert_close(y, y_ref)
    assert_close(entropies, entropies_ref)
    assert entropies.shape == (2**depth - 1,)


@pytest.mark.parametrize("depth", [1, 3])
def test_soft_gradients_match_torch_autograd(depth):
    ours, theirs = make_pair(IN, WIDTH, OUT, depth)
    x, xt = inputs((2, 5, IN))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
    (theirs.training_forward(xt) ** 2).sum().backward()
    for name in v1.PARAM_NAMES:
        ref = getattr(theirs, name).grad.numpy().reshape(grads[name][...].shape)
        np.testing.assert_allclose(grads[name][...], ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("depth", [0, 3])
def test_train_hardened(depth):
    ours, theirs = make_pair(IN, WIDTH, OUT, depth, train_hardened=True)
    x, xt = inputs((2, 5, IN))
    y, entropies = ours(x, return_entropies=True)
    y_ref, entropies_ref = theirs(xt, return_entropies=True)
    assert_close(y, y_ref)
    assert_close(entropies, entropies_ref)


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_hard_eval_matches_training_forward_with_hard_decisions(depth):
    ours, theirs = make_pair(IN, WIDTH, OUT, depth)
    x, xt = inputs((2, 5, IN))
    soft_hard = ours(x, use_hard_decisions=True)
    ours.eval()
    y = ours(x)
    y_ref = theirs.training_forward(xt, use_hard_decisions=True)
    assert_close(y, y_ref)
    assert_close(soft_hard, y_ref)


@pytest.mark.parametrize("depth", [1, 3])
def test_legacy_eval_matches_package_eval(depth):
    ours = nn.FFF(IN, WIDTH, OUT, depth, legacy_eval=True, rngs=nnx.Rngs(0))
    theirs = fastfeedforward.FFF(IN, WIDTH, OUT, depth)
    load_into_torch(theirs, ours)
    ours.eval()
    theirs.eval()
    x, xt = inputs((2, 5, IN))
    with torch.no_grad():
        y_ref = theirs(xt)
    assert_close(ours(x), y_ref)
    # The package's eval drops b2s, so the fixed eval differs from it by exactly the leaf bias.
    fixed = nn.FFF(IN, WIDTH, OUT, depth, rngs=nnx.Rngs(0))
    fixed.eval()
    leaves = v1.hard_leaves(x.reshape(-1, IN), fixed.node_weights[...], fixed.node_biases[...], depth)
    bias_on_leaf = fixed.b2s[...][leaves].reshape(fixed(x).shape)
    np.testing.assert_allclose(fixed(x) - ours(x), bias_on_leaf, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("depth", [1, 3])
def test_region_leak_one_equals_negated_nodes(depth):
    leaky, theirs = make_pair(IN, WIDTH, OUT, depth, region_leak=1.0)
    flipped = nn.FFF(IN, WIDTH, OUT, depth, rngs=nnx.Rngs(params=0))
    flipped.node_weights[...] = -leaky.node_weights[...]
    flipped.node_biases[...] = -leaky.node_biases[...]
    x, xt = inputs((2, 5, IN))
    y, entropies = leaky(x, return_entropies=True)
    y_flipped, entropies_flipped = flipped(x, return_entropies=True)
    np.testing.assert_allclose(y, y_flipped, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(entropies, entropies_flipped, rtol=TOL, atol=TOL)
    y_ref, entropies_ref = theirs.training_forward(xt, return_entropies=True)  # leak 1.0 always swaps
    assert_close(y, y_ref)
    assert_close(entropies, entropies_ref)


@pytest.mark.parametrize("depth", [1, 3])
def test_zero_logits_tie_rules(depth):
    """Exactly-zero logits: hard training decisions round 0.5 to 0 (left), the eval descent goes right."""
    ours = nn.FFF(IN, WIDTH, OUT, depth, rngs=nnx.Rngs(0))
    ours.node_weights[...] = jnp.zeros_like(ours.node_weights[...])
    ours.node_biases[...] = jnp.zeros_like(ours.node_biases[...])
    theirs = fastfeedforward.FFF(IN, WIDTH, OUT, depth)
    load_into_torch(theirs, ours)
    x, xt = inputs((2, 5, IN))
    last_leaf = 2**depth - 1

    y_train_hard = ours(x, use_hard_decisions=True)
    np.testing.assert_allclose(y_train_hard, leaf_mlp(ours, x, 0), rtol=TOL, atol=TOL)
    assert_close(y_train_hard, theirs.training_forward(xt, use_hard_decisions=True))

    ours.eval()
    np.testing.assert_allclose(ours(x), leaf_mlp(ours, x, last_leaf), rtol=TOL, atol=TOL)
    assert not np.allclose(ours(x), y_train_hard)
    legacy = convert.import_fastfeedforward(convert.export_fastfeedforward(ours), legacy_eval=True)
    legacy.eval()
    theirs.eval()
    with torch.no_grad():
        y_package_eval = theirs(xt)
    assert_close(legacy(x), y_package_eval)
    np.testing.assert_allclose(legacy(x), leaf_mlp(ours, x, last_leaf, output_bias=False), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("depth", [1, 3])
def test_node_gradients_zero_under_hard_decisions(depth):
    hardened, theirs = make_pair(IN, WIDTH, OUT, depth, train_hardened=True)
    x, xt = inputs((2, 5, IN))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(hardened)
    assert not np.any(grads["node_weights"][...]) and not np.any(grads["node_biases"][...])
    assert np.any(grads["w1s"][...]) and np.any(grads["b2s"][...])
    (theirs(xt) ** 2).sum().backward()
    np.testing.assert_allclose(grads["w1s"][...], theirs.w1s.grad.numpy(), rtol=1e-5, atol=1e-6)

    soft = nn.FFF(IN, WIDTH, OUT, depth, rngs=nnx.Rngs(params=0))
    grads = nnx.grad(lambda m: jnp.sum(m(x, use_hard_decisions=True) ** 2))(soft)
    assert not np.any(grads["node_weights"][...]) and not np.any(grads["node_biases"][...])
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(soft)
    assert np.any(grads["node_weights"][...])


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_usage_counters(mode, depth):
    ours, theirs = make_pair(IN, WIDTH, OUT, depth, usage_mode=mode)
    for step, batch in enumerate((8, 3, 13)):
        x, xt = inputs((batch, IN), seed=10 + step)
        ours(x)
        theirs(xt)
    exported = convert.export_fastfeedforward(ours)
    for name in ("node_usage", "leaf_usage"):
        ref = getattr(theirs, name).detach().numpy()
        np.testing.assert_allclose(getattr(ours, name)[...], ref, rtol=TOL, atol=1e-5)
        np.testing.assert_array_equal(exported[name], np.asarray(getattr(ours, name)[...]))
    if depth > 0:
        assert exported["node_usage"][0] == 8 + 3 + 13
    if mode == "hard" or depth == 0:
        # Rounded counts are small integers: they must agree exactly.
        np.testing.assert_array_equal(exported["leaf_usage"], theirs.leaf_usage.detach().numpy())


def test_depth_zero_is_a_plain_mlp():
    ours, theirs = make_pair(IN, WIDTH, OUT, 0)
    x, xt = inputs((2, 5, IN))
    y = ours(x)
    np.testing.assert_allclose(y, leaf_mlp(ours, x, 0), rtol=TOL, atol=TOL)
    assert_close(y, theirs.training_forward(xt))
    ours.eval()
    assert_close(ours(x), theirs.training_forward(xt, use_hard_decisions=True))
