"""fffjax.data.tokenizer: WordPiece training, special ids read from files (the fffjax layout and a
cramming-style folder with its specials in a shuffled order), encoding, transformers compatibility."""

import json

import numpy as np
import pytest
from _text_helpers import cramming_style_tokenizer_folder, synthetic_text

from fffjax.data.tokenizer import WORDPIECE_SPECIALS, SpecialTokens, Tokenizer, train_wordpiece


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(synthetic_text(300))
    return path


@pytest.fixture(scope="module")
def tokenizer(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    train_wordpiece([text_file], 120, min_frequency=1, out=out)
    return Tokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def cramming_folder(text_file, tmp_path_factory):
    return cramming_style_tokenizer_folder([text_file], tmp_path_factory.mktemp("cramming"), vocab_size=120, seed=3)


def test_trained_tokenizer_specials_and_round_trip(tokenizer):
    assert tokenizer.specials == WORDPIECE_SPECIALS
    assert 30 < tokenizer.vocab_size <= 120
    ids = tokenizer.encode("The Whale swam")
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert tokenizer.decode(ids) == "the whale swam"  # lower-cased WordPiece, specials skipped
    assert min(ids[1:-1]) >= len(WORDPIECE_SPECIALS.ids)


def test_encode_stream_and_padded(tokenizer):
    stream = tokenizer.encode_stream(["the whale", "the sea"], batch_size=1)
    assert stream.dtype == np.int32
    assert list(stream == tokenizer.sep_id).count(True) == 2 and stream[-1] == tokenizer.sep_id
    ids, mask = tokenizer.encode_padded(["the whale", "the whale swam under the grey sea " * 5], 8)
    assert ids.shape == (2, 8) and ids[0, 0] == tokenizer.cls_id and ids[0, 3] == tokenizer.sep_id
    assert ids[0, 4] == tokenizer.pad_id
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert ids[1, -1] == tokenizer.sep_id and mask[1].all()  # truncated, still ends with the sep token
    with pytest.raises(ValueError, match="seq_length"):
        tokenizer.encode_padded(["the whale"], 2)


def test_cramming_folder_specials_come_from_the_files(cramming_folder):
    tokenizer = Tokenizer.from_pretrained(cramming_folder)
    config = json.loads((cramming_folder / "tokenizer_config.json").read_text())
    for role in ("pad", "unk", "cls", "sep", "mask"):
        assert tokenizer.tokens[role] == f"<{role}>"
        assert getattr(tokenizer.specials, role) == tokenizer.token_to_id(config[f"{role}_token"])
    assert len(tokenizer.specials.ids) == 7  # <s> and </s> are special too
    assert tokenizer.specials != WORDPIECE_SPECIALS  # the shuffled order puts them elsewhere
    ids, mask = tokenizer.encode_padded([f"the whale {tokenizer.mask_token} the sea"], 12)
    assert tokenizer.mask_id in ids[0] and (ids[0, mask[0] == 0] == tokenizer.pad_id).all()


def test_save_pretrained_matches_transformers(cramming_folder, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = ["the whale swam", "old songs of home and harbour, the wind rose"]
    for source in (Tokenizer.from_pretrained(cramming_folder), tokenizer):
        folder = source.save_pretrained(tmp_path / source.tokens["mask"].strip("<>[]"))
        again = Tokenizer.from_pretrained(folder)
        assert again.specials == source.specials and again.tokens == source.tokens
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf.mask_token_id == source.mask_id and hf.pad_token_id == source.pad_id
        ours, _ = source.encode_padded(texts, 16)
        theirs = hf(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
        np.testing.assert_array_equal(ours, theirs["input_ids"])


def test_missing_roles_and_files_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "none")
    folder = tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["mask_token"] = "<not-a-token>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mask token '<not-a-token>'"):
        Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="ids"):
        SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=9, ids=(0, 1, 2, 3))


def test_encode_longest_pads_each_batch_to_its_longest_text(tokenizer):
    texts = ["the whale", "the crew sang old songs of home while the wind rose", "sea"]
    ids, mask = tokenizer.encode_longest(texts, 64)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert ids.shape == (3, max(lengths)) and mask.sum(axis=1).tolist() == lengths
    padded_ids, padded_mask = tokenizer.encode_padded(texts, 64)
    np.testing.assert_array_equal(ids, padded_ids[:, :max(lengths)])
    np.testing.assert_array_equal(mask, padded_mask[:, :max(lengths)])
    short, _ = tokenizer.encode_longest(texts, 5)   # truncated, the specials kept
    assert short.shape == (3, 5) and short[1, 0] == tokenizer.cls_id and short[1, 4] == tokenizer.sep_id
    with pytest.raises(ValueError, match="max_length: expected more than the 2 special tokens"):
        tokenizer.encode_longest(texts, 2)


def test_a_sentence_transformers_folder_caps_model_max_length(cramming_folder, tmp_path):
    folder = Tokenizer.from_pretrained(cramming_folder).save_pretrained(tmp_path / "st")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 512}))
    assert Tokenizer.from_pretrained(folder).model_max_length == 512
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    assert Tokenizer.from_pretrained(folder).model_max_length == 256
