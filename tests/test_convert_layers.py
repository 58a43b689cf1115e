"""fffjax.convert: state dicts that load strictly into the PyTorch modules, exact file round trips, errors."""

import re

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

from fffjax import convert, nn

IN, WIDTH, OUT = 6, 4, 3


def trained_fff(depth, usage_mode="none"):
    """An FFF-v1 module whose usage counters (if any) are non-zero."""
    module = nn.FFF(IN, WIDTH, OUT, depth, usage_mode=usage_mode, rngs=nnx.Rngs(0))
    if usage_mode != "none":
        for seed in range(2):
            module(jnp.asarray(np.random.default_rng(seed).standard_normal((5, IN)), jnp.float32))
    return module


def dyadic_ultrafast(depth, n_trees, features=8, out_features=5):
    """An UltraFastBERT-layout state dict with exactly representable weights."""
    rng = np.random.default_rng(depth)
    n = n_trees * (2 ** (depth + 1) - 1)
    return {
        "linear_in.weight": (rng.integers(-2, 3, (n, features)) / 4).astype(np.float32),
        "linear_in.bias": ((2 * rng.integers(-4, 4, n) + 1) / 32).astype(np.float32),
        "linear_out.weight": rng.standard_normal((out_features, n)).astype(np.float32),
    }


def assert_same_state(a, b):
    """Same keys in the same order, same dtypes and shapes, bit-identical values."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


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


# --------------------------------------------------------------------------- files


def _format_params():
    params = [pytest.param("layer.safetensors", id="safetensors"), pytest.param("layer", id="no-suffix")]
    params.append(pytest.param("layer.pt", id="pt", marks=pytest.mark.torch))
    return params


def _needs_backend(filename):
    pytest.importorskip("torch" if filename.endswith(".pt") else "safetensors")


@pytest.mark.parametrize("filename", _format_params())
@pytest.mark.parametrize("depth", [0, 3])
def test_fastfeedforward_round_trip_is_exact(tmp_path, filename, depth):
    _needs_backend(filename)
    original = trained_fff(depth, usage_mode="soft")
    exported = convert.export_fastfeedforward(original)
    path = convert.save(exported, tmp_path / filename)
    loaded = convert.load(path)
    assert_same_state(loaded, exported)
    assert loaded["depth"].shape == () and loaded["depth"].dtype == np.int64
    restored = convert.import_fastfeedforward(loaded)
    assert restored.usage_mode == "soft"
    assert_same_state(convert.export_fastfeedforward(restored), exported)
    for name in ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s", "node_usage", "leaf_usage"):
        np.testing.assert_array_equal(getattr(restored, name)[...], getattr(original, name)[...], err_msg=name)
    assert np.any(exported["leaf_usage"])


@pytest.mark.parametrize("filename", _format_params())
def test_ultrafast_round_trip_is_exact(tmp_path, filename):
    _needs_backend(filename)
    original = nn.UltraFastFF(8, 3, n_trees=2, out_features=5, rngs=nnx.Rngs(0))
    exported = convert.export_ultrafast_ff(original)
    loaded = convert.load(convert.save(exported, tmp_path / filename))
    assert_same_state(loaded, exported)
    restored = convert.import_ultrafast_ff(loaded, depth=3, n_trees=2)
    for name in ("w_in", "b_in", "w_out"):
        np.testing.assert_array_equal(getattr(restored, name)[...], getattr(original, name)[...], err_msg=name)


@pytest.mark.parametrize("filename", _format_params())
def test_save_keeps_dtypes_order_and_0d(tmp_path, filename):
    _needs_backend(filename)
    import ml_dtypes

    state = {
        "zeta": np.arange(6, dtype=np.float32).reshape(2, 3),
        "alpha": np.array(2.5, dtype=np.float32),
        "count": np.array(7, dtype=np.int64),
        "half": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
    }
    assert_same_state(convert.load(convert.save(state, tmp_path / filename)), state)


@pytest.mark.torch
def test_pt_load_never_unpickles_objects(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert.load(path)
    assert not _Payload.unpickled

    torch.save({"w": torch.zeros(2), "n": 3}, path)  # allowed by weights_only, but not a state dict
    with pytest.raises(ValueError, match="'n'"):
        convert.load(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="mapping"):
        convert.load(path)


class _Payload:
    """Records whether unpickling ran it."""

    unpickled = False

    def __reduce__(self):
        return (_Payload._mark, ())

    @staticmethod
    def _mark():
        _Payload.unpickled = True
        return _Payload()


def test_save_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        convert.save({"a": np.zeros(1)}, tmp_path / "a.bin", format="npz")


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
        (lambda s: s, dict(depth=2), ["'linear_in.weight'", r"\(7, 8\)", r"\(15, 8\)"]),
        (lambda s: s, dict(depth=3, n_trees=2), ["'linear_in.weight'", r"\(30, 8\)", r"\(15, 8\)"]),
        (lambda s: {**s, "linear_in.bias": np.zeros(14, np.float32)}, dict(depth=3),
         ["'linear_in.bias'", r"\(15,\)", r"\(14,\)"]),
        (lambda s: {**s, "linear_out.weight": np.zeros((5, 14), np.float32)}, dict(depth=3),
         ["'linear_out.weight'", r"\(5, 15\)", r"\(5, 14\)"]),
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
