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

from fffjax.data.tokenizer import SpecialTokens

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
    specials: SpecialTokens,
    rate: float = MLM_RATE,
) -> dict[str, np.ndarray]:
    """Selects and corrupts MLM positions.

    Args:
        input_ids: `(batch, seq)` int token ids; special ids (pad, cls, sep, ...) are never selected.
        rng: numpy generator (the caller derives it from the pipeline position).
        vocab_size: random replacements are drawn uniformly from the non-special ids below it.
        specials: the tokenizer's special ids (`Tokenizer.specials`); masked positions get `specials.mask`.
        rate: fraction of positions to predict.

    Returns:
        `input_ids (batch, seq)` corrupted ids, `attention_mask (batch, seq)` (1 = token),
        `mask_positions (batch, k)`, `mask_labels (batch, k)` original ids and
        `mask_weights (batch, k)` float32 (0 where a sequence had fewer than k word pieces), with
        `k = n_masked_positions(seq, rate)`.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (batch, seq), got {input_ids.shape}")
    words = specials.word_ids(vocab_size)
    if len(words) == 0:
        raise ValueError(f"vocab_size: expected more than the {len(specials.ids)} special ids, got {vocab_size}")
    batch, seq = input_ids.shape
    k = n_masked_positions(seq, rate)
    eligible = ~np.isin(input_ids, specials.ids)
    scores = rng.random((batch, seq))
    scores[~eligible] = 2.0  # ineligible positions sort last
    positions = np.argsort(scores, axis=1, kind="stable")[:, :k].astype(np.int32)
    rows = np.arange(batch)[:, None]
    labels = input_ids[rows, positions].astype(np.int32)
    weights = eligible[rows, positions].astype(np.float32)

    draw = rng.random((batch, k))
    random_ids = words[rng.integers(0, len(words), size=(batch, k))]
    replacement = np.where(draw < MASK_FRACTION, specials.mask,
                           np.where(draw < MASK_FRACTION + RANDOM_FRACTION, random_ids, labels))
    replacement = np.where(weights > 0, replacement, labels)
    corrupted = input_ids.astype(np.int32).copy()
    corrupted[rows, positions] = replacement
    return {
        "input_ids": corrupted,
        "attention_mask": (input_ids != specials.pad).astype(np.int32),
        "mask_positions": positions,
        "mask_labels": labels,
        "mask_weights": weights,
    }


def masked_fraction(weights: Float[np.ndarray, "batch k"], seq_length: int) -> float:
    """The realised prediction rate of a batch (for logging and tests)."""
    return float(weights.sum() / (weights.shape[0] * seq_length))
