"""fffjax.data.mlm: MLM masking (rate, 80/10/10 rule, labels, padding, weights)."""

import numpy as np
import pytest

from fffjax.data import mlm
from fffjax.data.tokenizer import CLS_ID, FIRST_WORD_ID, MASK_ID, PAD_ID


def test_mask_tokens_rate_rule_and_labels():
    rng = np.random.default_rng(0)
    ids = rng.integers(FIRST_WORD_ID, 100, size=(256, 64)).astype(np.int32)
    ids[:, 0] = CLS_ID
    out = mlm.mask_tokens(ids, np.random.default_rng(1), vocab_size=100)
    k = mlm.n_masked_positions(64)
    assert k == 16 and out["mask_positions"].shape == (256, k)
    rows = np.arange(256)[:, None]
    np.testing.assert_array_equal(out["mask_labels"], ids[rows, out["mask_positions"]])
    assert (out["mask_positions"] != 0).all()  # [CLS] never predicted
    assert all(len(set(r)) == k for r in out["mask_positions"])  # no repeats
    corrupted = out["input_ids"][rows, out["mask_positions"]]
    is_mask = corrupted == MASK_ID
    kept = corrupted == out["mask_labels"]
    assert abs(is_mask.mean() - 0.8) < 0.02
    assert abs((~is_mask & ~kept).mean() - 0.1) < 0.02  # random replacement (rarely equal to the label)
    untouched = np.ones_like(ids, bool)
    untouched[rows, out["mask_positions"]] = False
    np.testing.assert_array_equal(out["input_ids"][untouched], ids[untouched])
    assert mlm.masked_fraction(out["mask_weights"], 64) == 0.25


def test_mask_tokens_skips_padding_and_weights_short_rows():
    ids = np.full((2, 8), PAD_ID, np.int32)
    ids[:, 0] = CLS_ID
    ids[0, 1:8] = 10
    ids[1, 1] = 11  # one word piece only
    out = mlm.mask_tokens(ids, np.random.default_rng(0), vocab_size=50, rate=0.25)
    assert out["mask_weights"][0].tolist() == [1.0, 1.0]
    assert out["mask_weights"][1].tolist() == [1.0, 0.0]
    assert out["mask_positions"][1, 0] == 1
    np.testing.assert_array_equal(out["attention_mask"][1], [1, 1, 0, 0, 0, 0, 0, 0])
    with pytest.raises((ValueError, TypeError)):  # jaxtyping checks first in tests
        mlm.mask_tokens(ids[0], np.random.default_rng(0), vocab_size=50)
    with pytest.raises(ValueError, match="rate"):
        mlm.n_masked_positions(8, rate=1.5)
