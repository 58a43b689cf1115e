"""Reproduce the FFF paper's (arXiv 2308.14711) image experiments with honest baselines.

One command per table; each writes ``experiments/results/fff_paper_<table>_<dataset>.{md,json}``
(and plots where named)::

    python experiments/fff_paper.py grid --dataset mnist          # depth x leaf width, vs both FFs (+ 2 plots)
    python experiments/fff_paper.py hardening --dataset mnist     # hardening strength x region leak
    python experiments/fff_paper.py v2 --dataset mnist            # FFF-v2 trees vs FFs
    python experiments/fff_paper.py recipe --dataset mnist        # training recipes for one FFF shape
    python experiments/fff_paper.py plot --dataset mnist          # redraw the plots from the JSON
    python experiments/fff_paper.py v2 --dataset digits --seeds 1 --epochs 1 --hard-epochs 0 --trees 1x3 --tag smoke
                                                                  # smoke run: fff_paper_v2_smoke_digits.*

Every FFF-v1 row is compared with an FF (one ReLU hidden layer) of equal *training* width
(``2**d * l``, what the soft mixture computes) and of equal *inference* width (``d + l``, the
neurons on one hard path). Accuracies are of the hard (deployed) forward unless a column says
soft. ``--seeds N`` runs N seeds (vmapped) and reports mean and std. Data: MNIST and
Fashion-MNIST from the cache (``python -m fffjax.data.fetch vision``); ``digits`` needs nothing.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from fffjax import bench
from fffjax.data import vision
from fffjax.train import flat as C

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = ("grid", "hardening", "v2", "recipe")


# ---------------------------------------------------------------- running


def evaluate(spec, params, data, train_eval_n: int) -> dict:
    """Hard/soft test accuracy and hard train accuracy (on the first ``train_eval_n`` samples)."""
    xt, yt = data.x_train[:train_eval_n], data.y_train[:train_eval_n]
    hard = C.accuracy(spec, params, data.x_test, data.y_test, mode="hard")
    soft = C.accuracy(spec, params, data.x_test, data.y_test, mode="soft") if spec.kind == "fff" else hard
    return {"test_hard": hard, "test_soft": soft, "train_hard": C.accuracy(spec, params, xt, yt, mode="hard"),
            "gap_soft_minus_hard": soft - hard}


def run_spec(spec, config, data, seeds, train_eval_n, bar=None) -> dict:
    """Train ``spec`` for every seed; a row with per-seed metrics and their mean and std."""
    t0 = time.time()
    results = C.train_seeds(spec, config, data.x_train, data.y_train, seeds=tuple(seeds))
    per_seed = [evaluate(spec, r.params, data, train_eval_n) for r in results]
    row = {
        "model": spec.label, "kind": spec.kind, "depth": spec.depth, "width": spec.width,
        "n_trees": spec.n_trees, "region_leak": spec.region_leak,
        "hardening": config.hardening if spec.kind == "fff" else None,
        "hard_epochs": config.hard_epochs if spec.kind == "fff" else 0,
        "training_width": C.training_width(spec),
        "inference_width": {"fff": spec.depth + spec.width, "ff": spec.width,
                            "fff2": spec.n_trees * (spec.depth + 1)}[spec.kind],
        "inference_flops": C.inference_flops(spec), "params": C.n_params(results[0].params),
        "seeds": list(seeds), "seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean([r.history[-1]["loss"] for r in results])),
    }
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed])
        row[key] = values.tolist()
        row[key + "_mean"], row[key + "_std"] = float(values.mean()), float(values.std())
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"{spec.label}: {100 * row['test_hard_mean']:.2f}%")
    return row


def base_config(args) -> C.FlatTrainConfig:
    return C.FlatTrainConfig(epochs=args.epochs, hard_epochs=args.hard_epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, schedule=args.schedule, hardening=args.hardening,
                         hardening_schedule=args.hardening_schedule, seed=0)


def load_data(args):
    data = vision.load(args.dataset)
    if args.n_train or args.n_test:
        data = vision.subsample(data, n_train=args.n_train or None, n_test=args.n_test or None, seed=0)
    return data


def run_jobs(jobs, data, args, desc):
    """``jobs``: list of (spec, config); FF duplicates (same width and recipe) run once.

    Finished rows are appended to ``results/.partial_<dataset>.jsonl`` (keyed by the job and the
    data/seed settings), so an interrupted table resumes where it stopped.
    """
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(jobs))
    partial = RESULTS / f".partial_{args.dataset}.jsonl"
    settings = (args.seeds, args.n_train, args.n_test, args.train_eval_n)
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["row"]
    rows = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(unique), desc=desc) as bar:
        for spec, config in unique:
            key = repr((spec, config, settings))
            if key in done:
                rows[(spec, config)] = done[key]
                bar.update(1)
                continue
            rows[(spec, config)] = run_spec(spec, config, data, range(args.seeds), args.train_eval_n, bar)
            with partial.open("a") as f:
                f.write(json.dumps({"key": key, "row": rows[(spec, config)]}) + "\n")
    return rows


# ---------------------------------------------------------------- tables


def fff_jobs(args, data, depths, widths, hardenings, leaks):
    """FFF-v1 jobs and their two FF baselines (FF jobs use the recipe without FFF-only parts)."""
    d_in, n_cls = data.x_train.shape[1], data.n_classes
    cfg = base_config(args)
    ff_cfg = dataclasses.replace(cfg, hardening=0.0, hard_epochs=0, hardening_schedule="constant")
    triples = []
    for d in depths:
        for w in widths:
            for h in hardenings:
                for leak in leaks:
                    fff = (C.ModelSpec("fff", d_in, n_cls, depth=d, width=w, region_leak=leak),
                           dataclasses.replace(cfg, hardening=h))
                    train_ff = (C.ModelSpec("ff", d_in, n_cls, width=2 ** d * w), ff_cfg)
                    infer_ff = (C.ModelSpec("ff", d_in, n_cls, width=d + w), ff_cfg)
                    triples.append((fff, train_ff, infer_ff))
    return triples


def compare_rows(triples, rows):
    out = []
    for fff, train_ff, infer_ff in triples:
        r, a, b = rows[fff], rows[train_ff], rows[infer_ff]
        out.append({**r, "ff_train_width_test": a["test_hard_mean"], "ff_train_width_test_std": a["test_hard_std"],
                    "ff_infer_width_test": b["test_hard_mean"], "ff_infer_width_test_std": b["test_hard_std"],
                    "ff_train_width_flops": a["inference_flops"], "ff_infer_width_flops": b["inference_flops"],
                    "minus_ff_train_width": r["test_hard_mean"] - a["test_hard_mean"],
                    "minus_ff_infer_width": r["test_hard_mean"] - b["test_hard_mean"]})
    return out


def pct(mean, std=None):
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def fff_markdown(rows):
    head = ("| FFF | h | leak | train hard | test hard | test soft | soft−hard | FLOPs | "
            "FF 2^d·l (test) | Δ | FF d+l (test) | Δ |\n|" + "---|" * 12 + "\n")
    lines = []
    for r in rows:
        lines.append(
            f"| d{r['depth']} l{r['width']} | {r['hardening']:g} | {r['region_leak']:g} | "
            f"{pct(r['train_hard_mean'], r['train_hard_std'])} | {pct(r['test_hard_mean'], r['test_hard_std'])} | "
            f"{pct(r['test_soft_mean'])} | {100 * r['gap_soft_minus_hard_mean']:+.2f} | {r['inference_flops']:,} | "
            f"{pct(r['ff_train_width_test'], r['ff_train_width_test_std'])} (w{r['training_width']}) | "
            f"{100 * r['minus_ff_train_width']:+.2f} | "
            f"{pct(r['ff_infer_width_test'], r['ff_infer_width_test_std'])} (w{r['inference_width']}) | "
            f"{100 * r['minus_ff_infer_width']:+.2f} |")
    return head + "\n".join(lines) + "\n"


def plain_markdown(rows):
    head = ("| model | recipe | train width | inference width | FLOPs | train hard | test hard | test soft |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model']} | {r.get('recipe', '')} | {r['training_width']} | {r['inference_width']} | "
             f"{r['inference_flops']:,} | {pct(r['train_hard_mean'], r['train_hard_std'])} | "
             f"{pct(r['test_hard_mean'], r['test_hard_std'])} | {pct(r['test_soft_mean'])} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def summary(rows) -> str:
    """Headline lines: FFF vs both FFs over all rows of a comparison table."""
    if not rows or "minus_ff_train_width" not in rows[0]:
        return ""
    beats = sum(r["minus_ff_infer_width"] > 0 for r in rows)
    within = sum(r["minus_ff_train_width"] > -0.01 for r in rows)
    best = max(rows, key=lambda r: r["minus_ff_train_width"])
    return (f"- FFF (hard) beats the FF of equal inference width in {beats}/{len(rows)} configurations.\n"
            f"- FFF (hard) is within 1 point of the FF of equal training width in {within}/{len(rows)}; "
            f"closest: d{best['depth']} l{best['width']} h{best['hardening']:g} leak{best['region_leak']:g} "
            f"at {100 * best['minus_ff_train_width']:+.2f} points "
            f"({pct(best['test_hard_mean'])} vs {pct(best['ff_train_width_test'])}).\n")


def write(table, args, rows, markdown, extra=""):
    """``fff_paper_<table>[_<tag>]_<dataset>.{json,md}``: the rows with the command, machine and recipe."""
    name = f"fff_paper_{table}{'_' + args.tag if args.tag else ''}_{args.dataset}"
    cfg = dataclasses.asdict(base_config(args))
    meta = {"table": table, "dataset": args.dataset, "config": cfg, "seeds": args.seeds,
            "n_train": args.n_train or "all", "n_test": args.n_test or "all", "train_eval_n": args.train_eval_n,
            "full_grid_command": full_command(table, args.dataset)}
    report = {**bench.provenance(__file__, args.argv), "meta": meta, "rows": rows}
    text = (f"# FFF paper: {table} table, {args.dataset}\n\n"
            f"{bench.provenance_line(report)} Full grid: `{meta['full_grid_command']}`.\n\n"
            f"Recipe: {cfg['epochs']} epochs (FFF: last {cfg['hard_epochs']} with hard decisions, leaves only), "
            f"batch {cfg['batch_size']}, AdamW lr {cfg['learning_rate']:g} {cfg['schedule']}, "
            f"hardening {cfg['hardening_schedule']}; {args.seeds} seeds (mean ± std); train data "
            f"{meta['n_train']}, test {meta['n_test']}; train accuracy on the first {args.train_eval_n} "
            f"training samples. Accuracies in %, hard (deployed) forward unless marked soft; FLOPs per sample "
            f"of the hard forward.\n\n" + extra + markdown)
    bench.write_results(RESULTS, name, report=report, markdown=text)
    print(text)


def full_command(table, dataset):
    extra = {"grid": " --depths 1 2 3 4 5 6 --widths 1 2 4 8 16 32",
             "hardening": " --depths 1 2 3 4 5 6 --widths 16 --hardening-schedule constant",
             "v2": "", "recipe": " --shapes 3x16 1x64 2x32"}[table]
    return f"python experiments/fff_paper.py {table} --dataset {dataset} --seeds 5 --epochs 20{extra}"


def table_grid(args):
    data = load_data(args)
    triples = fff_jobs(args, data, args.depths, args.widths, [args.hardening], [args.leak])
    rows = run_jobs([j for t in triples for j in t], data, args, f"grid {args.dataset}")
    out = compare_rows(triples, rows)
    write("grid", args, out, fff_markdown(out), summary(out) + "\n")
    plot(args)


def table_hardening(args):
    data = load_data(args)
    triples = fff_jobs(args, data, args.depths, args.widths, args.hardenings, args.leaks)
    rows = run_jobs([j for t in triples for j in t], data, args, f"hardening {args.dataset}")
    out = compare_rows(triples, rows)
    write("hardening", args, out, fff_markdown(out), summary(out) + "\n")


def table_v2(args):
    data = load_data(args)
    d_in, n_cls = data.x_train.shape[1], data.n_classes
    cfg = dataclasses.replace(base_config(args), hardening=0.0, hard_epochs=0)
    jobs = []
    for shape in args.trees:
        k, d = (int(v) for v in shape.split("x"))
        spec = C.ModelSpec("fff2", d_in, n_cls, depth=d, n_trees=k)
        jobs += [(spec, cfg), (C.ModelSpec("ff", d_in, n_cls, width=k * (d + 1)), cfg),
                 (C.ModelSpec("ff", d_in, n_cls, width=C.training_width(spec)), cfg)]
    rows = run_jobs(jobs, data, args, f"v2 {args.dataset}")
    out = [dict(rows[j], recipe="") for j in dict.fromkeys(jobs)]
    write("v2", args, out, plain_markdown(out),
          "FFF-v2 (K trees x depth D: K(D+1) GELU neurons per sample) against FFs of its inference "
          "width K(D+1) and of its node count K(2^(D+1)-1).\n\n")


RECIPES = {
    # name: TrainConfig overrides (the package notebook's recipe first)
    "package notebook (Adam 1e-3, 5 ep, h 0.1)": dict(epochs=5, hard_epochs=0, learning_rate=1e-3,
                                                      schedule="constant", hardening=0.1,
                                                      hardening_schedule="constant"),
    "+ cosine lr 3e-3": dict(hard_epochs=0, learning_rate=3e-3, schedule="cosine", hardening=0.1,
                             hardening_schedule="constant"),
    "+ hard epochs": dict(learning_rate=3e-3, schedule="cosine", hardening=0.1, hardening_schedule="constant"),
    "+ hard epochs, h 1 ramp": dict(learning_rate=3e-3, schedule="cosine", hardening=1.0, hardening_schedule="ramp"),
    "+ hard epochs, h 0": dict(learning_rate=3e-3, schedule="cosine", hardening=0.0, hardening_schedule="constant"),
}


def table_recipe(args):
    data = load_data(args)
    d_in, n_cls = data.x_train.shape[1], data.n_classes
    jobs, names = [], []
    for d, w in [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.shapes]:
        for name, override in RECIPES.items():
            cfg = dataclasses.replace(base_config(args), **override)
            ff_cfg = dataclasses.replace(cfg, hardening=0.0, hard_epochs=0)
            for spec, c in [(C.ModelSpec("fff", d_in, n_cls, depth=d, width=w, region_leak=leak), cfg)
                            for leak in args.leaks] + [
                    (C.ModelSpec("ff", d_in, n_cls, width=2 ** d * w), ff_cfg),
                    (C.ModelSpec("ff", d_in, n_cls, width=d + w), ff_cfg)]:
                jobs.append((spec, c))
                names.append(name)
    rows = run_jobs(jobs, data, args, f"recipe {args.dataset}")
    seen, out = set(), []
    for job, name in zip(jobs, names):
        if job not in seen:
            seen.add(job)
            out.append(dict(rows[job], recipe=f"{name}; {job[1].epochs} ep" + (
                f", {job[1].hard_epochs} hard" if job[0].kind == "fff" else "")))
    write("recipe", args, out, plain_markdown(out),
          "Training recipes for one FFF shape and its two FF baselines (the same recipe, "
          "FFF-only parts dropped).\n\n")


# ---------------------------------------------------------------- plots


def plot(args):
    """Accuracy vs inference FLOPs and soft-hard gap vs depth, from the grid JSON."""
    plt = bench.pyplot()
    path = RESULTS / f"fff_paper_grid_{args.dataset}.json"
    rows = json.loads(path.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.errorbar([r["inference_flops"] for r in rows], [100 * r["test_hard_mean"] for r in rows],
                yerr=[100 * r["test_hard_std"] for r in rows], fmt="o", label="FFF-v1 (hard)", color="tab:red")
    ff = {}
    for r in rows:
        ff[r["ff_train_width_flops"]] = r["ff_train_width_test"]
        ff[r["ff_infer_width_flops"]] = r["ff_infer_width_test"]
    xs = sorted(ff)
    ax.plot(xs, [100 * ff[x] for x in xs], "s-", label="FF (one hidden layer)", color="tab:blue", ms=4)
    v2_path = RESULTS / f"fff_paper_v2_{args.dataset}.json"
    if v2_path.exists():
        v2 = [r for r in json.loads(v2_path.read_text())["rows"] if r["kind"] == "fff2"]
        ax.plot([r["inference_flops"] for r in v2], [100 * r["test_hard_mean"] for r in v2], "^",
                label="FFF-v2", color="tab:green")
    ax.set(xscale="log", xlabel="inference FLOPs per sample", ylabel="test accuracy (%)",
           title=f"{args.dataset}: accuracy vs inference cost")
    ax.set_ylim(max(0, min(100 * r["test_hard_mean"] for r in rows) - 5), 100)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    bench.write_results(RESULTS, f"fff_paper_accuracy_vs_flops_{args.dataset}", figure=fig, dpi=110)

    fig, ax = plt.subplots(figsize=(7, 5))
    for w in sorted({r["width"] for r in rows}):
        sub = sorted((r for r in rows if r["width"] == w), key=lambda r: r["depth"])
        ax.errorbar([r["depth"] for r in sub], [100 * r["gap_soft_minus_hard_mean"] for r in sub],
                    yerr=[100 * r["gap_soft_minus_hard_std"] for r in sub], marker="o", label=f"leaf {w}", capsize=2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="depth", ylabel="test soft − test hard (points)", title=f"{args.dataset}: soft-to-hard gap")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    bench.write_results(RESULTS, f"fff_paper_gap_vs_depth_{args.dataset}", figure=fig, dpi=110)


# ---------------------------------------------------------------- CLI


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("table", choices=[*TABLES, "plot"])
    p.add_argument("--dataset", default="mnist", choices=vision.DATASET_NAMES)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hard-epochs", type=int, default=2, help="final FFF epochs with hard decisions")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--schedule", default="cosine", choices=C.SCHEDULES)
    p.add_argument("--hardening", type=float, default=1.0, help="grid's hardening strength")
    p.add_argument("--hardening-schedule", default="ramp", choices=C.HARDENING_SCHEDULES)
    p.add_argument("--leak", type=float, default=0.1, help="grid's region leak")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--widths", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--hardenings", type=float, nargs="+", default=[0.0, 0.1, 1.0, 3.0])
    p.add_argument("--leaks", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--trees", nargs="+", default=["1x3", "1x6", "4x2", "4x4", "16x2", "16x3"],
                   help="FFF-v2 shapes KxD")
    p.add_argument("--shapes", nargs="+", default=["3x16"], help="recipe table's FFF shapes DEPTHxLEAF")
    p.add_argument("--n-train", type=int, default=0, help="stratified training subset (0 = all)")
    p.add_argument("--n-test", type=int, default=0, help="stratified test subset (0 = all)")
    p.add_argument("--tag", default="", help="suffix of the table name in the output files (variant runs)")
    p.add_argument("--train-eval-n", type=int, default=10000, help="training samples scored for train accuracy")
    args = p.parse_args(argv)
    args.argv = argv   # the arguments as given (None: sys.argv[1:]), for the command in the results
    return args


def main(argv=None):
    args = parse(argv)
    {"grid": table_grid, "hardening": table_hardening, "v2": table_v2, "recipe": table_recipe,
     "plot": plot}[args.table](args)


if __name__ == "__main__":
    main()
