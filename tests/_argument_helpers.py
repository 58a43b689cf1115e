"""Small FFF-v1 and FFF-v2 weights and inputs as numpy arrays, for the tests that bad arguments raise
errors naming them: the ops (test_ops_api.py) and the NNX modules (test_nn.py)."""

import numpy as np

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

# A float where an int belongs: our ValueError, or (under the tests' jaxtyping/beartype hook) a
# TypeCheckError that names the parameter.
NOT_AN_INT = r"({0} must be an? (positive )?int|parameter '{0}')"


def zeros(*shape):
    return np.zeros(shape, np.float32)
