"""``fffjax pretrain`` against ``Trainer.step`` alone: the tokens/s of the training loop as users run it.

1. **The loop**: ``fffjax pretrain --config CONFIG --random-tokens --bf16 --save-every SAVE_EVERY
   --steps STEPS --no-progress --no-resume --out RUN``, run in this process through the command's own
   ``run`` (random word pieces: no corpus or network needed), ``RUN`` a folder in a temporary
   directory (removed afterwards; ``--run-dir`` keeps it elsewhere). Its tokens/s is the tokens of
   the steps after ``--skip`` (the compile and warm-up) over the sum of their ``wall_s`` in
   ``metrics.jsonl``: the data, the step, the checkpoints (every ``SAVE_EVERY`` steps and the last)
   and the metrics log. With ``STEPS`` a multiple of ``SAVE_EVERY`` the timed steps hold saves at
   the rate of a long run. Checkpoint time per save is the ``checkpoint_s`` of the saved steps: what
   the loop waits for (orbax's host copy); the files and the digest are written in the background.
2. **``Trainer.step`` alone**: a Trainer of the same model and train config (built as the command
   builds them), holding the loop's last checkpoint, on batches of the same random-token pipeline
   made beforehand; :func:`fffjax.bench.latency` of ``--alone-steps`` steps after 3 warm-up steps,
   the median of ``--repeats`` repeats; each step fetches its metrics before the next is sent. Beside it,
   ``Trainer.launch`` of the same steps sent back to back (:func:`fffjax.bench.stream`, metrics never
   fetched): the device's own pace. The loop fetches a step's metrics after launching the next one, so
   it can beat ``Trainer.step`` alone and approach the back-to-back pace.

The ratio loop / alone is the fraction of the step's throughput that the loop keeps (target >= 0.95).
Writes ``pretrain_throughput.json`` (command, date, device, versions) and ``.md`` to ``--out``
(default ``experiments/results``).

Run on the GPU machine (a few minutes)::

    python experiments/bench_pretrain.py --out $OUT

Smoke test on the CPU (well under a minute, mostly compiles)::

    python experiments/bench_pretrain.py --config tiny --steps 20 --save-every 10 --batch-size 8 --skip 2 \\
        --alone-steps 5 --out /tmp/pretrain_smoke
"""

import argparse
import itertools
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fffjax import bench

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "pretrain_throughput"
TARGET = 0.95


def pretrain_argv(args, run_dir: Path) -> list[str]:
    """The arguments of the ``fffjax pretrain`` command the loop runs."""
    argv = ["--config", args.config, "--random-tokens", "--bf16", "--save-every", str(args.save_every),
            "--steps", str(args.steps), "--no-progress", "--no-resume", "--out", str(run_dir)]
    return argv + (["--batch-size", str(args.batch_size)] if args.batch_size else [])


def run_loop(argv: list[str]) -> tuple[list[dict], float]:
    """(metrics records, wall seconds of the whole command) of ``fffjax pretrain argv``."""
    from fffjax.train import pretrain
    from fffjax.train.metrics import read_metrics

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    parsed = parser.parse_args(argv)
    began = time.perf_counter()
    pretrain.run(parsed)
    return read_metrics(parsed.out / "metrics.jsonl"), time.perf_counter() - began


def command_setup(argv: list[str]) -> dict:
    """What ``fffjax pretrain --random-tokens argv`` trains, built as its ``run`` builds it: ``model_config``,
    ``config`` (the TrainConfig), ``tokens_per_step`` and ``batches`` (the random-token MLM pipeline)."""
    import dataclasses

    from fffjax.data import pipeline
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS
    from fffjax.train import pretrain

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    parsed = parser.parse_args(argv)
    model_config, overrides, data = pretrain.load_run_config(parsed.config)
    config = pretrain.train_config_from(parsed, overrides, pretrain.PRETRAIN_DEFAULTS)
    model_config = dataclasses.replace(model_config, pad_token_id=WORDPIECE_SPECIALS.pad)
    seq_length = parsed.seq_length or data["seq_length"] or model_config.max_seq_length
    rows = pretrain.random_token_rows(max(pretrain.RANDOM_ROWS, config.batch_size), seq_length,
                                      model_config.vocab_size, seed=config.seed)
    batches = pipeline.mlm_pipeline(rows, config.batch_size, vocab_size=model_config.vocab_size,
                                    specials=WORDPIECE_SPECIALS)
    return {"model_config": model_config, "config": config, "tokens_per_step": config.batch_size * seq_length,
            "batches": batches}


