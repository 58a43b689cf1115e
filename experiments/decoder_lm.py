"""FFF in a causal decoder against every baseline at equal training tokens: perplexity, dead nodes, samples.

Measures the validation perplexity and its curve, the dead nodes and node-visit entropy per tree
level, and samples text of each variant.

Three phases, each resumable (a finished run is skipped)::

    python experiments/decoder_lm.py train --runs runs/decoder_lm --steps 1500 --seeds 0 1 2
    python experiments/decoder_lm.py analyse --runs runs/decoder_lm
    python experiments/decoder_lm.py report --runs runs/decoder_lm [more run folders] --out experiments/results

**train** runs ``fffjax train-lm`` once per variant and seed (``--variants``: ``SIZE-FFN`` names of
`fffjax.models.decoder`, plus any ``SIZE-fff-KxD`` / ``SIZE-narrow-KxD`` shape; an FFF variant with the
suffix ``-lb`` trains with the FFF-v2 load-balancing term at coefficient ``LOAD_BALANCE``, ``-lbC`` at
coefficient ``C``: `fffjax.models.decoder.DecoderConfig.load_balance`), ``--parallel`` runs at
a time as separate processes on one device (a small model leaves a GPU mostly idle between its
kernels; ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` lets them share its memory, and a persistent
compilation cache in the runs folder compiles each shape once). Every run sees the same batches of
the same rows for a seed (the data order depends on the seed only), so every variant trains on the
same tokens; attention, embeddings and norms are the same in every variant.

**analyse** loads each run's last checkpoint (float32) and, for FFF-v2 variants, routes
``--analyse-tokens`` held-out tokens through every layer's trees
(:func:`fffjax.regions.v2_node_visits`): the share of nodes no token reaches at each level and the
entropy of the tokens' spread over a level's nodes (:func:`fffjax.regions.v2_tree_usage`). It also
writes continuations of a few prompts for the first seed of each variant, sampled (temperature 0.8,
top-p 0.95, seed 0: greedy decoding of models this small mostly repeats one token).

**report** gathers ``summary.json``, ``metrics.jsonl`` and ``analysis.json`` of every run into
``decoder_lm.{json,md,png}``: the perplexity table (mean and spread over seeds, ratio to the dense
twin and to attention only), validation curves, dead-node fractions per level, and the samples.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fffjax import bench
from fffjax.data import corpus
from fffjax.models.decoder import DECODER_CONFIGS, DecoderConfig

SMALL_VARIANTS = ("small-dense", "small-none", "small-narrow-1x11", "small-narrow-4x9", "small-narrow-16x7",
                  "small-fff-1x11", "small-fff-4x9", "small-fff-16x7")
PROMPTS = ("and the lord said unto", "the whale", "mr. speaker, the state of the union", "it is a truth")
LOAD_BALANCE = 0.01   # coefficient of the load-balancing term of the "-lb" variants
LB_SUFFIX = "-lb"


def variant_config(name: str) -> DecoderConfig:
    """The decoder of a variant name: a preset, or ``SIZE-fff-KxD`` / ``SIZE-narrow-KxD`` of any shape;
    an FFF variant's name ending ``-lb`` (coefficient ``LOAD_BALANCE``) or ``-lbC`` (coefficient ``C``)
    adds the load-balancing term."""
    base, suffix, coefficient = name.rpartition(LB_SUFFIX)
    if suffix and base and (not coefficient or coefficient.replace(".", "", 1).isdigit()):
        config = variant_config(base)
        if config.ffn != "fff":
            raise ValueError(f"variant {name!r}: the load-balancing suffix {LB_SUFFIX!r} needs an FFF variant")
        return dataclasses.replace(config, load_balance=float(coefficient) if coefficient else LOAD_BALANCE)
    if name in DECODER_CONFIGS:
        return DECODER_CONFIGS[name]
    size, _, rest = name.partition("-")
    ffn, _, shape = rest.partition("-")
    if f"{size}-dense" not in DECODER_CONFIGS or ffn not in ("fff", "narrow"):
        raise ValueError(f"variant {name!r}: expected a preset {sorted(DECODER_CONFIGS)} or SIZE-fff-KxD / "
                         "SIZE-narrow-KxD")
    shape_fields = bench.parse_fields(shape, ("fff_trees", "fff_depth"))
    return dataclasses.replace(DECODER_CONFIGS[f"{size}-dense"], ffn=ffn, **shape_fields)


def run_dir(runs: Path, variant: str, seed: int) -> Path:
    return runs / variant / f"seed{seed}"


def _finished(folder: Path, steps: int) -> bool:
    summary = folder / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == steps


# ------------------------------------------------------------------------------------------------ train


def _train_one(args, variant: str, seed: int, env: dict) -> dict:
    folder = run_dir(args.runs, variant, seed)
    if _finished(folder, args.steps):
        return {"variant": variant, "seed": seed, "skipped": True}
    folder.mkdir(parents=True, exist_ok=True)
    run_json = folder / "run.json"
    config = variant_config(variant)
    data = {"sources": list(args.sources), "seq_length": config.max_seq_length, "holdout": args.holdout,
            "eval_batches": args.eval_batches}
    run_json.write_text(json.dumps({"model": config.to_dict(), "data": data}, indent=1))
    command = [sys.executable, "-m", "fffjax.cli", "train-lm", "--config", str(run_json), "--seed", str(seed),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--eval-every", str(args.eval_every), "--save-every", str(args.steps), "--keep", "1",
               "--out", str(folder), "--cache", str(args.cache), "--no-progress"]
    command += ["--bf16"] if args.bf16 else []
    start = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {status}); see {folder / 'train.log'}")
    summary = json.loads((folder / "summary.json").read_text())
    return {"variant": variant, "seed": seed, "seconds": seconds, "eval_perplexity": summary.get("eval_perplexity")}


def train(args) -> None:
    args.runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "JAX_COMPILATION_CACHE_DIR": str((args.runs / ".jax_cache").absolute()),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for variant in args.variants:
        variant_config(variant)   # refuse a bad name before anything runs
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    sweep = {**bench.provenance(__file__), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "bf16": args.bf16, "parallel": args.parallel, "variants": list(args.variants), "seeds": list(args.seeds)}
    record = args.runs / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record.write_text(json.dumps(sweep, indent=1, default=str))   # a sweep cut short keeps its record
    start = time.perf_counter()
    done = 0
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(_train_one, args, variant, seed, env) for variant, seed in jobs]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            done += 1
            ppl = result.get("eval_perplexity")
            bench.log(f"[{done}/{len(jobs)}] {result['variant']} seed {result['seed']}: "
                      + ("already done" if result.get("skipped") else
                         f"{result['seconds']:.0f} s, validation perplexity {ppl:.2f}"))
    sweep["wall_s"] = time.perf_counter() - start
    record.write_text(json.dumps(sweep, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- analyse


class _Tap:
    """Stands in for a layer's feedforward and keeps what it is given (eager calls only)."""

    def __init__(self, ffn, kept: list):
        self.ffn, self.kept = ffn, kept

    def __call__(self, x):
        self.kept.append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        return self.ffn(x)


