"""fffjax.data.mlm: MLM masking (rate, 80/10/10 rule, labels, padding, weights)."""

import numpy as np
import pytest

from fffjax.data import mlm
from fffjax.data.tokenizer import SpecialTokens

# Seven specials at shuffled ids, as in a tokenizer built by cramming: nothing may assume ids 0..4.
SPECIALS = SpecialTokens(pad=5, unk=0, cls=3, sep=6, mask=1, ids=(0, 1, 2, 3, 4, 5, 6))
CLS_ID, MASK_ID, PAD_ID, FIRST_WORD_ID = SPECIALS.cls, SPECIALS.mask, SPECIALS.pad, 7


def test_mask_tokens_rate_rule_and_labels():
    rng = np.random.default_rng(0)
    ids = rng.integers(FIRST_WORD_ID, 100, size=(256, 64)).astype(np.int32)
    ids[:, 0] = CLS_ID
    out = mlm.mask_tokens(ids, np.random.default_rng(1), vocab_size=100, specials=SPECIALS)
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
    assert not np.isin(corrupted[~is_mask], SPECIALS.ids).any()  # replacements are word pieces
    untouched = np.ones_like(ids, bool)
    untouched[rows, out["mask_positions"]] = False
    np.testing.assert_array_equal(out["input_ids"][untouched], ids[untouched])
    assert mlm.masked_fraction(out["mask_weights"], 64) == 0.25


def test_mask_tokens_skips_padding_and_weights_short_rows():
    ids = np.full((2, 8), PAD_ID, np.int32)
    ids[:, 0] = CLS_ID
    ids[0, 1:8] = 10
    ids[1, 1] = 11  # one word piece only
    out = mlm.mask_tokens(ids, np.random.default_rng(0), vocab_size=50, specials=SPECIALS, rate=0.25)
    assert out["mask_weights"][0].tolist() == [1.0, 1.0]
    assert out["mask_weights"][1].tolist() == [1.0, 0.0]
    assert out["mask_positions"][1, 0] == 1
    np.testing.assert_array_equal(out["attention_mask"][1], [1, 1, 0, 0, 0, 0, 0, 0])
    with pytest.raises((ValueError, TypeError)):  # jaxtyping checks first in tests
        mlm.mask_tokens(ids[0], np.random.default_rng(0), vocab_size=50, specials=SPECIALS)
    with pytest.raises(ValueError, match="rate"):
        mlm.n_masked_positions(8, rate=1.5)


def test_mask_tokens_never_selects_any_special_id():
    ids = np.random.default_rng(0).integers(0, 40, size=(64, 32)).astype(np.int32)
    out = mlm.mask_tokens(ids, np.random.default_rng(1), vocab_size=40, specials=SPECIALS)
    rows = np.arange(64)[:, None]
    picked = ids[rows, out["mask_positions"]]
    assert not np.isin(picked[out["mask_weights"] > 0], SPECIALS.ids).any()
    np.testing.assert_array_equal(out["attention_mask"], (ids != PAD_ID).astype(np.int32))
    with pytest.raises(ValueError, match="vocab_size"):
        mlm.mask_tokens(ids, np.random.default_rng(0), vocab_size=7, specials=SPECIALS)
