"""fffjax.train.objectives: the MLM loss against numpy, and the sparse decode of the MLM objective."""

import jax.numpy as jnp
import numpy as np
from _train_helpers import VOCAB, mlm_rows, small_config
from flax import nnx

from fffjax.data import pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS
from fffjax.models import CrammedBertMLM
from fffjax.train import mlm_objective
from fffjax.train.objectives import gather_positions, mlm_loss


def test_mlm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3)).astype(np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    loss, metrics = mlm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * weights).sum() / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), ((logits.argmax(-1) == labels) * weights).sum() / 3)


def test_sparse_decode_equals_gathered_full_logits():
    model = CrammedBertMLM(small_config(), rngs=nnx.Rngs(0))
    model.eval()
    batch = {
        k: jnp.asarray(v)
        for k, v in pipeline.mlm_pipeline(mlm_rows(), 8, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
        .batch_at(pipeline.initial_position(0))
        .items()
    }
    sparse, _ = mlm_objective(model, batch)
    full = gather_positions(model(batch["input_ids"], batch["attention_mask"]), batch["mask_positions"])
    dense_loss, _ = mlm_loss(full, batch["mask_labels"], batch["mask_weights"])
    np.testing.assert_allclose(float(sparse), float(dense_loss), rtol=1e-6)
