"""fffjax.ops.registry: the one rule that picks a kernel, the per-device wrapping, the model setter,
and the transformer ops (layer norm, attention, GELU) through every implementation the CPU runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def _norm_inputs(dtype, rows=6, width=24):
    k = jax.random.split(jax.random.key(0), 4)
    x = (2.0 * jax.random.normal(k[0], (rows, width)) + 1.0).astype(dtype)
    residual = jax.random.normal(k[1], (rows, width)).astype(dtype)
    return x, residual, jax.random.normal(k[2], (width,)), jax.random.normal(k[3], (width,))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_layer_norm_matches_flax(dtype, implementation):
    x, residual, scale, bias = _norm_inputs(dtype)
    norm = nnx.LayerNorm(24, epsilon=1e-12, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    with jax.numpy_dtype_promotion("standard"):   # flax's statistics promote 16-bit inputs to float32
        want_fused, want_alone = norm(x + residual), norm(x)
    y, h = ops.layer_norm(x, scale, bias, residual, eps=1e-12, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(x + residual, np.float32))
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_fused, np.float32), atol=tol)
    assert y.dtype == dtype
    alone = ops.layer_norm(x, scale, bias, eps=1e-12, implementation=implementation)
    np.testing.assert_allclose(np.asarray(alone, np.float32), np.asarray(want_alone, np.float32), atol=tol)


def test_layer_norm_names_the_bad_argument():
    x, residual, scale, bias = _norm_inputs(F32)
    with pytest.raises(ValueError, match=r"scale must have shape \(24,\), got \(10,\)"):
        ops.layer_norm(x, scale[:10], bias, eps=1e-5)
    with pytest.raises(ValueError, match="residual must have the shape"):
        ops.layer_norm(x, scale, bias, residual[:2], eps=1e-5)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ops.layer_norm(jnp.ones((2, 24), jnp.int32), scale, bias, eps=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_attention_matches_the_einsum_form(implementation):
    batch, seq, heads, width = 2, 9, 3, 8
    qkv = jax.random.normal(jax.random.key(1), (batch, seq, 3 * heads * width))
    key_bias = jnp.where(jnp.arange(seq) >= 6, -10000.0, 0.0)[None].repeat(batch, 0)
    q, k, v = ops.split_heads(qkv, heads)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * 0.3 + key_bias[:, None, None, :]
    want = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, -1), v).reshape(batch, seq, heads * width)
    got = ops.attention(qkv, key_bias, num_heads=heads, scale=0.3, implementation=implementation)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(2, 9\)"):
        ops.attention(qkv, key_bias[:, :4], num_heads=heads, scale=0.3)
    with pytest.raises(ValueError, match="qkv must have shape .* with heads=5"):
        ops.attention(qkv, None, num_heads=5, scale=0.3)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gelu_is_exact_and_differentiable(implementation):
    x = jnp.linspace(-5.0, 5.0, 42).reshape(3, -1)
    np.testing.assert_allclose(ops.gelu(x, implementation=implementation), jax.nn.gelu(x, approximate=False),
                               atol=2e-6)
    got = jax.grad(lambda a: jnp.sum(ops.gelu(a, implementation=implementation) ** 2))(x)
    want = jax.grad(lambda a: jnp.sum(jax.nn.gelu(a, approximate=False) ** 2))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
