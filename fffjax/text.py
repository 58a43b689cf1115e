"""Text in, text out: masked-token filling, sentence embeddings and classification with a loaded model.

Each function takes a model and the `Tokenizer` stored with it (``fffjax.from_pretrained`` returns
both) and works on plain strings. Texts are encoded with the tokenizer's own special tokens (as
transformers' pipelines do), so results match a transformers pipeline on the same weights. Batches
have a fixed shape (the last one padded with copies of its first row, whose outputs are dropped),
so a run compiles once per sequence length.
"""

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from fffjax.data.tokenizer import Tokenizer
from fffjax.models.bert import Bert, masked_mean
from fffjax.models.crammed_bert import CrammedBertClassifier, CrammedBertMLM


@nnx.jit
def _mlm_probabilities(model: CrammedBertMLM, input_ids: Int[Array, "batch seq"],
                       attention_mask: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
    return jax.nn.softmax(model(input_ids, attention_mask).astype(jnp.float32), axis=-1)


BERT_LENGTH_STEP = 16  # a Bert's batches are padded to a multiple of this many tokens (few compiled shapes)


@nnx.jit
def _masked_mean(model, input_ids: Int[Array, "batch seq"],
                 attention_mask: Int[Array, "batch seq"]) -> Float[Array, "batch hidden"]:
    return masked_mean(model.encode(input_ids, attention_mask), attention_mask)


@nnx.jit
def _class_probabilities(model: CrammedBertClassifier, input_ids: Int[Array, "batch seq"],
                         attention_mask: Int[Array, "batch seq"]) -> Float[Array, "batch labels"]:
    return jax.nn.softmax(model(input_ids, attention_mask).astype(jnp.float32), axis=-1)


def _check_model(model, classes: tuple[type, ...], function: str) -> None:
    if not isinstance(model, classes):
        names = " or ".join(cls.__name__ for cls in classes)
        raise TypeError(f"model: {function} needs a {names}, got {type(model).__name__}")


def fill_mask(model: CrammedBertMLM, tokenizer: Tokenizer, text: str, *, top_k: int = 5) -> list[list[dict]]:
    """The ``top_k`` most likely tokens at each mask token of ``text``.

    Args:
        model: a masked language model (eval mode for deterministic results).
        tokenizer: its tokenizer; ``text`` marks positions with ``tokenizer.mask_token``.
        text: the text, with at least one mask token; it must fit the model's ``max_seq_length``.
        top_k: how many candidates per position.

    Returns:
        One list per mask token, in order: ``[{"token", "token_id", "score", "sequence"}]`` by
        decreasing ``score`` (the softmax probability over the model's vocabulary); ``sequence`` is
        the text with that token filled in.
    """
    _check_model(model, (CrammedBertMLM,), "fill_mask")
    if not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k: expected in [1, {model.config.vocab_size}], got {top_k}")
    ids = tokenizer.encode(text)
    positions = [i for i, token_id in enumerate(ids) if token_id == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"text: expected at least one mask token {tokenizer.mask_token!r}, got {text!r}")
    if len(ids) > model.config.max_seq_length:
        raise ValueError(f"text: {len(ids)} tokens exceed the model's max_seq_length {model.config.max_seq_length}")
    input_ids = jnp.asarray([ids], jnp.int32)
    probabilities = np.asarray(_mlm_probabilities(model, input_ids, jnp.ones_like(input_ids)))[0]
    results = []
    for position in positions:
        best = np.argsort(-probabilities[position], kind="stable")[:top_k]
        candidates = []
        for token_id in best:
            filled = list(ids)
            filled[position] = int(token_id)
            candidates.append({"token": tokenizer.id_to_token(int(token_id)), "token_id": int(token_id),
                               "score": float(probabilities[position, token_id]),
                               "sequence": tokenizer.decode(filled)})
        results.append(candidates)
    return results


def _batches(tokenizer: Tokenizer, texts: Sequence[str], seq_length: int,
             batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray, int]]:
    """``(input_ids, attention_mask, n_real)`` batches of exactly ``batch_size`` rows."""
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode_padded(texts[start:start + batch_size], seq_length)
        real = len(ids)
        if real < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - real, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - real, axis=0)])
        yield ids, mask, real