def feedforward_inputs(model, batches) -> list[np.ndarray]:
    """Per layer, the ``(tokens, H)`` inputs of its feedforward over ``batches`` of ``input_ids``."""
    kept = [[] for _ in model.layers]
    ffns = [layer.ffn for layer in model.layers]
    try:
        for layer, store in zip(model.layers, kept):
            layer.ffn = _Tap(layer.ffn, store)
        for ids in batches:
            model(ids)
    finally:
        for layer, ffn in zip(model.layers, ffns):
            layer.ffn = ffn
    return [np.concatenate(parts) for parts in kept]


def analyse_one(folder: Path, *, cache: Path, tokens: int, samples: bool) -> dict:
    from fffjax import regions
    from fffjax.data.tokenizer import Tokenizer
    from fffjax.generate import generate_text, load_causal_lm
    from fffjax.train.lm import prepare_lm_data

    model = load_causal_lm(folder)
    config = model.config
    result: dict = {"variant": folder.parent.name, "seed": int(folder.name.removeprefix("seed"))}
    if config.ffn == "fff":
        data = json.loads((folder / "run.json").read_text())["data"]
        _, _, held = prepare_lm_data(cache, data["sources"], vocab_size=config.vocab_size,
                                     seq_length=data["seq_length"], holdout=data["holdout"])
        rows = held[: max(1, tokens // held.shape[1])]
        batches = [rows[i: i + 32] for i in range(0, len(rows), 32)]
        layers = []
        for layer, x in zip(model.layers, feedforward_inputs(model, batches)):
            ffn = layer.ffn
            visits = regions.v2_node_visits(x, ffn.w_in[...], ffn.b_in[...], depth=ffn.depth, n_trees=ffn.n_trees)
            usage = regions.v2_tree_usage(visits, depth=ffn.depth, n_trees=ffn.n_trees)
            layers.append({"dead_fraction": usage.dead_fraction.tolist(),
                           "visit_entropy": usage.visit_entropy.tolist(), "tokens": usage.tokens})
        result["layers"] = layers
    if samples:
        tokenizer = Tokenizer.from_pretrained(folder / "tokenizer")
        texts = generate_text(model, tokenizer, list(PROMPTS), max_new_tokens=40, temperature=0.8, top_p=0.95, seed=0)
        result["samples"] = dict(zip(PROMPTS, texts))
    (folder / "analysis.json").write_text(json.dumps(result, indent=1))
    return result


def _seed(folder: Path) -> int:
    return int(folder.name.removeprefix("seed"))


def analyse(args) -> None:
    if args.run is not None:
        first = _seed(args.run) == min(_seed(p) for p in args.run.parent.glob("seed*"))
        analyse_one(args.run, cache=args.cache, tokens=args.analyse_tokens, samples=first)
        return
    folders = sorted(p.parent for p in args.runs.glob("*/seed*/summary.json")
                     if not (p.parent / "analysis.json").is_file())

    def one(folder: Path) -> float:
        start = time.perf_counter()
        command = [sys.executable, __file__, "analyse", "--run", str(folder), "--cache", str(args.cache),
                   "--analyse-tokens", str(args.analyse_tokens)]
        with open(folder / "analyse.log", "w") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                                    env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}).returncode
        if status != 0:
            raise RuntimeError(f"analysing {folder} failed (exit {status}); see {folder / 'analyse.log'}")
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for folder, seconds in zip(folders, pool.map(one, folders)):
            bench.log(f"analysed {folder} in {seconds:.0f} s")


