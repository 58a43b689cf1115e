"""Tokenizers as files: a thin wrapper over `tokenizers.Tokenizer` whose special ids come from the files.

Two layouts are read the same way:

- a Hugging Face tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``), as transformers' ``save_pretrained`` writes it; the published
  UltraFastBERT tokenizers are such folders, with the specials ``<pad> <unk> <cls> <sep> <mask> <s>
  </s>`` at ids that differ from one tokenizer to the next;
- a bare ``tokenizer.json`` (what :func:`train_wordpiece` writes into a pretraining cache).

The roles (pad, unk, cls, sep, mask) are read from ``tokenizer_config.json``, else from
``special_tokens_map.json``, else recognised by name among the tokenizer's special added tokens
(``[PAD]`` or ``<pad>``, ...). Every special added token is excluded from MLM masking. The shipped
``tokenizer.json``'s own padding and truncation (all-MiniLM-L6-v2's pads to 128) are switched off:
:meth:`Tokenizer.encode_padded` and :meth:`Tokenizer.encode_longest` pad and truncate as asked. In a
sentence-transformers folder, ``sentence_bert_config.json``'s ``max_seq_length`` (the length its
embeddings truncate at) caps ``model_max_length``.
"""

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

ROLES = ("pad", "unk", "cls", "sep", "mask")
# Names recognised for each role when no config file names the token.
ROLE_NAMES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SENTENCE_BERT_CONFIG_FILE = "sentence_bert_config.json"   # a sentence-transformers model's max_seq_length
# The specials `train_wordpiece` writes, in this order, so they get ids 0..4.
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """The ids of a tokenizer's special tokens.

    Attributes:
        pad, unk, cls, sep, mask: ids of the five roles.
        ids: every special id (the roles and any other special added token, e.g. ``<s>``), sorted.
    """

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    ids: tuple[int, ...]

    def __post_init__(self):
        missing = [role for role in ROLES if getattr(self, role) not in self.ids]
        if missing:
            raise ValueError(f"ids: expected to contain the ids of {missing}, got {self.ids}")

    def word_ids(self, vocab_size: int) -> Int[np.ndarray, " words"]:
        """`(vocab_size - n_special,)` int32: every id that is not special (MLM replacements)."""
        # np.delete, not np.setdiff1d: MLM masking calls this per batch, and setdiff1d sorts the vocabulary
        return np.delete(np.arange(vocab_size, dtype=np.int32), [i for i in self.ids if 0 <= i < vocab_size])


# The layout `train_wordpiece` produces; synthetic-token benchmarks use it too.
WORDPIECE_SPECIALS = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4, ids=(0, 1, 2, 3, 4))


