"""A lower-cased WordPiece tokenizer trained offline with `tokenizers`, saved as one JSON file.

The special tokens come first, so `[PAD]` is id 0 (the model's `pad_token_id`), then `[UNK]` 1,
`[CLS]` 2, `[SEP]` 3, `[MASK]` 4; ids from `FIRST_WORD_ID` on are word pieces.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fffjax.data.corpus import missing_data_error

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
FIRST_WORD_ID = len(SPECIAL_TOKENS)


def train_wordpiece(files: Sequence[Path | str], vocab_size: int, *, min_frequency: int = 2,
                    out: Path | str | None = None):
    """Trains a lower-cased BERT WordPiece tokenizer on text files.

    Args:
        files: UTF-8 text files (one paragraph per line).
        vocab_size: the largest vocabulary size (a small corpus may give fewer pieces).
        min_frequency: pieces seen fewer times are not added.
        out: if given, the tokenizer is saved there as JSON.

    Returns:
        A `tokenizers.Tokenizer` with padding and truncation switched off.
    """
    from tokenizers import BertWordPieceTokenizer

    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"vocab_size: expected more than {FIRST_WORD_ID}, got {vocab_size}")
    if not files:
        raise ValueError("files: expected at least one text file")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=min_frequency,
                    special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer = wordpiece._tokenizer  # the plain `tokenizers.Tokenizer` it wraps
    tokenizer.no_padding()
    tokenizer.no_truncation()
    _check_specials(tokenizer)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out))
    return tokenizer


def load_tokenizer(path: Path | str):
    """Loads a tokenizer JSON written by `train_wordpiece` (padding and truncation off)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise missing_data_error("tokenizer JSON", path)
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    _check_specials(tokenizer)
    return tokenizer


def _check_specials(tokenizer) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(f"tokenizer: expected {token} at id {expected_id}, "
                             f"got {tokenizer.token_to_id(token)}")


def encode_stream(tokenizer, paragraphs: Iterable[str], *, batch_size: int = 4096) -> np.ndarray:
    """Encodes paragraphs into one int32 token stream, each paragraph followed by `[SEP]`.

    Returns:
        `(n_tokens,)` int32 word-piece ids without `[CLS]` (the pipeline adds it per sequence).
    """
    chunks = []
    batch: list[str] = []

    def flush():
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            chunks.append(np.asarray(encoding.ids + [SEP_ID], dtype=np.int32))
        batch.clear()

    for paragraph in paragraphs:
        batch.append(paragraph)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)


def encode_padded(tokenizer, texts: Sequence[str], seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts as `[CLS] pieces... [SEP]`, truncated and padded with `[PAD]` to `seq_length`.

    Returns:
        `input_ids (n, seq_length)` int32 and `attention_mask (n, seq_length)` int32 (1 = token).
    """
    if seq_length < 2:
        raise ValueError(f"seq_length: expected at least 2, got {seq_length}")
    ids = np.full((len(texts), seq_length), PAD_ID, np.int32)
    for row, encoding in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        pieces = [CLS_ID] + encoding.ids[: seq_length - 2] + [SEP_ID]
        ids[row, : len(pieces)] = pieces
    return ids, (ids != PAD_ID).astype(np.int32)
