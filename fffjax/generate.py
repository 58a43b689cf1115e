"""Text generation with a :class:`~fffjax.models.CausalLM`: a jitted prefill and decode step over a
static key/value cache, greedy or sampled, batched, with stop tokens, streamed token by token.

How a call runs:

1. The prompts (lists of token ids, of any lengths) are left-padded to ``P = bucket_length(longest)``
   slots, a power of two, so that every prompt length of a bucket shares one compiled prefill.
2. The jitted prefill runs them, fills slots ``[0, P)`` of a cache of
   ``T = bucket_length(P + max_new_tokens)`` slots and picks each row's first new token.
3. The jitted decode step feeds each row's last token in the next slot and picks the following one;
   one call runs ``tokens_per_call`` such steps in a ``scan``. Its shapes depend only on the batch,
   ``T`` and the steps per call: it compiles once for every token of every call with the same batch,
   cache bucket and sampling mode (greedy or not); temperature, top-k, top-p, the seed and the stop
   tokens are arguments, not constants.

Picking a token: ``temperature == 0`` is greedy (the argmax). Otherwise the logits are divided by the
temperature, cut to the ``top_k`` best (0: no cut), then to the smallest set of best tokens whose
probability reaches ``top_p`` (1: no cut; tokens tied with the last one kept stay), and sampled with
the key ``fold_in(key(seed), slot)``: the same call with the same seed gives the same tokens.

A row ends at its first stop token (which it emits); afterwards it emits the pad id until every row
has ended or ``max_new_tokens`` tokens are out. The model runs in eval mode (dropout off) whatever
mode it is in; its own attributes are left as they are.

Text: :func:`prompt_ids` encodes a prompt with the tokenizer's own specials minus a trailing
separator (``[CLS] text``, the start of a document ``[CLS] text [SEP]``), and the separator is the
default stop token of :func:`generate_text` and :func:`stream_text`.
"""

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax._typing import Array, Float, Int
from fffjax.convert.decoder import import_decoder
from fffjax.convert.hf import DECODER_MODEL_TYPE, is_decoder_config, read_hf_dir
from fffjax.data.tokenizer import Tokenizer
from fffjax.models.crammed_bert import cast_parameters
from fffjax.models.decoder import MODEL_NAME, CausalLM, DecoderConfig, KVCache, causal_lm_from_params
from fffjax.pretrained import is_hf_folder
from fffjax.train.checkpoint import load_params
from fffjax.tree import check_count

MIN_BUCKET = 16   # the shortest prompt bucket: shorter prompts share one compiled prefill


def bucket_length(n: int) -> int:
    """The smallest power of two ``>= max(n, MIN_BUCKET)``: the slots a length-``n`` sequence gets."""
    check_count(n, "n", 1)
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


# ------------------------------------------------------------------------------------- choosing tokens


