"""fffjax.convert.io: exact file round trips (safetensors, torch .pt, no suffix), dtypes, key order
and 0-d arrays, and loading that never unpickles objects."""

import numpy as np
import pytest
from _convert_helpers import trained_fff
from flax import nnx

from fffjax import convert, nn


def assert_same_state(a, b):
    """Same keys in the same order, same dtypes and shapes, bit-identical values."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


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
