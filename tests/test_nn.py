"""fffjax.nn: bad arguments to the NNX modules' constructors and calls raise an error naming them."""

import numpy as np
import pytest
from _argument_helpers import DEPTH, H_OUT, IN, NOT_AN_INT, OUT, V1_WEIGHTS, V2_WEIGHTS, WIDTH, X_V1, X_V2, H, K, zeros
from flax import nnx

from fffjax import convert, nn


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
        fff_module(zeros(3, IN + 1))
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
        module(zeros(3, H + 2))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        module(np.ones((3, H), np.int32))
    assert module(X_V2).shape == (3, H_OUT)
