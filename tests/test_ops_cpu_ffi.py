"""fffjax.ops.cpu_ffi, the C++ CPU custom calls of ``fff_v2_hard``, ``fff_v1_hard`` and ``attention``: the
thread split, bfloat16, gradients, declining (so that "xla" answers), compilation caching, the build
cache folder. The cases it shares with the "xla" implementation are in test_ops_xla.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cpu_kernel_helpers import assert_close, problem, skip_unless_built, v1_problem

from fffjax import ops, v1, v2
from fffjax.ops import cpu_ffi, fff_v1_hard, fff_v2_hard, registry, xla


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("n_trees,depth,tree_order", [(2, 7, "0"), (5, 4, "0"), (5, 4, "1"), (17, 3, None),
                                                         (8, 3, None), (7, 3, None)])
def test_cpu_ffi_thread_split(monkeypatch, threads, n_trees, depth, tree_order):
    """The C++ kernel's on-demand split over threads (forced by FFFJAX_CPU_THREADS) changes nothing, in
    either order of several trees (by token block on several threads, or tree by tree; FFFJAX_CPU_TREE_ORDER
    forces one)."""
    skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    if tree_order is None:                    # the kernel's own choice: the block order from 8 trees
        monkeypatch.delenv("FFFJAX_CPU_TREE_ORDER", raising=False)
    else:
        monkeypatch.setenv("FFFJAX_CPU_TREE_ORDER", tree_order)
    x, w_in, b_in, w_out = problem(41, 700, 64, depth, n_trees, 48)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, implementation="cpu_ffi")
    assert_close(actual, v2.masked_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees))


def test_cpu_ffi_block_order_with_a_partial_gelu_vector(monkeypatch):
    """Block order with 9 trees of depth 4 (a full group of 8 and one tree) over 701 tokens: a chunk's
    activations (tokens x 8 trees x 5 levels) end in a partial vector of 16, which the GELU pads."""
    skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", "2")
    monkeypatch.setenv("FFFJAX_CPU_TREE_ORDER", "0")
    x, w_in, b_in, w_out = problem(5, 701, 48, 4, 9, 40)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=4, n_trees=9, implementation="cpu_ffi")
    assert_close(actual, v2.masked_forward(x, w_in, b_in, w_out, depth=4, n_trees=9))


def test_cpu_prefers_ffi_and_falls_back_to_xla():
    candidates = registry.candidates("fff_v2_hard", None, jnp.float32, {"depth": 2, "n_trees": 1})
    assert candidates[-1] == "xla"
    assert candidates[0] == ("cpu_ffi" if jax.default_backend() == "cpu" else candidates[0])
    x, w_in, b_in, w_out = problem(31, 9, 20, 2, 1, 20)
    # An unsupported dtype (or no compiler) makes cpu_ffi decline, so that "xla" answers.
    with pytest.raises(NotImplementedError):
        cpu_ffi.registered_fn(x.astype(jnp.int32), w_in, b_in, w_out, depth=2)
    assert_close(fff_v2_hard(x, w_in, b_in, w_out, depth=2), v2.masked_forward(x, w_in, b_in, w_out, depth=2))


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FFFJAX_CACHE_DIR", str(tmp_path))
    assert cpu_ffi.cache_dir() == tmp_path


# --------------------------------------------------------------------------- fff_v1_hard


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_ffi_v1_thread_split(monkeypatch, threads):
    """The v1 kernel split over threads (forced by FFFJAX_CPU_THREADS) changes nothing."""
    skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    x, weights = v1_problem(71, 700, 32, 12, 10, 4)
    actual = fff_v1_hard(x, *weights, depth=4, implementation="cpu_ffi")
    assert_close(actual, v1.hard_forward_reference(x, *weights, depth=4))


def test_cpu_ffi_v1_bfloat16_computes_in_float32():
    skip_unless_built("cpu_ffi")
    x, weights = v1_problem(81, 40, 64, 16, 10, 3)
    actual = fff_v1_hard(x.astype(jnp.bfloat16), *(w.astype(jnp.bfloat16) for w in weights), depth=3,
                         implementation="cpu_ffi")
    assert actual.dtype == jnp.bfloat16
    as_f32 = [a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, *weights)]
    assert_close(actual, v1.hard_forward_reference(*as_f32, depth=3), rel=2e-2)


@pytest.mark.parametrize("leaf_output_bias", [True, False])
def test_cpu_ffi_v1_gradients_equal_xla(leaf_output_bias):
    skip_unless_built("cpu_ffi")
    x, weights = v1_problem(91, 30, 12, 6, 5, 2)
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
        assert_close(g, e)


@pytest.mark.parametrize("width", [8, 96, 23])
def test_cpu_ffi_v1_exact_gelu_leaves_equal_reference(width):
    """The exact-GELU leaves (fffjax.v2.gelu, as BERT's feedforward) run in the kernel, forward and VJP."""
    skip_unless_built("cpu_ffi")
    x, weights = v1_problem(131, 37, 24, width, 10, 3)
    actual = fff_v1_hard(x, *weights, depth=3, activation=v2.gelu, implementation="cpu_ffi")
    assert_close(actual, v1.hard_forward_reference(x, *weights, depth=3, activation=v2.gelu))

    def loss(implementation, *args):
        return jnp.sum(fff_v1_hard(*args, depth=3, activation=v2.gelu, implementation=implementation) ** 2)

    grads = jax.grad(functools.partial(loss, "cpu_ffi"), argnums=tuple(range(7)))(x, *weights)
    expected = jax.grad(functools.partial(loss, "xla"), argnums=tuple(range(7)))(x, *weights)
    for g, e in zip(grads, expected):
        assert_close(g, e)


def test_cpu_ffi_v1_rejects_an_activation_it_does_not_compile():
    x, weights = v1_problem(3, 4, 6, 8, 5, 2)
    with pytest.raises(ValueError, match="activation"):
        cpu_ffi.fff_v1_hard_cpu(x, *weights, depth=2, activation=jnp.tanh)


def test_v1_other_activations_fall_back_to_xla(monkeypatch):
    """cpu_ffi compiles ReLU and exact GELU: under implementation=None, the tanh GELU goes to "xla"."""
    skip_unless_built("cpu_ffi")
    assert registry.candidates("fff_v1_hard", None, jnp.float32, {"depth": 3})[0] == "cpu_ffi"
    x, weights = v1_problem(101, 17, 20, 8, 10, 3)
    with pytest.raises(NotImplementedError, match="gelu"):
        fff_v1_hard(x, *weights, depth=3, activation=jax.nn.gelu, implementation="cpu_ffi")
    calls = []
    xla_fn = registry._REGISTRY["fff_v1_hard"]["xla"].fn

    def spy(*args, **kwargs):
        calls.append(kwargs["activation"])
        return xla_fn(*args, **kwargs)

    monkeypatch.setitem(registry._REGISTRY["fff_v1_hard"], "xla", registry.Implementation(fn=spy))
    actual = fff_v1_hard(x, *weights, depth=3, activation=jax.nn.gelu)
    assert calls == [jax.nn.gelu]
    assert_close(actual, v1.hard_forward_reference(x, *weights, depth=3, activation=jax.nn.gelu))
    fff_v1_hard(x, *weights, depth=3)  # relu: answered by cpu_ffi
    assert calls == [jax.nn.gelu]


def test_cpu_ffi_v1_no_recompile_across_calls_of_one_shape():
    skip_unless_built("cpu_ffi")
    x, weights = v1_problem(111, 16, 24, 8, 10, 2)
    fff_v1_hard(x, *weights, depth=2, implementation="cpu_ffi").block_until_ready()
    size = cpu_ffi.fff_v1_hard_cpu._cache_size()
    for seed in (112, 113):
        x, weights = v1_problem(seed, 16, 24, 8, 10, 2)
        fff_v1_hard(x, *weights, depth=2, implementation="cpu_ffi").block_until_ready()
    assert cpu_ffi.fff_v1_hard_cpu._cache_size() == size


# --------------------------------------------------------------------------- attention


def attention_problem(seed: int, batch: int, seq: int, heads: int, width: int):
    """A fused projection ``(batch, seq, 3 * heads * width)`` and a key bias with -10000 at padding: the
    last sequence fully padded (a uniform softmax), the others with random padding."""
    k = jax.random.split(jax.random.key(seed), 2)
    qkv = 2.0 * jax.random.normal(k[0], (batch, seq, 3 * heads * width))
    padded = jax.random.uniform(k[1], (batch, seq)) < 0.3
    padded = padded.at[-1].set(True) if batch > 1 else padded
    return qkv, jnp.where(padded, -10000.0, 0.0)


# Shapes that reach every path of the kernel: query blocks of 4 with a short last block, key and value
# widths not a multiple of 16 (zero-padded lanes), 1 to 4 vectors per column block, several blocks.
ATTENTION_SHAPES = [(2, 9, 3, 8), (1, 1, 1, 4), (3, 37, 2, 20), (2, 130, 2, 72), (2, 128, 12, 64)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_cpu_ffi_attention_matches_xla(shape):
    skip_unless_built("cpu_ffi")
    batch, seq, heads, width = shape
    qkv, key_bias = attention_problem(sum(shape), *shape)
    scale = width ** -0.5
    for bias in (key_bias, None):
        actual = ops.attention(qkv, bias, num_heads=heads, scale=scale, implementation="cpu_ffi")
        expected = xla.attention(qkv, bias, num_heads=heads, scale=scale)
        assert actual.shape == (batch, seq, heads * width)
        if bias is None or batch == 1:
            assert_close(actual, expected)
            continue
        assert_close(actual[:-1], expected[:-1])
        # The fully padded sequence: every score sits beside -10000, where a float32 step is 1e-3, so
        # the two kernels' summation orders may round a score a step apart.
        assert_close(actual[-1], expected[-1], rel=5e-3)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_ffi_attention_thread_split(monkeypatch, threads):
    """The split of (sequence, head) pairs over threads (forced by FFFJAX_CPU_THREADS) changes nothing."""
    skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    qkv, key_bias = attention_problem(7, 5, 33, 3, 16)
    actual = ops.attention(qkv, key_bias, num_heads=3, scale=0.25, implementation="cpu_ffi")
    assert_close(actual, xla.attention(qkv, key_bias, num_heads=3, scale=0.25))


def test_cpu_ffi_attention_bfloat16_computes_in_float32():
    skip_unless_built("cpu_ffi")
    qkv, key_bias = attention_problem(11, 2, 20, 2, 16)
    qkv16 = qkv.astype(jnp.bfloat16)
    actual = ops.attention(qkv16, key_bias, num_heads=2, scale=0.25, implementation="cpu_ffi")
    assert actual.dtype == jnp.bfloat16
    expected = xla.attention(qkv16.astype(jnp.float32), key_bias, num_heads=2, scale=0.25)
    assert_close(actual, expected, rel=1e-2)


def test_cpu_ffi_attention_gradients_equal_xla():
    skip_unless_built("cpu_ffi")
    qkv, key_bias = attention_problem(13, 2, 11, 2, 8)
    cotangent = jax.random.normal(jax.random.key(14), (2, 11, 16))

    def loss(implementation, qkv, key_bias):
        out = ops.attention(qkv, key_bias, num_heads=2, scale=0.3, implementation=implementation)
        return jnp.sum(out * cotangent)

    grads = jax.grad(functools.partial(loss, "cpu_ffi"), argnums=(0, 1))(qkv, key_bias)
    expected = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1))(qkv, key_bias)
    assert not np.allclose(np.asarray(expected[0]), 0.0)
    for g, e in zip(grads, expected):
        assert_close(g, e)


