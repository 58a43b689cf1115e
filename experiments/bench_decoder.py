"""Generation speed of the FFF causal decoder against its dense twin: decode and prefill tokens/s, side by side.

For each size (``--config``), three models of one shape are built with random weights in eval mode:
``SIZE-fff-KxD`` (``--fff``, FFF-v2 feedforward), ``SIZE-dense`` (its dense twin, width 4H) and
``SIZE-none`` (no feedforward: the same step without it). They run as users' generation runs them:
:func:`fffjax.generate.jitted_steps` gives the jitted prefill and decode step of :mod:`fffjax.generate`,
the model's arrays passed as arguments of every call (never compiled in as constants), greedy.

``--device gpu``: bfloat16 parameters and compute (as ``load_causal_lm(..., dtype=bfloat16)``), every op
on its default implementation (Pallas FFF-v2, causal attention through cuDNN or XLA, Pallas layer norms).
``--device cpu``: float32, the FFF layers through ``cpu_ffi`` (the C++ kernel), attention through XLA
(``cpu_ffi`` attention is bidirectional only). On a machine with a GPU, run the CPU setting with
``JAX_PLATFORMS=cpu``.

**Decode** (``--batches``): ``B`` prompts of ``--prompt-length`` random tokens are prefilled into a cache of
``T = bucket_length(prompt + steps)`` slots (``steps`` covers every timed step, so no call overwrites a
slot), then the decode is called on the cache the last call returned (it donates it), each call running
``--tokens-per-call`` steps (one ``scan``, as ``generate_stream(..., tokens_per_call=...)`` runs them). A
sample is ``--calls`` calls sent back to back, the last one waited for: the stream
:func:`fffjax.generate.generate_stream` keeps going (it dispatches call ``t + 1`` before it fetches call
``t``'s tokens). The models' samples are interleaved round by round (:func:`fffjax.bench.side_by_side`), so
that a busy machine slows them alike; times are per decode step (per call / steps per call), tokens/s =
``B`` / median seconds per step.

**Prefill** (``--prefill``, ``BxP``): the jitted prefill of ``B`` prompts of ``P`` tokens into a cache of
``bucket_length(P + steps)`` slots, one call per sample, waited for; tokens/s = ``B * P`` / median seconds.

**Where the time goes** (``--breakdown-batches``): the step of ``SIZE-none`` timed in the same rounds
as the decode steps; then, each jitted alone with its weights as arguments and timed as device time per
call inside a jitted loop (:func:`fffjax.bench.chained`, so without one dispatch per call): the
vocabulary (the tied logits projection ``hidden @ E.T`` and the greedy argmax over V); the attention core over the cache
(:func:`fffjax.ops.cached_attention`, one layer, times the layer count); the feedforward alone (one layer
on ``(B, 1, H)``, times the layer count; the same input every call, so an FFF walks one path from cache),
then over ``NEW_TOKENS`` different inputs a call (a ``lax.scan``: a new path per input, as in a decode
step, though the loop repeats the same inputs every call, so that their rows are in L2 after the first:
these rows tell a walk's cost per new path from one path's, not rows read from HBM from rows in L2), alone
and with its norm and residual add (what the step without feedforward leaves out); with ``--flush-mb M``,
also over new inputs each after a read of M MB, minus the same loop without the feedforward: the
feedforward from cold caches, as after the other layers' weights inside a step. Then per model:
feedforward = step - step without it (what the step saves without the feedforward and its norm);
vocabulary and attention core as timed; the rest (QKV and output projections, norms, embedding lookup,
cache writes, dispatch) = step without feedforward - vocabulary - attention core.

**Batch-1 weight-read floor**: at batch 1 a decode step reads every weight it uses once per token. Values
read per token: embedding rows ``2H``, attention projections ``4 H^2`` per layer, norms ``2H`` each, the
feedforward ``2 * 4H * H`` per layer (dense) or ``K (D + 1) (2H + 1)`` (FFF: the rows of ``w_in``, ``w_out``
and ``b_in`` on the paths), the vocabulary ``V H``, and the key/value cache ``2 T H`` per layer (the static
cache is read whole). The ideal speed-up is the dense twin's bytes over the FFF model's, beside the measured
batch-1 ratio; GB/s is the bytes over the measured step time.

Writes ``decoder_speed_<device>.json``, ``.md`` and ``.png`` (tokens/s against batch) to ``--out``.

Run on the GPU machine (``base``: H 768, 12 layers; a few minutes)::

    python experiments/bench_decoder.py --device gpu --out experiments/results

On 2 CPU cores (``small`` at batches 1, 8, 64 and ``base`` at 1 and 8; add 256 with ``--batches``)::

    python experiments/bench_decoder.py --device cpu

The committed CPU table adds batch 256 at ``small`` and GPT-2 medium's shape at batch 1::

    python experiments/bench_decoder.py --device cpu --config small:1,8,64,256 base:1,8 medium:1

CPU smoke run (the tiny presets, seconds)::

    python experiments/bench_decoder.py --device cpu --config tiny --batches 1,4 --prefill 2x32 \\
        --breakdown-batches 1 --prompt-length 16 --rounds 2 --calls 2 --out /tmp/decoder_speed

Redraw the md and png from the json::

    python experiments/bench_decoder.py --device cpu --from-json experiments/results/decoder_speed_cpu.json
"""

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = {
    # dtype, sizes (SIZE or SIZE:BATCHES), decode batches, prefill shapes, breakdown batches
    "gpu": dict(dtype="bfloat16", config=["base"], batches="1,8,64,256", prefill="1x512,8x128,64x128",
                breakdown_batches="1,256"),
    "cpu": dict(dtype="float32", config=["small", "base:1,8"], batches="1,8,64", prefill="1x256,8x128",
                breakdown_batches="1,64"),
}
ALL_BATCHES = (1, 8, 64, 256)   # the decode batches of a full report
PARTS = ("feedforward", "attention core", "vocabulary", "rest")
NEW_TOKENS = 16   # different inputs per call of the breakdown's feedforward parts timed on new tokens
ALONE = {"feedforward alone": "feedforward timed alone (x layers)",
         "feedforward, new tokens": f"feedforward alone, {NEW_TOKENS} new inputs a call (x layers)",
         "norm + feedforward + residual, new tokens": "norm + feedforward + residual, new inputs (x layers)",
         "feedforward after a cache flush": "feedforward alone after a cache flush, new inputs (x layers)"}