def filter_logits(
    logits: Float[Array, "batch vocab"], top_k: Int[Array, ""] | int, top_p: Float[Array, ""] | float
) -> Float[Array, "batch vocab"]:
    """``logits`` with ``-inf`` outside each row's ``top_k`` best (0: all) and, of those, outside the
    smallest set of best tokens whose softmax probability reaches ``top_p`` (ties with the last kept
    logit are kept too)."""
    vocab = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)
    ranked = jnp.where(ranks < k, -jnp.sort(-logits, axis=-1), -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    better_mass = jnp.cumsum(probs, axis=-1) - probs   # the probability of the strictly better tokens
    kept = jnp.sum((better_mass < jnp.asarray(top_p, jnp.float32)) & (ranks < k), axis=-1)
    threshold = jnp.take_along_axis(ranked, jnp.maximum(kept, 1)[:, None] - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(
    logits: Float[Array, "batch vocab"],
    key,
    temperature: Float[Array, ""] | float,
    top_k: Int[Array, ""] | int,
    top_p: Float[Array, ""] | float,
    *,
    greedy: bool,
) -> Int[Array, " batch"]:
    """Each row's next token: the argmax when ``greedy``, else a draw from ``filter_logits(logits /
    temperature, top_k, top_p)`` with ``key``."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / jnp.asarray(temperature, jnp.float32), top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------- jitted programs


def _eval_model(program, leaves) -> CausalLM:
    graphdef, treedef = program
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    model.eval()
    return model


@functools.partial(jax.jit, static_argnames=("program", "cache_length", "greedy"))
def _prefill(program, leaves, input_ids, attention_mask, stop, sampling, key, *, cache_length: int, greedy: bool):
    logits, cache = _eval_model(program, leaves).prefill(input_ids, attention_mask, cache_length)
    tokens = choose_tokens(logits, jax.random.fold_in(key, 0), *sampling, greedy=greedy)
    return tokens, stop[tokens], cache


@functools.partial(jax.jit, static_argnames=("program", "greedy", "steps"), donate_argnames=("cache",))
def _decode(program, leaves, cache: KVCache, tokens, finished, stop, sampling, key, pad_id, *, greedy: bool,
            steps: int):
    model = _eval_model(program, leaves)

    def step(carry, _):
        cache, tokens, finished = carry
        logits, cache = model.decode_step(tokens, cache)
        chosen = choose_tokens(logits, jax.random.fold_in(key, cache.length), *sampling, greedy=greedy)
        chosen = jnp.where(finished, pad_id, chosen)
        finished = finished | stop[chosen]
        return (cache, chosen, finished), (chosen, finished)

    (cache, _, _), (chosen, finished) = jax.lax.scan(step, (cache, tokens, finished), length=steps)
    return chosen, finished, cache


def jitted_steps(model: CausalLM) -> tuple[Callable, Callable]:
    """``(prefill, decode)``: the jitted programs :func:`generate_stream` runs, bound to ``model``.

    The model is split into its static structure (a static argument, one compile per structure) and
    its arrays, which go in as arguments of every call (never compiled in as constants)::

        tokens, finished, cache = prefill(input_ids, attention_mask, stop, sampling, key,
                                          cache_length=T, greedy=True)
        new, ended, cache = decode(cache, tokens, finished, stop, sampling, key, pad_id, greedy=True, steps=S)
        tokens, finished = new[-1], ended[-1]

    ``input_ids, attention_mask (B, P)`` int32 (left-padded), ``stop (V,)`` bool (the stop ids),
    ``sampling`` the ``(temperature, top_k, top_p)`` scalars, ``key`` a PRNG key, ``pad_id`` an int32
    scalar. ``decode`` runs ``S`` decode steps in one call (a ``scan``; one compile per ``S``) and returns
    every step's tokens and ended flags, ``(S, B)``; it donates ``cache`` (pass the one it returned
    last). One call per several tokens spares the host a dispatch of the model's arrays per token,
    which at batch 1 on a GPU costs more than the step's kernels. The model's arrays are read when this
    is called: a later change of its weights is not seen.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a CausalLM, got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    program = (graphdef, treedef)
    return functools.partial(_prefill, program, leaves), functools.partial(_decode, program, leaves)


# ------------------------------------------------------------------------------------- token ids API


def _check_settings(config: DecoderConfig, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                    pad_id) -> list[list[int]]:
    check_count(max_new_tokens, "max_new_tokens", 1)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    check_count(top_k, "top_k", 0)   # 0: no cut
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no cut), got {top_p!r}")
    vocab = config.vocab_size
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty sequence of token id sequences")
    rows = []
    for i, prompt in enumerate(prompts):
        array = np.asarray(prompt)
        row = [int(t) for t in array] if array.ndim == 1 and array.dtype.kind in "iu" else None
        if not row:
            raise ValueError(f"prompts[{i}] must be a non-empty sequence of token ids, got {prompt!r}")
        if min(row) < 0 or max(row) >= vocab:
            raise ValueError(f"prompts[{i}] holds ids outside [0, vocab_size={vocab}): {row}")
        if len(row) + max_new_tokens > config.max_seq_length:
            raise ValueError(f"prompts[{i}] has {len(row)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's max_seq_length {config.max_seq_length}")
        rows.append(row)
    for name, ids in (("stop_tokens", list(stop_tokens)), ("pad_id", [pad_id])):
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"{name} must be token ids in [0, vocab_size={vocab}), got {ids}")
    return rows


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids, attention_mask (len(rows), length)`` int32: each row right-aligned after ``pad_id``s."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def generate_stream(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int | None = None,
    tokens_per_call: int = 1,
) -> Iterator[np.ndarray]:
    """Yields the next token of every prompt, one ``(len(prompts),)`` int32 array per step.

    Args:
        model: the causal LM (run in eval mode; the model itself is not changed).
        prompts: token id sequences, of any lengths (each at least one token).
        max_new_tokens: the most steps; each prompt's length plus it must fit ``max_seq_length``.
        temperature, top_k, top_p, seed: how tokens are picked (module docstring; 0 = greedy).
        stop_tokens: ids that end a row (the row emits it, then ``pad_id``).
        pad_id: what padding and ended rows hold (default: the model's ``pad_token_id``).
        tokens_per_call: decode steps per jitted call (:func:`jitted_steps`); the tokens are the same
            for any value. Above 1 the host dispatches the model once per that many tokens and receives
            them together; a call may run up to ``tokens_per_call - 1`` steps past the step at which every
            row has ended (their tokens are dropped).

    The arguments are checked on the call; the model runs as the iterator is consumed, and stops
    once every row has ended.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a CausalLM, got {type(model).__name__}")
    config = model.config
    pad_id = config.pad_token_id if pad_id is None else pad_id
    rows = _check_settings(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id)
    check_count(tokens_per_call, "tokens_per_call", 1)
    return _stream(model, rows, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                   top_p=float(top_p), seed=seed, stop_tokens=list(stop_tokens), pad_id=int(pad_id),
                   tokens_per_call=tokens_per_call)


def _stream(model: CausalLM, rows, *, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, pad_id,
            tokens_per_call):
    prompt_slots = bucket_length(max(len(row) for row in rows))
    input_ids, attention_mask = left_pad(rows, prompt_slots, pad_id)
    prefill, decode = jitted_steps(model)
    stop = np.zeros((model.config.vocab_size,), bool)
    stop[stop_tokens] = True
    stop = jnp.asarray(stop)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    key, pad, greedy = jax.random.key(seed), jnp.int32(pad_id), temperature == 0
    tokens, finished, cache = prefill(input_ids, attention_mask, stop, sampling, key,
                                      cache_length=bucket_length(prompt_slots + max_new_tokens), greedy=greedy)
    new, ended, done = tokens[None], finished[None], 1   # the tokens in hand, (steps, B); how many are out
    while True:
        steps = min(tokens_per_call, max_new_tokens - done)
        if steps:   # dispatched before the tokens in hand reach the host
            following = decode(cache, new[-1], ended[-1], stop, sampling, key, pad, greedy=greedy, steps=steps)
        host_new, host_ended = jax.device_get((new, ended))
        for row_tokens, row_ended in zip(host_new, host_ended):
            yield row_tokens
            if row_ended.all():
                return
        if not steps:
            return
        new, ended, cache = following
        done += steps


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **options) -> list[list[int]]:
    """The new tokens of every prompt, each row up to and with its stop token (``options``: those of
    :func:`generate_stream`)."""
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    stop = set(options.get("stop_tokens", ()))
    for tokens in generate_stream(model, prompts, max_new_tokens=max_new_tokens, **options):
        for row, token in enumerate(tokens.tolist()):
            if not ended[row]:
                out[row].append(token)
                ended[row] = token in stop
    return out


# ------------------------------------------------------------------------------------------ text API


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` encoded with the tokenizer's specials, without a trailing separator (``[CLS] text``)."""
    ids = tokenizer.encode(text)
    return ids[:-1] if len(ids) > 1 and ids[-1] == tokenizer.sep_id else ids


