"""fffjax.train.optim: the AdamW recipe (triangle schedule, weight-decay mask, clipping)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _train_helpers import small_config
from flax import nnx

from fffjax.models import CrammedBertClassifier
from fffjax.train import TrainConfig
from fffjax.train import sharding as shd
from fffjax.train.optim import decay_mask, make_optimizer, triangle_schedule


def test_triangle_schedule_shape():
    schedule = triangle_schedule(1e-3, 100, 0.5)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0 and values.argmax() == 50 and np.isclose(values[50], 1e-3)
    assert np.isclose(values[25], 5e-4) and np.isclose(values[75], 5e-4) and values[100] == 0.0
    assert np.all(np.diff(values[:51]) > 0) and np.all(np.diff(values[50:]) < 0)


def test_decay_mask_excludes_norms_and_biases_of_the_real_model():
    model = CrammedBertClassifier(small_config(), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = {shd.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert not mask["encoder.layers.0.norm1.scale"] and not mask["encoder.final_norm.bias"]
    assert not mask["encoder.layers.0.ffn.b_in"] and not mask["head.bias"] and not mask["pooler.dense.bias"]
    assert mask["encoder.layers.0.ffn.w_in"] and mask["encoder.layers.0.attn.query_key_value.kernel"]
    assert mask["encoder.embedding.word_embedding.embedding"] and mask["head.kernel"]


def test_optimizer_is_adamw_with_recipe_constants_and_clipping():
    config = TrainConfig(steps=10, learning_rate=1e-2, peak_fraction=0.1)
    tx = make_optimizer(config)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    grads = {"w": jnp.full((2, 2), 100.0), "norm": {"scale": jnp.zeros((2,))}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # step 0 of the triangle has lr 0: nothing moves; step 1 (lr = peak) moves w by lr * (1 + wd)
    assert float(optax.tree.norm(updates)) == 0.0
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    lr = 1e-2
    m_hat = (0.1 * 0.25 + 0.09 * 0.25) / (1 - 0.9 ** 2)  # clipped grad of w is 0.5 / 2 = 0.25 per entry
    v_hat = (0.02 * 0.0625 + 0.0196 * 0.0625) / (1 - 0.98 ** 2)
    expected_w = -lr * (m_hat / (np.sqrt(v_hat) + 1e-12) + 0.01 * 1.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected_w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["norm"]["scale"]), 0.0)  # zero grad, no weight decay
