"""UltraFastBERT ``base`` against its dense twin on one GPU: training and inference throughput.

``base`` is UltraFastBERT-1x11-long (16 layers, H 768, 12 heads, vocab 32768, seq 128, one FFF-v2
tree of depth 11: 12 of 4095 neurons per token); ``base-dense`` is the same model with crammed BERT's
dense feedforward of width 3072. Both are measured in the same run, so every ratio is side by side.

1. **Training**: optimizer steps/s and tokens/s of the MLM objective (sparse prediction at 25% of the
   positions) with :class:`fffjax.train.Trainer` on random token ids, one device, bf16 compute
   (float32 master weights and AdamW), ``--train-batch`` sequences per step. The FFF model runs each
   implementation of ``--train-implementations`` (default ``pallas``: the Pallas forward with the
   conditional backward kernels; ``xla``'s backward is a scatter-add, slow on a GPU). The Trainer
   runs the modules in the compute dtype, data parallel (``dp``) on a one-device mesh.
2. **Inference**: jitted forward passes, bf16 parameters and compute, dropout off, ``--infer-batch``
   sequences: (a) ``encode`` (the encoder, where the FFF replaces the dense feedforward),
   (b) ``classifier`` (:class:`CrammedBertClassifier`: encoder + pooled head, the fine-tuned model),
   (c) ``mlm`` (full-vocabulary logits: the tied 768 x 32768 decoder costs about as much as the whole
   FFF encoder). FFF with each of ``--implementations`` (default ``pallas,xla``) and the dense twin,
   for each attention kernel of ``--attention`` (default ``auto``: the Pallas kernel on a GPU;
   ``cudnn,pallas`` times both; dropout is off, so :class:`SelfAttention` runs the fused form).

   ``--norm`` picks the layer norms likewise (``auto``: the one-pass Pallas kernel on a GPU; ``xla,auto``
   times both), and ``--gelu`` the dense twin's exact GELU (``auto``: the elementwise Pallas kernel on a
   GPU; ``auto,xla`` also times ``jax.nn.gelu``). Speed-ups are against the dense row of the first
   ``--gelu``.
3. ``--profile``: a JAX profiler trace of one call of each forward (:func:`fffjax.bench.profile_kernels`):
   kernel time per HLO op, where the encoder's time goes. Kernel times of parts of tens of
   microseconds come from this trace, not from timing the parts alone.

Timing (:mod:`fffjax.bench`): inference reports the throughput of a stream of batches
(:func:`~fffjax.bench.stream`: ``--steps`` calls sent back to back, the last one waited for) and the
latency of one batch (:func:`~fffjax.bench.latency`: each call waited for); training, the latency of
``--steps`` steps (each ending in a host fetch of the metrics). After the compile and ``--warmup``
calls; the median of ``--repeats`` repeats. Writes ``bert_gpu.json`` (rows, command, date, device,
versions), ``bert_gpu.md`` and ``bert_gpu.png`` to ``--out`` after every measurement.

Run on the GPU machine (a few minutes, mostly compiles)::

    python experiments/bench_bert_gpu.py --out $OUT

Smoke test on the CPU (tiny, about a minute)::

    python experiments/bench_bert_gpu.py --config tiny --train-implementations xla \\
        --implementations xla --train-batch 8 --infer-batch 16 --steps 2 --repeats 2 --out /tmp/bert_smoke

Redraw the md and png from a json (written next to it unless ``--out`` is given)::

    python experiments/bench_bert_gpu.py --plot-only experiments/results/bert_gpu.json
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bert_gpu"
FORWARDS = ("encode", "classifier", "mlm")
# AttentionConfig fields in the order of --attention-config's BQxW[xHxS].
ATTENTION_TILES = ("block_q", "num_warps", "heads_per_program", "num_stages")


def split_list(text: str) -> list[str]:
    """``"pallas,xla"`` -> ``["pallas", "xla"]``; ``""`` -> ``[]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ----------------------------------------------------------------------------- training