# ----------------------------------------------------------------------------------------------- report


def _ffn_description(config: DecoderConfig) -> tuple[str, int, int]:
    """(shape, feedforward neurons per layer, neurons a token evaluates per layer)."""
    if config.ffn == "fff":
        nodes = config.fff_trees * (2 ** (config.fff_depth + 1) - 1)
        balance = f", load balance {config.load_balance:g}" if config.load_balance else ""
        return f"FFF-v2 {config.fff_trees}x{config.fff_depth}{balance}", nodes, config.active_neurons
    if config.ffn == "none":
        return "none (attention only)", 0, 0
    label = "dense twin" if config.ffn == "dense" else "narrow dense"
    return f"{label} {config.active_neurons}", config.active_neurons, config.active_neurons


def collect(runs_dirs: list[Path]) -> tuple[dict, list[dict]]:
    """Per variant: config and per-seed summary, validation curve and analysis; and each sweep's record."""
    from fffjax.train.metrics import read_metrics

    variants: dict[str, dict] = {}
    sweeps = []
    for runs in runs_dirs:
        sweeps += [json.loads(p.read_text()) for p in sorted(runs.glob("sweep-*.json"))]
        for summary_path in sorted(runs.glob("*/seed*/summary.json")):
            folder = summary_path.parent
            entry = variants.setdefault(folder.parent.name, {"seeds": {}})
            run = json.loads((folder / "run.json").read_text())
            entry["config"] = run["model"]
            entry["seq_length"] = run["data"]["seq_length"]
            summary = json.loads(summary_path.read_text())
            curve = [(r["step"], r["eval_loss"]) for r in read_metrics(folder / "metrics.jsonl") if "eval_loss" in r]
            analysis = json.loads((folder / "analysis.json").read_text()) if (folder / "analysis.json").is_file() \
                else {}
            entry["seeds"][_seed(folder)] = {"summary": summary, "curve": curve, "analysis": analysis}
    return variants, sweeps


def _mean_levels(entry: dict, key: str) -> list[float] | None:
    per_run = [np.mean([layer[key] for layer in seed["analysis"]["layers"]], axis=0)
               for seed in entry["seeds"].values() if seed["analysis"].get("layers")]
    return np.mean(per_run, axis=0).tolist() if per_run else None


