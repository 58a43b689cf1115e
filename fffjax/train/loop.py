"""`fit`: the run loop of the UltraFastBERT trainer, with checkpoints, resume, metrics and a loss plot."""

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fffjax.data.pipeline import initial_position
from fffjax.train import sharding as shd
from fffjax.train.checkpoint import RunCheckpoints
from fffjax.train.metrics import MetricsLog, plot_losses, tokens_per_second
from fffjax.train.optim import triangle_schedule
from fffjax.train.trainer import Trainer


def fit(
    trainer: Trainer,
    pipeline,
    *,
    out_dir: Path | str,
    model_config: Mapping[str, Any],
    run_info: Mapping[str, Any] | None = None,
    eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
    resume: bool = True,
    progress: bool = True,
    tokens_per_example: int = 0,
    plot_title: str = "",
) -> list[dict[str, Any]]:
    """Trains `trainer` for `config.steps` steps on `pipeline`, with checkpoints and metrics.

    Writes `<out_dir>/metrics.jsonl`, checkpoints under `<out_dir>/checkpoints/` (see
    `fffjax.train.checkpoint.RunCheckpoints`) and `<out_dir>/loss.png`. One metrics record per step:
    the objective's metrics (loss, accuracy, grad_norm), `lr`, eval_* every `eval_every` steps and
    at the end, and where the time went:

    - `step_s`: wall seconds of `trainer.step` (its metrics are fetched, so the step is done);
      `tokens_per_s` is the batch's tokens over `step_s`;
    - `checkpoint_s`: seconds in `RunCheckpoints.save` (near zero on steps it does not save);
    - `wall_s`: seconds since the previous record was timed (data, step, evaluation, checkpoint,
      logging); `wall_tokens_per_s` is the batch's tokens over `wall_s`, the loop's throughput.

    A step's record is written after its checkpoint is saved. With `resume`, restarts from the
    latest readable checkpoint (parameters, optimizer, data position, step), drops metric records of
    later steps and restores the checkpoint's own record if a crash lost it, so the continued log
    equals an uninterrupted one.

    Args:
        trainer: a `Trainer` (its state is replaced on resume).
        pipeline: a `fffjax.data.pipeline.BatchPipeline`.
        out_dir: run folder.
        model_config: the `ModelConfig` dict stored with every checkpoint.
        run_info: extra JSON stored in the checkpoints' `run` item (task, tokenizer, ...).
        eval_batches: a zero-argument callable giving held-out host batches.
        resume: continue from `<out_dir>/checkpoints` when it holds a step.
        progress: show a tqdm bar (process 0 only).
        tokens_per_example: for the tokens/s figure (sequence length).
        plot_title: title of `loss.png`.

    Returns:
        The metric records of the whole run (read back from the JSONL file).
    """
    from tqdm.auto import tqdm

    config = trainer.config
    out_dir = Path(out_dir)
    lead = jax.process_index() == 0
    log = MetricsLog(out_dir / "metrics.jsonl")
    schedule = triangle_schedule(config.learning_rate, config.steps, config.peak_fraction)
    # one device call for the whole table: a call of `schedule` per step would dispatch and wait
    learning_rates = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(config.steps)))
    tokens = config.batch_size * tokens_per_example
    run = {"train": config.to_dict(), **(run_info or {})}
    position = initial_position(config.seed)
    start = 0
    with RunCheckpoints(out_dir / "checkpoints", save_every=config.save_every, keep=config.keep) as checkpoints:
        if not resume and checkpoints.steps():
            raise FileExistsError(f"out_dir: {checkpoints.directory} already holds steps {checkpoints.steps()}; "
                                  "resume, or choose another folder (nothing is overwritten)")
        restored = checkpoints.restore_latest(trainer.abstract_state()) if resume else None
        if restored is not None:
            start = restored["step"]
            trainer.state = {"params": restored["params"], "opt_state": restored["opt_state"],
                             "step": shd.to_global(np.asarray(start, np.int32), shd.replicated(trainer.mesh))}
            position = restored["data"]
            if lead:
                print(f"resumed from {checkpoints.step_dir(start)}")
        if lead:
            log.truncate_after(start)
            if restored is not None and restored["metrics"] and log.last_step() < start:
                log.write(restored["metrics"])  # a crash between the save and the log line lost it
        bar = tqdm(total=config.steps, initial=start, disable=not (progress and lead), desc="train", unit="step")
        timed = time.perf_counter()
        for step in range(start, config.steps):
            batch, position = pipeline.next(position)
            began = time.perf_counter()
            record = {"step": step + 1, **trainer.step(batch)}
            step_s = time.perf_counter() - began
            record.update(lr=float(learning_rates[step]), step_s=step_s, tokens_per_s=tokens_per_second(tokens, step_s))
            last = step + 1 == config.steps
            if eval_batches is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                record.update({f"eval_{k}": v for k, v in trainer.evaluate(eval_batches()).items()})
            began = time.perf_counter()
            checkpoints.save(step + 1, params=trainer.state["params"], opt_state=trainer.state["opt_state"],
                             position=position, config=model_config, run=run, metrics=record, force=last)
            now = time.perf_counter()
            record.update(checkpoint_s=now - began, wall_s=now - timed,
                          wall_tokens_per_s=tokens_per_second(tokens, now - timed))
            timed = now
            if lead:
                log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update(1)
        bar.close()
    records = log.read() if log.path.exists() else []
    if lead and records:
        curves = {"train": ([r["step"] for r in records], [r["loss"] for r in records])}
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            curves["held-out"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
        try:
            plot_losses(curves, out_dir / "loss.png", title=plot_title,
                        smooth=max(1, min(20, len(records) // 20)))
        except ImportError:
            print("matplotlib is not installed (extra `dev`): no loss.png")
    return records