# The cache-flush rows: each new input is preceded by a read of --flush-mb MB; the feedforward's time after a
# flush is the difference of these two loops' times (see part_calls).
FLUSH_KINDS = ("cache flush", "cache flush + feedforward")


def name_of(device: str) -> str:
    return f"decoder_speed_{device}"


def int_list(text: str, what: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; each a positive int, else a ``ValueError`` naming ``what``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"{what}: expected a comma list of positive ints, got {text!r}")
    return [int(item) for item in items]


def tree_shape(text: str) -> tuple[int, int]:
    """``"KxD"`` -> ``(K, D)``, checked by the package's own count checks (K >= 1 trees, depth D >= 0;
    ``fffjax.ops`` runs depths the kernels do not take through ``"xla"``)."""
    from fffjax import tree

    parts = text.split("x")
    try:
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"got {text!r}")
        return tree.check_n_trees(int(parts[0]), "trees"), tree.check_depth(int(parts[1]))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--fff must be KxD (trees x depth): {error}") from None


def size_specs(items: list[str], batches: list[int]) -> list[tuple[str, list[int]]]:
    """``["small", "base:1,8"]`` -> ``[("small", batches), ("base", [1, 8])]``."""
    specs = []
    for item in items:
        size, _, own = item.partition(":")
        specs.append((size, int_list(own, f"--config {item}") if own else batches))
    return specs


def prefill_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x512,8x128"`` -> ``[(1, 512), (8, 128)]`` (batch, prompt tokens)."""
    shapes = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--prefill: expected BATCHxTOKENS items such as 8x128, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


# ----------------------------------------------------------------------------- weight reads


def values_read_per_token(config, slots: int) -> dict[str, int]:
    """Values a batch-1 decode step of ``config`` reads per token, by part, with a cache of ``slots`` slots."""
    h, layers = config.hidden_size, config.num_layers
    if config.ffn == "fff":
        ffn = config.fff_trees * (config.fff_depth + 1) * (2 * h + 1)
    else:
        ffn = 2 * config.active_neurons * h
    norms = (layers * (1 if config.ffn == "none" else 2) + 1) * 2 * h
    return {"embedding rows": 2 * h, "attention projections": layers * 4 * h * h, "norms": norms,
            "feedforward": layers * ffn, "vocabulary": config.vocab_size * h, "kv cache": layers * 2 * slots * h}


def weight_floor(fff_config, dense_config, slots: int, itemsize: int) -> dict:
    """Bytes read per token at batch 1 by part and in total for both models, and the ideal speed-ups."""
    fff, dense = values_read_per_token(fff_config, slots), values_read_per_token(dense_config, slots)
    fff_bytes = {part: n * itemsize for part, n in fff.items()}
    dense_bytes = {part: n * itemsize for part, n in dense.items()}
    weights = [p for p in fff if p != "kv cache"]
    return {"slots": slots, "itemsize": itemsize, "fff_bytes": fff_bytes, "dense_bytes": dense_bytes,
            "fff_total": sum(fff_bytes.values()), "dense_total": sum(dense_bytes.values()),
            "ideal_speedup": sum(dense_bytes.values()) / sum(fff_bytes.values()),
            "ideal_speedup_weights_only": sum(dense_bytes[p] for p in weights) / sum(fff_bytes[p] for p in weights)}


# ----------------------------------------------------------------------------- models and programs


