"""A deterministic, resumable batch pipeline over in-memory arrays.

The whole state of the pipeline is its **position**, a small pytree of int64 numpy scalars
`{"epoch", "index", "seed"}` saved in every checkpoint. The batch at a position is a pure function
of (arrays, position): epoch `e` visits the rows in the order `permutation(seed, e)`; `index` is the
next row of that order; a batch never straddles epochs (the remainder is dropped); the random
draws of a transform (MLM masking) come from `numpy.random.default_rng([seed, epoch, index])`.
So restoring a position reproduces every later batch bit for bit, on any number of processes:
each process builds the same global batch and keeps only its shard (`fffjax.train.sharding`).
"""

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from jaxtyping import Int

from fffjax.data import mlm
from fffjax.data.tokenizer import SpecialTokens

Position = dict[str, np.ndarray]
Transform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def initial_position(seed: int) -> Position:
    """Epoch 0, row 0."""
    return {"epoch": np.asarray(0, np.int64), "index": np.asarray(0, np.int64),
            "seed": np.asarray(seed, np.int64)}


def pack_sequences(stream: Int[np.ndarray, " tokens"], seq_length: int, *, cls_id: int) -> Int[np.ndarray, "n seq"]:
    """Cuts a token stream into rows `cls_id + (seq_length - 1) tokens` (the tail is dropped)."""
    if seq_length < 2:
        raise ValueError(f"seq_length: expected at least 2, got {seq_length}")
    body = seq_length - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"stream: {len(stream)} tokens cannot fill one sequence of {seq_length}")
    rows = np.asarray(stream[: n * body], np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), cls_id, np.int32), rows], axis=1)


def split_holdout(rows: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, held-out) split of rows: a seeded permutation, held-out rows last."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_held = int(round(fraction * len(rows)))
    return rows[np.sort(order[n_held:])], rows[np.sort(order[:n_held])]


class BatchPipeline:
    """Shuffled fixed-size batches over a dict of equally long arrays, addressed by position.

    Args:
        arrays: name -> array with a leading row axis of the same length for every entry.
        batch_size: global batch size (rows per batch), at most the number of rows.
        transform: optional `(batch, rng) -> batch` applied after slicing (e.g. MLM masking).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, transform: Transform | None = None):
        lengths = {name: len(a) for name, a in arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"arrays: expected equally long arrays, got lengths {lengths}")
        self.n_rows = next(iter(lengths.values()))
        if not 0 < batch_size <= self.n_rows:
            raise ValueError(f"batch_size: expected in [1, {self.n_rows}], got {batch_size}")
        self.arrays = dict(arrays)
        self.batch_size = batch_size
        self.transform = transform
        self.batches_per_epoch = self.n_rows // batch_size
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != (seed, epoch):
            self._order_cache = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(self.n_rows))
        return self._order_cache[1]

    def batch_at(self, position: Position) -> dict[str, np.ndarray]:
        """The batch starting at `position` (a pure function of it)."""
        seed, epoch, index = (int(position[k]) for k in ("seed", "epoch", "index"))
        if index + self.batch_size > self.n_rows:
            raise ValueError(f"position: index {index} leaves no full batch of {self.batch_size}")
        rows = np.sort(self._order(seed, epoch)[index: index + self.batch_size])
        batch = {name: a[rows] for name, a in self.arrays.items()}
        if self.transform is not None:
            batch = self.transform(batch, np.random.default_rng([seed, epoch, index]))
        return batch

    def advance(self, position: Position) -> Position:
        """The position after one batch (next epoch when the remainder cannot fill a batch)."""
        index = int(position["index"]) + self.batch_size
        epoch = int(position["epoch"])
        if index + self.batch_size > self.n_rows:
            epoch, index = epoch + 1, 0
        return {"epoch": np.asarray(epoch, np.int64), "index": np.asarray(index, np.int64),
                "seed": np.asarray(int(position["seed"]), np.int64)}

    def next(self, position: Position) -> tuple[dict[str, np.ndarray], Position]:
        """`(batch_at(position), advance(position))`."""
        return self.batch_at(position), self.advance(position)


def mlm_pipeline(rows: Int[np.ndarray, "n seq"], batch_size: int, *, vocab_size: int, specials: SpecialTokens,
                 rate: float = mlm.MLM_RATE) -> BatchPipeline:
    """A pipeline of MLM batches (see `fffjax.data.mlm.mask_tokens`) over packed rows."""

    def transform(batch, rng):
        return mlm.mask_tokens(batch["input_ids"], rng, vocab_size=vocab_size, specials=specials, rate=rate)

    return BatchPipeline({"input_ids": rows}, batch_size, transform)


def causal_lm_pipeline(rows: Int[np.ndarray, "n seq"], batch_size: int) -> BatchPipeline:
    """A pipeline of next-token batches over packed rows: ``input_ids`` and an all-ones
    ``attention_mask`` (packed rows hold no padding); `fffjax.train.objectives.causal_lm_objective`
    predicts each token from the ones before it."""

    def transform(batch, rng):
        return {"input_ids": batch["input_ids"], "attention_mask": np.ones_like(batch["input_ids"])}

    return BatchPipeline({"input_ids": rows}, batch_size, transform)


def held_out_documents(documents: Sequence[Sequence[str]], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs: the last ``fraction`` of each document's paragraphs, a contiguous
    block, is held out whole, so no held-out passage is split or shares a row with training text.

    Args:
        documents: one list of paragraphs per document (a corpus source: a book, a collection).
        fraction: in [0, 1): the share of each document's paragraphs held out (at least one
            paragraph when positive).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected in [0, 1), got {fraction}")
    train, held = [], []
    for paragraphs in documents:
        n_held = min(len(paragraphs) - 1, max(1, round(fraction * len(paragraphs)))) if fraction else 0
        train.extend(paragraphs[: len(paragraphs) - n_held])
        held.extend(paragraphs[len(paragraphs) - n_held:])
    return train, held
