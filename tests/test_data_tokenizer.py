"""fffjax.data.tokenizer: WordPiece training on a tiny synthetic file, special tokens, encoding."""

import numpy as np
import pytest
from _text_helpers import synthetic_text

from fffjax.data.tokenizer import (
    CLS_ID,
    FIRST_WORD_ID,
    PAD_ID,
    SEP_ID,
    encode_padded,
    encode_stream,
    load_tokenizer,
    train_wordpiece,
)


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