def size_configs(size: str, trees: int, depth: int) -> dict:
    """``{"fff", "dense", "none"}`` -> :class:`DecoderConfig` at preset size ``size``: FFF-v2 of ``trees``
    trees of ``depth`` (any shape, so that a wide model's tree can have about 4H nodes like its dense
    twin), the dense twin (4H) and no feedforward."""
    from fffjax.models.decoder import get_decoder_config

    dense = get_decoder_config(f"{size}-dense")
    return {"fff": dataclasses.replace(dense, ffn="fff", fff_trees=trees, fff_depth=depth), "dense": dense,
            "none": get_decoder_config(f"{size}-none")}


def build(config, device: str, seed: int, cached_attention: str | None = None):
    """A :class:`CausalLM` of ``config`` (a :class:`DecoderConfig` or a preset name) in eval mode:
    bfloat16 parameters and compute on the GPU; float32 with the FFF layers on ``cpu_ffi`` on the CPU;
    ``cached_attention`` names the decode step's attention implementation (None: the automatic choice)."""
    import jax.numpy as jnp
    from flax import nnx

    from fffjax.models.crammed_bert import cast_parameters
    from fffjax.models.decoder import CausalLM, get_decoder_config
    from fffjax.ops import set_implementation

    dtype = jnp.dtype(DEVICES[device]["dtype"])
    if isinstance(config, str):
        config = get_decoder_config(config)
    model = CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))
    model.eval()
    if dtype != jnp.float32:
        cast_parameters(model, dtype)
    if device == "cpu":
        set_implementation(model, "fff_v2_hard", "cpu_ffi")
    if cached_attention is not None:
        set_implementation(model, "cached_attention", cached_attention)
    return model


def pure(module, fn):
    """``call(*inputs)``: ``fn(module, *inputs)`` jitted as a function of the module's state, which is passed
    as an argument on every call."""
    import jax

    unbound, state = functional(module, fn)
    jitted = jax.jit(unbound)
    return lambda *inputs: jitted(state, *inputs)


