"""Text data: corpus assembly, WordPiece tokenizer, MLM masking, the resumable pipeline, labelled
sets. Everything runs on tiny synthetic files written to tmp folders (no network)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fffjax.data import corpus, fetch, labelled, mlm, pipeline
from fffjax.data.tokenizer import (CLS_ID, FIRST_WORD_ID, MASK_ID, PAD_ID, SEP_ID, encode_padded, encode_stream,
                                   load_tokenizer, train_wordpiece)

WORDS = ("the whale swam under the grey sea while the captain watched from the deck and the crew sang "
         "old songs of home and harbour and the wind rose over the waves").split()


def synthetic_text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(synthetic_text(300))
    return path


@pytest.fixture(scope="module")
def tokenizer(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    train_wordpiece([text_file], 120, min_frequency=1, out=out)
    return load_tokenizer(out)


# --------------------------------------------------------------------------- corpus


def test_build_corpus_from_fake_raw_packages(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sotu/package/data").mkdir(parents=True)
    (raw / "sotu/package/data/1790_a.json").write_text(json.dumps(
        {"year": 1790, "name": "A", "party": "none", "text": "First   paragraph here.\n\nSecond one."}))
    (raw / "moby-dick/package/data").mkdir(parents=True)
    for i in (2, 10, 1):
        (raw / f"moby-dick/package/data/chapter_{i}.txt").write_text(f"Chapter {i} text.\n")
    (raw / "dict-gcide/usr/share/dictd").mkdir(parents=True)
    with gzip.open(raw / "dict-gcide/usr/share/dictd/gcide.dict.dz", "wt") as f:
        f.write("Whale {n.} a sea animal. [1913 Webster]\n")
    counts = corpus.build_corpus(tmp_path, ["sotu", "moby_dick", "gcide"])
    assert counts == {"sotu": 2, "moby_dick": 3, "gcide": 1}
    files = corpus.corpus_files(tmp_path, ["sotu", "moby_dick", "gcide"])
    assert files[0].read_text() == "First paragraph here.\nSecond one.\n"
    assert files[1].read_text().splitlines() == ["Chapter 1 text.", "Chapter 2 text.", "Chapter 10 text."]
    assert files[2].read_text() == "Whale n. a sea animal.\n"
    assert corpus.read_paragraphs(files)[:2] == ["First paragraph here.", "Second one."]


def test_missing_data_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments/fetch_text.sh"):
        corpus.corpus_files(tmp_path, ["sotu"])
    with pytest.raises(FileNotFoundError, match="experiments/fetch_text.sh"):
        corpus.build_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="experiments/fetch_text.sh"):
        labelled.load_spam(tmp_path)
    with pytest.raises(FileNotFoundError, match="experiments/fetch_text.sh"):
        labelled.load_amazon(tmp_path)
    with pytest.raises(FileNotFoundError, match="experiments/fetch_text.sh"):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="sources"):
        corpus.build_corpus(tmp_path, ["nope"])


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_round_trip(tokenizer):
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert 30 < tokenizer.get_vocab_size() <= 120
    ids = tokenizer.encode("The Whale swam", add_special_tokens=False).ids
    assert tokenizer.decode(ids) == "the whale swam"  # lower-cased WordPiece
    assert min(ids) >= FIRST_WORD_ID


def test_encode_stream_and_padded(tokenizer):
    stream = encode_stream(tokenizer, ["the whale", "the sea"], batch_size=1)
    assert stream.dtype == np.int32
    assert list(stream == SEP_ID).count(True) == 2 and stream[-1] == SEP_ID
    ids, mask = encode_padded(tokenizer, ["the whale", "the whale swam under the grey sea " * 5], 8)
    assert ids.shape == (2, 8) and ids[0, 0] == CLS_ID and ids[0, 3] == SEP_ID and ids[0, 4] == PAD_ID
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert ids[1, -1] == SEP_ID and mask[1].all()  # truncated, still ends with [SEP]


# --------------------------------------------------------------------------- MLM masking


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


# --------------------------------------------------------------------------- pipeline


def test_pack_and_split():
    rows = pipeline.pack_sequences(np.arange(10, 40, dtype=np.int32), 8)
    assert rows.shape == (4, 8) and (rows[:, 0] == CLS_ID).all()
    np.testing.assert_array_equal(rows[1, 1:], np.arange(17, 24))
    train, held = pipeline.split_holdout(np.arange(100)[:, None], 0.1, seed=0)
    assert len(train) == 90 and len(held) == 10 and not set(train[:, 0]) & set(held[:, 0])
    with pytest.raises(ValueError, match="stream"):
        pipeline.pack_sequences(np.arange(3), 8)


def test_pipeline_is_deterministic_resumable_and_covers_each_epoch():
    rows = np.arange(FIRST_WORD_ID, FIRST_WORD_ID + 50 * 6, dtype=np.int32).reshape(50, 6)
    pipe = pipeline.mlm_pipeline(rows, 8, vocab_size=1000)
    position = pipeline.initial_position(seed=3)
    history = []
    for _ in range(14):  # 6 batches per epoch (2 rows dropped), so this crosses two epochs
        batch, position = pipe.next(position)
        history.append((batch, position))
    assert int(history[5][1]["epoch"]) == 1 and int(history[5][1]["index"]) == 0
    # resume: rebuild the pipeline, restart from a saved position, get identical batches
    fresh = pipeline.mlm_pipeline(rows.copy(), 8, vocab_size=1000)
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


# --------------------------------------------------------------------------- labelled sets


def test_spam_loader_on_a_fake_package(tmp_path):
    root = tmp_path / "raw/spam-assassin/package/data"
    for group, n in (("easy-ham-1", 12), ("spam-1", 8)):
        (root / group).mkdir(parents=True)
        for i in range(n):
            body = f"Subject: {'WIN MONEY' if 'spam' in group else 'meeting'} {i}\nFrom: a@b.c\n\nHello <br/> there {i}\n"
            (root / group / f"{i:05d}.json").write_text(json.dumps({"id": f"{i:05d}", "group": group, "text": body}))
    data = labelled.load_spam(tmp_path)
    assert len(data.test_texts) == 4 and len(data.train_texts) == 16
    assert data.train_labels.sum() + data.test_labels.sum() == 8
    assert all("From:" not in t for t in data.train_texts)  # headers stripped, subject kept
    assert any(t.startswith("WIN MONEY") for t, y in zip(data.train_texts, data.train_labels) if y == 1)
    again = labelled.load_spam(tmp_path)
    assert again.test_texts == data.test_texts  # the split is fixed
    with pytest.raises(ValueError, match="task"):
        labelled.load_task("imdb", tmp_path)


def test_email_body_keeps_text_parts_only():
    message = ("Subject: hi\nContent-Type: multipart/alternative; boundary=XX\n\n--XX\nContent-Type: text/plain\n\n"
               "plain words\n--XX\nContent-Type: application/octet-stream\n\nBINARY\n--XX--\n")
    body = labelled.email_body(message)
    assert "plain words" in body and "BINARY" not in body and body.startswith("hi")


def test_text_cache_follows_the_one_data_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    assert corpus.default_cache() == tmp_path.resolve() / "text"
    assert fetch.cache_dir() == tmp_path.resolve()
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert corpus.default_cache() == (Path("data_cache") / "text").resolve()