def random_mlm_batch(rng, batch: int, seq: int, vocab: int) -> dict:
    """An MLM batch (:func:`fffjax.data.mlm.mask_tokens`) of uniformly random word-piece ids."""

    from fffjax.data.mlm import mask_tokens
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS

    words = WORDPIECE_SPECIALS.word_ids(vocab)
    return mask_tokens(words[rng.integers(0, len(words), size=(batch, seq))], rng, vocab_size=vocab,
                       specials=WORDPIECE_SPECIALS)


def bench_train(args, config_name: str, implementation: str | None) -> dict:
    """One training row: MLM optimizer steps of ``config_name`` with the Trainer on one device, each
    step waited for (:func:`fffjax.bench.latency`: ``Trainer.step`` places the host batch, runs the
    jitted step and fetches the metrics, as a training loop does)."""
    import jax
    import numpy as np
    from flax import nnx

    from fffjax import train
    from fffjax.models.config import get_config
    from fffjax.models.crammed_bert import CrammedBertMLM
    from fffjax.train import sharding as shd

    t0 = time.perf_counter()
    config = get_config(config_name)
    train_config = train.TrainConfig(steps=10_000, batch_size=args.train_batch, compute_dtype=args.compute_dtype,
                                    data_parallel=1, model_parallel=1, parallelism="dp")
    model = CrammedBertMLM(config, implementation=implementation, rngs=nnx.Rngs(0))
    trainer = train.Trainer(model, train.mlm_objective, train_config,
                           mesh=shd.make_mesh(1, 1, devices=jax.devices()[:1]))
    host = random_mlm_batch(np.random.default_rng(0), args.train_batch, config.max_seq_length, config.vocab_size)
    seconds = bench.latency(trainer.step, host, calls=args.steps, warmup=args.warmup, repeats=args.repeats)
    gelu = {"gelu": resolved("gelu", None, args.compute_dtype)} if implementation is None else {}   # the default
    return {"bench": "train", "config": config_name, "implementation": implementation or "dense", **gelu,
            "batch": args.train_batch, "seq": config.max_seq_length, "step_s": seconds, "steps_per_s": 1.0 / seconds,
            "tokens_per_s": args.train_batch * config.max_seq_length / seconds, "compute_dtype": args.compute_dtype,
            "stage_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- inference


def build_models(config_name: str, dtype, implementation: str | None) -> dict:
    """``{"mlm": CrammedBertMLM, "classifier": CrammedBertClassifier}`` in eval mode, parameters in ``dtype``."""
    from flax import nnx

    from fffjax.models.config import get_config
    from fffjax.models.crammed_bert import CrammedBertClassifier, CrammedBertMLM, cast_parameters

    config = get_config(config_name)
    models = {}
    for kind, cls in (("mlm", CrammedBertMLM), ("classifier", CrammedBertClassifier)):
        model = cls(config, dtype=dtype, implementation=implementation, rngs=nnx.Rngs(0))
        model.eval()
        models[kind] = cast_parameters(model, dtype)
    return models


def jitted_forward(model, forward: str):
    """``(fn, state)``: ``fn(state, ids (B, S), mask (B, S))`` is the jitted ``forward`` of ``model``:
    encode -> ``(B, S, H)``, classifier -> ``(B, labels)``, mlm -> ``(B, S, V)``."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)   # the graphdef holds the FFF implementation: one program each

    def fn(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m.encode(ids, mask) if forward == "encode" else m(ids, mask)

    return jax.jit(fn), state


def configured(model, implementation: str | None, attention: str | None, norm: str | None = None,
               gelu: str | None = None):
    """``model`` with its FFF layers on ``implementation`` (None: left as built), its attention on
    ``attention``, its layer norms on ``norm`` and its dense feedforwards' GELU on ``gelu`` (in place)."""
    from fffjax.ops import set_implementation

    if implementation is not None:
        set_implementation(model, "fff_v2_hard", implementation)
    for op, name in (("attention", attention), ("layer_norm", norm), ("gelu", gelu)):
        set_implementation(model, op, name)
    return model


def resolved(op: str, implementation: str | None, dtype) -> str:
    """The implementation of ``op`` a call with ``implementation`` runs first for inputs of ``dtype``
    (None: the platform's preference, :func:`fffjax.ops.registry.preference`)."""
    import jax.numpy as jnp

    from fffjax.ops import registry

    return registry.candidates(op, implementation, jnp.dtype(dtype), {})[0]


def kernel_names(attention: str | None, norm: str | None, dtype, gelu: str | None = None, dense: bool = False) -> dict:
    """``{"attention": ..., "norm": ...[, "gelu": ...]}``: the kernels a row ran, resolved (None -> the
    default's name); ``gelu`` for a dense model only (the FFF kernels compute their own)."""
    names = {"attention": resolved("attention", attention, dtype), "norm": resolved("layer_norm", norm, dtype)}
    return {**names, "gelu": resolved("gelu", gelu, dtype)} if dense else names


def bench_forward(args, models: dict, forward: str, config_name: str, implementation: str | None,
                  inputs: tuple, attention: str | None = None, norm: str | None = None,
                  gelu: str | None = None) -> dict:
    """One inference row: compile, then the median seconds per batch, each waited for
    (:func:`fffjax.bench.latency`) and in a stream of batches (:func:`fffjax.bench.stream`)."""
    import jax

    model = configured(models["classifier" if forward == "classifier" else "mlm"], implementation, attention, norm,
                       gelu)
    fn, state = jitted_forward(model, forward)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, *inputs))
    first_call_s = time.perf_counter() - t0   # compile + one call
    seconds = bench.latency(fn, state, *inputs, calls=args.steps, warmup=args.warmup, repeats=args.repeats)
    stream = bench.stream(fn, state, *inputs, calls=args.steps, warmup=args.warmup, repeats=args.repeats)
    batch, seq = inputs[0].shape
    return {"bench": "infer", "forward": forward, "config": config_name, "implementation": implementation or "dense",
            **kernel_names(attention, norm, args.compute_dtype, gelu, implementation is None), "batch": batch,
            "seq": seq, "batch_s": seconds,
            "tokens_per_s": batch * seq / seconds, "stream_batch_s": stream,
            "stream_tokens_per_s": batch * seq / stream,
            "compute_dtype": args.compute_dtype, "first_call_s": first_call_s}