def functional(module, fn):
    """``(f, state)``: ``f(state, *inputs) = fn(module, *inputs)`` as a pure function of the module's state."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    return (lambda state, *inputs: fn(nnx.merge(graphdef, state), *inputs)), state


def random_prompts(config, batch: int, length: int, seed: int):
    """``(input_ids, attention_mask)`` of ``batch`` prompts of ``length`` random tokens (no padding)."""
    import jax.numpy as jnp
    import numpy as np

    ids = np.random.default_rng(seed).integers(5, config.vocab_size, (batch, length))
    return jnp.asarray(ids, jnp.int32), jnp.ones((batch, length), jnp.int32)


def greedy_settings(config):
    """``(stop, sampling, key, pad_id)`` of greedy decoding without stop tokens (no row ever ends)."""
    import jax
    import jax.numpy as jnp

    return (jnp.zeros((config.vocab_size,), bool), (jnp.float32(0), jnp.int32(0), jnp.float32(1)),
            jax.random.key(0), jnp.int32(config.pad_token_id))


class DecodeLoop:
    """Calls ``model``'s jitted decode, ``tokens_per_call`` steps a call, each call on the cache the call
    before returned.

    The prompts are prefilled into a cache of ``bucket_length(prompt_length + steps)`` slots; calls past
    ``steps`` steps raise ``RuntimeError`` (a full cache would overwrite its last slot).
    """

    def __init__(self, model, batch: int, prompt_length: int, steps: int, seed: int = 0, tokens_per_call: int = 1):
        from fffjax.generate import bucket_length, jitted_steps

        prefill, self.decode = jitted_steps(model)
        self.tokens_per_call = tokens_per_call
        self.stop, self.sampling, self.key, self.pad = greedy_settings(model.config)
        ids, mask = random_prompts(model.config, batch, prompt_length, seed)
        self.slots = bucket_length(prompt_length + steps)
        self.state = prefill(ids, mask, self.stop, self.sampling, self.key, cache_length=self.slots, greedy=True)
        self.left = self.slots - prompt_length

    def __call__(self):
        if self.left < self.tokens_per_call:
            raise RuntimeError("DecodeLoop: the cache is full; make it with more steps")
        self.left -= self.tokens_per_call
        tokens, finished, cache = self.state
        new, ended, cache = self.decode(cache, tokens, finished, self.stop, self.sampling, self.key, self.pad,
                                        greedy=True, steps=self.tokens_per_call)
        self.state = new[-1], ended[-1], cache
        return new


def part_calls(model, batch: int, slots: int, filled: int, flush_mb: int = 0) -> dict[str, tuple]:
    """``{part: (pure function, its arguments, times per step)}``: the vocabulary (logits and greedy argmax),
    the attention core over a cache of ``slots`` slots (``filled`` of them visible) and the feedforward,
    each on ``batch`` rows of one token, the weights among the arguments; layer 0 stands for every layer.
    ``flush_mb > 0`` adds the :data:`FLUSH_KINDS` loops: new inputs, each after a read of ``flush_mb`` MB."""
    import jax
    import jax.numpy as jnp

    from fffjax import ops
    from fffjax.models.crammed_bert import additive_mask

    config, dtype = model.config, model.dtype
    layers, h = config.num_layers, config.hidden_size
    heads, width = config.num_heads, config.attention_head_width
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (batch, h), dtype)
    q = jax.random.normal(keys[1], (batch, 1, heads, width), dtype)
    k = jax.random.normal(keys[2], (batch, slots, heads, width), dtype)
    v = jax.random.normal(keys[3], (batch, slots, heads, width), dtype)
    key_bias = additive_mask(jnp.arange(slots)[None, :].repeat(batch, 0) < filled, dtype)
    vocabulary, weights = functional(model, lambda m, x: jnp.argmax(m.logits(x), axis=-1))
    attn = model.layers[0].attn
    implementation = attn.cached.implementation
    core = functools.partial(ops.cached_attention, scale=float(attn.norm_factor), implementation=implementation)
    calls = {"vocabulary": (vocabulary, (weights, hidden), 1), "attention core": (core, (q, k, v, key_bias), layers)}
    if model.layers[0].ffn is not None:
        ffn, ffn_weights = functional(model.layers[0].ffn, lambda f, x: f(x))
        calls["feedforward alone"] = (ffn, (ffn_weights, hidden[:, None, :]), layers)
        # The loop above feeds one input, so an FFF walks the same path each call, from L2. In a decode
        # step every token is new: these scan over NEW_TOKENS different inputs per call (the same ones in
        # every call of the loop, so their paths too are in L2 after the first).
        fresh = jax.random.normal(keys[0], (NEW_TOKENS, batch, 1, h), dtype)

        def over_new_tokens(step):
            return lambda module, xs: jax.lax.scan(lambda c, x: (c, step(module, x)), 0, xs)[1]

        ffn_new, _ = functional(model.layers[0].ffn, over_new_tokens(lambda f, x: f(x)))
        half, block_weights = functional(model.layers[0], over_new_tokens(lambda b, x: x + b.ffn(b.norm2(x))))
        calls["feedforward, new tokens"] = (ffn_new, (ffn_weights, fresh), layers / NEW_TOKENS)
        calls["norm + feedforward + residual, new tokens"] = (half, (block_weights, fresh), layers / NEW_TOKENS)
        if flush_mb > 0:
            # Inside a step the other layers' weights pass through the caches between two feedforward calls.
            # Here every new input first reads flush_mb MB (a GPU: more than its L2), then the feedforward
            # runs; the loop without the feedforward is timed too, and the difference is the feedforward
            # starting from cold caches.
            flush = jnp.ones((flush_mb * 2**20 // 4,), jnp.float32)

            def after_flush(step):
                def run(*inputs):
                    *module, buf, xs = inputs

                    def body(carry, x):
                        # The sum depends on the carry, so XLA cannot hoist the read out of the loop; the
                        # barriers order flush, feedforward, next flush.
                        done, x = jax.lax.optimization_barrier((jnp.minimum(jnp.sum(buf * carry), 1.0), x))
                        y = x if step is None else step(*module, x)
                        return jax.lax.optimization_barrier((done, y))
                    return jax.lax.scan(body, jnp.float32(1), xs)[1]
                return run

            ffn_cold, _ = functional(model.layers[0].ffn, after_flush(lambda f, x: f(x)))
            calls["cache flush"] = (after_flush(None), (flush, fresh), layers / NEW_TOKENS)
            calls["cache flush + feedforward"] = (ffn_cold, (ffn_weights, flush, fresh), layers / NEW_TOKENS)
    return calls


# ----------------------------------------------------------------------------- measurements


def _row(timing, **fields) -> dict:
    return {**fields, "ms": 1e3 * timing.median_s, "min_ms": 1e3 * timing.min_s, "cpu_ms": 1e3 * timing.cpu_median_s,
            "samples": len(timing.samples_s), "samples_ms": [round(1e3 * t, 4) for t in timing.samples_s]}


def steps_needed(args) -> int:
    """Decode steps one variant may take: the warm-up calls and every sample's calls."""
    return (args.warmup + args.rounds * args.calls) * args.tokens_per_call


