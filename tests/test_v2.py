"""FFF-v2 (UltraFastBERT): masked vs conditional forms, the published torch layer, gradients, jit, bf16.

Most tests use *dyadic* data: inputs and node weights in {0, +-1/4, +-1/2}, biases odd multiples of
1/32. Every logit is then computed exactly (in any summation order, fp32 or bf16) and is never
zero, so both forms, and torch, take identical routing decisions and only the output sums differ
by rounding.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from fffjax import convert, nn, tree, v2
from fffjax.ops import fff_v2_hard

TOL = 1e-6
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax.monitoring event per jaxpr trace
LEAD_SHAPES = [(), (3,), (2, 5)]


def dyadic_problem(seed, *, depth, n_trees, features, out_features, lead=(7,), dtype=np.float32):
    """``x (*lead, H)``, ``w_in (K*N, H)``, ``b_in (K*N,)``, ``w_out (K*N, H_out)`` with exact logits."""
    rng = np.random.default_rng(seed)
    n = n_trees * tree.v2_nodes_per_tree(depth)
    x = rng.integers(-2, 3, (*lead, features)) / 4
    w_in = rng.integers(-2, 3, (n, features)) / 4
    b_in = (2 * rng.integers(-4, 4, n) + 1) / 32
    w_out = rng.standard_normal((n, out_features)) / np.sqrt((depth + 1) * n_trees)
    return tuple(jnp.asarray(a, dtype) for a in (x, w_in, b_in, w_out))


def assert_close(actual, expected, tol=TOL, name=""):
    """Relative to the largest magnitude: outputs are sums over nodes and trees."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, name
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def path_nodes(x, w_in, b_in, *, depth, n_trees):
    """Sorted flat indices of every node on some token's path, in numpy (exact for dyadic data).

    Tests avoid eager jax calls on fresh shapes: each would compile its own small XLA program.
    """
    x2 = np.asarray(x, np.float64).reshape(-1, w_in.shape[1])
    z = x2 @ np.asarray(w_in, np.float64).T + np.asarray(b_in, np.float64)
    per_tree = tree.v2_nodes_per_tree(depth)
    node = np.zeros((x2.shape[0], n_trees), np.int64)
    flat = node + per_tree * np.arange(n_trees)
    visited = [flat]
    for _ in range(depth):
        node = 2 * node + 1 + (np.take_along_axis(z, flat, axis=1) > 0)
        flat = node + per_tree * np.arange(n_trees)
        visited.append(flat)
    return np.unique(np.stack(visited))


# --------------------------------------------------------------------------- masked == conditional


def _forms(x, w_in, b_in, w_out, *, depth, n_trees):
    """``(op "xla", v2.conditional_forward, v2.masked_forward)`` outputs, each ``(..., H_out)``."""
    x2 = x.reshape(-1, x.shape[-1])
    out_shape = (*x.shape[:-1], w_out.shape[1])
    static = dict(depth=depth, n_trees=n_trees)
    return (
        fff_v2_hard(x, w_in, b_in, w_out, implementation="xla", **static),
        v2.conditional_forward(x2, w_in, b_in, w_out, **static).reshape(out_shape),
        v2.masked_forward(x2, w_in, b_in, w_out, **static).reshape(out_shape),
    )


# One compile per example for all three (compiles dominate these tests' time).
_all_forms = functools.partial(jax.jit, static_argnames=("depth", "n_trees"))(_forms)


# Each example compiles its forms afresh (new static depth and shapes): ~0.3 s of CPU at depth 1,
# ~4 s at depth 12, so the example counts stay small.
@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(0, 12),
    n_trees=st.sampled_from([1, 2, 4]),
    features=st.integers(1, 16),
    out_features=st.integers(1, 9),
    lead=st.sampled_from(LEAD_SHAPES),
    seed=st.integers(0, 2**16),
)
def test_masked_equals_conditional(depth, n_trees, features, out_features, lead, seed):
    x, w_in, b_in, w_out = dyadic_problem(
        seed, depth=depth, n_trees=n_trees, features=features, out_features=out_features, lead=lead)
    y_xla, y_conditional, y_masked = _all_forms(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees)
    assert y_xla.shape == y_conditional.shape == y_masked.shape == (*lead, out_features)
    assert_close(y_conditional, y_masked)
    assert_close(y_xla, y_masked)
    # The definition, token by token: sum over trees and levels of gelu(z[n_k]) * w_out[n_k].
    x2, w_in64, b_in64, w_out64 = (np.asarray(a, np.float64) for a in (x, w_in, b_in, w_out))
    x2 = x2.reshape(-1, features)
    per_tree = tree.v2_nodes_per_tree(depth)
    expected = np.zeros((x2.shape[0], out_features))
    for t in range(x2.shape[0]):
        for k in range(n_trees):
            node = 0
            for _ in range(depth + 1):
                flat = k * per_tree + node
                z = x2[t] @ w_in64[flat] + b_in64[flat]
                expected[t] += 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))) * w_out64[flat]
                node = 2 * node + 1 + int(z > 0)
    assert_close(y_xla, expected.reshape(*lead, out_features))