def bench_profile(args, models: dict, forward: str, config_name: str, implementation: str | None, inputs: tuple,
                  attention: str | None = None, norm: str | None = None, gelu: str | None = None) -> dict:
    """One ``profile`` row: :func:`fffjax.bench.profile_kernels` of one jitted ``forward`` call (after
    the compile and a warm-up call)."""
    model = configured(models["classifier" if forward == "classifier" else "mlm"], implementation, attention, norm,
                       gelu)
    fn, state = jitted_forward(model, forward)
    summary = bench.profile_kernels(fn, state, *inputs)
    return {"bench": "profile", "forward": forward, "config": config_name, "implementation": implementation or "dense",
            **kernel_names(attention, norm, args.compute_dtype, gelu, implementation is None),
            "batch": inputs[0].shape[0], "seq": inputs[0].shape[1], **summary}


# ----------------------------------------------------------------------------- report


def with_ratios(rows: list[dict], reference_gelu: str | None = None) -> list[dict]:
    """Rows with ``vs_dense``: tokens/s over the dense row of the same bench (and forward, attention and
    norm) whose GELU is ``reference_gelu`` (None: the first dense row); profile rows, which have no
    throughput, are left as they are."""
    def key(r):
        return r["bench"], r.get("forward"), r.get("attention"), r.get("norm")

    def ratio(r, field, dense):
        return r[field] / dense[key(r)] if key(r) in dense and field in r else None

    timed = [r for r in rows if "tokens_per_s" in r]
    reference = [r for r in timed if r["implementation"] == "dense"
                 and (r["bench"] == "train" or r.get("gelu") in (None, reference_gelu))]   # one dense training row
    dense, stream = {}, {}
    for r in reference:
        dense.setdefault(key(r), r["tokens_per_s"])
        if "stream_tokens_per_s" in r:
            stream.setdefault(key(r), r["stream_tokens_per_s"])
    return [{**r, "vs_dense": ratio(r, "tokens_per_s", dense),
             "stream_vs_dense": ratio(r, "stream_tokens_per_s", stream)}
            if "tokens_per_s" in r else r for r in rows]