def bench_decode(args, size: str, models: dict, batch: int, breakdown: bool) -> list[dict]:
    """Rows of the decode step of the FFF and dense models at ``batch`` (and, with ``breakdown``, of the
    step without feedforward and the parts of each model), timed side by side."""
    steps = steps_needed(args)
    variants, keys = {}, {}
    names = ["fff", "dense"] + (["none"] if breakdown else [])
    loops = {name: DecodeLoop(models[name], batch, args.prompt_length, steps, seed=batch,
                              tokens_per_call=args.tokens_per_call) for name in names}
    slots = loops["fff"].slots
    for name in names:
        variants[f"step/{name}"] = loops[name]
        keys[f"step/{name}"] = {"kind": "step", "model": name, "count": 1}
    times = bench.side_by_side(variants, rounds=args.rounds, calls=args.calls, warmup=args.warmup,
                               budget_s=args.budget_s / args.calls, min_rounds=args.min_rounds, log=bench.log)
    rows = []
    for label, key in keys.items():
        row = _row(times[label], size=size, batch=batch, slots=slots, prompt_length=args.prompt_length, **key)
        for field in ("ms", "min_ms", "cpu_ms"):   # per decode step
            row[field] /= args.tokens_per_call
        row["tokens_per_call"] = args.tokens_per_call
        row["tokens_per_s"] = batch / (row["ms"] / 1e3)
        rows.append(row)
    if breakdown:   # each part's device time inside a jitted loop: no dispatch, which would swamp a small part
        for name in ("fff", "dense"):
            for part, (fn, inputs, count) in part_calls(models[name], batch, slots, args.prompt_length + steps // 2,
                                                        args.flush_mb).items():
                per_call = bench.chained(fn, *inputs, calls=args.calls, budget_s=args.budget_s)
                rows.append({"size": size, "batch": batch, "slots": slots, "prompt_length": args.prompt_length,
                             "kind": part, "model": name, "count": count, "ms_per_call": 1e3 * per_call,
                             "ms": 1e3 * per_call * count})
                bench.log(f"{size} batch {batch} {part}/{name}: {1e3 * per_call:.4f} ms per call, x {count}")
    return rows


def bench_prefill(args, size: str, models: dict, batch: int, length: int) -> list[dict]:
    """Rows of the jitted prefill of ``batch`` prompts of ``length`` tokens, FFF and dense side by side."""
    from fffjax.generate import bucket_length, jitted_steps

    slots = bucket_length(length + steps_needed(args))
    variants = {}
    for name in ("fff", "dense"):
        prefill = jitted_steps(models[name])[0]
        stop, sampling, key, _ = greedy_settings(models[name].config)
        ids, mask = random_prompts(models[name].config, batch, length, seed=length)
        variants[name] = (lambda prefill=prefill, ids=ids, mask=mask, stop=stop, sampling=sampling, key=key:
                          prefill(ids, mask, stop, sampling, key, cache_length=slots, greedy=True)[0])
    times = bench.side_by_side(variants, rounds=args.rounds, calls=1, warmup=args.warmup, budget_s=args.budget_s,
                               min_rounds=args.min_rounds, log=bench.log)
    return [{**_row(times[name], size=size, model=name, batch=batch, tokens=length, slots=slots),
             "tokens_per_s": batch * length / times[name].median_s} for name in variants]


