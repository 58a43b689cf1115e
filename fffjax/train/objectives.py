"""Training objectives of the UltraFastBERT trainer: `(model, batch) -> (loss, metrics)`.

`mlm_objective` is sparse-prediction masked language modelling (the loss only at the masked
positions); `causal_lm_objective` is next-token prediction; `classification_objective` is sequence
classification. Each returns its accuracy as a metric, computed from the same logits as the loss.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fffjax._typing import Array, Float, Int

LossFn = Callable[[nnx.Module, dict[str, Array]], tuple[Array, dict[str, Array]]]


def mlm_loss(
    logits: Float[Array, "batch k vocab"], labels: Int[Array, "batch k"], weights: Float[Array, "batch k"]
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Weighted mean cross-entropy over the predicted positions, and their accuracy.

    Args:
        logits: `(batch, k, vocab)` logits at the masked positions.
        labels: `(batch, k)` original ids.
        weights: `(batch, k)` 1 for a real prediction, 0 for padding.
    """
    logits = logits.astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (per_token * weights).sum() / total
    accuracy = ((logits.argmax(-1) == labels).astype(weights.dtype) * weights).sum() / total
    return loss, {"accuracy": accuracy}


def gather_positions(x: Float[Array, "batch seq *rest"], positions: Int[Array, "batch k"]) -> Array:
    """`x[b, positions[b, j]]` for every b, j: `(batch, k, *rest)`."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def mlm_objective(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Sparse-prediction MLM loss of a model called as `model(input_ids, attention_mask)`.

    A model with `encode(ids, mask) -> (B, S, H)` and `decode(hidden) -> logits` is decoded only
    at the masked positions (crammed BERT's sparse prediction); otherwise full logits are gathered.
    """
    if hasattr(model, "encode") and hasattr(model, "decode"):
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        logits = model.decode(gather_positions(hidden, batch["mask_positions"]))
    else:
        logits = gather_positions(model(batch["input_ids"], batch["attention_mask"]), batch["mask_positions"])
    return mlm_loss(logits, batch["mask_labels"], batch["mask_weights"])


def causal_lm_objective(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy of a causal LM `model(input_ids, attention_mask) -> (B, S, V)` logits.

    Position `i` predicts token `i + 1`. A pair counts when both tokens are real (`attention_mask` 1,
    so left or right padding is never predicted nor predicts) and, when the batch has a `loss_mask
    (B, S)`, its target's `loss_mask` is 1 (e.g. 0 on the prompt of an instruction). The loss is the
    mean over counted pairs, as `mlm_loss`, with their accuracy.

    A decoder whose `config.load_balance` is `c > 0` also computes its FFF-v2 load-balancing term `b`
    (`model.logits_and_load_balance`), reported as the metric `load_balance`, and returns
    `loss + c * (b - stop_gradient(b))`: the value stays the cross-entropy (so `loss`, `eval_loss` and
    the perplexity keep their meaning), the gradient is that of `loss + c * b`.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    coefficient = getattr(getattr(model, "config", None), "load_balance", 0.0)
    if coefficient:
        logits, balance = model.logits_and_load_balance(input_ids, attention_mask)
        logits = logits[:, :-1]
    else:
        logits = model(input_ids, attention_mask)[:, :-1]
    weights = (attention_mask[:, :-1] * attention_mask[:, 1:]).astype(jnp.float32)
    if "loss_mask" in batch:
        weights = weights * batch["loss_mask"][:, 1:].astype(jnp.float32)
    loss, metrics = mlm_loss(logits, input_ids[:, 1:], weights)
    if coefficient:
        loss = loss + coefficient * (balance - jax.lax.stop_gradient(balance))
        metrics["load_balance"] = balance
    return loss, metrics


def classification_objective(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Mean cross-entropy and accuracy of a classifier `model(input_ids, attention_mask) -> (B, labels)`."""
    logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).mean()}
