"""Bad input to the hard-inference ops and the NNX modules raises an error naming the argument."""

import numpy as np
import pytest
from flax import nnx

from fffjax import convert, nn
from fffjax.ops import fff_v1_hard, fff_v2_hard

H, H_OUT, DEPTH, K = 6, 4, 2, 2
N = K * (2 ** (DEPTH + 1) - 1)  # 14 node rows
IN, WIDTH, OUT = 5, 3, 2
N_NODES, N_LEAVES = 2**DEPTH - 1, 2**DEPTH

# numpy arrays: every check runs before anything is computed, so nothing compiles.
rng = np.random.default_rng(0)
X_V2 = rng.standard_normal((3, H)).astype(np.float32)
V2_WEIGHTS = dict(
    w_in=rng.standard_normal((N, H)).astype(np.float32),
    b_in=rng.standard_normal((N,)).astype(np.float32),
    w_out=rng.standard_normal((N, H_OUT)).astype(np.float32),
)
X_V1 = rng.standard_normal((2, 3, IN)).astype(np.float32)
V1_WEIGHTS = dict(
    node_weights=rng.standard_normal((N_NODES, IN)).astype(np.float32),
    node_biases=rng.standard_normal((N_NODES,)).astype(np.float32),
    w1s=rng.standard_normal((N_LEAVES, IN, WIDTH)).astype(np.float32),
    b1s=rng.standard_normal((N_LEAVES, WIDTH)).astype(np.float32),
    w2s=rng.standard_normal((N_LEAVES, WIDTH, OUT)).astype(np.float32),
    b2s=rng.standard_normal((N_LEAVES, OUT)).astype(np.float32),
)


def v2_call(x=X_V2, depth=DEPTH, n_trees=K, implementation="xla", **weights):
    return fff_v2_hard(x, **{**V2_WEIGHTS, **weights}, depth=depth, n_trees=n_trees,
                       implementation=implementation)


def v1_call(x=X_V1, depth=DEPTH, implementation="xla", **weights):
    return fff_v1_hard(x, **{**V1_WEIGHTS, **weights}, depth=depth, implementation=implementation)


# A float where an int belongs: our ValueError, or (under the tests' jaxtyping/beartype hook) a
# TypeCheckError that names the parameter.
NOT_AN_INT = r"({0} must be an? (positive )?int|parameter '{0}')"


def _zeros(*shape):
    return np.zeros(shape, np.float32)


# --------------------------------------------------------------------------- fff_v2_hard


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(x=_zeros(3, H + 1)), ValueError, rf"x must have shape \(\.\.\., {H}\)"),
        (dict(x=_zeros(2, 3, H - 1)), ValueError, r"x must have shape .*\(2, 3, 5\)"),
        (dict(x=np.ones((3, H), np.int32)), TypeError, "x must be a floating-point array"),
        (dict(x=[[0.0] * H]), TypeError, "x must be an array"),
        (dict(depth=-1), ValueError, "depth must be an int >= 0, got -1"),
        (dict(depth=2.0), (ValueError, TypeError), NOT_AN_INT.format("depth")),
        (dict(depth=DEPTH + 1), ValueError, rf"w_in must have shape \({K * 15}, {H}\)"),
        (dict(n_trees=0), ValueError, "n_trees must be an int >= 1"),
        (dict(n_trees=1), ValueError, r"w_in must have shape \(7, "),
        (dict(w_in=_zeros(N - 1, H)), ValueError, rf"w_in must have shape \({N}, {H}\), got \({N - 1}, {H}\)"),
        (dict(w_in=_zeros(N)), ValueError, "w_in must have shape"),
        (dict(b_in=_zeros(N + 1)), ValueError, rf"b_in must have shape \({N},\), got \({N + 1},\)"),
        (dict(b_in=_zeros(N, 1)), ValueError, "b_in must have shape"),
        (dict(w_out=_zeros(N - 2, H_OUT)), ValueError, rf"w_out must have shape \({N}, H_out\)"),
        (dict(w_out=_zeros(H_OUT, N)), ValueError, "w_out must have shape"),
        (dict(implementation="cuda-magic"), ValueError, "implementation must be one of .*'cuda-magic'"),
    ],
)
def test_fff_v2_hard_names_the_bad_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        v2_call(**kwargs)


