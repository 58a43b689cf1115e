"""fffjax.data.pipeline: packing, the hold-out split, the deterministic, resumable batch pipeline."""

import numpy as np
import pytest

from fffjax.data import pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS

FIRST_WORD_ID = 5


def test_pack_and_split():
    rows = pipeline.pack_sequences(np.arange(10, 40, dtype=np.int32), 8, cls_id=7)
    assert rows.shape == (4, 8) and (rows[:, 0] == 7).all()
    np.testing.assert_array_equal(rows[1, 1:], np.arange(17, 24))
    train, held = pipeline.split_holdout(np.arange(100)[:, None], 0.1, seed=0)
    assert len(train) == 90 and len(held) == 10 and not set(train[:, 0]) & set(held[:, 0])
    with pytest.raises(ValueError, match="stream"):
        pipeline.pack_sequences(np.arange(3), 8, cls_id=7)


def test_pipeline_is_deterministic_resumable_and_covers_each_epoch():
    rows = np.arange(FIRST_WORD_ID, FIRST_WORD_ID + 50 * 6, dtype=np.int32).reshape(50, 6)
    pipe = pipeline.mlm_pipeline(rows, 8, vocab_size=1000, specials=WORDPIECE_SPECIALS)
    position = pipeline.initial_position(seed=3)
    history = []
    for _ in range(14):  # 6 batches per epoch (2 rows dropped), so this crosses two epochs
        batch, position = pipe.next(position)
        history.append((batch, position))
    assert int(history[5][1]["epoch"]) == 1 and int(history[5][1]["index"]) == 0
    # resume: rebuild the pipeline, restart from a saved position, get identical batches
    fresh = pipeline.mlm_pipeline(rows.copy(), 8, vocab_size=1000, specials=WORDPIECE_SPECIALS)
    saved = {k: np.asarray(int(v)) for k, v in history[8][1].items()}  # as if read back from JSON
    for batch, _ in history[9:]:
        again, saved = fresh.next(saved)
        for key in batch:
            np.testing.assert_array_equal(again[key], batch[key])
    # different epochs shuffle differently; another seed gives other batches
    first_rows = lambda b: sorted(b["mask_labels"][:, 0])  # noqa: E731
    assert first_rows(history[0][0]) != first_rows(history[6][0])
    other, _ = pipe.next(pipeline.initial_position(seed=4))
    assert not np.array_equal(other["input_ids"], history[0][0]["input_ids"])


def test_pipeline_visits_every_row_once_per_epoch():
    rows = np.arange(40)[:, None]
    pipe = pipeline.BatchPipeline({"x": rows, "y": rows * 2}, 10)
    position = pipeline.initial_position(0)
    seen = []
    for _ in range(4):
        batch, position = pipe.next(position)
        np.testing.assert_array_equal(batch["y"], batch["x"] * 2)
        seen.extend(batch["x"][:, 0])
    assert sorted(seen) == list(range(40)) and int(position["epoch"]) == 1
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.BatchPipeline({"x": rows}, 41)
    with pytest.raises(ValueError, match="equally long"):
        pipeline.BatchPipeline({"x": rows, "y": rows[:3]}, 4)


def test_held_out_documents_hold_out_the_closing_paragraphs_of_each_document():
    book = [f"b{i}" for i in range(20)]
    speeches = [f"s{i}" for i in range(5)]
    train, held = pipeline.held_out_documents([book, speeches], 0.1)
    assert held == ["b18", "b19", "s4"]                   # 10% of 20, and at least one of 5
    assert train == book[:18] + speeches[:4]
    assert pipeline.held_out_documents([book], 0.0) == (book, [])
    assert pipeline.held_out_documents([["only"]], 0.5) == (["only"], [])   # a document keeps a paragraph
    with pytest.raises(ValueError, match=r"fraction: expected in \[0, 1\), got 1.0"):
        pipeline.held_out_documents([book], 1.0)


def test_causal_lm_pipeline_gives_whole_rows_with_a_full_attention_mask():
    rows = np.arange(40, dtype=np.int32).reshape(10, 4)
    batches = pipeline.causal_lm_pipeline(rows, 5)
    position = pipeline.initial_position(3)
    first, position = batches.next(position)
    assert first["input_ids"].shape == (5, 4) and np.all(first["attention_mask"] == 1)
    second, _ = batches.next(position)
    covered = np.concatenate([first["input_ids"], second["input_ids"]])
    np.testing.assert_array_equal(covered[np.argsort(covered[:, 0])], rows)   # one epoch: every row once, whole
