"""all-MiniLM-L6-v2 converted into FFF trees: quality kept and CPU speed, against the teacher.

Quality at each active fraction and stage, and sentence-embedding speed on the CPU, against the teacher
and a dense student of equal active width.

    python experiments/distill_minilm.py --runs runs/distill_minilm --out experiments/results

Phases (each skipped when its files exist, so a killed run resumes where it stopped):

1. convert: for each (kind, fraction) of the grid, :func:`fffjax.distill.run` (stages a-c, and d where
   the grid says), the student saved as a BERT checkpoint and its report as JSON in ``--runs``;
2. probes: logistic-regression probes on frozen embeddings of Amazon reviews and SpamAssassin
   messages, for the teacher and every final student;
3. speed: sentence-embedding throughput of the teacher and the final students side by side in one
   process (float32, batch 1 and 32, 32 and 128 tokens), and the feedforward's share of the teacher's
   time (the teacher with its feedforwards replaced by zero-cost ones);
4. report: ``distill_minilm{_cpu}.{json,md,png}``.

Quality is measured on held-out corpus sentences (whole blocks at the end of each source), since no
STS, GLUE or MTEB data is reachable offline.
"""

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fffjax import bench, similarity
from fffjax import distill as fd
from fffjax.cmd_distill import add_config_arguments, config_from_args, default_teacher, sample_sentences
from fffjax.data.labelled import load_task
from fffjax.models.bert import sentence_embedding
from fffjax.pretrained import from_pretrained
from fffjax.train.checkpoint import load_bert_checkpoint, save_bert_checkpoint

# (kind, fraction, last stage): the targets at <= 10% of the neurons get the end-to-end stage; the
# others show the trend with fraction at the layer-wise stage.
GRID = (
    ("fff_v2", 0.1, "d"), ("fff_v1", 0.0625, "d"), ("dense", 0.1, "d"),
    ("fff_v2", 0.05, "c"), ("fff_v2", 0.25, "c"), ("fff_v1", 0.125, "c"), ("dense", 0.25, "c"),
)
PROBE_TASKS = ("amazon", "spam")


def run_name(kind: str, fraction: float) -> str:
    return f"{kind}-{fraction * 100:g}pct"


def convert_phase(args, teacher, tokenizer, train, held) -> dict[str, dict]:
    reports = {}
    data = None
    for kind, fraction, last_stage in GRID[:args.configs]:
        name = run_name(kind, fraction)
        if args.only and name not in args.only:
            continue
        folder = args.runs / name
        if (folder / "report.json").is_file():
            reports[name] = json.loads((folder / "report.json").read_text())
            continue
        if data is None:
            bench.log("teacher data")
            data = fd.prepare_data(teacher, tokenizer, train, held, layer_tokens=args.layer_tokens,
                                   max_length=args.max_length, seed=args.seed)
        bench.log(f"convert {name} (stages up to {last_stage})")
        config = config_from_args(args, kind=kind, fraction=fraction, last_stage=last_stage)
        student, report = fd.run(teacher, tokenizer, data, config, progress=lambda line: bench.log(f"  {line}"))
        save_bert_checkpoint(folder / "student", student, tokenizer=tokenizer, overwrite=True)
        tmp = folder / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(folder / "report.json")
        reports[name] = report
    return reports


def probe_phase(args, models: dict, tokenizer) -> dict[str, dict[str, float]]:
    path = args.runs / "probes.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    tasks = {}
    for task in PROBE_TASKS:
        s = load_task(task)
        rng = np.random.default_rng(args.seed)
        train = rng.permutation(len(s.train_texts))[:args.probe_train]
        test = rng.permutation(len(s.test_texts))[:args.probe_test]
        tasks[task] = ([s.train_texts[i] for i in train], s.train_labels[train],
                       [s.test_texts[i] for i in test], s.test_labels[test])
    for name, model in models.items():
        if name in done:
            continue
        bench.log(f"probes {name}")
        done[name] = {}
        for task, (train_x, train_y, test_x, test_y) in tasks.items():
            e_train = fd.embeddings(model, tokenizer, train_x, max_length=args.probe_length)
            e_test = fd.embeddings(model, tokenizer, test_x, max_length=args.probe_length)
            done[name][task] = similarity.probe_accuracy(e_train, train_y, e_test, test_y)
        path.write_text(json.dumps(done, indent=1))
    return done


class _NoFeedforward(nnx.Module):
    """A feedforward slot that costs nothing: the teacher without it shows what the rest costs."""

    def __call__(self, x):
        return jnp.zeros_like(x)