def breakdown(rows: list[dict], size: str, batch: int) -> dict | None:
    """``{..., "parts": {model: {part: ms}}, "step": {model: ms}, "alone": {kind: {model: ms}}}`` of one size
    and batch (see the module docstring), or None where the parts were not timed."""
    ms = {(r["kind"], r["model"]): r["ms"] for r in rows if r["size"] == size and r["batch"] == batch}
    if ("step", "none") not in ms:
        return None
    out = {"size": size, "batch": batch, "step_without_feedforward": ms["step", "none"], "step": {},
           "alone": {kind: {} for kind in ALONE}, "parts": {}}
    for model in ("fff", "dense"):
        step = ms["step", model]
        parts = {"feedforward": step - ms["step", "none"], "attention core": ms["attention core", model],
                 "vocabulary": ms["vocabulary", model]}
        parts["rest"] = ms["step", "none"] - parts["attention core"] - parts["vocabulary"]
        out["step"][model] = step
        for kind in ALONE:
            out["alone"][kind][model] = ms.get((kind, model))
        if all((kind, model) in ms for kind in FLUSH_KINDS):
            flush, both = (ms[kind, model] for kind in FLUSH_KINDS)
            out["alone"]["feedforward after a cache flush"][model] = both - flush
        out["parts"][model] = parts
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """``{size, batch, fff_tokens_per_s, dense_tokens_per_s, ratio}`` of the decode steps (ratio: FFF tok/s
    over dense tok/s, from the same rounds)."""
    steps = {(r["size"], r["batch"], r["model"]): r for r in rows if r["kind"] == "step"}
    return [{"size": size, "batch": batch, "slots": r["slots"], "fff_tokens_per_s": r["tokens_per_s"],
             "dense_tokens_per_s": steps[size, batch, "dense"]["tokens_per_s"], "fff_ms": r["ms"],
             "dense_ms": steps[size, batch, "dense"]["ms"],
             "ratio": r["tokens_per_s"] / steps[size, batch, "dense"]["tokens_per_s"]}
            for (size, batch, model), r in steps.items() if model == "fff" and (size, batch, "dense") in steps]


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    machine = report["machine"]
    device = report["device"]
    lines = [f"# FFF decoder vs its dense twin: generation speed ({device})", "",
             bench.provenance_line(report) + f" {machine['cpu_model']}, {machine['cores']} cores; "
             f"1-minute load average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after "
             "(this run's own busy cores included).", "",
             f"{report['dtype']}, random weights, eval mode, greedy; FFF-v2 `{report['fff']}` against the dense "
             f"feedforward of width 4H; implementations tried in order: "
             + "; ".join(f"{op} {', '.join(names)}" for op, names in report["implementations"].items()) + ". "
             f"Decode: prompts of {report['prompt_length']} tokens prefilled, then the jitted decode step of "
             "`fffjax.generate` on its static cache, "
             f"{report.get('tokens_per_call', 1)} step(s) per call, {report['calls']} calls per sample sent back to "
             "back, times per step; prefill: one call per sample, waited for. "
             "Median over samples interleaved round by round in one process (`fffjax.bench.side_by_side`); "
             "ratios from the same rounds.", ""]
    if report.get("notes"):
        lines += [f"**Note:** {note}" for note in report["notes"]] + [""]
    lines += ["## Decode", "", "| size | batch | cache slots | FFF tok/s | dense tok/s | FFF / dense |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['batch']} | {r['slots']} | {r['fff_tokens_per_s']:.0f} | "
              f"{r['dense_tokens_per_s']:.0f} | **{r['ratio']:.2f}x** |" for r in report["decode_ratios"]]
    lines += ["", "## Prefill", "", "| size | batch x tokens | FFF tok/s | dense tok/s | FFF / dense |",
              "|---|---|---:|---:|---:|"]
    prefill = {(r["size"], r["batch"], r["tokens"], r["model"]): r for r in report["prefill"]}
    for (size, batch, tokens, model), r in prefill.items():
        if model == "fff":
            d = prefill[size, batch, tokens, "dense"]
            lines.append(f"| {size} | {batch} x {tokens} | {r['tokens_per_s']:.0f} | {d['tokens_per_s']:.0f} | "
                         f"**{r['tokens_per_s'] / d['tokens_per_s']:.2f}x** |")
    for b in report["breakdown"]:
        step = b["step"]
        lines += ["", f"## Where a decode step's time goes: {b['size']}, batch {b['batch']}", "",
                  "*feedforward* = step - the same step without feedforward (`none` preset: "
                  f"{b['step_without_feedforward']:.3f} ms); *attention core*: softmax over the cache, one layer "
                  "timed alone x layers; *vocabulary*: logits projection and greedy argmax, timed alone; *rest*: "
                  "QKV and output projections, norms, embedding, cache writes, dispatch (the step without "
                  "feedforward minus the two timed parts). Parts timed alone: device time per call inside a "
                  "jitted loop (`fffjax.bench.chained`, no dispatch).", "",
                  "| part | FFF ms | FFF share | dense ms | dense share |", "|---|---:|---:|---:|---:|"]
        for part in PARTS:
            f, d = b["parts"]["fff"][part], b["parts"]["dense"][part]
            lines.append(f"| {part} | {f:.3f} | {100 * f / step['fff']:.0f}% | {d:.3f} | "
                         f"{100 * d / step['dense']:.0f}% |")
        lines.append(f"| **whole step** | **{step['fff']:.3f}** | | **{step['dense']:.3f}** | |")
        # A JSON report without "alone" (--from-json) holds the one-input loop as "feedforward_alone".
        alone = b.get("alone") or {"feedforward alone": b["feedforward_alone"]}
        for kind, label in ALONE.items():
            if alone.get(kind, {}).get("fff") is not None:
                lines.append(f"| {label} | {alone[kind]['fff']:.3f} | | {alone[kind]['dense']:.3f} | |")
        free = step["dense"] / b["step_without_feedforward"]
        lines += ["", f"With a feedforward that cost nothing the step would be **{free:.2f}x** the "
                  f"dense twin's (dense step / step without feedforward); the FFF step is "
                  f"{step['dense'] / step['fff']:.2f}x."]
        if min(b["parts"][m]["rest"] for m in ("fff", "dense")) < 0:
            lines.append("*rest* is negative here: the parts timed alone run slower than inside the whole step, "
                         "so read their rows as upper bounds.")
    lines += ["", "## Batch-1 weight-read floor", "",
              "Bytes a batch-1 decode step reads per token (each weight it uses once; the static cache whole); "
              "ideal = dense bytes / FFF bytes; GB/s = bytes / measured step time.", ""]
    measured = {(r["size"], r["batch"]): r for r in report["decode_ratios"]}
    for size, floor in report["weight_floor"].items():
        lines += [f"**{size}** (cache of {floor['slots']} slots, {floor['itemsize']} bytes a value)", "",
                  "| part | FFF MB/token | dense MB/token |", "|---|---:|---:|"]
        lines += [f"| {part} | {floor['fff_bytes'][part] / 1e6:.3f} | {floor['dense_bytes'][part] / 1e6:.3f} |"
                  for part in floor["fff_bytes"]]
        lines.append(f"| **total** | **{floor['fff_total'] / 1e6:.2f}** | **{floor['dense_total'] / 1e6:.2f}** |")
        line = (f"\nIdeal speed-up {floor['ideal_speedup']:.2f}x ({floor['ideal_speedup_weights_only']:.2f}x "
                "counting weights only)")
        r = measured.get((size, 1))
        if r is not None:
            line += (f"; measured at batch 1: **{r['ratio']:.2f}x** (FFF {floor['fff_total'] / r['fff_ms'] / 1e6:.1f} "
                     f"GB/s, dense {floor['dense_total'] / r['dense_ms'] / 1e6:.1f} GB/s)")
        lines += [line + ".", ""]
    return "\n".join(lines)


