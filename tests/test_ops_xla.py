"""The CPU implementations of ``fff_v2_hard`` ("xla" gather path, "cpu_ffi" C++ custom call) against
the masked dense reference: outputs, tie rule, dtypes, gradients and compilation caching."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fffjax import tree, v2
from fffjax.ops import api, cpu_ffi, fff_v2_hard
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
    "implementation,jitted", [("xla", xla_ops.fff_v2_hard_xla), ("cpu_ffi", cpu_ffi.fff_v2_hard_cpu)]
)
def test_no_recompile_across_calls_of_one_shape(implementation, jitted):
    _skip_unless_built(implementation)
    first = _problem(21, 16, 24, 2, 1, 24)
    fff_v2_hard(*first, depth=2, implementation=implementation).block_until_ready()
    size = jitted._cache_size()
    for seed in (22, 23):
        fff_v2_hard(*_problem(seed, 16, 24, 2, 1, 24), depth=2, implementation=implementation).block_until_ready()
    assert jitted._cache_size() == size


def test_cpu_prefers_ffi_and_falls_back_to_xla():
    candidates = api._candidates("fff_v2_hard", None)
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