def speed_phase(args, models: dict) -> dict:
    no_ffn = nnx.clone(models["teacher"])
    for layer in no_ffn.layers:
        layer.ffn = _NoFeedforward()
    variants = {**models, "teacher without feedforward": no_ffn}
    forward = nnx.jit(lambda model, ids, mask: sentence_embedding(model(ids, mask), mask))
    rows = []
    for batch in (1, 32):
        for seq in (32, 128):
            ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (batch, seq)), jnp.int32)
            mask = jnp.ones((batch, seq), jnp.int32)
            calls = {name: (lambda m=m, ids=ids, mask=mask: forward(m, ids, mask)) for name, m in variants.items()}
            timings = bench.side_by_side(calls, rounds=args.speed_rounds, budget_s=args.speed_budget_s)
            for name, t in timings.items():
                rows.append({"batch": batch, "seq": seq, "model": name, "ms": t.median_s * 1e3,
                             "sentences_per_s": batch / t.median_s, "speedup": 1.0 / t.vs_first})
            bench.log(f"speed batch {batch} x {seq}: " + ", ".join(
                f"{name} {1 / t.vs_first:.2f}x" for name, t in timings.items()))
    return {"rows": rows}


def random_students(seed: int) -> dict:
    """A random teacher of all-MiniLM-L6-v2's shape and its stage-(a) students of every (kind, fraction)
    of the grid: for timing where the pretrained weights are not at hand (the GPU machine), and at the
    fractions the grid trains only layer-wise. Routing on random weights is about as balanced as on
    trained ones, so the speed is representative."""
    from fffjax.convert import dense_to_fff
    from fffjax.models.bert import Bert, BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                        max_positions=512, type_vocab_size=2)
    teacher = Bert(config, rngs=nnx.Rngs(seed))
    teacher.eval()
    models = {"teacher": teacher}
    for kind, fraction, _ in GRID:
        spec = dense_to_fff.spec_for_fraction(kind, config.intermediate_size, fraction)
        params = [dense_to_fff.init_from_dense(fd.dense_layer_params(layer.ffn), spec, seed=seed)
                  for layer in teacher.layers]
        models[run_name(kind, fraction)] = fd.student_from_layers(teacher, params, spec)
    return models


def speed_markdown(report: dict) -> str:
    lines = ["# all-MiniLM-L6-v2-shaped students: sentence-embedding speed", "", bench.provenance_line(report), "",
             "Random weights of all-MiniLM-L6-v2's shape, students converted by stage (a) (speed does not depend "
             "on the training stage). One process, variants interleaved (`fffjax.bench.side_by_side`), "
             f"{report['dtype']}.", "",
             "| batch x tokens | model | ms per call | sentences/s | vs teacher |", "|---|---|---|---|---|"]
    for row in report["speed"]["rows"]:
        lines.append(f"| {row['batch']} x {row['seq']} | {row['model']} | {row['ms']:.3f} | "
                     f"{row['sentences_per_s']:.1f} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = ["# all-MiniLM-L6-v2 -> FFF: quality kept and CPU speed", "", bench.provenance_line(report), "",
             f"Teacher: all-MiniLM-L6-v2 (6 layers, H 384, feedforward 1536). {report['n_train']} training and "
             f"{report['n_held_out']} held-out corpus sentences (held out as whole blocks at each source's end); "
             f"{report['layer_tokens']} token vectors per layer for stages b and c; probes on "
             f"{report['probe_train']} training / {report['probe_test']} test texts per task, "
             f"{report['probe_length']} tokens.", "",
             "Stages: a = tree from the dense layer; b = routers and output rows fitted on the teacher's hidden "
             "states; c = layer-wise distillation; d = end-to-end distillation of the sentence embeddings.", "",
             "## Quality against the teacher (held-out sentences)", "",
             "| student | active / 1536 | stage | cosine | Spearman | nn@1 | nn@10 | amazon probe | spam probe |",
             "|---|---|---|---|---|---|---|---|---|"]
    probes = report["probes"]
    t = probes["teacher"]
    lines.append(f"| teacher | 1536 (100%) | – | 1 | 1 | 1 | 1 | {t['amazon']:.3f} | {t['spam']:.3f} |")
    for name, r in report["runs"].items():
        active = r["active_neurons"]
        final = list(r["stages"])[-1]
        for stage, e in r["stages"].items():
            p = probes.get(name, {}) if stage == final else {}
            amazon = f"{p['amazon']:.3f} ({p['amazon'] / t['amazon']:.1%})" if p else ""
            spam = f"{p['spam']:.3f} ({p['spam'] / t['spam']:.1%})" if p else ""
            lines.append(f"| {name} | {active} ({active / 1536:.1%}) | {stage} | {e['cosine']:.4f} | "
                         f"{e['spearman']:.4f} | {e['neighbours_at_1']:.3f} | {e['neighbours_at_10']:.3f} | "
                         f"{amazon} | {spam} |")
    lines += ["", "FFF-v2 students carry one more tree of constant neurons for the dense output bias "
              "(`to_module(output_bias='tree')`), so their active count includes depth + 1 more neurons.", "",
              "## Sentence-embedding speed (float32, 2 CPU cores, one process, side by side)", "",
              "| batch x tokens | model | ms per call | sentences/s | vs teacher |", "|---|---|---|---|---|"]
    for row in report["speed"]["rows"]:
        lines.append(f"| {row['batch']} x {row['seq']} | {row['model']} | {row['ms']:.2f} | "
                     f"{row['sentences_per_s']:.1f} | {row['speedup']:.2f}x |")
    lines += ["", "The feedforward's share of the teacher's time is 1 - (teacher without feedforward) / teacher; "
              "a student whose feedforward cost nothing would run at the `teacher without feedforward` speed.",
              ""]
    for row in report["speed"]["rows"]:
        if row["model"] == "teacher without feedforward":
            lines.append(f"- batch {row['batch']} x {row['seq']}: feedforward share {1 - 1 / row['speedup']:.0%}, "
                         f"ceiling {row['speedup']:.2f}x")
    return "\n".join(lines)


