"""fffjax.train.objectives: the MLM loss against numpy, the sparse decode of the MLM objective, and the
next-token loss of the causal LM objective with padding and a loss mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import VOCAB, mlm_rows, small_config
from flax import nnx

from fffjax.data import pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS
from fffjax.models import CausalLM, CrammedBertMLM, DecoderConfig
from fffjax.train import causal_lm_objective, mlm_objective
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


def test_causal_lm_objective_predicts_the_next_real_token():
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, max_seq_length=12,
                           ffn="fff", fff_depth=2, dropout=0.0)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    model.eval()
    ids = np.asarray(mlm_rows(2)[:, :7])
    loss, metrics = causal_lm_objective(model, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)})
    log_probs = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids)), -1))
    nll = -np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    # left padding of row 0 by 3 slots: no pair with a pad counts, so the loss is unchanged
    padded = np.zeros((2, 10), np.int32)
    padded[0, 3:], padded[1, :7] = ids[0], ids[1]
    mask = (np.arange(10) >= 3).astype(np.int32)[None].repeat(2, 0)
    mask[1] = np.arange(10) < 7
    padded_loss, _ = causal_lm_objective(model, {"input_ids": jnp.asarray(padded), "attention_mask": jnp.asarray(mask)})
    np.testing.assert_allclose(float(padded_loss), nll.mean(), rtol=1e-5)
    # a loss mask keeps only row 1's last two targets
    loss_mask = np.zeros((2, 7), np.int32)
    loss_mask[1, 5:] = 1
    masked, _ = causal_lm_objective(model, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
                                            "loss_mask": jnp.asarray(loss_mask)})
    np.testing.assert_allclose(float(masked), nll[1, 4:].mean(), rtol=1e-5)


def _lb_problem(load_balance: float):
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, max_seq_length=12,
                           ffn="fff", fff_depth=3, fff_trees=2, dropout=0.0, load_balance=load_balance)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    model.eval()
    ids = np.asarray(mlm_rows(2)[:, :9])
    mask = np.ones_like(ids)
    mask[0, :2] = 0   # left padding in row 0
    return model, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def _loss_and_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return causal_lm_objective(nnx.merge(graphdef, p, rest), batch)

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_causal_lm_objective_without_load_balance_is_the_cross_entropy():
    """Coefficient 0: the objective is the next-token loss of the logits, its gradients exactly theirs."""
    model, batch = _lb_problem(0.0)
    (loss, metrics), grads = _loss_and_grads(model, batch)
    assert set(metrics) == {"accuracy"}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def reference(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask)[:, :-1]
        return mlm_loss(logits, ids[:, 1:], (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32))[0]

    expected, expected_grads = jax.value_and_grad(reference)(params)
    assert float(loss) == float(expected)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_array_equal(got, want)


def test_causal_lm_objective_adds_the_load_balance_gradient_not_its_value():
    plain_model, batch = _lb_problem(0.0)
    model, _ = _lb_problem(0.5)
    (plain, _), plain_grads = _loss_and_grads(plain_model, batch)
    (loss, metrics), grads = _loss_and_grads(model, batch)
    assert float(loss) == float(plain)          # the value stays the cross-entropy (eval_loss, perplexity)
    balance = float(metrics["load_balance"])
    assert 0.0 < balance <= 2 * 3 / 4           # two layers, each at most depth / 4
    _, term = model.logits_and_load_balance(batch["input_ids"], batch["attention_mask"])
    assert float(term) == pytest.approx(balance, rel=1e-6)
    # the gradient is the cross-entropy's plus 0.5 x the term's; the term reaches the routing logits and
    # what feeds them (w_in, b_in, the layers below), never the last layer's output rows nor the final norm
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    term_grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest).logits_and_load_balance(
        batch["input_ids"], batch["attention_mask"])[1])(params)
    flat, flat_plain, flat_term = (dict(nnx.to_flat_state(g)) for g in (grads, plain_grads, term_grads))
    for path, got in flat.items():
        expected = flat_plain[path][...] + 0.5 * flat_term[path][...]
        np.testing.assert_allclose(got[...], expected, rtol=1e-5, atol=1e-7, err_msg=str(path))
        if path in (("layers", 1, "ffn", "w_out"),) or path[0] == "final_norm":
            assert not np.any(flat_term[path][...]), path
    for layer in (0, 1):
        assert np.any(flat_term[("layers", layer, "ffn", "b_in")][...])
