"""fffjax.data.labelled: the labelled text sets on tiny fake packages in tmp folders (no network)."""

import json

import pytest

from fffjax.data import labelled


def test_spam_loader_on_a_fake_package(tmp_path):
    root = tmp_path / "raw/spam-assassin/package/data"
    for group, n in (("easy-ham-1", 12), ("spam-1", 8)):
        (root / group).mkdir(parents=True)
        for i in range(n):
            body = (
                f"Subject: {'WIN MONEY' if 'spam' in group else 'meeting'} {i}\nFrom: a@b.c\n\nHello <br/> there {i}\n"
            )
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