def test_cpu_ffi_attention_declines_what_it_does_not_compute():
    """Integer inputs (or no compiler, or another backend) make it raise NotImplementedError, the
    registry's signal to fall back; the CPU's default for attention stays "xla"."""
    with pytest.raises(NotImplementedError):
        cpu_ffi.registered_fn_attention(jnp.zeros((1, 4, 6), jnp.int32), None, num_heads=2, scale=1.0)
    assert registry.candidates("attention", None, jnp.float32, {}) == ("xla",)


# --------------------------------------------------------------------------- cached attention


def _cache_problem(batch, queries, slots, heads, width, seed=5):
    q, k, v = (jax.random.normal(key, (batch, n, heads, width))
               for key, n in zip(jax.random.split(jax.random.key(seed), 3), (queries, slots, slots), strict=True))
    filled = jnp.arange(slots)[None] < jnp.arange(1, batch + 1)[:, None] * slots // (batch + 1)
    return q, k, v, jnp.where(filled, 0.0, -10000.0)    # rows fill different numbers of slots


@pytest.mark.parametrize("shape", [(1, 1, 256, 8, 64), (3, 1, 37, 4, 24), (2, 5, 20, 3, 16), (4, 1, 9, 2, 7)])
def test_cpu_ffi_cached_attention_matches_xla(shape):
    skip_unless_built("cpu_ffi")
    q, k, v, key_bias = _cache_problem(*shape)
    for bias in (key_bias, None):
        got = ops.cached_attention(q, k, v, bias, scale=0.3, implementation="cpu_ffi")
        want = ops.cached_attention(q, k, v, bias, scale=0.3, implementation="xla")
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_ffi_cached_attention_thread_split(monkeypatch, threads):
    skip_unless_built("cpu_ffi")
    monkeypatch.setenv("FFFJAX_CPU_THREADS", threads)
    q, k, v, key_bias = _cache_problem(6, 1, 64, 4, 32)
    np.testing.assert_allclose(ops.cached_attention(q, k, v, key_bias, scale=0.2, implementation="cpu_ffi"),
                               ops.cached_attention(q, k, v, key_bias, scale=0.2, implementation="xla"),
                               atol=2e-6, rtol=1e-5)


def test_cpu_ffi_cached_attention_bfloat16_and_gradients():
    skip_unless_built("cpu_ffi")
    q, k, v, key_bias = _cache_problem(2, 1, 24, 2, 16)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = ops.cached_attention(*bf, key_bias, scale=0.25, implementation="cpu_ffi")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ops.cached_attention(
        *(a.astype(jnp.float32) for a in bf), key_bias, scale=0.25, implementation="xla"), atol=2e-2)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(ops.cached_attention(q, k, v, key_bias, scale=0.25,
                                                            implementation=implementation) ** 2)

    for g_ffi, g_xla in zip(jax.grad(loss("cpu_ffi"), argnums=(0, 1, 2))(q, k, v),
                            jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g_ffi, g_xla, atol=1e-5)


def test_cpu_prefers_the_cached_attention_kernel():
    names = registry.candidates("cached_attention", None, jnp.float32, {"scale": 1.0})
    assert names == (("cpu_ffi", "xla") if jax.default_backend() == "cpu" else ("xla",))