# --------------------------------------------------------------------------- fff_v1_hard


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(x=_zeros(4, IN + 2)), ValueError, rf"x must have shape \(\.\.\., {IN}\)"),
        (dict(x=np.ones((4, IN), np.int64)), TypeError, "x must be a floating-point array"),
        (dict(depth=-2), ValueError, "depth must be an int >= 0, got -2"),
        (dict(depth=DEPTH + 1), ValueError, r"w1s must have shape \(8, "),
        (dict(node_weights=_zeros(N_NODES + 1, IN)), ValueError,
         rf"node_weights must have shape \({N_NODES}, {IN}\), got \({N_NODES + 1}, {IN}\)"),
        (dict(node_weights=_zeros(N_NODES, IN + 1)), ValueError, "node_weights must have shape"),
        (dict(node_biases=_zeros(N_NODES, 2)), ValueError, rf"node_biases must have shape \({N_NODES}, 1\)"),
        (dict(node_biases=_zeros(N_NODES + 1)), ValueError, rf"node_biases must have shape \({N_NODES},\)"),
        (dict(w1s=_zeros(N_LEAVES, IN)), ValueError, "w1s must have shape"),
        (dict(w1s=_zeros(N_LEAVES + 1, IN, WIDTH)), ValueError, "w1s must have shape"),
        (dict(b1s=_zeros(N_LEAVES, WIDTH + 1)), ValueError, rf"b1s must have shape \({N_LEAVES}, {WIDTH}\)"),
        (dict(w2s=_zeros(N_LEAVES, WIDTH + 1, OUT)), ValueError, "w2s must have shape"),
        (dict(w2s=_zeros(N_LEAVES, WIDTH)), ValueError, "w2s must have shape"),
        (dict(b2s=_zeros(N_LEAVES, OUT + 1)), ValueError, rf"b2s must have shape \({N_LEAVES}, {OUT}\)"),
        (dict(implementation="nope"), ValueError, "implementation must be one of .*'nope'"),
    ],
)
def test_fff_v1_hard_names_the_bad_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        v1_call(**kwargs)


def test_package_layout_node_biases_accepted():
    """The package's ``(n, 1)`` node biases are valid input (the control for the cases above)."""
    y = v1_call(node_biases=V1_WEIGHTS["node_biases"][:, None])
    np.testing.assert_array_equal(y, v1_call())
    assert y.shape == (2, 3, OUT)


# --------------------------------------------------------------------------- NNX modules


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(depth=1.5), NOT_AN_INT.format("depth")),
        (dict(in_features=0), "in_features must be an int >= 1"),
        (dict(leaf_width=-3), "leaf_width must be an int >= 1"),
        (dict(out_features=2.0), NOT_AN_INT.format("out_features")),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\]"),
        (dict(region_leak=-0.1), r"region_leak must be in \[0, 1\]"),
        (dict(usage_mode="sometimes"), "usage_mode must be one of"),
    ],
)
def test_fff_module_constructor_names_the_bad_argument(kwargs, pattern):
    args = dict(in_features=IN, leaf_width=WIDTH, out_features=OUT, depth=DEPTH) | kwargs
    with pytest.raises((ValueError, TypeError), match=pattern):
        nn.FFF(**args, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(features=0), "features must be an int >= 1"),
        (dict(n_trees=0), "n_trees must be an int >= 1"),
        (dict(out_features=-4), "out_features must be an int >= 1"),
        (dict(init="xavier"), "init must be one of"),
    ],
)
def test_ultrafast_module_constructor_names_the_bad_argument(kwargs, pattern):
    args = dict(features=H, depth=DEPTH) | kwargs
    with pytest.raises(ValueError, match=pattern):
        nn.UltraFastFF(**args, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def fff_module():
    """Built by the converter (abstractly: no init, no compile) from the weights above."""
    state = {"depth": np.array(DEPTH, np.int64), **V1_WEIGHTS}
    return convert.import_fastfeedforward(state)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fff_module_call_names_the_bad_argument(fff_module, mode):
    getattr(fff_module, mode)()
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., {IN}\)"):
        fff_module(_zeros(3, IN + 1))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        fff_module(np.ones((3, IN), np.int32))
    with pytest.raises(TypeError, match="x must be an array"):
        fff_module([[0.0] * IN])
    if mode == "eval":
        with pytest.raises(ValueError, match="return_entropies"):
            fff_module(X_V1, return_entropies=True)
        with pytest.raises(ValueError, match="use_hard_decisions"):
            fff_module(X_V1, use_hard_decisions=False)
        fff_module.implementation = "nope"
        try:
            with pytest.raises(ValueError, match="implementation must be one of .*'nope'"):
                fff_module(X_V1)
        finally:
            fff_module.implementation = None
    fff_module.train()


def test_ultrafast_module_call_names_the_bad_argument():
    state = {"linear_in.weight": V2_WEIGHTS["w_in"], "linear_in.bias": V2_WEIGHTS["b_in"],
             "linear_out.weight": V2_WEIGHTS["w_out"].T}
    module = convert.import_ultrafast_ff(state, depth=DEPTH, n_trees=K, implementation="bogus")
    with pytest.raises(ValueError, match="implementation must be one of .*'bogus'"):
        module(X_V2)
    module.implementation = "xla"
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., {H}\)"):
        module(_zeros(3, H + 2))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        module(np.ones((3, H), np.int32))
    assert module(X_V2).shape == (3, H_OUT)
