"""Independent branch training of an FFF-v1: subtrees trained apart, as on loosely connected machines.

Recipe, for a tree of depth ``d`` and a split level ``s``:

1. **Joint phase**: train the whole tree for ``joint_epochs`` epochs (soft mixture, hardening).
2. **Freeze** the top ``s`` routing levels; send every training sample down them (hard, ``>= 0``)
   and split the training set by the subtree it reaches (``2**s`` shards).
3. **Independent**: train each of the ``2**s`` subtrees (an FFF-v1 of depth ``d - s``, started
   from the joint phase's weights) on its shard in its **own process** (``multiprocessing``
   spawn, one fresh process per subtree, ``maxtasksperchild=1``): the process receives the
   data set name, its shard's indices, its subtree's weights and the recipe, and returns its
   trained weights; processes never communicate. Reassemble and evaluate the hard forward.
4. **Sync every N steps** (variant): the top ``s`` levels keep training. Each process trains its
   subtree *and* a copy of the top nodes on its shard (the full soft mixture, other subtrees held
   at the last broadcast), and every round (``N`` local steps) sends its top-node update to a
   coordinator, which averages the top nodes (weighted by shard size), collects the subtrees,
   re-splits the data by the new routing and broadcasts the model. The processes of a round run
   one after another in the coordinator's process as separate calls sharing no state (each
   starts a fresh optimizer from the broadcast model): that is the whole message exchange.

**Equal total compute**, counted in leaf evaluations of the soft forward (samples x leaves
computed; backward proportional): joint training costs ``epochs * n * 2**d``. The independent
subtrees compute only ``2**(d-s)`` leaves per sample, so after the joint phase each trains
``(epochs - joint_epochs) * 2**s`` epochs over its shard; the sync variant computes the whole
mixture per sample and trains ``epochs - joint_epochs`` epochs over its shard. The last
``hard_epochs`` (scaled the same way) use rounded decisions (leaves only), as the joint recipe.

Run (writes ``experiments/results/branch_training.{md,json,png}``; ``--out NAME`` for other names)::

    python experiments/branch_training.py --datasets mnist fashion_mnist
    python experiments/branch_training.py --datasets digits --epochs 4 --splits 1 --sync-rounds 1 \\
        --out /tmp/branch                                         # quick check, no data needed
"""

import argparse
import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- tree surgery


def subtree_index(depth: int, split: int):
    """Heap rows of the routing nodes of each of the ``2**split`` subtrees: ``(2**split, M)``."""
    from fffjax import parallel

    _, sub = parallel.subtree_rows(depth, split)
    return sub.reshape(2**split, -1)


def extract_subtree(params: dict, depth: int, split: int, i: int) -> dict:
    """Parameters of subtree ``i`` (below the top ``split`` levels) as an FFF-v1 of depth ``depth - split``."""
    rows = subtree_index(depth, split)[i]
    per = 2 ** (depth - split)
    leaves = slice(i * per, (i + 1) * per)
    return {"node_weights": np.asarray(params["node_weights"])[rows],
            "node_biases": np.asarray(params["node_biases"])[rows],
            **{k: np.asarray(params[k])[leaves] for k in ("w1s", "b1s", "w2s", "b2s")}}


def insert_subtree(params: dict, sub: dict, depth: int, split: int, i: int) -> dict:
    """``params`` with subtree ``i`` replaced by ``sub`` (numpy copies)."""
    out = {k: np.array(v) for k, v in params.items()}
    rows = subtree_index(depth, split)[i]
    per = 2 ** (depth - split)
    out["node_weights"][rows] = sub["node_weights"]
    out["node_biases"][rows] = sub["node_biases"]
    for k in ("w1s", "b1s", "w2s", "b2s"):
        out[k][i * per:(i + 1) * per] = sub[k]
    return out


def top_mask(params: dict, depth: int, split: int, i: int | None) -> dict:
    """0/1 gradient mask: the top ``split`` node levels, plus subtree ``i`` if given."""
    mask = {k: np.zeros(np.shape(v), np.float32) for k, v in params.items()}
    mask["node_weights"][: 2**split - 1] = 1
    mask["node_biases"][: 2**split - 1] = 1
    if i is not None:
        mask = insert_subtree(mask, {k: np.ones_like(v) for k, v in extract_subtree(mask, depth, split, i).items()},
                              depth, split, i)
    return mask