def _new_text(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prompt`` (decoded together, so word pieces join across the seam)."""
    before, after = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    common = 0
    for a, b in zip(before, after):
        if a != b:
            break
        common += 1
    return after[common:]


def stream_text(model: CausalLM, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int,
                stop_tokens: Sequence[int] | None = None, **options) -> Iterator[str]:
    """Yields the text each new token adds to ``prompt`` (``options``: those of :func:`generate_stream`;
    ``stop_tokens`` default to the tokenizer's separator)."""
    ids = prompt_ids(tokenizer, prompt)
    stop_tokens = (tokenizer.sep_id,) if stop_tokens is None else stop_tokens
    stream = generate_stream(model, [ids], max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, **options)

    def pieces():
        new: list[int] = []
        shown = ""
        for tokens in stream:
            new.append(int(tokens[0]))
            text = _new_text(tokenizer, ids, new)
            common = len(shown) if text.startswith(shown) else 0
            if text[common:]:
                yield text[common:]
            shown = text

    return pieces()


def generate_text(model: CausalLM, tokenizer: Tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int,
                  stop_tokens: Sequence[int] | None = None, **options) -> str | list[str]:
    """The text generated after each prompt (one string for one prompt); ``prompt + result`` reads as
    the whole text. ``options``: those of :func:`generate_stream`; ``stop_tokens`` default to the
    tokenizer's separator."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [prompt_ids(tokenizer, text) for text in texts]
    stop_tokens = (tokenizer.sep_id,) if stop_tokens is None else stop_tokens
    new = generate(model, ids, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, **options)
    results = [_new_text(tokenizer, prompt, row) for prompt, row in zip(ids, new)]
    return results[0] if isinstance(prompts, str) else results


# ------------------------------------------------------------------------------------------- loading


def load_causal_lm(path: str | Path, *, dtype=jnp.float32, implementation: str | None = None) -> CausalLM:
    """The :class:`CausalLM` of an fffjax checkpoint (``save_checkpoint(path, params, config.to_dict())``),
    of a training run's latest step or of an ``fffjax export`` folder of one, in eval mode; ``dtype`` is
    the compute and parameter dtype."""
    if is_hf_folder(path):
        state_dict, config_json = read_hf_dir(path)
        if not is_decoder_config(config_json):
            raise ValueError(f"path {path} does not hold a causal LM: its config.json's model_type is "
                             f"{config_json.get('model_type')!r}, not {DECODER_MODEL_TYPE!r}")
        model = import_decoder(state_dict, config_json, dtype=dtype, implementation=implementation)
    else:
        params, config, record = load_params(path)
        if config.get("model") != MODEL_NAME:
            raise ValueError(f"checkpoint {record['path']} does not hold a causal LM: its config names model "
                             f"{config.get('model')!r}, not {MODEL_NAME!r}")
        model = causal_lm_from_params(DecoderConfig.from_dict(config), params, dtype=dtype,
                                      implementation=implementation)
    if dtype != jnp.float32:
        model = cast_parameters(model, dtype)
    return model
