"""The CPU implementations of ``fff_v2_hard`` and ``fff_v1_hard`` ("xla" gather paths, "cpu_ffi" C++
custom calls) against the dense references: outputs, tie rules, dtypes, gradients, the activation
fallback and compilation caching."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import tree, v1, v2
from fffjax.ops import cpu_ffi, fff_v1_hard, fff_v2_hard, registry
from fffjax.ops import xla as xla_ops

IMPLEMENTATIONS = ("xla", "cpu_ffi")


def _skip_unless_built(implementation: str) -> None:
    if implementation == "cpu_ffi" and not cpu_ffi.available():
        pytest.skip(f"cpu_ffi kernel did not build here: {cpu_ffi.build_error()}")


def _problem(seed: int, tokens: int, features: int, depth: int, n_trees: int, out_features: int):
    params = v2.init(jax.random.PRNGKey(seed), features, depth, n_trees=n_trees, out_features=out_features)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (tokens, features))
    return x, params["w_in"], params["b_in"], params["w_out"]


def _assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    bound = rel * max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_array_less(np.max(np.abs(actual - expected)), bound)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "tokens,features,depth,n_trees,out_features",
    [
        (5, 16, 0, 1, 16),        # depth 0: one neuron per tree
        (37, 1000, 4, 1, 70),     # odd H (vector tail), H_out with a tail, ragged token groups
        (64, 48, 6, 3, 48),       # K > 1 trees, sorted deep levels (8 subtrees for 64 tokens)
        (600, 96, 5, 2, 64),      # several groups of subtrees, two trees accumulating into y
        (256, 768, 11, 1, 768),   # the UltraFastBERT 1x11 layer shape
    ],
)
def test_matches_masked_reference(implementation, tokens, features, depth, n_trees, out_features):
    _skip_unless_built(implementation)
    x, w_in, b_in, w_out = _problem(depth + tokens, tokens, features, depth, n_trees, out_features)
    expected = v2.masked_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, implementation=implementation)
    assert actual.dtype == x.dtype
    _assert_close(actual, expected)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_ffi_thread_split(monkeypatch, threads):
    """The C++ kernel's on-demand split over threads (forced by FFFJAX_CPU_THREADS) changes nothing."""
    _skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    x, w_in, b_in, w_out = _problem(41, 700, 64, 7, 2, 48)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=7, n_trees=2, implementation="cpu_ffi")
    _assert_close(actual, v2.masked_forward(x, w_in, b_in, w_out, depth=7, n_trees=2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_leading_batch_dims(implementation):
    _skip_unless_built(implementation)
    x, w_in, b_in, w_out = _problem(3, 2 * 3 * 5, 40, 3, 2, 24)
    x = x.reshape(2, 3, 5, 40)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=3, n_trees=2, implementation=implementation)
    expected = v2.masked_forward(x.reshape(-1, 40), w_in, b_in, w_out, depth=3, n_trees=2)
    assert actual.shape == (2, 3, 5, 24)
    _assert_close(actual.reshape(-1, 24), expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_logit_goes_left(implementation):
    """Strict ``> 0``: a logit of exactly 0 at the root routes to node 1, then positive logits go right."""
    _skip_unless_built(implementation)
    depth, features = 3, 8
    n = tree.v2_nodes_per_tree(depth)
    x = jnp.zeros((2, features))
    w_in = jnp.zeros((n, features))
    b_in = jnp.ones((n,)).at[0].set(0.0)
    w_out = jnp.arange(n * 4, dtype=jnp.float32).reshape(n, 4)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=depth, implementation=implementation)
    path = [0, 1, 4, 10]  # left at the root (z = 0), then right (z = 1) at every level
    gelu1 = float(jax.nn.gelu(1.0, approximate=False))
    expected = gelu1 * w_out[jnp.asarray(path[1:])].sum(axis=0)
    np.testing.assert_allclose(np.asarray(actual), np.broadcast_to(expected, (2, 4)), rtol=1e-6)
    _assert_close(actual, v2.masked_forward(x, w_in, b_in, w_out, depth=depth))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_computes_in_float32(implementation):
    _skip_unless_built(implementation)
    x, w_in, b_in, w_out = (a.astype(jnp.bfloat16) for a in _problem(7, 32, 64, 4, 1, 64))
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=4, implementation=implementation)
    assert actual.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (x, w_in, b_in, w_out)]
    expected = v2.masked_forward(*f32, depth=4)
    _assert_close(actual, expected, rel=2e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_match_masked_form(implementation):
    _skip_unless_built(implementation)
    x, w_in, b_in, w_out = _problem(11, 24, 32, 3, 2, 16)
    cotangent = jax.random.normal(jax.random.PRNGKey(5), (24, 16))

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cotangent)

    hard = functools.partial(fff_v2_hard, depth=3, n_trees=2, implementation=implementation)
    masked = functools.partial(v2.masked_forward, depth=3, n_trees=2)
    grads = jax.grad(functools.partial(loss, hard), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    expected = jax.grad(functools.partial(loss, masked), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    for g, e in zip(grads, expected):
        _assert_close(g, e)


@pytest.mark.parametrize(
    "implementation,jitted", [("xla", xla_ops.fff_v2_hard), ("cpu_ffi", cpu_ffi.fff_v2_hard_cpu)]
)
def test_no_recompile_across_calls_of_one_shape(implementation, jitted):
    _skip_unless_built(implementation)
    first = _problem(21, 16, 24, 2, 1, 24)
    fff_v2_hard(*first, depth=2, implementation=implementation).block_until_ready()
    size = jitted._cache_size()
    for seed in (22, 23):
        fff_v2_hard(*_problem(seed, 16, 24, 2, 1, 24), depth=2, implementation=implementation).block_until_ready()
    assert jitted._cache_size() == size


def test_gpu_prefers_masked_dense_for_wide_paths(monkeypatch):
    # On the H200 128x4 (5 of 31 neurons per tree) runs faster masked dense, 1x11 through Pallas (bench_gpu.md).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "pallas" in registry.available_implementations("fff_v2_hard")
    f32 = jnp.float32
    assert registry.candidates("fff_v2_hard", None, f32, {"depth": 4, "n_trees": 128})[:2] == ("reference", "pallas")
    assert registry.candidates("fff_v2_hard", None, f32, {"depth": 11, "n_trees": 1})[0] == "pallas"
    assert registry.candidates("fff_v2_hard", "pallas", f32, {"depth": 4, "n_trees": 128}) == ("pallas",)


def test_cpu_prefers_ffi_and_falls_back_to_xla():
    candidates = registry.candidates("fff_v2_hard", None, jnp.float32, {"depth": 2, "n_trees": 1})
    assert candidates[-1] == "xla"
    assert candidates[0] == ("cpu_ffi" if jax.default_backend() == "cpu" else candidates[0])
    x, w_in, b_in, w_out = _problem(31, 9, 20, 2, 1, 20)
    # An unsupported dtype (or no compiler) makes cpu_ffi decline, so that "xla" answers.
    with pytest.raises(NotImplementedError):
        cpu_ffi.registered_fn(x.astype(jnp.int32), w_in, b_in, w_out, depth=2)
    _assert_close(fff_v2_hard(x, w_in, b_in, w_out, depth=2), v2.masked_forward(x, w_in, b_in, w_out, depth=2))


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FFFJAX_CACHE_DIR", str(tmp_path))
    assert cpu_ffi.cache_dir() == tmp_path


# --------------------------------------------------------------------------- fff_v1_hard


def _v1_problem(seed: int, tokens: int, features: int, width: int, out_features: int, depth: int):
    params = v1.init(jax.random.PRNGKey(seed), features, width, out_features, depth)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (tokens, features))
    return x, tuple(params[name] for name in v1.PARAM_NAMES)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("leaf_output_bias", [True, False])
@pytest.mark.parametrize(
    "tokens,features,width,out_features,depth",
    [
        (7, 5, 8, 1, 0),        # depth 0: one leaf, a plain MLP; x shorter than a vector
        (450, 64, 8, 10, 3),    # the digits demo: half-vector hidden layer, masked 10-wide output
        (33, 64, 1, 10, 1),     # width 1, a ragged group of samples
        (20, 784, 256, 10, 3),  # MNIST-sized input, 16 full vectors of hidden units
        (300, 5, 33, 1, 8),     # deep tree: 256 leaves; width 33 = two vectors and a tail
        (50, 21, 4, 2, 2),      # widths 4 and 2: several rows per vector, an input tail mid-vector
        (12, 37, 2, 4, 1),
    ],
)
def test_v1_matches_dense_reference(implementation, leaf_output_bias, tokens, features, width, out_features, depth):
    _skip_unless_built(implementation)
    x, weights = _v1_problem(depth + tokens + width, tokens, features, width, out_features, depth)
    expected = v1.hard_forward_reference(x, *weights, depth=depth, leaf_output_bias=leaf_output_bias)
    actual = fff_v1_hard(x, *weights, depth=depth, leaf_output_bias=leaf_output_bias,
                         implementation=implementation)
    assert actual.dtype == x.dtype
    _assert_close(actual, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_v1_leading_batch_dims(implementation):
    _skip_unless_built(implementation)
    x, weights = _v1_problem(51, 2 * 3 * 4, 24, 8, 10, 3)
    actual = fff_v1_hard(x.reshape(2, 3, 4, 24), *weights, depth=3, implementation=implementation)
    assert actual.shape == (2, 3, 4, 10)
    _assert_close(actual.reshape(-1, 10), v1.hard_forward_reference(x, *weights, depth=3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_v1_zero_logit_goes_right(implementation):
    """``>= 0``: logits of exactly 0 at every level reach the last leaf."""
    _skip_unless_built(implementation)
    depth = 3
    x, (node_weights, node_biases, w1s, b1s, w2s, b2s) = _v1_problem(61, 9, 16, 8, 4, depth)
    node_weights, node_biases = jnp.zeros_like(node_weights), jnp.zeros_like(node_biases)
    weights = (node_weights, node_biases, w1s, b1s, w2s, b2s)
    actual = fff_v1_hard(x, *weights, depth=depth, implementation=implementation)
    last = 2**depth - 1
    expected = jax.nn.relu(x @ w1s[last] + b1s[last]) @ w2s[last] + b2s[last]
    _assert_close(actual, expected)
    _assert_close(actual, v1.hard_forward_reference(x, *weights, depth=depth))


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_ffi_v1_thread_split(monkeypatch, threads):
    """The v1 kernel split over threads (forced by FFFJAX_CPU_THREADS) changes nothing."""
    _skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    x, weights = _v1_problem(71, 700, 32, 12, 10, 4)
    actual = fff_v1_hard(x, *weights, depth=4, implementation="cpu_ffi")
    _assert_close(actual, v1.hard_forward_reference(x, *weights, depth=4))


def test_cpu_ffi_v1_bfloat16_computes_in_float32():
    _skip_unless_built("cpu_ffi")
    x, weights = _v1_problem(81, 40, 64, 16, 10, 3)
    actual = fff_v1_hard(x.astype(jnp.bfloat16), *(w.astype(jnp.bfloat16) for w in weights), depth=3,
                         implementation="cpu_ffi")
    assert actual.dtype == jnp.bfloat16
    as_f32 = [a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, *weights)]
    _assert_close(actual, v1.hard_forward_reference(*as_f32, depth=3), rel=2e-2)


@pytest.mark.parametrize("leaf_output_bias", [True, False])
def test_cpu_ffi_v1_gradients_equal_xla(leaf_output_bias):
    _skip_unless_built("cpu_ffi")
    x, weights = _v1_problem(91, 30, 12, 6, 5, 2)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), (30, 5))

    def loss(implementation, *args):
        y = fff_v1_hard(*args, depth=2, leaf_output_bias=leaf_output_bias, implementation=implementation)
        return jnp.sum(y * cotangent)

    argnums = tuple(range(7))
    grads = jax.grad(functools.partial(loss, "cpu_ffi"), argnums=argnums)(x, *weights)
    expected = jax.grad(functools.partial(loss, "xla"), argnums=argnums)(x, *weights)
    assert not np.allclose(np.asarray(expected[3]), 0.0)  # w1s gets a gradient
    for g, e in zip(grads, expected):
        assert g.shape == e.shape
        _assert_close(g, e)


def test_v1_other_activations_fall_back_to_xla(monkeypatch):
    """cpu_ffi compiles only ReLU: under implementation=None, gelu goes to "xla", relu does not."""
    _skip_unless_built("cpu_ffi")
    assert registry.candidates("fff_v1_hard", None, jnp.float32, {"depth": 3})[0] == "cpu_ffi"
    x, weights = _v1_problem(101, 17, 20, 8, 10, 3)
    with pytest.raises(NotImplementedError, match="relu"):
        fff_v1_hard(x, *weights, depth=3, activation=jax.nn.gelu, implementation="cpu_ffi")
    calls = []
    xla_fn = registry._REGISTRY["fff_v1_hard"]["xla"].fn

    def spy(*args, **kwargs):
        calls.append(kwargs["activation"])
        return xla_fn(*args, **kwargs)

    monkeypatch.setitem(registry._REGISTRY["fff_v1_hard"], "xla", registry.Implementation(fn=spy))
    actual = fff_v1_hard(x, *weights, depth=3, activation=jax.nn.gelu)
    assert calls == [jax.nn.gelu]
    _assert_close(actual, v1.hard_forward_reference(x, *weights, depth=3, activation=jax.nn.gelu))
    fff_v1_hard(x, *weights, depth=3)  # relu: answered by cpu_ffi
    assert calls == [jax.nn.gelu]


def test_cpu_ffi_v1_no_recompile_across_calls_of_one_shape():
    _skip_unless_built("cpu_ffi")
    x, weights = _v1_problem(111, 16, 24, 8, 10, 2)
    fff_v1_hard(x, *weights, depth=2, implementation="cpu_ffi").block_until_ready()
    size = cpu_ffi.fff_v1_hard_cpu._cache_size()
    for seed in (112, 113):
        x, weights = _v1_problem(seed, 16, 24, 8, 10, 2)
        fff_v1_hard(x, *weights, depth=2, implementation="cpu_ffi").block_until_ready()
    assert cpu_ffi.fff_v1_hard_cpu._cache_size() == size