def time_step_alone(setup: dict, run_dir: Path, *, steps: int, repeats: int) -> tuple[float, float]:
    """Seconds per ``Trainer.step`` of the command's model and batches, from the run's last checkpoint,
    and seconds per step of ``Trainer.launch`` sent back to back (metrics never fetched: the device's
    pace, a ceiling for any loop)."""
    import numpy as np
    from flax import nnx

    from fffjax.models import CrammedBertMLM
    from fffjax.train import sharding as shd
    from fffjax.train.checkpoint import RunCheckpoints
    from fffjax.train.objectives import mlm_objective
    from fffjax.train.trainer import Trainer

    config = setup["config"]
    model = CrammedBertMLM(setup["model_config"], rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    trainer = Trainer(model, mlm_objective, config)
    with RunCheckpoints(run_dir / "checkpoints", save_every=config.save_every) as checkpoints:
        restored = checkpoints.restore_latest(trainer.abstract_state())
    trainer.state = {"params": restored["params"], "opt_state": restored["opt_state"],
                     "step": shd.to_global(np.asarray(restored["step"], np.int32), shd.replicated(trainer.mesh))}
    position, host_batches = restored["data"], []
    for _ in range(16):
        batch, position = setup["batches"].next(position)
        host_batches.append(batch)
    cycle = itertools.cycle(host_batches)
    alone = bench.latency(lambda: trainer.step(next(cycle)), calls=steps, warmup=3, repeats=repeats)
    queued = bench.stream(lambda: trainer.launch(next(cycle)), calls=steps, warmup=3, repeats=repeats)
    return alone, queued


def summarize(records: list[dict], run_s: float, alone_s: float, queued_s: float, tokens_per_step: int,
              args) -> dict:
    """The report's figures from the loop's metrics records and the step-alone time."""
    timed = records[args.skip:]
    saves = [r for r in timed if r["step"] % args.save_every == 0 or r["step"] == args.steps]
    wall = sum(r["wall_s"] for r in timed)
    loop_tokens_per_s = len(timed) * tokens_per_step / wall
    alone_tokens_per_s = tokens_per_step / alone_s
    per_step_ms = {
        "wall": 1e3 * wall / len(timed),
        "step": 1e3 * sum(r["step_s"] for r in timed) / len(timed),
        "checkpoint": 1e3 * sum(r["checkpoint_s"] for r in timed) / len(timed),
        "evaluation": 1e3 * sum(r["eval_s"] for r in timed) / len(timed),
    }
    return {
        "tokens_per_step": tokens_per_step, "timed_steps": [timed[0]["step"], timed[-1]["step"]],
        "loop_tokens_per_s": loop_tokens_per_s, "step_alone_tokens_per_s": alone_tokens_per_s,
        "ratio": loop_tokens_per_s / alone_tokens_per_s, "target": TARGET,
        "step_alone_ms": 1e3 * alone_s, "launch_back_to_back_ms": 1e3 * queued_s,
        "launch_back_to_back_tokens_per_s": tokens_per_step / queued_s,
        "ratio_to_back_to_back": loop_tokens_per_s * queued_s / tokens_per_step, "loop_ms_per_step": per_step_ms,
        "loop_step_ms_median": 1e3 * statistics.median(r["step_s"] for r in timed),
        "saves": [{"step": r["step"], "checkpoint_ms": 1e3 * r["checkpoint_s"]} for r in saves],
        "checkpoint_ms_per_save": 1e3 * statistics.mean(r["checkpoint_s"] for r in saves) if saves else None,
        "run_s": run_s, "run_s_outside_timed_steps": run_s - wall,
    }


def markdown(report: dict) -> str:
    r = report["result"]
    ms = r["loop_ms_per_step"]
    verdict = "meets" if r["ratio"] >= r["target"] else "misses"
    lines = [
        "# `fffjax pretrain` throughput against `Trainer.step` alone", "",
        bench.provenance_line(report), "",
        f"The loop: `{report['pretrain_command']}` (steps {r['timed_steps'][0]}-{r['timed_steps'][1]} timed, "
        f"{r['tokens_per_step']:,} tokens per step).", "",
        "| | tokens/s | ms per step |", "|---|---|---|",
        f"| `Trainer.step` alone | {r['step_alone_tokens_per_s']:,.0f} | {r['step_alone_ms']:.2f} |",
        f"| `Trainer.launch` back to back (metrics never fetched) | {r['launch_back_to_back_tokens_per_s']:,.0f} | "
        f"{r['launch_back_to_back_ms']:.2f} |",
        f"| `fffjax pretrain` loop | {r['loop_tokens_per_s']:,.0f} | {ms['wall']:.2f} |",
        "",
        f"**Ratio loop / step alone: {r['ratio']:.3f}** ({verdict} the target {r['target']}); loop / back to back: "
        f"{r['ratio_to_back_to_back']:.3f}.", "",
        "Where the loop's time per step goes (mean over the timed steps, ms): "
        + ", ".join(f"{name} {value:.3f}" for name, value in ms.items())
        + f"; median step {r['loop_step_ms_median']:.2f}.", "",
        "Checkpoint saves (time the loop waits, ms): "
        + (", ".join(f"step {s['step']}: {s['checkpoint_ms']:.1f}" for s in r["saves"]) or "none in the timed steps")
        + ".", "",
        f"The whole command took {r['run_s']:.1f} s, {r['run_s_outside_timed_steps']:.1f} s of it outside the timed "
        "steps (model setup, compile and warm-up steps, waiting for the last checkpoint to be written).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", help="model preset or JSON of `fffjax pretrain --config`")
    ap.add_argument("--steps", type=int, default=600, help="steps of the loop (a multiple of --save-every)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the command's")
    ap.add_argument("--skip", type=int, default=10, help="first steps of the loop left out (compile, warm-up)")
    ap.add_argument("--alone-steps", type=int, default=50, help="steps per repeat of Trainer.step alone")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run-dir", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args(argv)
    if not 0 <= args.skip < args.steps:
        ap.error(f"--skip: expected 0 <= skip < --steps {args.steps}, got {args.skip}")

    temporary = None if args.run_dir else tempfile.mkdtemp(prefix="bench_pretrain_")
    run_dir = args.run_dir or Path(temporary) / "run"
    try:
        loop_argv = pretrain_argv(args, run_dir)
        bench.log(f"loop: fffjax pretrain {shlex.join(loop_argv)}")
        records, run_s = run_loop(loop_argv)
        bench.log(f"Trainer.step alone: {args.alone_steps} steps x {args.repeats}")
        setup = command_setup(loop_argv)
        alone_s, queued_s = time_step_alone(setup, run_dir, steps=args.alone_steps, repeats=args.repeats)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    report = {**bench.provenance(__file__, argv), "config": args.config,
              "pretrain_command": "fffjax pretrain " + shlex.join(pretrain_argv(args, Path("RUN"))),
              "steps": args.steps, "save_every": args.save_every, "skip": args.skip,
              "alone_steps": args.alone_steps, "repeats": args.repeats,
              "result": summarize(records, run_s, alone_s, queued_s, setup["tokens_per_step"], args)}
    written = bench.write_results(args.out, args.name, report=report, markdown=markdown(report))
    print(markdown(report))
    bench.log(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