# --------------------------------------------------------------------------- gradients


@functools.partial(jax.jit, static_argnames=("depth", "n_trees"))
def _all_grads(x, w_in, b_in, w_out, cotangent, *, depth, n_trees):
    """Per form of :func:`_forms`, gradients of ``sum(y * cotangent)`` w.r.t. ``(x, w_in, b_in, w_out)``."""
    def loss(form, *args):
        return jnp.sum(_forms(*args, depth=depth, n_trees=n_trees)[form] * cotangent)

    return tuple(jax.grad(loss, argnums=(1, 2, 3, 4))(form, x, w_in, b_in, w_out) for form in range(3))


@settings(max_examples=6, deadline=None)
@given(
    depth=st.integers(0, 6),
    n_trees=st.sampled_from([1, 2, 4]),
    features=st.integers(1, 12),
    out_features=st.integers(1, 6),
    lead=st.sampled_from(LEAD_SHAPES),
    seed=st.integers(0, 2**16),
)
def test_conditional_gradients_equal_masked(depth, n_trees, features, out_features, lead, seed):
    x, w_in, b_in, w_out = dyadic_problem(
        seed, depth=depth, n_trees=n_trees, features=features, out_features=out_features, lead=lead)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((*lead, out_features)), jnp.float32)
    static = dict(depth=depth, n_trees=n_trees)
    grads_xla, grads_conditional, grads_masked = _all_grads(x, w_in, b_in, w_out, cotangent, **static)
    for grads in (grads_xla, grads_conditional):
        for name, g, ref in zip(("x", "w_in", "b_in", "w_out"), grads, grads_masked):
            assert g.shape == ref.shape, name
            scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
            np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * scale, err_msg=name)

    # Only rows on some token's path get gradient; every path row of w_out does (gelu(z) != 0).
    on_path = np.zeros(w_in.shape[0], bool)
    on_path[path_nodes(x, w_in, b_in, **static)] = True
    for grads in (grads_xla, grads_conditional, grads_masked):
        _, g_w_in, g_b_in, g_w_out = (np.asarray(g) for g in grads)
        assert not np.any(g_w_in[~on_path]) and not np.any(g_b_in[~on_path])
        np.testing.assert_array_equal(np.any(g_w_out != 0, axis=1), on_path)


# --------------------------------------------------------------------------- the published torch layer


