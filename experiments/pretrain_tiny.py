"""Tiny FFF crammed BERT vs its dense twin on the CPU: MLM pretraining, then fine-tuning.

Pretraining at equal steps, then fine-tuning on Amazon fine-food reviews and SpamAssassin.

    bash experiments/fetch_text.sh                      # once: corpus and labelled sets
    python experiments/pretrain_tiny.py --scratch       # runs everything (skips finished runs)
    python experiments/pretrain_tiny.py --report-only   # rebuilds the plot and the table

Each run is an ordinary `fffjax pretrain` / `fffjax finetune` command (printed before it starts),
with its folder under `runs/bert_tiny/`. The report goes to `experiments/results/bert_tiny_cpu/`:
`mlm_loss.png` (train and held-out MLM loss of both models), `results.md` and `results.json`
(final MLM losses, fine-tune test accuracies, FFF/dense accuracy ratio, wall time), and each run's
`metrics.jsonl`.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fffjax import bench

ROOT = Path(__file__).resolve().parents[1]   # the repository: runs/ lives there
RUNS = ROOT / "runs" / "bert_tiny"
RESULTS = Path(__file__).resolve().parent / "results" / "bert_tiny_cpu"
CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"fff": "pretrain_tiny.json", "dense": "pretrain_tiny_dense.json"}
FINETUNE = {"fff": "finetune_tiny.json", "dense": "finetune_tiny_dense.json"}
TASKS = ("amazon", "spam")


def command(args: list[str], log: Path) -> float:
    """Runs `fffjax ...` with output to `log`; returns wall seconds."""
    cmd = [sys.executable, "-m", "fffjax.cli", *args, "--no-progress"]
    print("$ fffjax " + " ".join(args), flush=True)
    began = time.time()
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): see {log}")
    return time.time() - began


def pretrain(name: str) -> float:
    out = RUNS / f"pretrain-{name}"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text()).get("wall_s", float("nan"))
    out.mkdir(parents=True, exist_ok=True)
    seconds = command(["pretrain", "--config", str(CONFIGS / MODELS[name]), "--out", str(out)], out / "log.txt")
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "wall_s": seconds}, indent=2))
    return seconds


def finetune(name: str, task: str, *, scratch: bool = False) -> float:
    """Fine-tunes the pretrained encoder, or (`scratch`) the same architecture from random init."""
    out = RUNS / f"{'scratch' if scratch else 'finetune'}-{name}-{task}"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text()).get("wall_s", float("nan"))
    out.mkdir(parents=True, exist_ok=True)
    source = (["--tokenizer", str(RUNS / f"pretrain-{name}" / "tokenizer")] if scratch
              else ["--init", str(RUNS / f"pretrain-{name}")])
    seconds = command(["finetune", "--config", str(CONFIGS / FINETUNE[name]), "--task", task, *source,
                       "--out", str(out)], out / "log.txt")
    result = json.loads((out / "result.json").read_text())
    (out / "result.json").write_text(json.dumps({**result, "wall_s": seconds}, indent=2))
    return seconds


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(argv: list[str] | None = None) -> dict:
    """Collects the runs' metrics and results into ``experiments/results/bert_tiny_cpu/``."""
    from fffjax.train.metrics import plot_losses

    RESULTS.mkdir(parents=True, exist_ok=True)
    curves, table = {}, {"pretrain": {}, "finetune": {}, "scratch": {}}
    for name in MODELS:
        out = RUNS / f"pretrain-{name}"
        records = read_jsonl(out / "metrics.jsonl")
        shutil.copyfile(out / "metrics.jsonl", RESULTS / f"pretrain_{name}_metrics.jsonl")
        curves[f"{name} train"] = ([r["step"] for r in records], [r["loss"] for r in records])
        evals = [r for r in records if "eval_loss" in r]
        curves[f"{name} held-out"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
        summary = json.loads((out / "summary.json").read_text())
        table["pretrain"][name] = {
            "steps": records[-1]["step"], "final_train_loss": records[-1]["loss"],
            "held_out_loss": evals[-1]["eval_loss"], "held_out_accuracy": evals[-1]["eval_accuracy"],
            "median_step_s": sorted(r["seconds"] for r in records)[len(records) // 2],
            "wall_s": summary.get("wall_s"),
        }
        for task in TASKS:
            for kind in ("finetune", "scratch"):
                ft = RUNS / f"{kind}-{name}-{task}"
                if (ft / "result.json").exists():
                    result = json.loads((ft / "result.json").read_text())
                    shutil.copyfile(ft / "metrics.jsonl", RESULTS / f"{kind}_{name}_{task}_metrics.jsonl")
                    table[kind if kind == "finetune" else "scratch"].setdefault(task, {})[name] = result
    plot_losses(curves, RESULTS / "mlm_loss.png", title="tiny crammed BERT, MLM loss (CPU, equal steps)",
                ylabel="MLM cross-entropy", smooth=25)
    for _task, by_model in table["finetune"].items():
        if "fff" in by_model and "dense" in by_model:
            by_model["fff_over_dense"] = by_model["fff"]["test_accuracy"] / by_model["dense"]["test_accuracy"]
    head = bench.provenance(__file__, argv)
    lines = ["# tiny FFF vs tiny-dense on the CPU", "",
             "Commands: `bash experiments/fetch_text.sh && python experiments/pretrain_tiny.py` "
             "(each run is a `fffjax pretrain` / `fffjax finetune` command printed by the script; configs in "
             "`experiments/configs/`). This report: " + bench.provenance_line(head), "",
             "## MLM pretraining (equal steps, batch 32 x 128 tokens, prose corpus)", "",
             "| model | steps | final train loss | held-out loss | held-out accuracy | median s/step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in table["pretrain"].items():
        lines.append(f"| {name} | {row['steps']} | {row['final_train_loss']:.3f} | {row['held_out_loss']:.3f} | "
                     f"{row['held_out_accuracy']:.3f} | {row['median_step_s']:.3f} | "
                     f"{row['wall_s'] or float('nan'):.0f} |")
    lines += ["", "## Fine-tuning (test accuracy, fixed splits)", "",
              "| task | n test | majority class | FFF | dense | FFF / dense | FFF from scratch | dense from scratch |",
              "|---|---|---|---|---|---|---|---|"]
    for task, by_model in table["finetune"].items():
        if "fff" in by_model and "dense" in by_model:
            fff, dense = by_model["fff"], by_model["dense"]
            scratch = table["scratch"].get(task, {})
            cells = [f"{scratch[n]['test_accuracy']:.3f}" if n in scratch else "-" for n in ("fff", "dense")]
            lines.append(f"| {task} | {fff['n_test']} | {fff['majority_baseline']:.3f} | {fff['test_accuracy']:.3f} | "
                         f"{dense['test_accuracy']:.3f} | {by_model['fff_over_dense']:.3f} | {cells[0]} | {cells[1]} |")
    bench.write_results(RESULTS, "results", report={**head, **table}, markdown="\n".join(lines))
    print("\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune from random init (baseline)")
    args = parser.parse_args(argv)
    if not args.report_only:
        RUNS.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(pretrain, MODELS))
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda nt: finetune(*nt), [(n, t) for t in TASKS for n in MODELS]))
        if args.scratch:
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(lambda nt: finetune(*nt, scratch=True), [(n, t) for t in TASKS for n in MODELS]))
    report(argv)


if __name__ == "__main__":
    main()