def _implementation(row: dict) -> str:
    return row["implementation"] + (f" (GELU {row['gelu']})" if "gelu" in row else "")


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def markdown(report: dict) -> str:
    rows = with_ratios(report["rows"], report.get("reference_gelu"))
    train = [r for r in rows if r["bench"] == "train"]
    infer = [r for r in rows if r["bench"] == "infer"]
    lines = [f"# UltraFastBERT `{report['config']}` vs `{report['dense_config']}` on {report['device_kind']}", "",
             bench.provenance_line(report), ""]
    if train:
        r0 = train[0]
        lines += [f"## Training: MLM optimizer steps, {r0['compute_dtype']} compute, {r0['batch']} x {r0['seq']} "
                  "tokens per step, one device", "",
                  "| model | FFF implementation (dense: its GELU) | step (ms) | steps/s | tokens/s | vs dense |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {_implementation(r)} | {1e3 * r['step_s']:.1f} | {r['steps_per_s']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {_ratio(r['vs_dense'])} |" for r in train]
        lines.append("")
    if infer:
        r0 = infer[0]
        lines += [f"## Inference: jitted forward, {r0['compute_dtype']} parameters and compute, "
                  f"{r0['batch']} x {r0['seq']} tokens per batch", "",
                  "encode: the encoder (what replaces the dense feedforward); classifier: encoder + pooled head "
                  "(the fine-tuned model); mlm: full-vocabulary logits (the tied decoder is a dense "
                  "H x V matmul per token, the same in both models)." + (
                      " Speed-ups are against the dense twin whose exact GELU runs through "
                      f"`{report['reference_gelu']}`."
                      if report.get("reference_gelu") else ""), "",
                  "Throughput: `--steps` batches sent back to back, the last one waited for (a stream of batches: "
                  "the host's dispatch overlaps the GPU's work); latency: each batch waited for before the next "
                  "is sent (then the host's dispatch of a call with these models' ~170 arrays adds to every "
                  "batch).", "",
                  "| forward | attention | norm | model | FFF implementation (dense: its GELU) "
                  "| throughput: ms per batch | tokens/s | speedup vs dense | latency: ms per batch "
                  "| speedup vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        order = {f: i for i, f in enumerate(FORWARDS)}
        for r in sorted(infer, key=lambda r: (order.get(r["forward"], len(order)), r.get("attention") or "",
                                              r.get("norm") or "")):
            stream_ms = f"{1e3 * r['stream_batch_s']:.2f}" if "stream_batch_s" in r else "–"
            stream_tps = f"{r['stream_tokens_per_s']:,.0f}" if "stream_batch_s" in r else "–"
            lines.append(f"| {r['forward']} | {r.get('attention', 'einsum')} | {r.get('norm', 'xla')} | "
                         f"{r['config']} | {_implementation(r)} | {stream_ms} | {stream_tps} | "
                         f"{_ratio(r.get('stream_vs_dense'))} | {1e3 * r['batch_s']:.2f} | {_ratio(r['vs_dense'])} |")
        lines.append("")
    for r in (r for r in rows if r["bench"] == "profile"):
        gelu = f", GELU {r['gelu']}" if "gelu" in r else ""
        lines += [f"## Kernels of one `{r['forward']}` call: {r['config']} ({r['implementation']}), attention "
                  f"{r.get('attention', 'einsum')}, norm {r.get('norm', 'xla')}{gelu}, profiler trace", "",
                  f"{r['kernels']} kernels, {r['busy_ms']:.2f} ms of kernel time in a span of {r['span_ms']:.2f} ms "
                  "(the rest: the GPU waiting between kernels). Time per HLO op, longest first:", "",
                  "| op | kernels | ms |", "|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['ms']:.3f} |" for o in r["ops"]]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict):
    """Bar plot: training tokens/s (left), inference tokens/s per forward (right); bars labelled vs dense."""
    import numpy as np

    plt = bench.pyplot()
    rows = with_ratios(report["rows"], report.get("reference_gelu"))
    impls = list(dict.fromkeys(["dense"] + [r["implementation"] for r in rows]))
    colors = {name: f"C{i}" for i, name in enumerate(impls)}
    fig, (ax_t, ax_i) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 2.2]})

    def bars(ax, groups: list[str], rows_of):
        names = [n for n in impls if any(r["implementation"] == n for g in groups for r in rows_of(g))]
        width = 0.8 / max(1, len(names))
        labelled = set()
        for j, name in enumerate(names):
            for g, group in enumerate(groups):
                r = next((r for r in rows_of(group) if r["implementation"] == name), None)
                if r is None:
                    continue
                x = g + (j - (len(names) - 1) / 2) * width
                ax.bar(x, r["tokens_per_s"] / 1e6, width, color=colors[name],
                       label=None if name in labelled else name)
                labelled.add(name)
                if r["vs_dense"] is not None and name != "dense":
                    ax.annotate(f"{r['vs_dense']:.2f}x", (x, r["tokens_per_s"] / 1e6), ha="center", va="bottom",
                                fontsize=8)
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_ylabel("million tokens/s")
        ax.grid(axis="y", alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)

    bars(ax_t, ["train step"], lambda _: [r for r in rows if r["bench"] == "train"])
    ax_t.set_title("training (MLM, optimizer steps)")
    forwards = [f for f in FORWARDS if any(r["bench"] == "infer" and r.get("forward") == f for r in rows)]
    streamed = [{**r, "tokens_per_s": r["stream_tokens_per_s"], "vs_dense": r["stream_vs_dense"]}
                if r.get("stream_vs_dense") is not None else r for r in rows if r["bench"] == "infer"]
    bars(ax_i, forwards, lambda f: [r for r in streamed if r.get("forward") == f])
    ax_i.set_title("inference throughput (a stream of batches, bf16)" if report.get("compute_dtype") == "bfloat16"
                   else "inference throughput (a stream of batches)")
    fig.suptitle(f"UltraFastBERT {report['config']} vs {report['dense_config']}, {report['device_kind']}")
    fig.tight_layout()
    return fig