@pytest.mark.torch
@pytest.mark.parametrize(
    "depth,n_trees,features,out_features,lead",
    [(0, 1, 8, 8, (5,)), (2, 2, 8, 5, (2, 5)), (4, 4, 16, 16, (9,)), (11, 1, 16, 16, (3, 4))],
)
def test_matches_torch_reference(depth, n_trees, features, out_features, lead):
    torch = pytest.importorskip("torch")
    from torch_reference import UltraFastFFReference

    torch.manual_seed(depth + 10 * n_trees)
    reference = UltraFastFFReference(features, out_features, depth, n_trees)  # published init
    module = convert.import_ultrafast_ff(reference.state_dict(), depth=depth, n_trees=n_trees)
    x = np.random.default_rng(depth).standard_normal((*lead, features)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    p = (module.w_in[...], module.b_in[...], module.w_out[...])
    for name, y in zip(("xla op", "conditional", "masked"),
                       _all_forms(jnp.asarray(x), *p, depth=depth, n_trees=n_trees)):
        assert_close(y, expected, name=name)
    module.implementation = "xla"
    assert_close(module(jnp.asarray(x)), expected)


@pytest.mark.torch
@pytest.mark.parametrize("depth,n_trees", [(1, 1), (3, 4)])
def test_gradients_match_torch_autograd(depth, n_trees):
    torch = pytest.importorskip("torch")
    from torch_reference import UltraFastFFReference

    features, out_features = 10, 6
    x, w_in, b_in, w_out = dyadic_problem(
        depth, depth=depth, n_trees=n_trees, features=features, out_features=out_features, lead=(4, 6))
    state = {"linear_in.weight": w_in, "linear_in.bias": b_in, "linear_out.weight": w_out.T}
    module = convert.import_ultrafast_ff(state, depth=depth, n_trees=n_trees)
    reference = UltraFastFFReference(features, out_features, depth, n_trees)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    reference(torch.from_numpy(np.array(x))).pow(2).sum().backward()
    expected = {
        "w_in": reference.linear_in.weight.grad.numpy(),
        "b_in": reference.linear_in.bias.grad.numpy(),
        "w_out": reference.linear_out.weight.grad.numpy().T,
    }
    for implementation in ("xla", "reference"):
        module.implementation = implementation
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)
        for name, ref in expected.items():
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(grads[name][...], ref, rtol=0, atol=1e-5 * scale, err_msg=name)


# --------------------------------------------------------------------------- jit, bf16


def test_xla_implementation_does_not_retrace():
    """No jaxpr trace at all when the jitted "xla" op is called again with seen shapes."""
    traced = []

    def on_event(event, duration, **kwargs):
        if event == TRACE_EVENT:
            traced.append(kwargs.get("fun_name"))

    depth, n_trees, features = 3, 2, 11
    x, w_in, b_in, w_out = dyadic_problem(0, depth=depth, n_trees=n_trees, features=features,
                                          out_features=features, lead=(2, 5))
    x_new, w_in_new, _, _ = dyadic_problem(1, depth=depth, n_trees=n_trees, features=features,
                                           out_features=features, lead=(2, 5))
    call = lambda x, w_in: fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees,  # noqa: E731
                                       implementation="xla")
    first = call(x, w_in)
    call(x.reshape(10, features), w_in)  # warm the eager reshape too
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        second = call(x_new, w_in_new)
        call(x_new.reshape(10, features), w_in)   # (2, 5) and (10,) give the same token matrix
        assert traced == [], f"the xla implementation retraced for shapes it had seen: {traced}"
        call(jnp.zeros((37, features)), w_in)      # a new token count must trace (the listener works)
        assert traced, "no trace recorded for a new shape: the trace counter is broken"
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert not np.allclose(first, second)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_bf16_inputs(implementation):
    depth, n_trees, features = 4, 2, 16
    x, w_in, b_in, w_out = dyadic_problem(3, depth=depth, n_trees=n_trees, features=features,
                                          out_features=8, lead=(3, 4))
    y32 = fff_v2_hard(x, w_in, b_in, w_out, depth=depth, n_trees=n_trees, implementation=implementation)
    # Dyadic inputs, weights and logits are exact in bf16, so routing is unchanged.
    args16 = (x.astype(jnp.bfloat16), w_in.astype(jnp.bfloat16), b_in.astype(jnp.bfloat16),
              w_out.astype(jnp.bfloat16))
    y16 = fff_v2_hard(*args16, depth=depth, n_trees=n_trees, implementation=implementation)
    assert y16.dtype == jnp.bfloat16 and y16.shape == y32.shape
    assert_close(y16, y32, tol=3e-2)

    module = nn.UltraFastFF(features, depth, n_trees=n_trees, out_features=8, dtype=jnp.bfloat16,
                            implementation=implementation, rngs=nnx.Rngs(0))
    assert module.w_in[...].dtype == jnp.bfloat16
    assert module(args16[0]).dtype == jnp.bfloat16


