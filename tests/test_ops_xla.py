"""fffjax.ops.xla, the "xla" gather paths of ``fff_v2_hard`` and ``fff_v1_hard``, against the dense
references: outputs, tie rules, dtypes, gradients and compilation caching. Every case runs the C++
"cpu_ffi" implementation too where it built (its own tests: test_ops_cpu_ffi.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cpu_kernel_helpers import assert_close, problem, skip_unless_built, v1_problem

from fffjax import tree, v1, v2
from fffjax.ops import cpu_ffi, fff_v1_hard, fff_v2_hard
from fffjax.ops import xla as xla_ops

IMPLEMENTATIONS = ("xla", "cpu_ffi")


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
    skip_unless_built(implementation)
    x, w_in, b_in, w_out = problem(depth + tokens, tokens, features, depth, n_trees, out_features)
    expected = v2.masked_forward(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, implementation=implementation)
    assert actual.dtype == x.dtype
    assert_close(actual, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_leading_batch_dims(implementation):
    skip_unless_built(implementation)
    x, w_in, b_in, w_out = problem(3, 2 * 3 * 5, 40, 3, 2, 24)
    x = x.reshape(2, 3, 5, 40)
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=3, n_trees=2, implementation=implementation)
    expected = v2.masked_forward(x.reshape(-1, 40), w_in, b_in, w_out, depth=3, n_trees=2)
    assert actual.shape == (2, 3, 5, 24)
    assert_close(actual.reshape(-1, 24), expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_logit_goes_left(implementation):
    """Strict ``> 0``: a logit of exactly 0 at the root routes to node 1, then positive logits go right."""
    skip_unless_built(implementation)
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
    assert_close(actual, v2.masked_forward(x, w_in, b_in, w_out, depth=depth))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_computes_in_float32(implementation):
    skip_unless_built(implementation)
    x, w_in, b_in, w_out = (a.astype(jnp.bfloat16) for a in problem(7, 32, 64, 4, 1, 64))
    actual = fff_v2_hard(x, w_in, b_in, w_out, depth=4, implementation=implementation)
    assert actual.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (x, w_in, b_in, w_out)]
    expected = v2.masked_forward(*f32, depth=4)
    assert_close(actual, expected, rel=2e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_match_masked_form(implementation):
    skip_unless_built(implementation)
    x, w_in, b_in, w_out = problem(11, 24, 32, 3, 2, 16)
    cotangent = jax.random.normal(jax.random.PRNGKey(5), (24, 16))

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cotangent)

    hard = functools.partial(fff_v2_hard, depth=3, n_trees=2, implementation=implementation)
    masked = functools.partial(v2.masked_forward, depth=3, n_trees=2)
    grads = jax.grad(functools.partial(loss, hard), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    expected = jax.grad(functools.partial(loss, masked), argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)
    for g, e in zip(grads, expected):
        assert_close(g, e)


@pytest.mark.parametrize(
    "implementation,jitted", [("xla", xla_ops.fff_v2_hard), ("cpu_ffi", cpu_ffi.fff_v2_hard_cpu)]
)
def test_no_recompile_across_calls_of_one_shape(implementation, jitted):
    skip_unless_built(implementation)
    first = problem(21, 16, 24, 2, 1, 24)
    fff_v2_hard(*first, depth=2, implementation=implementation).block_until_ready()
    size = jitted._cache_size()
    for seed in (22, 23):
        fff_v2_hard(*problem(seed, 16, 24, 2, 1, 24), depth=2, implementation=implementation).block_until_ready()
    assert jitted._cache_size() == size


# --------------------------------------------------------------------------- fff_v1_hard


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
    skip_unless_built(implementation)
    x, weights = v1_problem(depth + tokens + width, tokens, features, width, out_features, depth)
    expected = v1.hard_forward_reference(x, *weights, depth=depth, leaf_output_bias=leaf_output_bias)
    actual = fff_v1_hard(x, *weights, depth=depth, leaf_output_bias=leaf_output_bias,
                         implementation=implementation)
    assert actual.dtype == x.dtype
    assert_close(actual, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_v1_leading_batch_dims(implementation):
    skip_unless_built(implementation)
    x, weights = v1_problem(51, 2 * 3 * 4, 24, 8, 10, 3)
    actual = fff_v1_hard(x.reshape(2, 3, 4, 24), *weights, depth=3, implementation=implementation)
    assert actual.shape == (2, 3, 4, 10)
    assert_close(actual.reshape(-1, 10), v1.hard_forward_reference(x, *weights, depth=3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_v1_zero_logit_goes_right(implementation):
    """``>= 0``: logits of exactly 0 at every level reach the last leaf."""
    skip_unless_built(implementation)
    depth = 3
    x, (node_weights, node_biases, w1s, b1s, w2s, b2s) = v1_problem(61, 9, 16, 8, 4, depth)
    node_weights, node_biases = jnp.zeros_like(node_weights), jnp.zeros_like(node_biases)
    weights = (node_weights, node_biases, w1s, b1s, w2s, b2s)
    actual = fff_v1_hard(x, *weights, depth=depth, implementation=implementation)
    last = 2**depth - 1
    expected = jax.nn.relu(x @ w1s[last] + b1s[last]) @ w2s[last] + b2s[last]
    assert_close(actual, expected)
    assert_close(actual, v1.hard_forward_reference(x, *weights, depth=depth))
