"""Masked-language-model batches as in the crammed-BERT recipe, on the host in numpy
(docs/conventions.md, "Pretraining recipe").

Rate 0.25 with the BERT replacement rule: of the selected positions 80% become `[MASK]`, 10% a
random word piece and 10% stay unchanged (cramming's `use_80_20_rule`: 80% mask, the other 20%
split evenly between random and kept). Sparse prediction: the loss is taken only at the selected
positions, which are returned explicitly. The published code draws a Bernoulli mask and then keeps
a fixed count `round(rate * B * S)` of positions (for static shapes); here every sequence gets
exactly `round(rate * S)` positions drawn without replacement among its word pieces, which has
the same expected rate, static shapes and no cross-sequence coupling.
"""

import numpy as np
from jaxtyping import Float, Int

from fffjax.data.tokenizer import FIRST_WORD_ID, MASK_ID, PAD_ID

MLM_RATE = 0.25
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


def n_masked_positions(seq_length: int, rate: float = MLM_RATE) -> int:
    """How many positions each sequence predicts: `max(1, round(rate * seq_length))`."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate: expected in (0, 1), got {rate}")
    return max(1, int(round(rate * seq_length)))


def mask_tokens(
    input_ids: Int[np.ndarray, "batch seq"],
    rng: np.random.Generator,
    *,
    vocab_size: int,
    rate: float = MLM_RATE,
) -> dict[str, np.ndarray]:
    """Selects and corrupts MLM positions.

    Args:
        input_ids: `(batch, seq)` int token ids; ids below `FIRST_WORD_ID` (`[PAD]`, `[CLS]`,
            `[SEP]`, ...) are never selected.
        rng: numpy generator (the caller derives it from the pipeline position).
        vocab_size: random replacements are drawn from `[FIRST_WORD_ID, vocab_size)`.
        rate: fraction of positions to predict.

    Returns:
        `input_ids (batch, seq)` corrupted ids, `attention_mask (batch, seq)` (1 = token),
        `mask_positions (batch, k)`, `mask_labels (batch, k)` original ids and
        `mask_weights (batch, k)` float32 (0 where a sequence had fewer than k word pieces), with
        `k = n_masked_positions(seq, rate)`.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (batch, seq), got {input_ids.shape}")
    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"vocab_size: expected more than {FIRST_WORD_ID}, got {vocab_size}")
    batch, seq = input_ids.shape
    k = n_masked_positions(seq, rate)
    eligible = input_ids >= FIRST_WORD_ID
    scores = rng.random((batch, seq))
    scores[~eligible] = 2.0  # ineligible positions sort last
    positions = np.argsort(scores, axis=1, kind="stable")[:, :k].astype(np.int32)
    rows = np.arange(batch)[:, None]
    labels = input_ids[rows, positions].astype(np.int32)
    weights = eligible[rows, positions].astype(np.float32)

    draw = rng.random((batch, k))
    random_ids = rng.integers(FIRST_WORD_ID, vocab_size, size=(batch, k), dtype=np.int32)
    replacement = np.where(draw < MASK_FRACTION, MASK_ID,
                           np.where(draw < MASK_FRACTION + RANDOM_FRACTION, random_ids, labels))
    replacement = np.where(weights > 0, replacement, labels)
    corrupted = input_ids.astype(np.int32).copy()
    corrupted[rows, positions] = replacement
    return {
        "input_ids": corrupted,
        "attention_mask": (input_ids != PAD_ID).astype(np.int32),
        "mask_positions": positions,
        "mask_labels": labels,
        "mask_weights": weights,
    }


def masked_fraction(weights: Float[np.ndarray, "batch k"], seq_length: int) -> float:
    """The realised prediction rate of a batch (for logging and tests)."""
    return float(weights.sum() / (weights.shape[0] * seq_length))