def _run_batched(function: Callable, model, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int,
                 seq_length: int | None, progress: bool, description: str) -> np.ndarray:
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    seq_length = seq_length or model.config.max_seq_length
    if seq_length > model.config.max_seq_length:
        raise ValueError(f"seq_length: at most the model's max_seq_length {model.config.max_seq_length}, "
                         f"got {seq_length}")
    batch_size = min(batch_size, len(texts))
    batches = _batches(tokenizer, texts, seq_length, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(texts) // batch_size), desc=description, unit="batch")
    outputs = [np.asarray(function(model, jnp.asarray(ids), jnp.asarray(mask)))[:real] for ids, mask, real in batches]
    return np.concatenate(outputs)


def _embed_bert(model: Bert, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int,
                seq_length: int | None, progress: bool) -> np.ndarray:
    """Masked means of a `Bert`'s last hidden states. Texts run in order of length, each batch padded
    to its longest text rounded up to a multiple of ``BERT_LENGTH_STEP`` and the last batch filled with
    repeats of its first text, so that a whole corpus compiles a handful of shapes; padding is masked,
    so the means are those of each text alone."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    limit = model.config.max_positions
    seq_length = seq_length or min(tokenizer.model_max_length or limit, limit)
    if seq_length > limit:
        raise ValueError(f"seq_length: at most the model's max_positions {limit}, got {seq_length}")
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="embed", unit="batch")
    ids, mask = tokenizer.encode_longest(texts, seq_length)
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    embeddings = np.empty((len(texts), model.config.hidden_size), np.float32)
    for start in starts:
        rows = order[start:start + batch_size]
        width = min(-(-int(lengths[rows].max()) // BERT_LENGTH_STEP) * BERT_LENGTH_STEP, ids.shape[1])
        batch = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        means = _masked_mean(model, jnp.asarray(ids[batch, :width]), jnp.asarray(mask[batch, :width]))
        embeddings[rows] = np.asarray(means)[:len(rows)]
    return embeddings


def embed(model, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 32, seq_length: int | None = None,
          normalize: bool | None = None, progress: bool = False) -> Float[np.ndarray, "n hidden"]:
    """Sentence embeddings: the mean of the encoder's final hidden states over each text's tokens
    (padding excluded), optionally L2-normalised.

    For a `Bert` (a sentence-transformers encoder such as all-MiniLM-L6-v2) this is its sentence
    embedding (:func:`fffjax.models.bert.sentence_embedding`): each batch padded to its longest text,
    texts truncated to the tokenizer's ``model_max_length`` (the folder's sentence-transformers
    ``max_seq_length``), normalised unless ``normalize=False``.

    Args:
        model: a `CrammedBertMLM` or `CrammedBertClassifier` (its encoder is used), or a `Bert`.
        tokenizer: its tokenizer.
        texts: the texts; each is truncated to ``seq_length`` tokens (specials kept).
        batch_size: texts per forward pass.
        seq_length: padded length (default: the model's ``max_seq_length``); for a `Bert`, the
            truncation length (batches are padded to their longest text).
        normalize: divide each embedding by its L2 norm; None: yes for a `Bert`, no otherwise.
        progress: show a progress bar.

    Returns:
        `(len(texts), hidden_size)` float32.
    """
    _check_model(model, (CrammedBertMLM, CrammedBertClassifier, Bert), "embed")
    if isinstance(model, Bert):
        embeddings = _embed_bert(model, tokenizer, texts, batch_size=batch_size, seq_length=seq_length,
                                 progress=progress)
        normalize = normalize is None or normalize
    else:
        embeddings = _run_batched(_masked_mean, model, tokenizer, texts, batch_size=batch_size,
                                  seq_length=seq_length, progress=progress, description="embed")
    if normalize:
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return embeddings


def predict(model: CrammedBertClassifier, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 32,
            seq_length: int | None = None, progress: bool = False) -> Float[np.ndarray, "n labels"]:
    """Class probabilities of a fine-tuned classifier (softmax of its logits), `(len(texts), num_labels)`
    float32; the predicted label of text ``i`` is ``argmax(probabilities[i])``. Arguments as :func:`embed`."""
    _check_model(model, (CrammedBertClassifier,), "predict")
    return _run_batched(_class_probabilities, model, tokenizer, texts, batch_size=batch_size, seq_length=seq_length,
                        progress=progress, description="predict")
