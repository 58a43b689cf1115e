"""fffjax.data.corpus: assembling the corpus from raw packages, the errors that name the fetch
command, the text cache folder. Everything runs on tiny synthetic files in tmp folders (no network)."""

import gzip
import json
from pathlib import Path

import pytest

from fffjax.data import corpus, fetch, labelled


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
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="sources"):
        corpus.build_corpus(tmp_path, ["nope"])


def test_text_cache_follows_the_one_data_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    assert corpus.default_cache() == tmp_path.resolve() / "text"
    assert fetch.cache_dir() == tmp_path.resolve()
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert corpus.default_cache() == (Path("data_cache") / "text").resolve()


def test_split_sentences_keeps_whole_sentences_of_the_allowed_length():
    paragraph = ('Call me Ishmael. Some years ago, never mind how long, I thought I would sail. "Yes!" he said. '
                 'It was 1851 when the ship left port for good.')
    assert corpus.split_sentences(paragraph) == [
        "Some years ago, never mind how long, I thought I would sail.",
        "It was 1851 when the ship left port for good."]
    assert corpus.split_sentences(paragraph, min_words=1)[0] == "Call me Ishmael."
    with pytest.raises(ValueError, match="min_words"):
        corpus.split_sentences(paragraph, min_words=0)


def test_corpus_sentences_hold_out_the_end_of_each_document(tmp_path):
    (tmp_path / "corpus").mkdir()
    for name in ("austen", "kjv"):
        lines = [f"The {name} paragraph number {i} is here. It has a second sentence too." for i in range(10)]
        (tmp_path / "corpus" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    train, held = corpus.corpus_sentences(tmp_path, ("austen", "kjv"), held_out_fraction=0.2)
    assert len(train) == 2 * 8 * 2 and len(held) == 2 * 2 * 2
    assert "The austen paragraph number 9 is here." in held
    assert not any("number 8" in s or "number 9" in s for s in train)