def plot(report: dict):
    """Decode tokens/s against batch (log axes), FFF solid and dense dashed, one colour per size."""
    plt = bench.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    sizes = list(dict.fromkeys(r["size"] for r in report["decode_ratios"]))
    for i, size in enumerate(sizes):
        rs = sorted((r for r in report["decode_ratios"] if r["size"] == size), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rs]
        ax.plot(batches, [r["fff_tokens_per_s"] for r in rs], "o-", color=f"C{i}", label=f"{size} FFF {report['fff']}")
        ax.plot(batches, [r["dense_tokens_per_s"] for r in rs], "s--", color=f"C{i}", label=f"{size} dense")
        for r in rs:
            ax.annotate(f"{r['ratio']:.2f}x", (r["batch"], r["fff_tokens_per_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (rows decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode step, {report['dtype']}, {report['device_kind']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(report: dict, out: Path, *, png: bool = True, with_json: bool = True) -> None:
    bench.write_results(out, name_of(report["device"]), report=report if with_json else None,
                        markdown=markdown(report), figure=plot(report) if png else None)


# ----------------------------------------------------------------------------- main


def check_device(device: str) -> None:
    import jax

    from fffjax.ops import cpu_ffi

    backend = jax.default_backend()
    if device == "gpu" and backend != "gpu":
        raise SystemExit(f"--device gpu needs JAX's GPU backend; this process has {backend!r}")
    if device == "cpu":
        if backend != "cpu":
            raise SystemExit(f"--device cpu needs JAX's CPU backend (this process has {backend!r}): "
                             "run it with JAX_PLATFORMS=cpu")
        if not cpu_ffi.available():
            raise SystemExit(f"the cpu_ffi kernels did not build: {cpu_ffi.build_error()}")


def run(args, argv: list[str] | None) -> dict:
    import jax.numpy as jnp

    from fffjax.ops import registry

    check_device(args.device)
    specs = size_specs(args.config, int_list(args.batches, "--batches"))
    breakdown_batches = int_list(args.breakdown_batches, "--breakdown-batches")
    dtype = jnp.dtype(DEVICES[args.device]["dtype"])
    trees, depth = args.fff
    fff_name = f"{trees}x{depth}"
    impls = {"fff_v2_hard": ("cpu_ffi",) if args.device == "cpu" else
             registry.candidates("fff_v2_hard", None, dtype, {"depth": depth})}
    for op in ("attention", "cached_attention", "layer_norm", "gelu"):
        impls[op] = registry.candidates(op, args.cached_attention if op == "cached_attention" else None, dtype, {})
    report = {**bench.provenance(__file__, argv), "device": args.device, "dtype": str(dtype), "fff": fff_name,
              "fff_trees": trees, "fff_depth": depth, "prompt_length": args.prompt_length, "calls": args.calls,
              "tokens_per_call": args.tokens_per_call,
              "rounds": args.rounds, "implementations": {op: list(n) for op, n in impls.items()},
              "load_before": list(os.getloadavg()), "notes": [], "decode": [], "decode_ratios": [], "prefill": [],
              "breakdown": [], "weight_floor": {}}
    missing = sorted(set(ALL_BATCHES) - {b for _, batches in specs for b in batches})
    if missing:
        report["notes"].append(f"batches {missing} were not run (this run's --batches/--config); "
                               "a full report has 1, 8, 64 and 256.")
    out = Path(args.out)
    for size, batches in specs:
        names = {"fff": f"{size}-fff-{fff_name}", "dense": f"{size}-dense", "none": f"{size}-none"}
        configs = size_configs(size, trees, depth)
        config = configs["fff"]
        if args.prompt_length + steps_needed(args) > config.max_seq_length:
            raise SystemExit(f"--prompt-length {args.prompt_length} plus {steps_needed(args)} decode steps "
                             f"exceeds {size}'s max_seq_length {config.max_seq_length}")
        began = time.perf_counter()
        models = {kind: build(configs[kind], args.device, args.seed, args.cached_attention) for kind in names}
        bench.log(f"{size}: built {', '.join(names.values())} in {time.perf_counter() - began:.0f} s")
        slots = None
        for batch in batches:
            rows = bench_decode(args, size, models, batch, breakdown=batch in breakdown_batches)
            slots = rows[0]["slots"]
            report["decode"] += rows
            report["decode_ratios"] = ratios(report["decode"])
            parts = breakdown(report["decode"], size, batch)
            if parts is not None:
                report["breakdown"].append(parts)
            r = next(r for r in report["decode_ratios"] if r["size"] == size and r["batch"] == batch)
            bench.log(f"{size} decode batch {batch}: FFF {r['fff_tokens_per_s']:.0f} vs dense "
                      f"{r['dense_tokens_per_s']:.0f} tok/s -> {r['ratio']:.2f}x")
            report["weight_floor"][size] = weight_floor(models["fff"].config, models["dense"].config, slots,
                                                        dtype.itemsize)
            report["load_after"] = list(os.getloadavg())
            write(report, out, png=False)
        for batch, length in prefill_shapes(args.prefill):
            if length > config.max_seq_length:
                report["notes"].append(f"prefill {batch}x{length} skipped for {size}: beyond its max_seq_length "
                                       f"{config.max_seq_length}")
                continue
            rows = bench_prefill(args, size, models, batch, length)
            report["prefill"] += rows
            bench.log(f"{size} prefill {batch}x{length}: FFF {rows[0]['tokens_per_s']:.0f} vs dense "
                      f"{rows[1]['tokens_per_s']:.0f} tok/s")
        report["load_after"] = list(os.getloadavg())
        write(report, out, png=False)
    write(report, out)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES), default="gpu",
                    help="gpu: bfloat16, default implementations; cpu: float32, FFF through cpu_ffi")
    ap.add_argument("--config", nargs="+", default=None, metavar="SIZE[:BATCHES]",
                    help="decoder sizes (tiny, small, base, medium, wide, xwide), each optionally with its own comma "
                         "list of batches (default gpu: base; cpu: small base:1,8)")
    ap.add_argument("--fff", default=(1, 11), type=tree_shape,
                    help="FFF-v2 trees x depth, KxD (default 1x11; 1x13 has about 4H nodes at the wide size, 1x14 at "
                         "xwide)")
    ap.add_argument("--batches", default=None, help="comma list of decode batches (default gpu 1,8,64,256; cpu 1,8,64)")
    ap.add_argument("--prefill", default=None, help="comma list of BATCHxTOKENS prefill shapes "
                                                    "(default gpu 1x512,8x128,64x128; cpu 1x256,8x128)")
    ap.add_argument("--breakdown-batches", default=None,
                    help="decode batches whose step is split into parts (default gpu 1,256; cpu 1,64)")
    ap.add_argument("--prompt-length", type=int, default=128, help="prompt tokens before the decode steps")
    ap.add_argument("--calls", type=int, default=None, help="decode calls per sample (default gpu 20, cpu 8)")
    ap.add_argument("--tokens-per-call", type=int, default=1,
                    help="decode steps per jitted call (generate_stream's tokens_per_call); times are per step")
    ap.add_argument("--rounds", type=int, default=7, help="samples per variant (at most)")
    ap.add_argument("--min-rounds", type=int, default=3, help="samples per variant (at least)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (the first compiles)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds of samples per variant: slow variants take fewer (default gpu 5, cpu 4)")
    ap.add_argument("--seed", type=int, default=0, help="weights")
    ap.add_argument("--cached-attention", default=None, metavar="NAME",
                    help="the decode step's attention implementation (e.g. pallas; default: the automatic choice)")
    ap.add_argument("--flush-mb", type=int, default=0,
                    help="with the breakdown, also time the feedforward on new inputs each after a read of this many "
                         "MB (e.g. 128, past a Hopper GPU's 50 MB L2): the feedforward from cold caches (0: not)")
    ap.add_argument("--walk-lookahead", type=int, default=None,
                    help="levels per round of the GPU's few-token FFF walk (default: the library's WALK_CONFIG)")
    ap.add_argument("--walk-warps", type=int, default=None,
                    help="warps of the few-token FFF walk (default: the library's)")
    ap.add_argument("--walk-tree-rows", action="store_true",
                    help="the few-token FFF walk with one program per token and its trees as tile rows (tree_rows)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of decoder_speed_DEVICE.json/.md/.png")
    ap.add_argument("--from-json", default=None, metavar="JSON", help="redraw the md and png from a json")
    args = ap.parse_args(argv)
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), Path(args.out), with_json=False)
        return
    defaults = DEVICES[args.device]
    args.config = args.config or defaults["config"]
    tuned = {k: v for k, v in (("lookahead", args.walk_lookahead), ("num_warps", args.walk_warps),
                               ("tree_rows", args.walk_tree_rows or None)) if v is not None}
    if tuned:   # walk_config reads WALK_CONFIG at call time
        from pallas_kernels import fff_v2_forward
        fff_v2_forward.WALK_CONFIG = dataclasses.replace(fff_v2_forward.WALK_CONFIG, **tuned)
    args.batches = args.batches or defaults["batches"]
    args.prefill = args.prefill or defaults["prefill"]
    args.breakdown_batches = args.breakdown_batches or defaults["breakdown_batches"]
    args.calls = args.calls or (20 if args.device == "gpu" else 8)
    args.budget_s = args.budget_s or (5.0 if args.device == "gpu" else 4.0)
    run(args, argv)
    stem = Path(args.out) / name_of(args.device)
    bench.log(f"done: {stem}.{{json,md,png}}")
    print(stem.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
