"""fffjax.ops.per_device: ``rows_per_device`` on a data mesh of the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
from _mesh_helpers import make_mesh

from fffjax import ops


def test_rows_per_device_splits_rows_and_sums_replicated_gradients():
    mesh = make_mesh((4, 2), ("data", "model"))
    x = jax.random.normal(jax.random.key(0), (32, 3))
    w = jax.random.normal(jax.random.key(1), (3,))

    def loss(x, w):
        return jnp.sum(ops.rows_per_device(lambda a, v: jnp.sin(a * v), (x,), (w,)) ** 2)

    want = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
        assert "sdy.manual_computation" in jax.jit(loss).lower(x, w).as_text()
        # Inside a shard_map that already maps "data" the caller is per device: fn runs as it is.
        inner = jax.jit(jax.shard_map(lambda a: ops.rows_per_device(lambda b: b * 2, (a,)),
                                      in_specs=jax.P("data"), out_specs=jax.P("data")))(x)
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w_, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(inner, x * 2)
