"""fffjax.ops.registry: the one rule that picks a kernel, the per-device wrapping, the model setter
(the transformer ops through every implementation the CPU runs: test_ops_api.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import ops
from fffjax.ops import registry
from pallas_kernels.attention import MAX_SEQ

F32, BF16 = jnp.float32, jnp.bfloat16
FFF_STATIC = {"depth": 11, "n_trees": 1}


@pytest.mark.parametrize("op", ["layer_norm", "attention", "gelu"])
def test_transformer_ops_prefer_pallas_on_a_gpu_for_16_bit_only(monkeypatch, op):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert registry.candidates(op, None, BF16, {})[0] == "pallas"
    assert registry.candidates(op, None, jnp.float16, {})[0] == "pallas"
    assert registry.candidates(op, None, F32, {}) == ("xla",)   # float32 keeps XLA's rounding
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert registry.candidates(op, None, BF16, {}) == ("xla",)


def test_the_cached_attention_kernel_is_opt_in_on_a_gpu(monkeypatch):
    # Not measured on a GPU yet: an automatic choice keeps XLA; naming it runs it.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert registry.candidates("cached_attention", None, BF16, {"scale": 1.0}) == ("xla",)
    assert registry.candidates("cached_attention", "pallas", BF16, {"scale": 1.0}) == ("pallas",)


def test_attention_falls_back_from_pallas_to_cudnn_then_xla(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert registry.candidates("attention", None, BF16, {}) == ("pallas", "cudnn", "xla")
    with pytest.raises(NotImplementedError, match=f"at most {MAX_SEQ} tokens"):
        ops.attention(jnp.zeros((1, MAX_SEQ + 1, 6), BF16), num_heads=2, scale=1.0, implementation="pallas")


def test_fff_ops_prefer_the_cpu_kernel_on_the_cpu_and_pallas_on_a_gpu(monkeypatch):
    for op, static in (("fff_v2_hard", FFF_STATIC), ("fff_v1_hard", {"depth": 3})):
        monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
        assert registry.candidates(op, None, F32, static) == ("cpu_ffi", "xla")
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        assert registry.candidates(op, None, F32, static) == ("pallas", "xla")


def test_an_explicit_choice_is_the_only_candidate_and_unknown_names_are_refused():
    assert registry.candidates("gelu", "pallas", F32, {}) == ("pallas",)
    with pytest.raises(ValueError, match=r"implementation must be one of \['pallas', 'xla'\] or None, got 'tanh'"):
        ops.gelu(jnp.ones(3), implementation="tanh")
    with pytest.raises(ValueError, match="op must be one of"):
        registry.available_implementations("softmax")


def test_not_implemented_falls_back_only_for_an_automatic_choice(monkeypatch):
    calls = []

    def declines(x):
        calls.append("declines")
        raise NotImplementedError("not this one")

    monkeypatch.setitem(registry._REGISTRY["gelu"], "pallas", registry.Implementation(fn=declines))
    monkeypatch.setattr(registry, "preference", lambda *a: ("pallas", "xla"))
    x = jnp.linspace(-2.0, 2.0, 7)
    np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6)
    assert calls == ["declines"]
    with pytest.raises(NotImplementedError, match="not this one"):
        ops.gelu(x, implementation="pallas")


def test_register_implementation_adds_a_name(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "gelu", dict(registry._REGISTRY["gelu"]))
    registry.register_implementation("gelu", "relu-ish", lambda x: jnp.maximum(x, 0.0))
    assert "relu-ish" in ops.available_implementations("gelu")
    np.testing.assert_array_equal(ops.gelu(jnp.array([-1.0, 2.0]), implementation="relu-ish"), [0.0, 2.0])


def test_per_device_implementations_run_per_device_on_a_data_mesh(monkeypatch):
    seen = []

    def kernel(x):   # records the rows each call sees
        seen.append(x.shape)
        return 2.0 * x

    monkeypatch.setitem(registry._REGISTRY["gelu"], "custom", registry.Implementation(fn=kernel, per_device=True))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jnp.arange(32.0).reshape(8, 4)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: ops.gelu(a, implementation="custom"))(jax.device_put(x, jax.P("data")))
    np.testing.assert_array_equal(y, 2.0 * x)
    assert seen == [(2, 4)]   # traced once, on one device's rows


def test_gpu_prefers_masked_dense_for_wide_paths(monkeypatch):
    # On the H200 128x4 (5 of 31 neurons per tree) runs faster masked dense, 1x11 through Pallas (bench_gpu.md).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "pallas" in registry.available_implementations("fff_v2_hard")
    f32 = jnp.float32
    assert registry.candidates("fff_v2_hard", None, f32, {"depth": 4, "n_trees": 128})[:2] == ("reference", "pallas")
    assert registry.candidates("fff_v2_hard", None, f32, {"depth": 11, "n_trees": 1})[0] == "pallas"
    assert registry.candidates("fff_v2_hard", "pallas", f32, {"depth": 4, "n_trees": 128}) == ("pallas",)