def _token_content(value: Any) -> str | None:
    """A token as stored in a transformers config: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special token ids, encoding for fffjax's models.

    Build it with :meth:`from_pretrained` (files) or :func:`train_wordpiece`. Encoding adds the
    backend's own special tokens (its post-processor, for example ``[CLS] text [SEP]``), as
    transformers does, so ids match those of ``AutoTokenizer`` on the same files.
    """

    def __init__(self, backend, tokens: Mapping[str, str], *, model_max_length: int | None = None):
        """Args:
        backend: a `tokenizers.Tokenizer`; padding and truncation are switched off on it.
        tokens: role (``ROLES``) -> token string, each in the backend's vocabulary.
        model_max_length: the longest input the tokenizer is meant for (None: unknown).
        """
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.tokens = {role: tokens[role] for role in ROLES}
        self.model_max_length = model_max_length
        role_ids = {}
        for role, token in self.tokens.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer: its {role} token {token!r} is not in the vocabulary")
            role_ids[role] = token_id
        added = [int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special]
        self.specials = SpecialTokens(**role_ids, ids=tuple(sorted(set(added) | set(role_ids.values()))))

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: Path | str) -> "Tokenizer":
        """Reads a tokenizer folder or a ``tokenizer.json`` file (see the module docstring)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        folder, file = (path, path / TOKENIZER_FILE) if path.is_dir() else (path.parent, path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer: no {TOKENIZER_FILE} at {file}")
        backend = Backend.from_file(str(file))
        configs = []
        if path.is_dir():
            for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
                if (folder / name).is_file():
                    configs.append(json.loads((folder / name).read_text()))
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        tokens = {}
        for role in ROLES:
            named = next((_token_content(c.get(f"{role}_token")) for c in configs
                          if _token_content(c.get(f"{role}_token")) is not None), None)
            if named is None:
                named = next((name for name in ROLE_NAMES[role] if name in specials), None)
            if named is None:
                raise ValueError(
                    f"tokenizer {path}: no {role} token (expected {role}_token in {CONFIG_FILE} or "
                    f"{SPECIAL_TOKENS_MAP_FILE}, or one of {list(ROLE_NAMES[role])} among its special tokens)")
            tokens[role] = named
        max_length = next((c["model_max_length"] for c in configs
                           if isinstance(c.get("model_max_length"), int) and c["model_max_length"] < 10**9), None)
        sentence_config = folder / SENTENCE_BERT_CONFIG_FILE
        if path.is_dir() and sentence_config.is_file():
            # A sentence-transformers folder: its embeddings truncate at this length, not the tokenizer's own.
            sentence_max = json.loads(sentence_config.read_text()).get("max_seq_length")
            if isinstance(sentence_max, int) and sentence_max > 0:
                max_length = sentence_max if max_length is None else min(max_length, sentence_max)
        return cls(backend, tokens, model_max_length=max_length)

    def save_pretrained(self, folder: Path | str) -> Path:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
        ``folder`` (created), the files transformers' ``AutoTokenizer.from_pretrained`` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        special_map = {f"{role}_token": token for role, token in self.tokens.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map,
                  "clean_up_tokenization_spaces": False}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")
        return folder

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self.specials.pad

    @property
    def unk_id(self) -> int:
        return self.specials.unk

    @property
    def cls_id(self) -> int:
        return self.specials.cls

    @property
    def sep_id(self) -> int:
        return self.specials.sep

    @property
    def mask_id(self) -> int:
        return self.specials.mask

    @property
    def mask_token(self) -> str:
        return self.tokens["mask"]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """The ids of one text with the backend's special tokens (``[CLS] ... [SEP]``), untruncated."""
        return self.backend.encode(text).ids

    def encode_stream(self, paragraphs: Iterable[str], *, batch_size: int = 4096) -> np.ndarray:
        """Encodes paragraphs into one int32 token stream, each paragraph followed by the sep token.

        Returns:
            `(n_tokens,)` int32 word-piece ids without cls (the pipeline adds it per sequence).
        """
        chunks = []
        batch: list[str] = []

        def flush():
            for encoding in self.backend.encode_batch(batch, add_special_tokens=False):
                chunks.append(np.asarray(encoding.ids + [self.sep_id], dtype=np.int32))
            batch.clear()

        for paragraph in paragraphs:
            batch.append(paragraph)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)

    def _encode_truncated(self, texts: Sequence[str], max_length: int, name: str) -> list[list[int]]:
        """Each text's ids with the backend's special tokens, truncated to ``max_length`` (specials kept)."""
        n_added = self.backend.num_special_tokens_to_add(False)
        if max_length <= n_added:
            raise ValueError(f"{name}: expected more than the {n_added} special tokens added, got {max_length}")
        rows = []
        for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False):
            if len(encoding.ids) > max_length - n_added:
                encoding.truncate(max_length - n_added)
            rows.append(self.backend.post_process(encoding).ids)
        return rows

    def _pad(self, rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for row, pieces in enumerate(rows):
            ids[row, : len(pieces)] = pieces
            mask[row, : len(pieces)] = 1
        return ids, mask

    def encode_padded(self, texts: Sequence[str], seq_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts with the backend's special tokens, truncated (specials kept) and padded to
        `seq_length` with the pad id.

        Returns:
            `input_ids (n, seq_length)` int32 and `attention_mask (n, seq_length)` int32 (1 = token).
        """
        return self._pad(self._encode_truncated(texts, seq_length, "seq_length"), seq_length)

    def encode_longest(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts as :meth:`encode_padded` does, truncated to ``max_length`` tokens, but padded
        only to the longest of them (what sentence-transformers feeds its encoder).

        Returns:
            `input_ids (n, longest)` int32 and `attention_mask (n, longest)` int32 (1 = token).
        """
        if not texts:
            raise ValueError("texts: expected at least one text")
        rows = self._encode_truncated(texts, max_length, "max_length")
        return self._pad(rows, max(len(row) for row in rows))


def train_wordpiece(files: Sequence[Path | str], vocab_size: int, *, min_frequency: int = 2,
                    out: Path | str | None = None) -> Tokenizer:
    """Trains a lower-cased BERT WordPiece tokenizer on text files.

    The specials are ``WORDPIECE_SPECIAL_TOKENS`` at ids 0..4; encoding adds ``[CLS] ... [SEP]``.

    Args:
        files: UTF-8 text files (one paragraph per line).
        vocab_size: the largest vocabulary size (a small corpus may give fewer pieces).
        min_frequency: pieces seen fewer times are not added.
        out: if given, the tokenizer is saved there as one ``tokenizer.json`` file.
    """
    from tokenizers import BertWordPieceTokenizer, processors

    if vocab_size <= len(WORDPIECE_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected more than {len(WORDPIECE_SPECIAL_TOKENS)}, got {vocab_size}")
    if not files:
        raise ValueError("files: expected at least one text file")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=min_frequency,
                    special_tokens=list(WORDPIECE_SPECIAL_TOKENS), show_progress=False)
    backend = wordpiece._tokenizer  # the plain `tokenizers.Tokenizer` it wraps
    pad, unk, cls_token, sep, mask = WORDPIECE_SPECIAL_TOKENS
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token} $A {sep}", pair=f"{cls_token} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls_token, backend.token_to_id(cls_token)), (sep, backend.token_to_id(sep))])
    tokenizer = Tokenizer(backend, dict(zip(ROLES, WORDPIECE_SPECIAL_TOKENS, strict=True)))
    if tokenizer.specials != WORDPIECE_SPECIALS:
        raise RuntimeError(f"train_wordpiece: expected the specials {WORDPIECE_SPECIALS}, got {tokenizer.specials}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        backend.save(str(out))
    return tokenizer
