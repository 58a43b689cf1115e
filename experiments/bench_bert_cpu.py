"""UltraFastBERT ``base`` against its dense twin ``base-dense`` on the CPU, end to end, side by side.

``base`` is UltraFastBERT-1x11-long (16 layers, H 768, 12 heads, one FFF-v2 tree of depth 11: 12 of 4095
neurons per token); ``base-dense`` is the same model with crammed BERT's dense feedforward of width 3072.
Random weights, float32, eval mode, sequences of 128 random word pieces (no padding), ``--batches``
sequences per call. Two forwards of :class:`fffjax.models.crammed_bert.CrammedBertClassifier`:
``encode`` (the encoder, ``model.encode``) and ``classifier`` (encoder, pooled head, class logits).
Each is one jitted pure function of the model's state (``nnx.split``; the weights are arguments, not
constants folded into the program). The FFF layers run through the C++ kernel (``cpu_ffi``); attention
through each of ``--attention`` in both models (``xla``: the CPU's default, ``jax.nn.dot_product_attention``;
``cpu_ffi``: the C++ kernel that reads the fused QKV projection as it is).

Timing (:func:`fffjax.bench.side_by_side`): for each batch size, every (forward, attention, model) variant
is compiled and warmed up, then timed round by round, interleaved, one call per sample waited for
(latency); the median of the samples. Ratios are of medians from the same run. The multiply-add count
gives the ceiling of the ratio: the attention projections and the attention itself stay dense.

Where the time goes (``--parts-batch``, default 8): each part of the forward jitted alone with its
weights as arguments and timed side by side the same way (layer 0's parts, times the layer count):
embeddings (lookup, positions, layer norm), the QKV projection, attention (scores, softmax, weighted
values), the output projection, the feedforward, the layer norms with their residual adds, and the
classifier head (pooler and head). Their sum is set beside the whole forward.

The script waits (up to ``--wait-s``) until the 1-minute load average is below ``--max-load`` before it
measures, and records the load averages before and after.

Run (about 6 minutes on 2 cores; writes ``experiments/results/bert_cpu.{json,md,png}``)::

    python experiments/bench_bert_cpu.py

Redraw the md and png from the json::

    python experiments/bench_bert_cpu.py --from-json experiments/results/bert_cpu.json

Smoke run (the tiny pair, seconds)::

    python experiments/bench_bert_cpu.py --config tiny --batches 1,2 --parts-batch 2 --rounds 2 --out /tmp/bert_cpu
"""

import argparse
import json
import os
import time
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bert_cpu"
FORWARDS = ("encode", "classifier")
PARTS = ("embeddings", "qkv projection", "attention", "output projection", "feedforward", "norms + residual",
         "classifier head")