def test_routing_margin_is_the_smallest_logit_on_the_paths():
    depth, n_trees, features = 3, 2, 24
    p = v2.init(jax.random.key(0), features, depth, n_trees=n_trees)
    x = jax.random.normal(jax.random.key(1), (9, features))
    w_in, b_in = np.asarray(p["w_in"], np.float64), np.asarray(p["b_in"], np.float64)
    per_tree = tree.v2_nodes_per_tree(depth)
    want = []
    for row in np.asarray(x, np.float64):          # walk each token down each tree, one node at a time
        logits = []
        for k in range(n_trees):
            node = 0
            for _ in range(depth + 1):
                z = row @ w_in[k * per_tree + node] + b_in[k * per_tree + node]
                logits.append(abs(z))
                node = 2 * node + (2 if z > 0 else 1)
        want.append(min(logits))
    got = v2.routing_margin(x, p["w_in"], p["b_in"], depth=depth, n_trees=n_trees)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A token put exactly on a root's boundary has margin 0.
    x0 = x.at[0].set(-p["b_in"][0] * p["w_in"][0] / jnp.sum(p["w_in"][0] ** 2))
    assert float(v2.routing_margin(x0, p["w_in"], p["b_in"], depth=depth, n_trees=n_trees)[0]) < 1e-6


def test_weights_of_another_depth_or_tree_count_are_refused_as_such():
    """Depth-3 weights passed with depth=4 are named a depth-3 tree, not only a wrong shape."""
    w_in, b_in, w_out = np.zeros((15, 8), np.float32), np.zeros((15,), np.float32), np.zeros((15, 8), np.float32)
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError) as error:
        fff_v2_hard(x, w_in, b_in, w_out, depth=4)
    assert str(error.value) == ("w_in must have shape (31, 8), got (15, 8): 15 rows is a depth-3 tree "
                                "(2**(depth+1)-1 = 15 nodes per tree x n_trees=1); depth=4 expects 31")
    with pytest.raises(ValueError, match=r"15 rows is 1 tree of depth 3 \(15 nodes each\); n_trees=2 expects 30$"):
        v2.check_arguments(x, w_in, b_in, w_out, depth=3, n_trees=2)
    with pytest.raises(ValueError, match=r"b_in must have shape \(15,\), got \(7,\): 7 entries is a depth-2 tree"):
        v2.check_arguments(x, w_in, b_in[:7], w_out, depth=3, n_trees=1)


# ---------------------------------------------------------------------------------------- load balancing


def test_path_logits_follow_the_hard_path_and_carry_gradients():
    x, w_in, b_in, _ = dyadic_problem(3, depth=3, n_trees=2, features=8, out_features=4, lead=(11,))
    path, logits = v2.path_logits(x, w_in, b_in, depth=3, n_trees=2)
    z = x @ w_in.T + b_in
    np.testing.assert_array_equal(path, v2.path_from_logits(z, depth=3, n_trees=2))
    np.testing.assert_allclose(logits, np.take_along_axis(np.asarray(z), np.asarray(path).reshape(11, -1), 1)
                               .reshape(path.shape), atol=1e-6)
    grad = jax.grad(lambda b: v2.path_logits(x, w_in, b, depth=3, n_trees=2)[1].sum())(b_in)
    np.testing.assert_array_equal(grad, np.bincount(np.asarray(path).ravel(), minlength=b_in.shape[0]))


def balance_problem(bias: float, *, depth: int = 2, tokens: int = 64):
    """One tree whose level-``l`` nodes read ``x[l]``; the tokens are every sign pattern in ``{-1, +1}^depth``
    equally often, so a node's logits are ``+-1 + bias``: every node splits its tokens evenly and
    symmetrically for ``bias == 0``; all go to the right for ``bias > 1``."""
    n = tree.v2_nodes_per_tree(depth)
    signs = (np.arange(tokens)[:, None] >> np.arange(depth)) % 2
    x = jnp.asarray(np.concatenate([2.0 * signs - 1, np.zeros((tokens, 1))], 1), jnp.float32)
    levels = np.floor(np.log2(np.arange(n) + 1)).astype(int)
    w_in = jnp.asarray(np.eye(depth + 1)[levels], jnp.float32)
    return x, w_in, jnp.full((n,), bias, jnp.float32)