def figure(report: dict):
    plt = bench.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"fff_v1": "o", "fff_v2": "s", "dense": "^"}
    for name, r in report["runs"].items():
        kind = r["config"]["kind"]
        stages = list(r["stages"])
        axes[0].plot(stages, [r["stages"][s]["spearman"] for s in stages], marker=markers[kind], label=name)
        final = r["stages"][stages[-1]]
        axes[1].scatter(r["active_neurons"] / 1536, final["spearman"], marker=markers[kind], label=name)
    axes[0].axhline(0.95, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="stage", ylabel="Spearman vs teacher (held out)", title="quality by stage")
    axes[1].axhline(0.95, color="grey", ls="--", lw=0.8)
    axes[1].set(xlabel="active fraction of the 1536 neurons", ylabel="Spearman after the last stage",
                title="quality by active fraction")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/distill_minilm"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--name", default="distill_minilm_cpu")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--configs", type=int, default=len(GRID), help="run the first N of the grid")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="of those, only the runs named (e.g. fff_v2-10pct dense-10pct)")
    parser.add_argument("--train-sentences", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--sentences", type=Path, default=None,
                        help="a file of one sentence a line (its last --held-out lines held out) instead of the "
                             "offline corpus")
    parser.add_argument("--convert-only", action="store_true",
                        help="stop after the conversions (e.g. on a GPU machine without the probe data)")
    # Fewer layer-wise steps than the library's default: the grid runs on 2 CPU cores.
    add_config_arguments(parser, layer_steps=600)
    parser.add_argument("--probe-train", type=int, default=1500)
    parser.add_argument("--probe-test", type=int, default=1000)
    parser.add_argument("--probe-length", type=int, default=128)
    parser.add_argument("--speed-rounds", type=int, default=10)
    parser.add_argument("--speed-budget-s", type=float, default=3.0)
    parser.add_argument("--speed-only", action="store_true",
                        help="only time random-weight students of the teacher's shape (e.g. on a GPU without "
                             "the pretrained files); writes NAME_speed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of --speed-only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.speed_only:
        models = random_students(args.seed)
        if args.dtype == "bfloat16":
            from fffjax.models import cast_parameters
            models = {name: cast_parameters(m, jnp.bfloat16) for name, m in models.items()}
        report = {**bench.provenance(__file__, argv), "dtype": args.dtype, "speed": speed_phase(args, models)}
        paths = bench.write_results(args.out, f"{args.name}_speed", report=report, markdown=speed_markdown(report))
        bench.log("wrote " + ", ".join(map(str, paths)))
        return
    teacher_path = args.teacher or default_teacher()
    teacher, tokenizer = from_pretrained(teacher_path)
    train, held = sample_sentences(args.train_sentences, args.held_out, args.seed, args.sentences)
    bench.log(f"{len(train)} training and {len(held)} held-out sentences")
    reports = convert_phase(args, teacher, tokenizer, train, held)
    if args.convert_only:
        return
    models = {"teacher": teacher}
    for name in reports:
        models[name] = load_bert_checkpoint(args.runs / name / "student")
    probes = probe_phase(args, models, tokenizer)
    speed = speed_phase(args, {name: m for name, m in models.items()
                               if name == "teacher" or reports[name]["config"]["last_stage"] == "d"})
    report = {**bench.provenance(__file__, argv), "n_train": len(train), "n_held_out": len(held),
              "layer_tokens": args.layer_tokens, "probe_train": args.probe_train, "probe_test": args.probe_test,
              "probe_length": args.probe_length, "runs": reports, "probes": probes, "speed": speed,
              "seconds": time.perf_counter() - start}
    for r in report["runs"].values():
        for e in r["stages"].values():
            e.pop("loss_curves", None)
    paths = bench.write_results(args.out, args.name, report=report, markdown=markdown(report), figure=figure(report))
    bench.log("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