def write(report: dict, out: Path, *, with_json: bool = True, png: bool = True) -> None:
    """``bert_gpu.json`` (rows with their ``vs_dense``), ``bert_gpu.md`` and optionally ``bert_gpu.png``."""
    rows = with_ratios(report["rows"], report.get("reference_gelu"))
    bench.write_results(out, NAME, report={**report, "rows": rows} if with_json else None, markdown=markdown(report),
                        figure=plot(report) if png else None)


# ----------------------------------------------------------------------------- main


def run(args, argv: list[str] | None) -> dict:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_kernels.attention
    from fffjax.models.config import get_config

    dense_name = args.dense_config or f"{args.config}-dense"
    config = get_config(args.config)
    report = {**bench.provenance(__file__, argv), "config": args.config, "dense_config": dense_name,
              "flax_version": flax.__version__, "compute_dtype": args.compute_dtype,
              "pallas_attention_config": str(pallas_kernels.attention.DEFAULT_CONFIG), "rows": []}
    out = Path(args.out)
    bench.log(f"{args.config} vs {dense_name} on {report['device_kind']} ({jax.default_backend()}), "
              f"jax {jax.__version__}")

    def record(row: dict) -> None:
        report["rows"].append(row)
        bench.log(json.dumps(row))
        write(report, out, png=False)

    train_impls = split_list(args.train_implementations)
    for impl in [None] + train_impls if train_impls else []:
        name = dense_name if impl is None else args.config
        bench.log(f"train {name} ({impl or 'dense'}): build, compile, time")
        record(bench_train(args, name, impl))

    impls = split_list(args.implementations)
    # Resolved names, each once ("auto": Pallas attention, norms and GELU on a GPU, XLA on a CPU).
    attentions = list(dict.fromkeys(resolved("attention", None if a == "auto" else a, args.compute_dtype)
                                    for a in split_list(args.attention) or ["auto"]))
    norms = list(dict.fromkeys(resolved("layer_norm", None if n == "auto" else n, args.compute_dtype)
                               for n in split_list(args.norm) or ["auto"]))
    gelus = list(dict.fromkeys(resolved("gelu", None if g == "auto" else g, args.compute_dtype)
                               for g in split_list(args.gelu) or ["auto"]))
    report["reference_gelu"] = gelus[0]
    if impls:
        batch = random_mlm_batch(np.random.default_rng(1), args.infer_batch, config.max_seq_length, config.vocab_size)
        inputs = (jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
        dtype = jnp.dtype(args.compute_dtype)
        for name, model_impls, model_gelus in ((dense_name, [None], gelus), (args.config, impls, [None])):
            bench.log(f"infer {name}: build")
            models = build_models(name, dtype, model_impls[0])
            for attention, norm, gelu, impl in itertools.product(attentions, norms, model_gelus, model_impls):
                what = f"{name} ({impl or 'dense'}, attention {attention}, norm {norm}" + (
                    f", gelu {gelu})" if impl is None else ")")
                for forward in split_list(args.forwards):
                    bench.log(f"infer {what} {forward}: compile, time")
                    record(bench_forward(args, models, forward, name, impl, inputs, attention, norm, gelu))
                if args.profile:
                    for forward in split_list(args.forwards):
                        bench.log(f"profile {what} {forward}")
                        record(bench_profile(args, models, forward, name, impl, inputs, attention, norm, gelu))
            del models
    write(report, out, png=True)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", help="FFF preset (or config JSON)")
    ap.add_argument("--dense-config", default=None, help="its dense twin (default: CONFIG-dense)")
    ap.add_argument("--train-implementations", default="pallas",
                    help="comma list of FFF implementations to train ('' skips training; add xla for reference)")
    ap.add_argument("--implementations", default="pallas,xla",
                    help="comma list of FFF implementations for inference ('' skips inference)")
    ap.add_argument("--train-batch", type=int, default=128, help="sequences per training step (one device)")
    ap.add_argument("--infer-batch", type=int, default=256, help="sequences per inference batch")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls (after the compile)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--forwards", default=",".join(FORWARDS), help=f"comma list of inference forwards: {FORWARDS}")
    ap.add_argument("--attention", default="auto",
                    help="comma list of attention implementations for inference: xla, cudnn, pallas, auto "
                         "(see fffjax.ops.registry)")
    ap.add_argument("--norm", default="auto",
                    help="comma list of layer-norm implementations for inference: xla, pallas, auto (Pallas on a GPU)")
    ap.add_argument("--gelu", default="auto",
                    help="comma list of the dense twin's GELU implementations: xla (jax.nn.gelu), pallas, auto "
                         "(Pallas on a GPU); speed-ups are against the first")
    ap.add_argument("--attention-config", default=None, metavar="BQxW[xHxS]",
                    help="tiles of the Pallas attention kernel for this run (default: its DEFAULT_CONFIG); "
                         "e.g. the best_pallas_config of bench_attention_gpu")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one call of each forward with the JAX profiler: kernel time per HLO op")
    ap.add_argument("--out", default=None, help=f"folder of {NAME}.json/.md/.png (default experiments/results)")
    ap.add_argument("--plot-only", default=None, metavar="JSON", help=f"redraw {NAME}.md and .png from a json")
    args = ap.parse_args(argv)
    if args.plot_only:
        report = json.loads(Path(args.plot_only).read_text())
        out = Path(args.out) if args.out else Path(args.plot_only).parent
        write(report, out, with_json=False)
        print(f"wrote {out / NAME}.md and .png", flush=True)
        return
    args.out = args.out or str(RESULTS)
    if args.attention_config:
        import pallas_kernels.attention

        pallas_kernels.attention.DEFAULT_CONFIG = pallas_kernels.attention.AttentionConfig(
            **bench.parse_fields(args.attention_config, ATTENTION_TILES))
    run(args, argv)
    bench.log(f"done: {Path(args.out) / NAME}.{{json,md,png}}")
    print((Path(args.out) / f"{NAME}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