def test_load_balance_loss_is_zero_when_balanced_and_positive_when_collapsed():
    def balance(bias, **kw):
        x, w_in, b_in = balance_problem(bias)
        return float(v2.load_balance_loss(*v2.path_logits(x, w_in, b_in, depth=2), depth=2, **kw))

    assert balance(0.0) == 0.0
    collapsed = balance(3.0)
    # every token takes the right child at both routing levels: (sigmoid(4) + sigmoid(2)) / 2 - 1/2 per level
    p = (1 / (1 + math.exp(-4)) + 1 / (1 + math.exp(-2))) / 2
    assert collapsed == pytest.approx(2 * (p - 0.5) ** 2, rel=1e-6)
    assert balance(3.0, temperature=0.5) > collapsed   # a sharper soft decision sees the collapse more fully
    # padding tokens (weight 0) do not count
    x, w_in, b_in = balance_problem(3.0)
    path, logits = v2.path_logits(x, w_in, b_in, depth=2)
    weights = jnp.asarray(np.arange(64) % 4 == 3, jnp.float32)   # only the (+1, +1) tokens: logit 4 everywhere
    only_right = float(v2.load_balance_loss(path, logits, depth=2, weights=weights))
    assert only_right == pytest.approx(2 * (1 / (1 + math.exp(-4)) - 0.5) ** 2, rel=1e-6)


def test_load_balance_gradient_moves_a_collapsed_node_towards_balance():
    x, w_in, b_in = balance_problem(3.0)

    def loss(b):
        return v2.load_balance_loss(*v2.path_logits(x, w_in, b, depth=2), depth=2)

    gradient = jax.jit(jax.grad(loss))
    grad = np.asarray(gradient(b_in))
    assert grad[0] > 0                      # the root sends everything right: descent lowers its bias
    assert np.all(grad[[1, 3, 4, 5]] == 0)  # unvisited nodes and the leaves get no gradient
    b = b_in
    for _ in range(200):
        b = b - 1.0 * gradient(b)
    assert float(loss(b)) < 0.1 * float(loss(b_in))
    assert abs(float(b[0])) < 1.0           # the root splits its tokens again (logits +-1 + b)


def test_load_balance_loss_refuses_mismatched_shapes():
    path = jnp.zeros((4, 1, 3), jnp.int32)
    # our ValueError, or (under the tests' jaxtyping hook) a TypeCheckError naming the argument
    with pytest.raises((ValueError, TypeError), match="logits"):
        v2.load_balance_loss(path, jnp.zeros((4, 1, 2)), depth=2)
    with pytest.raises((ValueError, TypeError), match="path"):
        v2.load_balance_loss(jnp.zeros((4, 2, 3), jnp.int32), jnp.zeros((4, 2, 3)), depth=2)   # n_trees=1
    with pytest.raises((ValueError, TypeError), match="weights"):
        v2.load_balance_loss(path, jnp.zeros((4, 1, 3)), depth=2, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        v2.load_balance_loss(path, jnp.zeros((4, 1, 3)), depth=2, temperature=0.0)


def test_load_balance_term_revives_dead_nodes_in_training():
    """A tiny layer fitted to a regression target from biased routing (every bias +1, inputs off-centre):
    with the term added, fewer nodes end up without tokens than with the task loss alone."""
    from fffjax import regions

    depth, features = 5, 8
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((512, features)) + 1.0, jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((features, features)) / np.sqrt(features), jnp.float32))
    start = v2.init(jax.random.key(0), features, depth)
    start = {**start, "b_in": start["b_in"] + 1.0}

    def dead_fraction(p):
        visits = regions.v2_node_visits(x, p["w_in"], p["b_in"], depth=depth, n_trees=1)
        return regions.v2_tree_usage(visits, depth=depth, n_trees=1).dead_fraction

    def fit(coefficient):
        def loss(p):
            task = jnp.mean((v2.conditional_forward(x, p["w_in"], p["b_in"], p["w_out"], depth=depth) - y) ** 2)
            balance = v2.load_balance_loss(*v2.path_logits(x, p["w_in"], p["b_in"], depth=depth), depth=depth)
            return task + coefficient * balance

        optimizer = optax.adam(1e-2)

        @jax.jit
        def step(p, state):
            grads = jax.grad(loss)(p)
            with jax.numpy_dtype_promotion("standard"):   # optax's bias correction raises an int to a float
                updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        p, state = start, optimizer.init(start)
        for _ in range(60):
            p, state = step(p, state)
        return dead_fraction(p)

    assert dead_fraction(start)[-1] > 0.5
    plain, balanced = fit(0.0), fit(1.0)
    assert plain[-1] > 0.5                               # the task loss alone leaves most leaves dead
    assert balanced.sum() < 0.5 * plain.sum() and balanced[-1] < 0.25