def route(params: dict, x: np.ndarray, split: int) -> np.ndarray:
    """Subtree (``0 .. 2**split - 1``) each sample reaches through the top ``split`` levels (``>= 0``)."""
    import jax.numpy as jnp

    from fffjax import v1

    return np.asarray(v1.hard_leaves(jnp.asarray(x), jnp.asarray(params["node_weights"][: 2**split - 1]),
                                     jnp.asarray(params["node_biases"][: 2**split - 1]), split))


# ----------------------------------------------------------------------------- workers


def load_data(name: str, n_train: int | None):
    from fffjax.data import vision

    data = vision.load(name)
    return vision.subsample(data, n_train=n_train) if n_train else data


def train_subtree(task: dict) -> dict:
    """One independent process: train a subtree on its shard (runs in a fresh spawned interpreter)."""
    import jax

    from fffjax.train import flat as C

    t0 = time.time()
    data = load_data(task["dataset"], task["n_train"])
    idx = task["indices"]
    spec = C.ModelSpec("fff", data.x_train.shape[1], data.n_classes, depth=task["depth"], width=task["width"])
    config = C.FlatTrainConfig(**task["config"])
    result = C.train(spec, config, data.x_train[idx], data.y_train[idx], params=task["params"])
    return {"params": jax.tree.map(np.asarray, result.params), "seconds": time.time() - t0,
            "steps": config.epochs * (len(idx) // min(config.batch_size, len(idx)))}


# ----------------------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class Setup:
    dataset: str
    depth: int
    width: int
    epochs: int
    joint_epochs: int
    hard_epochs: int
    sync_rounds: int
    batch_size: int
    learning_rate: float
    hardening: float
    n_train: int | None
    seed: int
    workers: int


def recipe(setup: Setup, epochs: int, hard_epochs: int, **kw) -> dict:
    return dict(epochs=epochs, hard_epochs=hard_epochs, batch_size=setup.batch_size,
                learning_rate=setup.learning_rate, schedule="cosine", hardening=setup.hardening,
                hardening_schedule="ramp", seed=setup.seed, **kw)


def independent(setup: Setup, data, joint_params: dict, split: int) -> dict:
    """Steps 2-3: freeze the top, split the data, train the subtrees in separate processes."""
    shard = route(joint_params, data.x_train, split)
    scale = 2**split
    config = recipe(setup, (setup.epochs - setup.joint_epochs) * scale, setup.hard_epochs * scale)
    tasks = [{"dataset": setup.dataset, "n_train": setup.n_train, "indices": np.flatnonzero(shard == i), "subtree": i,
              "depth": setup.depth - split, "width": setup.width, "config": config,
              "params": extract_subtree(joint_params, setup.depth, split, i)} for i in range(2**split)]
    runnable = [t for t in tasks if len(t["indices"]) > 0]
    ctx = multiprocessing.get_context("spawn")
    t0 = time.time()
    with ctx.Pool(setup.workers, maxtasksperchild=1) as pool:
        done = pool.map(train_subtree, runnable, chunksize=1)
    params = joint_params
    for t, out in zip(runnable, done, strict=True):
        params = insert_subtree(params, out["params"], setup.depth, split, t["subtree"])
    return {"params": params, "shard_sizes": [int(np.sum(shard == i)) for i in range(2**split)],
            "wall_seconds": time.time() - t0, "process_seconds": [o["seconds"] for o in done],
            "local_steps": [o["steps"] for o in done]}


def synced(setup: Setup, data, joint_params: dict, split: int) -> dict:
    """Step 4: local training of top nodes + own subtree, coordinator averages the top every round."""
    import jax

    from fffjax.train import flat as C

    spec = C.ModelSpec("fff", data.x_train.shape[1], data.n_classes, depth=setup.depth, width=setup.width)
    soft_epochs = setup.epochs - setup.joint_epochs - setup.hard_epochs
    rounds = setup.sync_rounds
    model = {k: np.asarray(v) for k, v in joint_params.items()}
    t0, steps_per_round = time.time(), []
    n_top = 2**split - 1
    for r in range(rounds + 1):
        last = r == rounds          # the final leaves-only hard phase, one more (top frozen) round
        epochs = setup.hard_epochs if last else soft_epochs // rounds
        if epochs <= 0:
            continue
        shard = route(model, data.x_train, split)
        top_sum = {k: np.zeros_like(model[k][:n_top]) for k in ("node_weights", "node_biases")}
        new = model
        steps = []
        for i in range(2**split):
            idx = np.flatnonzero(shard == i)
            if len(idx) == 0:
                continue
            config = C.FlatTrainConfig(**recipe(setup, epochs, epochs if last else 0))
            if epochs * (len(idx) // min(setup.batch_size, len(idx))) < 2:   # optax's cosine needs 2 steps
                config = dataclasses.replace(config, schedule="constant")
            mask = top_mask(model, setup.depth, split, i)
            if last:
                mask["node_weights"][:] = 0
                mask["node_biases"][:] = 0
            out = C.train(spec, config, data.x_train[idx], data.y_train[idx], params=model, grad_mask=mask)
            local = jax.tree.map(np.asarray, out.params)
            new = insert_subtree(new, extract_subtree(local, setup.depth, split, i), setup.depth, split, i)
            for k in top_sum:
                top_sum[k] += len(idx) * local[k][:n_top]
            steps.append(config.epochs * (len(idx) // min(setup.batch_size, len(idx))))
        new = {k: np.array(v) for k, v in new.items()}
        for k in top_sum:                                   # the coordinator's average of the top nodes
            new[k][:n_top] = top_sum[k] / sum(int(np.sum(shard == i)) for i in range(2**split))
        model = new
        steps_per_round.append(steps)
    return {"params": model, "shard_sizes": [int(np.sum(route(model, data.x_train, split) == i))
                                             for i in range(2**split)],
            "wall_seconds": time.time() - t0, "sync_every_steps": [max(s) for s in steps_per_round[:-1]],
            "rounds": rounds}


def run_dataset(setup: Setup, splits: list[int]) -> list[dict]:
    from fffjax.train import flat as C

    data = load_data(setup.dataset, setup.n_train)
    spec = C.ModelSpec("fff", data.x_train.shape[1], data.n_classes, depth=setup.depth, width=setup.width)
    acc = lambda p: C.accuracy(spec, p, data.x_test, data.y_test, mode="hard")  # noqa: E731
    rows = []
    t0 = time.time()
    joint = C.train(spec, C.FlatTrainConfig(**recipe(setup, setup.epochs, setup.hard_epochs)),
                    data.x_train, data.y_train)
    rows.append({"dataset": setup.dataset, "method": "joint", "split": 0, "test_hard": acc(joint.params),
                 "wall_seconds": time.time() - t0, "compute_epochs_full_tree": setup.epochs})
    print(rows[-1], flush=True)
    t0 = time.time()
    phase = C.train(spec, C.FlatTrainConfig(**recipe(setup, setup.joint_epochs, 0)), data.x_train, data.y_train)
    phase_params = {k: np.asarray(v) for k, v in phase.params.items()}
    phase_seconds = time.time() - t0
    for split in splits:
        for method, fn in (("independent", independent), ("sync", synced)):
            if method == "sync" and setup.sync_rounds <= 0:
                continue
            out = fn(setup, data, phase_params, split)
            row = {"dataset": setup.dataset, "method": method, "split": split, "test_hard": acc(out["params"]),
                   "shard_sizes": out["shard_sizes"], "wall_seconds": out["wall_seconds"] + phase_seconds,
                   "compute_epochs_full_tree": setup.epochs}
            row.update({k: v for k, v in out.items() if k not in ("params", "shard_sizes", "wall_seconds")})
            rows.append(row)
            print({k: v for k, v in row.items() if k != "process_seconds"}, flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def write_report(report: dict, stem: str) -> None:
    """``stem.json`` (``report``: provenance, ``setups``, ``rows``), ``stem.md`` and ``stem.png`` under
    ``experiments/results/``."""
    rows, s0 = report["rows"], Setup(**report["setups"][0])
    lines = [
        "# Independent branch training of FFF-v1 vs joint training (equal total compute)", "",
        bench.provenance_line(report), "",
        f"FFF-v1 depth {s0.depth}, leaf width {s0.width}; AdamW lr {s0.learning_rate} cosine, batch "
        f"{s0.batch_size}, hardening {s0.hardening} (ramp); joint: {s0.epochs} epochs ({s0.hard_epochs} hard, "
        f"leaves only). Branch methods: {s0.joint_epochs} joint epochs, then the top s levels frozen "
        f"(independent: 2^s subtrees in separate spawned processes, {s0.epochs - s0.joint_epochs}·2^s epochs "
        f"each over its shard) or synced every round ({s0.sync_rounds} rounds; top nodes averaged by a "
        f"coordinator). Equal compute in leaf evaluations (see the script's docstring). Seed {s0.seed}, one run; "
        "hard (deployed) test accuracy in %.", "",
        "| data set | s | joint | independent | gap (ind - joint) | synced | gap (sync - joint) "
        "| shard sizes (independent) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        joint = next(r for r in rows if r["dataset"] == ds and r["method"] == "joint")["test_hard"]
        for split in sorted({r["split"] for r in rows if r["dataset"] == ds and r["split"] > 0}):
            get = lambda m, ds=ds, split=split: next(  # noqa: E731
                (r for r in rows if r["dataset"] == ds and r["split"] == split and r["method"] == m), None)
            ind, syn = get("independent"), get("sync")
            fmt = lambda r: f"{100 * r['test_hard']:.2f}" if r else "–"  # noqa: E731
            gap = lambda r, joint=joint: f"{100 * (r['test_hard'] - joint):+.2f}" if r else "–"  # noqa: E731
            lines.append(f"| {ds} | {split} | {100 * joint:.2f} | {fmt(ind)} | {gap(ind)} | {fmt(syn)} | {gap(syn)} "
                         f"| {ind['shard_sizes'] if ind else '–'} |")
    joint_steps = s0.epochs * 60000 // s0.batch_size if s0.dataset != "digits" else None
    lines += [
        "", "Notes:", "",
        "- Equal compute is counted in leaf evaluations, so a subtree of 2^(d-s) leaves trains 2^s times "
        "as many epochs over its shard: independent branches take more optimizer steps per parameter than "
        f"the joint run (joint: {s0.epochs} epochs"
        + (f", {joint_steps:,} steps" if joint_steps else "") + "; each branch's local steps are in the JSON). "
        "Part of their gain is that the joint recipe is not converged at this budget.",
        "- The frozen top levels route unevenly (shard sizes above): a subtree that receives no training "
        "sample keeps its joint-phase weights, and test samples reaching it are served by them.",
        "- Synced: the coordinator averages the top nodes every round (one local epoch of each shard, "
        "`sync_every_steps` in the JSON) and re-splits the data by the new routing; the local optimizer "
        "restarts each round.",
    ]
    plt = bench.pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        joint = next(r for r in rows if r["dataset"] == ds and r["method"] == "joint")["test_hard"]
        ax.axhline(100 * joint, color="k", ls="--", label="joint")
        for method, marker in (("independent", "o"), ("sync", "s")):
            pts = sorted((r["split"], 100 * r["test_hard"]) for r in rows
                         if r["dataset"] == ds and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=method)
        ax.set_title(ds)
        ax.set_xlabel("split level s (2^s subtrees)")
        ax.set_ylabel("hard test accuracy (%)")
        ax.set_xticks(sorted({r["split"] for r in rows if r["split"] > 0}))
        ax.legend()
    fig.tight_layout()
    bench.write_results(RESULTS, stem, report=report, markdown="\n".join(lines), figure=fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--joint-epochs", type=int, default=2)
    ap.add_argument("--hard-epochs", type=int, default=1)
    ap.add_argument("--sync-rounds", type=int, default=5,
                    help="must divide epochs - joint - hard epochs; 0 skips the synced variant")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hardening", type=float, default=1.0)
    ap.add_argument("--n-train", type=int, default=None, help="class-stratified training subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes alive at once")
    ap.add_argument("--out", default="branch_training")
    ap.add_argument("--replot", action="store_true", help="rebuild the table and plot from the JSON")
    a = ap.parse_args(argv)
    if a.replot:
        write_report(json.loads((RESULTS / f"{a.out}.json").read_text()), a.out)
        print((RESULTS / f"{a.out}.md").read_text())
        return
    if max(a.splits) > a.depth or a.joint_epochs + a.hard_epochs >= a.epochs:
        ap.error("need max(--splits) <= --depth and --joint-epochs + --hard-epochs < --epochs")
    if a.sync_rounds and (a.epochs - a.joint_epochs - a.hard_epochs) % a.sync_rounds:
        ap.error("--sync-rounds must divide --epochs - --joint-epochs - --hard-epochs (equal compute)")
    head = bench.provenance(__file__, argv)
    setups, rows = [], []
    for ds in a.datasets:
        setup = Setup(ds, a.depth, a.width, a.epochs, a.joint_epochs, a.hard_epochs, a.sync_rounds, a.batch_size,
                      a.lr, a.hardening, a.n_train, a.seed, a.workers)
        setups.append(setup)
        rows += run_dataset(setup, a.splits)
        write_report({**head, "setups": [dataclasses.asdict(s) for s in setups], "rows": rows}, a.out)
    print((RESULTS / f"{a.out}.md").read_text())


if __name__ == "__main__":
    main()