def split_list(text: str) -> list[str]:
    """``"1,8,32"`` -> ``["1", "8", "32"]``; ``""`` -> ``[]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def multiply_adds_per_token(config, seq: int) -> dict[str, int]:
    """Multiply-adds per token of each matmul part of the encoder (embeddings and norms are negligible).

    QKV projection ``3 H^2``, output projection ``H^2``, attention ``2 S H`` (scores and weighted values
    over ``S`` keys), feedforward ``2 H W`` dense or ``2 H K (D + 1)`` for the FFF (the neurons on a
    token's paths), each per layer.
    """
    h, layers = config.hidden_size, config.num_layers
    ffn = 2 * h * (config.dense_width if config.ffn == "dense" else config.fff_trees * (config.fff_depth + 1))
    per_layer = {"qkv projection": 3 * h * h, "attention": 2 * seq * h, "output projection": h * h, "feedforward": ffn}
    return {part: layers * n for part, n in per_layer.items()}


def flop_ceiling(fff_config, dense_config, seq: int) -> float:
    """The encoder's multiply-adds of the dense twin over those of the FFF model: the speed-up at equal
    efficiency of every part."""
    return sum(multiply_adds_per_token(dense_config, seq).values()) / sum(
        multiply_adds_per_token(fff_config, seq).values())


def wait_until_quiet(max_load: float, wait_s: float, *, poll_s: float = 30.0, load=os.getloadavg,
                     sleep=time.sleep) -> tuple[bool, list[float]]:
    """Wait until the 1-minute load average is below ``max_load``, polling every ``poll_s`` for at most
    ``wait_s`` seconds; ``(quiet, load averages at the end)``."""
    waited = 0.0
    while True:
        now = list(load())
        if now[0] < max_load:
            return True, now
        if waited >= wait_s:
            return False, now
        bench.log(f"load average {now[0]:.2f} >= {max_load}: waiting")
        sleep(poll_s)
        waited += poll_s


# ----------------------------------------------------------------------------- models and parts


def build(config_name: str, seed: int):
    """A :class:`CrammedBertClassifier` of ``config_name`` in eval mode, its FFF layers on ``cpu_ffi``."""
    from flax import nnx

    from fffjax.models import get_config
    from fffjax.models.crammed_bert import CrammedBertClassifier
    from fffjax.ops import set_implementation

    model = CrammedBertClassifier(get_config(config_name), rngs=nnx.Rngs(seed))
    model.eval()
    return set_implementation(model, "fff_v2_hard", "cpu_ffi")


def pure(modules: tuple, fn):
    """``call(*inputs)``: ``fn(*modules, *inputs)`` jitted as a function of the modules' states, which
    are passed as arguments on every call (the weights are not compiled in as constants)."""
    import jax
    from flax import nnx

    graphdefs, states = zip(*(nnx.split(m) for m in modules))
    jitted = jax.jit(lambda states, *inputs: fn(*map(nnx.merge, graphdefs, states), *inputs))
    return lambda *inputs: jitted(states, *inputs)


def forward(model, name: str):
    """``call(ids, mask)``: the jitted ``encode`` (``(B, S, H)``) or ``classifier`` (``(B, labels)``)."""
    if name == "encode":
        return pure((model,), lambda m, ids, mask: m.encode(ids, mask))
    return pure((model,), lambda m, ids, mask: m(ids, mask))


def parts(model, ids, mask) -> dict[str, tuple]:
    """``{part: (call, times per forward)}``: zero-argument jitted calls of each part of the classifier's
    forward on the activations of ``ids`` and ``mask`` (layer 0 stands for every layer)."""
    import jax.numpy as jnp

    from fffjax import ops
    from fffjax.models.crammed_bert import additive_mask

    config = model.config
    layers = config.num_layers
    layer = model.encoder.layers[0]
    attn = layer.attn
    h = jnp.asarray(model.encoder.embedding(ids))
    qkv = attn.query_key_value(h)
    key_bias = additive_mask(mask, h.dtype)
    context = qkv[..., :config.hidden_size]
    embed = pure((model.encoder.embedding,), lambda m, ids: m(ids))
    project_qkv = pure((attn.query_key_value,), lambda m, x: m(x))
    core = pure((attn,), lambda m, qkv, bias: ops.attention(
        qkv, bias, num_heads=m.num_heads, scale=float(m.norm_factor), implementation=m.implementation))
    project_out = pure((attn.dense,), lambda m, x: m(x))
    ffn = pure((layer.ffn,), lambda m, x: m(x))
    norm = pure((layer.norm1,), lambda m, x, residual: m(x, residual))
    head = pure((model.pooler, model.head), lambda pooler, head, hidden: head(pooler(hidden)))
    return {"embeddings": (lambda: embed(ids), 1),
            "qkv projection": (lambda: project_qkv(h), layers),
            "attention": (lambda: core(qkv, key_bias), layers),
            "output projection": (lambda: project_out(context), layers),
            "feedforward": (lambda: ffn(h), layers),
            "norms + residual": (lambda: norm(h, h), 2 * layers + 1),
            "classifier head": (lambda: head(h), 1)}


def _timing_row(timing, **fields) -> dict:
    return {**fields, "ms": 1e3 * timing.median_s, "min_ms": 1e3 * timing.min_s,
            "cpu_ms": 1e3 * timing.cpu_median_s, "samples": len(timing.samples_s),
            "samples_ms": [round(1e3 * t, 3) for t in timing.samples_s]}


def bench_batch(args, models: dict, batch: int) -> list[dict]:
    """Rows of every (forward, attention, model) at ``batch`` sequences, timed side by side."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fffjax.ops import set_implementation

    config = models[args.config].config
    rng = np.random.default_rng(batch)
    ids = jnp.asarray(rng.integers(5, config.vocab_size, (batch, config.max_seq_length)), jnp.int32)
    mask = jnp.ones_like(ids)
    variants, keys = {}, {}
    for attention in split_list(args.attention):
        for name, model in models.items():
            set_implementation(model, "attention", attention)
            for fwd in split_list(args.forwards):
                call = forward(model, fwd)
                label = f"{fwd}/{attention}/{name}"
                variants[label] = lambda call=call: call(ids, mask)
                keys[label] = {"forward": fwd, "attention": attention, "model": name}
    t0 = time.perf_counter()
    for call in variants.values():
        jax.block_until_ready(call())   # compile
    bench.log(f"batch {batch}: {len(variants)} variants compiled in {time.perf_counter() - t0:.0f} s")
    times = bench.side_by_side(variants, rounds=args.rounds, warmup=1, budget_s=args.budget_s,
                               min_rounds=args.min_rounds, log=bench.log)
    return [_timing_row(times[label], **keys[label], batch=batch, seq=config.max_seq_length) for label in variants]


def bench_parts(args, models: dict, batch: int) -> list[dict]:
    """Rows of every part of each model's forward at ``batch`` sequences (first attention of
    ``--attention``), timed side by side; ``ms`` is per forward (the part's time times its count)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fffjax.ops import set_implementation

    attention = split_list(args.attention)[0]
    config = models[args.config].config
    rng = np.random.default_rng(batch)
    ids = jnp.asarray(rng.integers(5, config.vocab_size, (batch, config.max_seq_length)), jnp.int32)
    mask = jnp.ones_like(ids)
    variants, keys = {}, {}
    for name, model in models.items():
        set_implementation(model, "attention", attention)
        for part, (call, count) in parts(model, ids, mask).items():
            variants[f"{part}/{name}"] = call
            keys[f"{part}/{name}"] = {"part": part, "model": name, "count": count}
    for call in variants.values():
        jax.block_until_ready(call())
    times = bench.side_by_side(variants, rounds=args.rounds, warmup=1, budget_s=args.budget_s,
                               min_rounds=args.min_rounds, log=bench.log)
    rows = []
    for label, key in keys.items():
        row = _timing_row(times[label], **key, attention=attention, batch=batch, seq=config.max_seq_length)
        row["ms_per_call"], row["ms"] = row["ms"], row["ms"] * key["count"]
        rows.append(row)
    return rows


def check_attention(models: dict, attentions: list[str], batch: int = 2) -> dict:
    """Largest difference of each model's classifier logits and encoder output between the attention
    implementations (the first against the others), at ``batch`` sequences."""
    import jax.numpy as jnp
    import numpy as np

    from fffjax.ops import set_implementation

    out = {}
    for name, model in models.items():
        config = model.config
        ids = jnp.asarray(np.random.default_rng(0).integers(5, config.vocab_size, (batch, config.max_seq_length)),
                          jnp.int32)
        mask = jnp.ones_like(ids).at[-1, config.max_seq_length // 2:].set(0)
        results = {}
        for attention in attentions:
            set_implementation(model, "attention", attention)
            results[attention] = (np.asarray(forward(model, "encode")(ids, mask)),
                                  np.asarray(forward(model, "classifier")(ids, mask)))
        first = results[attentions[0]]
        out[name] = {a: {"encode_max_abs_diff": float(np.max(np.abs(r[0] - first[0]))),
                         "classifier_max_abs_diff": float(np.max(np.abs(r[1] - first[1])))}
                     for a, r in results.items() if a != attentions[0]}
    return out


# ----------------------------------------------------------------------------- report


def ratios(rows: list[dict], fff: str, dense: str) -> list[dict]:
    """``{forward, attention, batch, fff_ms, dense_ms, speedup}`` for each pair of rows of the two models
    measured together (speedup: dense ms over FFF ms)."""
    by_key = {(r["forward"], r["attention"], r["batch"], r["model"]): r for r in rows}
    out = []
    for (fwd, attention, batch, model), r in by_key.items():
        other = by_key.get((fwd, attention, batch, dense))
        if model == fff and other is not None:
            out.append({"forward": fwd, "attention": attention, "batch": batch, "fff_ms": r["ms"],
                        "dense_ms": other["ms"], "speedup": other["ms"] / r["ms"],
                        "cpu_speedup": other["cpu_ms"] / r["cpu_ms"]})
    return out


def parts_summary(part_rows: list[dict], fff: str, dense: str) -> str:
    """One paragraph: how much faster the feedforward got, and what share of the FFF model's time the
    parts both models share take (which bounds the speed-up of the whole)."""
    ms = {(r["model"], r["part"]): r["ms"] for r in part_rows}
    total = sum(v for (model, _), v in ms.items() if model == fff)
    ffn_fff, ffn_dense = ms[fff, "feedforward"], ms[dense, "feedforward"]
    shared = total - ffn_fff
    projections = ms[fff, "qkv projection"] + ms[fff, "output projection"]
    bound = (shared + ffn_dense) / shared
    return (f"The FFF feedforward takes {ffn_fff:.1f} ms against the dense one's {ffn_dense:.1f} ms "
            f"({ffn_dense / ffn_fff:.0f}x less). What both models share takes {shared:.0f} of the FFF model's "
            f"{total:.0f} ms ({100 * shared / total:.0f}%): the attention projections {projections:.0f} ms "
            f"({100 * projections / total:.0f}%, dense matmuls at the rate of the dense feedforward's), attention "
            f"{ms[fff, 'attention']:.0f} ms, norms {ms[fff, 'norms + residual']:.0f} ms. With a feedforward that "
            f"cost nothing, these parts would allow {bound:.2f}x.")


def markdown(report: dict) -> str:
    fff, dense = report["config"], report["dense_config"]
    machine = report["machine"]
    lines = [f"# UltraFastBERT `{fff}` vs `{dense}` on the CPU, end to end", "",
             bench.provenance_line(report) + f" {machine['cpu_model']}, {machine['cores']} cores; "
             f"1-minute load average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after "
             f"(this run's own busy cores included); XLA_FLAGS `{report['xla_flags'] or '(none)'}`.", "",
             f"float32, random weights, eval mode, {report['seq']} tokens per sequence; the FFF layers through "
             "`cpu_ffi` (the C++ kernel). *encode*: `model.encode`; *classifier*: encoder + pooled head. Each a jitted "
             "function of the model's state (weights as arguments). Wall-clock ms per call (one call per sample, "
             "waited for), median over samples interleaved round by round in one process "
             "(`fffjax.bench.side_by_side`); *speed-up* = dense ms / FFF ms of the same run; *CPU-time speed-up*: "
             "the same for process CPU time.", "",
             f"Multiply-add ceiling of the encoder's speed-up (the attention projections and the attention itself "
             f"stay dense): **{report['flop_ceiling']:.2f}x**.", "",
             f"| batch | forward | attention | {fff} ms | {dense} ms | speed-up | CPU-time speed-up |",
             "|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['forward']} | {r['attention']} | {r['fff_ms']:.1f} | {r['dense_ms']:.1f} | "
              f"**{r['speedup']:.2f}x** | {r['cpu_speedup']:.2f}x |" for r in report["ratios"]]
    lines.append("")
    part_rows = report.get("parts", [])
    if part_rows:
        batch, attention = part_rows[0]["batch"], part_rows[0]["attention"]
        whole = {r["model"]: r["ms"] for r in report["rows"]
                 if r["batch"] == batch and r["forward"] == "classifier" and r["attention"] == attention}
        macs = report["multiply_adds_per_token"]
        lines += [f"## Where the time goes: batch {batch}, attention `{attention}`", "",
                  "Each part jitted alone (weights as arguments) and timed side by side; ms per forward = ms per "
                  "call x calls per forward (layer 0 stands for all layers). *GMAC/s*: multiply-adds of the "
                  "part over its time.", "",
                  f"| part | calls | {fff} ms | {fff} GMAC/s | {dense} ms | {dense} GMAC/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        tokens = batch * report["seq"]

        def rate(model: str, part: str, ms: float) -> str:
            n = macs[model].get(part)
            return f"{n * tokens / ms / 1e6:.0f}" if n else "–"

        totals = {fff: 0.0, dense: 0.0}
        for part in PARTS:
            row = {r["model"]: r for r in part_rows if r["part"] == part}
            if fff not in row or dense not in row:
                continue
            totals[fff] += row[fff]["ms"]
            totals[dense] += row[dense]["ms"]
            lines.append(f"| {part} | {row[fff]['count']} | {row[fff]['ms']:.1f} | {rate(fff, part, row[fff]['ms'])} | "
                         f"{row[dense]['ms']:.1f} | {rate(dense, part, row[dense]['ms'])} |")
        lines.append(f"| **sum of parts** | | **{totals[fff]:.1f}** | | **{totals[dense]:.1f}** | |")
        if fff in whole and dense in whole:
            lines.append(f"| whole classifier (table above) | | {whole[fff]:.1f} | | {whole[dense]:.1f} | |")
        lines += ["", parts_summary(part_rows, fff, dense), ""]
    if report.get("attention_check"):
        lines += ["Attention implementations agree (largest difference from the first, 2 sequences, one half "
                  "padded): " + "; ".join(f"{model} {a}: encoder {d['encode_max_abs_diff']:.1e}, "
                                          f"logits {d['classifier_max_abs_diff']:.1e}"
                                          for model, per in report["attention_check"].items()
                                          for a, d in per.items()) + ".", ""]
    return "\n".join(lines)


def plot(report: dict):
    """Left: ms per call of each model per (batch, forward, attention), speed-up above the FFF bar; right:
    the parts of one forward, stacked per model."""
    import numpy as np

    plt = bench.pyplot()
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    rs = report["ratios"]
    x = np.arange(len(rs))
    ax_l.bar(x - 0.2, [r["dense_ms"] for r in rs], 0.4, label=report["dense_config"], color="C0")
    ax_l.bar(x + 0.2, [r["fff_ms"] for r in rs], 0.4, label=f"{report['config']} (FFF, cpu_ffi)", color="C1")
    for i, r in enumerate(rs):
        ax_l.annotate(f"{r['speedup']:.2f}x", (i + 0.2, r["fff_ms"]), ha="center", va="bottom", fontsize=8)
    ax_l.set_xticks(x, [f"B={r['batch']}\n{r['forward']}\n{r['attention']}" for r in rs], fontsize=7)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("ms per call (log)")
    ax_l.set_title("latency per batch of 128-token sequences")
    ax_l.legend(fontsize=8)
    ax_l.grid(axis="y", alpha=0.3)
    part_rows = report.get("parts", [])
    models = [report["config"], report["dense_config"]]
    bottom = np.zeros(len(models))
    for i, part in enumerate(PARTS):
        ms = np.array([next((r["ms"] for r in part_rows if r["part"] == part and r["model"] == m), 0.0)
                       for m in models])
        if ms.any():
            ax_r.bar(models, ms, bottom=bottom, label=part, color=f"C{i}")
            bottom += ms
    if part_rows:
        ax_r.set_title(f"parts of one forward, batch {part_rows[0]['batch']}")
        ax_r.set_ylabel("ms per forward")
        ax_r.legend(fontsize=7)
    fig.suptitle(f"UltraFastBERT {report['config']} vs {report['dense_config']}, float32, "
                 f"{report['machine']['cores']} CPU cores")
    fig.tight_layout()
    return fig


def write(report: dict, out: Path, *, png: bool = True, with_json: bool = True) -> None:
    bench.write_results(out, NAME, report=report if with_json else None, markdown=markdown(report),
                        figure=plot(report) if png else None)


# ----------------------------------------------------------------------------- main


def run(args, argv: list[str] | None) -> dict:
    import jax

    from fffjax.models import get_config
    from fffjax.ops import cpu_ffi

    if not cpu_ffi.available():
        raise SystemExit(f"the cpu_ffi kernels did not build: {cpu_ffi.build_error()}")
    quiet, load_before = wait_until_quiet(args.max_load, args.wait_s)
    if not quiet:
        bench.log(f"load average still {load_before[0]:.2f} after {args.wait_s} s: measuring anyway (recorded)")
    fff_config, dense_config = get_config(args.config), get_config(args.dense_config)
    seq = fff_config.max_seq_length
    report = {**bench.provenance(__file__, argv), "config": args.config, "dense_config": args.dense_config,
              "seq": seq, "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": load_before,
              "quiet_before": quiet, "flop_ceiling": flop_ceiling(fff_config, dense_config, seq),
              "multiply_adds_per_token": {args.config: multiply_adds_per_token(fff_config, seq),
                                          args.dense_config: multiply_adds_per_token(dense_config, seq)},
              "rows": [], "ratios": [], "parts": []}
    bench.log(f"{args.config} vs {args.dense_config} on {report['machine']['cpu_model']} "
              f"({report['machine']['cores']} cores), jax {jax.__version__}")
    models = {args.config: build(args.config, args.seed), args.dense_config: build(args.dense_config, args.seed)}
    report["attention_check"] = check_attention(models, split_list(args.attention))
    out = Path(args.out)
    for batch in (int(b) for b in split_list(args.batches)):
        report["rows"] += bench_batch(args, models, batch)
        report["ratios"] = ratios(report["rows"], args.config, args.dense_config)
        for r in (r for r in report["ratios"] if r["batch"] == batch):
            bench.log(f"batch {batch} {r['forward']} attention {r['attention']}: {r['fff_ms']:.1f} vs "
                      f"{r['dense_ms']:.1f} ms -> {r['speedup']:.2f}x")
        report["load_after"] = list(os.getloadavg())
        write(report, out, png=False)
    if args.parts_batch:
        report["parts"] = bench_parts(args, models, args.parts_batch)
    report["load_after"] = list(os.getloadavg())
    write(report, out)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", help="FFF preset")
    ap.add_argument("--dense-config", default=None, help="its dense twin (default: CONFIG-dense)")
    ap.add_argument("--batches", default="1,8,32", help="comma list of sequences per call")
    ap.add_argument("--forwards", default=",".join(FORWARDS), help=f"comma list of {FORWARDS}")
    ap.add_argument("--attention", default="cpu_ffi,xla",
                    help="comma list of attention implementations, each run in both models (parts: the first)")
    ap.add_argument("--parts-batch", type=int, default=8, help="batch of the per-part timing (0: skip it)")
    ap.add_argument("--rounds", type=int, default=7, help="samples per variant (at most)")
    ap.add_argument("--min-rounds", type=int, default=3, help="samples per variant (at least)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="seconds of samples per variant: slow variants take fewer, within the two bounds")
    ap.add_argument("--seed", type=int, default=0, help="weights")
    ap.add_argument("--max-load", type=float, default=0.7, help="wait until the 1-minute load average is below this")
    ap.add_argument("--wait-s", type=float, default=1200.0, help="longest wait for a quiet machine")
    ap.add_argument("--out", default=str(RESULTS), help=f"folder of {NAME}.json/.md/.png")
    ap.add_argument("--from-json", default=None, metavar="JSON", help=f"redraw {NAME}.md and .png from a json")
    args = ap.parse_args(argv)
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), Path(args.out), with_json=False)
        return
    args.dense_config = args.dense_config or f"{args.config}-dense"
    run(args, argv)
    bench.log(f"done: {Path(args.out) / NAME}.{{json,md,png}}")
    print((Path(args.out) / f"{NAME}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
