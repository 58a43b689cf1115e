"""Random FFF-v1 / FFF-v2 problems and the tolerance for the CPU implementations' tests (the "xla"
gather paths, the "cpu_ffi" C++ custom calls)."""

import jax
import numpy as np
import pytest

from fffjax import v1, v2
from fffjax.ops import cpu_ffi


def skip_unless_built(implementation: str) -> None:
    if implementation == "cpu_ffi" and not cpu_ffi.available():
        pytest.skip(f"cpu_ffi kernel did not build here: {cpu_ffi.build_error()}")


def problem(seed: int, tokens: int, features: int, depth: int, n_trees: int, out_features: int):
    params = v2.init(jax.random.PRNGKey(seed), features, depth, n_trees=n_trees, out_features=out_features)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (tokens, features))
    return x, params["w_in"], params["b_in"], params["w_out"]


def assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    bound = rel * max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_array_less(np.max(np.abs(actual - expected)), bound)


def v1_problem(seed: int, tokens: int, features: int, width: int, out_features: int, depth: int):
    params = v1.init(jax.random.PRNGKey(seed), features, width, out_features, depth)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (tokens, features))
    return x, tuple(params[name] for name in v1.PARAM_NAMES)