def summarise(variants: dict) -> dict[str, dict]:
    rows = {}
    for name, entry in variants.items():
        config = DecoderConfig.from_dict(entry["config"])
        shape, neurons, active = _ffn_description(config)
        seeds = entry["seeds"]
        ppl = [s["summary"]["eval_perplexity"] for s in seeds.values() if "eval_perplexity" in s["summary"]]
        first = next(iter(seeds.values()))["summary"]
        train = first["train"]
        rows[name] = {
            "shape": shape, "ffn_neurons": neurons, "active_neurons": active, "seeds": sorted(seeds),
            "perplexity": ppl, "perplexity_mean": float(np.mean(ppl)) if ppl else None,
            "perplexity_sd": float(np.std(ppl, ddof=1)) if len(ppl) > 1 else 0.0,
            "steps": first["step"], "tokens": first["step"] * train["batch_size"] * entry["seq_length"],
            "epochs": first["epochs"], "dead_fraction": _mean_levels(entry, "dead_fraction"),
            "visit_entropy": _mean_levels(entry, "visit_entropy"),
            "depth": config.fff_depth if config.ffn == "fff" else None}
    return rows


def _ratio(value, base) -> str:
    return "–" if value is None or base is None else f"{100 * (value / base - 1):+.1f}%"


def markdown(rows: dict, variants: dict, sweeps: list[dict]) -> str:
    dense = next((r["perplexity_mean"] for n, r in rows.items() if n.endswith("-dense")), None)
    none = next((r["perplexity_mean"] for n, r in rows.items() if n.endswith("-none")), None)
    lines = ["# FFF in a causal decoder: validation perplexity at equal training tokens", ""]
    lines += [bench.provenance_line(s) + f" {len(s['variants'])} variants x seeds {s['seeds']}, {s['steps']} steps "
              f"of {s['batch_size']} rows, peak learning rate {s['lr']}, bf16 compute: {s['bf16']}, "
              f"{s['parallel']} runs at a time"
              + (f", {s['wall_s'] / 60:.1f} min." if "wall_s" in s else " (cut short: the runs it finished are shown).")
              for s in sweeps]
    some = next(iter(rows.values()))
    lines += ["", f"Every run: {some['steps']} steps, {some['tokens'] / 1e6:.1f}M training tokens "
              f"({some['epochs']:.2f} epochs of the corpus's training rows); validation: the held-out closing "
              "paragraphs of every source, next-token perplexity. Same attention, "
              "embeddings and norms in every variant; the data order depends on the seed only.", "",
              "| variant | feedforward | FFN neurons / layer | active / token | val. perplexity | seeds | vs dense "
              "| vs attention only | leaf level dead | leaf visit entropy (bits) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ppl = "–" if r["perplexity_mean"] is None else f"**{r['perplexity_mean']:.2f}** ± {r['perplexity_sd']:.2f}"
        dead = "–" if r["dead_fraction"] is None else f"{100 * r['dead_fraction'][-1]:.0f}%"
        entropy = "–" if r["visit_entropy"] is None else f"{r['visit_entropy'][-1]:.2f} of {r['depth']}"
        lines.append(f"| {name} | {r['shape']} | {r['ffn_neurons']:,} | {r['active_neurons']} | {ppl} | "
                     f"{len(r['seeds'])} | {_ratio(r['perplexity_mean'], dense)} | "
                     f"{_ratio(r['perplexity_mean'], none)} | {dead} | {entropy} |")
    lines += ["", "*± is the standard deviation over seeds. Dead: share of the leaf level's nodes (over trees and "
              "layers, mean over seeds) that no held-out token reaches. Visit entropy: of the tokens' spread "
              "over a tree's leaves, mean over trees, layers and seeds; D bits is a uniform spread."
              + (" \"load balance c\": trained on the cross-entropy plus c times the FFF-v2 load-balancing term "
                 "(`fffjax.v2.load_balance_loss`, summed over layers); its perplexity is the cross-entropy's alone."
                 if any("load balance" in r["shape"] for r in rows.values()) else "") + "*", ""]
    fff_rows = {n: r for n, r in rows.items() if r["dead_fraction"] is not None}
    if fff_rows:
        lines += ["## Dead nodes and visit entropy per level (mean over layers and seeds)", ""]
        for name, r in fff_rows.items():
            lines.append(f"- **{name}**: dead " + ", ".join(f"L{i} {100 * d:.0f}%"
                                                           for i, d in enumerate(r["dead_fraction"]))
                         + "; entropy (bits) " + ", ".join(f"L{i} {e:.2f}" for i, e in enumerate(r["visit_entropy"])))
        lines.append("")
    lines += ["## Samples (first seed; temperature 0.8, top-p 0.95, sampling seed 0; 40 new tokens at most)", ""]
    for name, entry in variants.items():
        samples = next((s["analysis"].get("samples") for s in entry["seeds"].values()
                        if s["analysis"].get("samples")), None)
        if samples:
            lines += [f"**{name}**", ""] + [f"- *{prompt}* {text.strip()}" for prompt, text in samples.items()] + [""]
    return "\n".join(lines)


def figure(rows: dict, variants: dict):
    plt = bench.pyplot()
    fig, (curves, levels) = plt.subplots(1, 2, figsize=(13, 5))
    for name, entry in variants.items():
        by_step: dict[int, list[float]] = {}
        for seed in entry["seeds"].values():
            for step, loss in seed["curve"]:
                by_step.setdefault(step, []).append(loss)
        steps = sorted(by_step)
        tokens_per_step = rows[name]["tokens"] / rows[name]["steps"]
        curves.plot([s * tokens_per_step / 1e6 for s in steps], [math.exp(np.mean(by_step[s])) for s in steps],
                    marker=".", label=name,
                    linestyle="--" if "narrow" in name else ":" if LB_SUFFIX in name else "-")
        r = rows[name]
        if r["dead_fraction"] is not None:
            levels.plot(range(len(r["dead_fraction"])), [100 * d for d in r["dead_fraction"]], marker="o", label=name)
    curves.set(xlabel="training tokens (M)", ylabel="validation perplexity (mean over seeds)", yscale="log",
               title="validation perplexity")
    curves.legend(fontsize=8)
    levels.set(xlabel="tree level", ylabel="dead nodes (%)", title="FFF-v2 nodes no held-out token reaches")
    if levels.lines:
        levels.legend(fontsize=8)
    fig.tight_layout()
    return fig


def report(args) -> None:
    variants, sweeps = collect(args.runs_dirs)
    if not variants:
        raise SystemExit(f"--runs: no finished run under {[str(p) for p in args.runs_dirs]}")
    order = {name.partition("-")[2]: i for i, name in enumerate(SMALL_VARIANTS)}   # the FFN, any size

    def place(name: str):   # a "-lb" variant right after its plain twin
        size, _, ffn = name.partition("-")
        return size, order.get(ffn.partition(LB_SUFFIX)[0], len(order)), name

    variants = dict(sorted(variants.items(), key=lambda kv: place(kv[0])))
    rows = summarise(variants)
    text = markdown(rows, variants, sweeps)
    written = bench.write_results(args.out, args.name, report={"sweeps": sweeps, "variants": rows},
                                  markdown=text, figure=figure(rows, variants))
    print(text)
    bench.log(f"wrote {[str(p) for p in written]}")


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    phases = parser.add_subparsers(dest="phase", required=True)
    for phase in ("train", "analyse"):
        sub = phases.add_parser(phase)
        sub.add_argument("--runs", type=Path, default=Path("runs/decoder_lm"), help="folder of the runs")
        sub.add_argument("--cache", type=Path, default=Path("data_cache/text"), help="text cache (corpus, lm/)")
        sub.add_argument("--parallel", type=int, default=4, help="runs at a time (separate processes)")
    train_parser, analyse_parser = phases.choices["train"], phases.choices["analyse"]
    train_parser.add_argument("--variants", nargs="+", default=list(SMALL_VARIANTS))
    train_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    train_parser.add_argument("--steps", type=int, default=1500)
    train_parser.add_argument("--batch-size", type=int, default=32)
    train_parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train_parser.add_argument("--eval-every", type=int, default=250)
    train_parser.add_argument("--sources", nargs="+", default=list(corpus.SOURCES), help="corpus sources")
    train_parser.add_argument("--eval-batches", type=int, default=None,
                              help="held-out batches per evaluation (default: every held-out row)")
    train_parser.add_argument("--holdout", type=float, default=0.01, help="closing share of each source held out")
    train_parser.add_argument("--float32", dest="bf16", action="store_false", help="float32 compute (default bf16)")
    analyse_parser.add_argument("--run", type=Path, default=None, help="analyse this one run folder, in-process")
    analyse_parser.add_argument("--analyse-tokens", type=int, default=65536,
                                help="held-out tokens routed through the trees")
    report_parser = phases.add_parser("report")
    report_parser.add_argument("--runs", dest="runs_dirs", type=Path, nargs="+", default=[Path("runs/decoder_lm")])
    report_parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    report_parser.add_argument("--name", default="decoder_lm")
    args = parser.parse_args(argv)
    {"train": train, "analyse": analyse, "report": report}[args.phase](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
