"""fffjax.convert.layers: FFF layer state dicts that load strictly into the PyTorch modules
(fastfeedforward, UltraFastBERT's layer), and the errors that name bad keys and shapes."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from _convert_helpers import IN, OUT, WIDTH, trained_fff

from fffjax import convert


def dyadic_ultrafast(depth, n_trees, features=8, out_features=5):
    """An UltraFastBERT-layout state dict with exactly representable weights."""
    rng = np.random.default_rng(depth)
    n = n_trees * (2 ** (depth + 1) - 1)
    return {
        "linear_in.weight": (rng.integers(-2, 3, (n, features)) / 4).astype(np.float32),
        "linear_in.bias": ((2 * rng.integers(-4, 4, n) + 1) / 32).astype(np.float32),
        "linear_out.weight": rng.standard_normal((out_features, n)).astype(np.float32),
    }


# --------------------------------------------------------------------------- into torch, strictly


@pytest.mark.torch
@pytest.mark.parametrize("usage_mode", ["none", "soft", "hard"])
@pytest.mark.parametrize("depth", [0, 2])
def test_fastfeedforward_export_loads_strictly(depth, usage_mode):
    torch = pytest.importorskip("torch")
    fastfeedforward = pytest.importorskip("fastfeedforward")
    ours = trained_fff(depth, usage_mode)
    exported = convert.export_fastfeedforward(ours)
    theirs = fastfeedforward.FFF(IN, WIDTH, OUT, depth, usage_mode=usage_mode)
    package_state = theirs.state_dict()
    assert list(exported) == list(package_state)
    for key, value in package_state.items():
        assert exported[key].shape == tuple(value.shape), key
        assert str(exported[key].dtype) == str(value.dtype).removeprefix("torch."), key
    assert exported["depth"].shape == () and exported["depth"].dtype == np.int64 and exported["depth"] == depth

    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    if usage_mode != "none":
        np.testing.assert_array_equal(theirs.node_usage.detach().numpy(), exported["node_usage"])
        np.testing.assert_array_equal(theirs.leaf_usage.detach().numpy(), exported["leaf_usage"])
    x = np.random.default_rng(7).standard_normal((2, 5, IN)).astype(np.float32)
    with torch.no_grad():
        soft_ref = theirs.training_forward(torch.from_numpy(x)).numpy()
        hard_ref = theirs.training_forward(torch.from_numpy(x), use_hard_decisions=True).numpy()
    fresh = convert.import_fastfeedforward(exported)  # counting more would change `ours`
    np.testing.assert_allclose(fresh(jnp.asarray(x)), soft_ref, rtol=1e-6, atol=1e-6)
    fresh.eval()
    np.testing.assert_allclose(fresh(jnp.asarray(x)), hard_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.torch
def test_import_fastfeedforward_from_torch_tensors():
    torch = pytest.importorskip("torch")
    fastfeedforward = pytest.importorskip("fastfeedforward")
    torch.manual_seed(0)
    theirs = fastfeedforward.FFF(IN, WIDTH, OUT, 3, usage_mode="soft")
    x = np.random.default_rng(3).standard_normal((9, IN)).astype(np.float32)
    theirs(torch.from_numpy(x))  # counts usage
    counted = theirs.node_usage.detach().numpy().copy()
    ours = convert.import_fastfeedforward(theirs.state_dict())  # requires_grad tensors, (n, 1) biases
    assert ours.usage_mode == "soft" and ours.depth == 3
    np.testing.assert_array_equal(ours.node_usage[...], counted)
    with torch.no_grad():
        expected = theirs.training_forward(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.node_usage[...], 2 * counted, rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("depth,n_trees", [(0, 1), (3, 2), (5, 4)])
def test_ultrafast_export_loads_strictly(depth, n_trees):
    torch = pytest.importorskip("torch")
    from torch_reference import UltraFastFFReference

    module = convert.import_ultrafast_ff(dyadic_ultrafast(depth, n_trees), depth=depth, n_trees=n_trees)
    exported = convert.export_ultrafast_ff(module, prefix="ffn.")
    assert list(exported) == ["ffn.linear_in.weight", "ffn.linear_in.bias", "ffn.linear_out.weight"]
    reference = UltraFastFFReference(8, 5, depth, n_trees)
    reference.load_state_dict(
        {k.removeprefix("ffn."): torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    x = (np.random.default_rng(1).integers(-2, 3, (3, 4, 8)) / 4).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(module(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.torch
def test_import_ultrafast_ff_keeps_torch_dtype():
    torch = pytest.importorskip("torch")
    from torch_reference import UltraFastFFReference

    reference = UltraFastFFReference(8, 8, 2, 1).to(torch.bfloat16)
    module = convert.import_ultrafast_ff(reference.state_dict(), depth=2)
    assert module.w_in[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(module.w_out[...], np.float32), reference.linear_out.weight.detach().float().numpy().T)


# --------------------------------------------------------------------------- bad state dicts


@pytest.fixture(scope="module")
def fff_state():
    return convert.export_fastfeedforward(trained_fff(2, usage_mode="soft"))


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize(
    "edit,patterns",
    [
        (lambda s: _without(s, "w2s"), ["missing", "'w2s'"]),
        (lambda s: {**s, "extra.weight": np.zeros(3, np.float32)}, ["unexpected", "'extra.weight'"]),
        (lambda s: _without(s, "leaf_usage"), ["missing", "'leaf_usage'"]),
        (lambda s: {**s, "b1s": np.zeros((4, 5), np.float32)}, ["'b1s'", r"\(4, 4\)", r"\(4, 5\)"]),
        (lambda s: {**s, "node_biases": np.zeros((3, 2), np.float32)}, ["'node_biases'", r"\(3, 1\)", r"\(3, 2\)"]),
        (lambda s: {**s, "node_weights": np.zeros((3, 7), np.float32)}, ["'node_weights'", r"\(3, 6\)", r"\(3, 7\)"]),
        (lambda s: {**s, "depth": np.array(3)}, ["'node_biases'", r"\(7, 1\)", r"\(3, 1\)"]),
        (lambda s: {**s, "depth": np.array([2])}, ["'depth'", r"\(\)", r"\(1,\)"]),
        (lambda s: {**s, "depth": np.array(2.0)}, ["'depth'", "integer"]),
        (lambda s: {**s, "w1s": np.zeros((4, 6), np.float32)}, ["'w1s'", "n_leaves, in, width", r"\(4, 6\)"]),
        (lambda s: {**s, "leaf_usage": np.zeros(5, np.float32)}, ["'leaf_usage'", r"\(4,\)", r"\(5,\)"]),
        (lambda s: {**s, "b2s": np.zeros((4, 3), np.int32)}, ["'b2s'", "floating"]),
    ],
)
def test_import_fastfeedforward_names_bad_keys_and_shapes(fff_state, edit, patterns):
    with pytest.raises(ValueError) as info:
        convert.import_fastfeedforward(edit(dict(fff_state)))
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_import_fastfeedforward_usage_mode_rules(fff_state):
    with pytest.raises(ValueError, match="usage_mode"):
        convert.import_fastfeedforward(fff_state, usage_mode="none")
    with pytest.raises(ValueError, match="usage_mode"):
        convert.import_fastfeedforward(fff_state, usage_mode="sometimes")
    plain = convert.import_fastfeedforward(_without(fff_state, "node_usage", "leaf_usage"), usage_mode="hard")
    assert plain.usage_mode == "hard" and not np.any(plain.node_usage[...])
    assert "node_usage" not in convert.export_fastfeedforward(
        convert.import_fastfeedforward(_without(fff_state, "node_usage", "leaf_usage")))


@pytest.mark.parametrize(
    "edit,kwargs,patterns",
    [
        (lambda s: s, dict(depth=2), ["'linear_in.weight'", r"\(7, 8\)", r"\(15, 8\)",
                                      r"15 rows is a depth-3 tree .*; depth=2 expects 7"]),
        (lambda s: s, dict(depth=3, n_trees=2), ["'linear_in.weight'", r"\(30, 8\)", r"\(15, 8\)",
                                                 r"1 tree of depth 3 .*; n_trees=2 expects 30"]),
        (lambda s: {**s, "linear_in.bias": np.zeros(14, np.float32)}, dict(depth=3),
         ["'linear_in.bias'", r"\(15,\)", r"\(14,\)"]),
        (lambda s: {**s, "linear_out.weight": np.zeros((5, 14), np.float32)}, dict(depth=3),
         ["'linear_out.weight'", r"\(5, 15\)", r"\(5, 14\)", r"14 rows is not 1 whole tree of any depth"]),
        (lambda s: {**s, "linear_out.weight": np.zeros(15, np.float32)}, dict(depth=3),
         ["'linear_out.weight'", r"\(H_out, 15\)", r"\(15,\)"]),
        (lambda s: _without(s, "linear_in.bias"), dict(depth=3), ["missing", "'linear_in.bias'"]),
        (lambda s: {**s, "linear_out.bias": np.zeros(5, np.float32)}, dict(depth=3),
         ["unexpected", "'linear_out.bias'"]),
        (lambda s: s, dict(depth=3, prefix="ffn."), ["missing", "'ffn.linear_in.weight'"]),
        (lambda s: s, dict(depth=-1), ["depth", "-1"]),
        (lambda s: s, dict(depth=3, n_trees=0), ["n_trees"]),
    ],
)
def test_import_ultrafast_ff_names_bad_keys_and_shapes(edit, kwargs, patterns):
    with pytest.raises(ValueError) as info:
        convert.import_ultrafast_ff(edit(dyadic_ultrafast(3, 1)), **kwargs)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_export_rejects_other_modules():
    with pytest.raises(TypeError, match="fffjax.nn.FFF"):
        convert.export_fastfeedforward(convert.import_ultrafast_ff(dyadic_ultrafast(1, 1), depth=1))
    with pytest.raises(TypeError, match="fffjax.nn.UltraFastFF"):
        convert.export_ultrafast_ff(trained_fff(1))
