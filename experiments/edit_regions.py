"""Surgical editing: add a held-out class by fine-tuning only the FFF leaves it routes to.

    python experiments/edit_regions.py --dataset mnist            # table + plot under experiments/results/

Smoke run on the bundled digits (a minute)::

    python experiments/edit_regions.py --dataset digits --n-train 0 --seeds 1 --epochs 1 --edit-epochs 1 --out /tmp/e

1. Train an FFF-v1 and an FF (equal training width) on every class but ``--new-class``.
2. Fine-tune on the new class's training images alone (the hardest continual-learning setting:
   no replay), three ways: FFF, only the leaves the new class reaches (hard routing, nodes and
   all other leaves frozen); FFF, every parameter (soft then hard, as in training); FF, every
   parameter.
3. Report old-class test accuracy before/after (forgetting), new-class test accuracy after, and
   for the leaf edit how many leaves changed and the share of old-class test inputs they serve
   (an upper bound on what the edit can touch: every other old input keeps its exact output).
Writes ``experiments/results/editing_<dataset>.{md,json,png}``.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from fffjax import bench, regions
from fffjax.data import vision
from fffjax.train import flat as C

RESULTS = Path(__file__).resolve().parent / "results"


def leaf_method(min_share: float) -> str:
    return f"FFF leaves only (>{100 * min_share:g}% of new)"


def split_classes(data: vision.Split, new_class: int):
    """``(old, new)`` views of the data: masks over train and test."""
    return (data.y_train != new_class, data.y_test != new_class,
            data.y_train == new_class, data.y_test == new_class)


def masked_accuracy(spec, params, x, y, mask) -> float:
    return C.accuracy(spec, params, x[mask], y[mask]) if mask.any() else float("nan")


def run_seed(data, args, seed: int) -> list[dict]:
    """Base training and the three edits for one seed; one row per method."""
    old_tr, old_te, new_tr, new_te = split_classes(data, args.new_class)
    d_in, n_cls = data.x_train.shape[1], data.n_classes
    fff = C.ModelSpec("fff", d_in, n_cls, depth=args.depth, width=args.width, region_leak=args.leak)
    ff = C.ModelSpec("ff", d_in, n_cls, width=2 ** args.depth * args.width)
    base_cfg = C.FlatTrainConfig(epochs=args.epochs, hard_epochs=args.hard_epochs, learning_rate=args.lr,
                             batch_size=args.batch_size,
                             schedule="cosine", hardening=args.hardening, hardening_schedule="ramp", seed=seed)
    ff_cfg = dataclasses.replace(base_cfg, hardening=0.0, hard_epochs=0)
    fff_base = C.train(fff, base_cfg, data.x_train[old_tr], data.y_train[old_tr]).params
    ff_base = C.train(ff, ff_cfg, data.x_train[old_tr], data.y_train[old_tr]).params

    x_new, y_new = data.x_train[new_tr], data.y_train[new_tr]
    edit_cfg = C.FlatTrainConfig(epochs=args.edit_epochs, batch_size=args.edit_batch_size, learning_rate=args.edit_lr,
                             schedule="constant", seed=seed)
    old_leaves = regions.leaf_assignments(fff_base, data.x_test[old_te], depth=args.depth)
    edits = {}
    for share in args.min_shares:
        mask = regions.leaf_gradient_mask(fff_base, x_new, depth=args.depth, min_share=share)
        # All-hard epochs: routing frozen, only the masked leaves move.
        edits[leaf_method(share)] = (fff, fff_base, dataclasses.replace(edit_cfg, hard_epochs=args.edit_epochs), mask)
    edits["FFF full"] = (fff, fff_base, dataclasses.replace(edit_cfg, hard_epochs=min(1, args.edit_epochs - 1)), None)
    edits["FF full"] = (ff, ff_base, edit_cfg, None)
    rows = []
    for method, (spec, params, cfg, grad_mask) in edits.items():
        edited = np.flatnonzero(np.asarray(grad_mask["b2s"])[:, 0]) if grad_mask is not None else None
        exposed = float(np.isin(old_leaves, edited).mean()) if grad_mask is not None else None
        after = C.train(spec, cfg, x_new, y_new, params=params, grad_mask=grad_mask).params
        before_old = masked_accuracy(spec, params, data.x_test, data.y_test, old_te)
        after_old = masked_accuracy(spec, after, data.x_test, data.y_test, old_te)
        rows.append({
            "method": method, "seed": seed, "model": spec.label,
            "old_before": before_old, "old_after": after_old, "forgetting": before_old - after_old,
            "new_after": masked_accuracy(spec, after, data.x_test, data.y_test, new_te),
            "all_after": C.accuracy(spec, after, data.x_test, data.y_test),
            "edited_leaves": edited.tolist() if grad_mask is not None else None,
            "old_test_share_in_edited_leaves": exposed,
        })
    return rows


def aggregate(rows):
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method]
        agg = {"method": method, "model": sub[0]["model"]}
        for key in ("old_before", "old_after", "forgetting", "new_after", "all_after"):
            values = np.array([r[key] for r in sub])
            agg[key + "_mean"], agg[key + "_std"] = float(values.mean()), float(values.std())
        if sub[0]["edited_leaves"] is not None:
            agg["edited_leaves"] = float(np.mean([len(r["edited_leaves"]) for r in sub]))
            agg["old_test_share_in_edited_leaves"] = float(np.mean([r["old_test_share_in_edited_leaves"] for r in sub]))
        out.append(agg)
    return out


def markdown(agg, args, n_leaves):
    f = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
    lines = ["| method | model | old classes before | old after | forgetting (points) | new class after "
             "| all classes after |",
             "|---|---|---|---|---|---|---|"]
    for a in agg:
        lines.append(f"| {a['method']} | {a['model']} | {f(a['old_before_mean'], a['old_before_std'])} | "
                     f"{f(a['old_after_mean'], a['old_after_std'])} | {f(a['forgetting_mean'], a['forgetting_std'])} | "
                     f"{f(a['new_after_mean'], a['new_after_std'])} | {f(a['all_after_mean'], a['all_after_std'])} |")
    notes = [f"- {a['method']}: changed {a['edited_leaves']:.1f} of {n_leaves} leaves on average, which serve "
             f"{100 * a['old_test_share_in_edited_leaves']:.1f}% of the old-class test inputs."
             for a in agg if "edited_leaves" in a]
    return ("\n".join(lines) + "\n\nEvery old input routed to an unedited leaf keeps its exact output:\n\n"
            + "\n".join(notes) + "\n")


def plot(agg, title):
    """Grouped bars per method: old-class accuracy before and after, new-class accuracy after."""
    plt = bench.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(agg))
    bars = [("old classes before", "old_before", "tab:gray"), ("old classes after", "old_after", "tab:blue"),
            ("new class after", "new_after", "tab:orange")]
    for i, (label, key, color) in enumerate(bars):
        ax.bar(x + (i - 1) * 0.27, [100 * a[key + "_mean"] for a in agg], 0.27,
               yerr=[100 * a[key + "_std"] for a in agg], label=label, color=color, capsize=2)
    ax.set_xticks(x, [a["method"].replace(" (", "\n(") for a in agg], fontsize=8)
    ax.set(ylabel="test accuracy (%)", title=title, ylim=(0, 100))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    return fig


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=vision.DATASET_NAMES)
    p.add_argument("--new-class", type=int, default=9)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--leak", type=float, default=0.0)
    p.add_argument("--hardening", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hard-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--edit-epochs", type=int, default=2)
    p.add_argument("--edit-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--edit-batch-size", type=int, default=32)
    p.add_argument("--min-shares", type=float, nargs="+", default=[0.02, 0.2],
                   help="one leaf edit per value: edit leaves that receive more than this share of the new class")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-train", type=int, default=20000, help="stratified training subset (0 = all)")
    p.add_argument("--out", default=None, help="results folder (default experiments/results)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    out = Path(args.out) if args.out else RESULTS
    name = f"editing_{args.dataset}"
    if args.replot:
        saved = json.loads((out / f"{name}.json").read_text())
        bench.write_results(out, name, figure=plot(saved["aggregate"],
                                                   f"adding class {saved['args']['new_class']} ({args.dataset})"),
                            dpi=110)
        return saved["aggregate"]
    data = vision.load(args.dataset)
    if args.n_train:
        data = vision.subsample(data, n_train=args.n_train, seed=0)
    if not 0 <= args.new_class < data.n_classes:
        raise ValueError(f"--new-class must be in [0, {data.n_classes}), got {args.new_class}")
    t0 = time.time()
    from tqdm.auto import tqdm

    rows = [r for seed in tqdm(range(args.seeds), desc="editing seeds") for r in run_seed(data, args, seed)]
    agg = aggregate(rows)
    report = {**bench.provenance(__file__, argv), "args": vars(args), "rows": rows, "aggregate": agg,
              "seconds": round(time.time() - t0, 1)}
    text = (f"# Surgical editing: add class {args.new_class} to FFF d{args.depth} l{args.width} ({args.dataset})\n\n"
            f"{bench.provenance_line(report)} Base: {args.epochs} epochs on the other classes "
            f"({args.n_train or 'all'} training images, stratified), FF of equal training width "
            f"({2 ** args.depth * args.width}); edit: {args.edit_epochs} epochs of Adam lr {args.edit_lr:g}, batch "
            f"{args.edit_batch_size}, on the new "
            f"class's training images only (no replay); {args.seeds} seeds, mean ± std; test accuracy in %.\n\n"
            + markdown(agg, args, 2 ** args.depth))
    bench.write_results(out, name, report=report, markdown=text,
                        figure=plot(agg, f"adding class {args.new_class} ({args.dataset})"), dpi=110)
    print(text)
    return agg


if __name__ == "__main__":
    main()
