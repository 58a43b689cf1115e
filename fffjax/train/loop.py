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

    - `step_s`: wall seconds from the previous record's metrics to this step's (the step itself;
      the next batch is made and the previous record written while it runs); `tokens_per_s` is the
      batch's tokens over `step_s`;
    - `eval_s` and `checkpoint_s`: seconds the loop waits for evaluation and for
      `RunCheckpoints.save` (zero on steps without them; a save copies the state on the device and
      writes it in the background);
    - `wall_s`: their sum, the loop's time for the step; `wall_tokens_per_s` is the batch's tokens
      over `wall_s`, the loop's throughput.

    The metrics of a step are fetched after the next step is launched, so the device always has a
    step queued; steps that evaluate or save, and the last one, are fetched at once (the evaluation
    and the checkpoint need their state).

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
        timed = time.perf_counter()   # when the previous record's metrics were in hand
        upcoming = pipeline.next(position) if start < config.steps else None
        unfetched = None   # (record, device metrics) of the step launched before this one

        def measured(record, metrics):
            """`record` with the step's metrics, `lr` and the time since the previous record."""
            nonlocal timed
            record.update(trainer.fetch_metrics(metrics), lr=float(learning_rates[record["step"] - 1]))
            now = time.perf_counter()
            record.update(step_s=now - timed, tokens_per_s=tokens_per_second(tokens, now - timed))
            timed = now
            return record

        def write(record, *, eval_s=0.0, checkpoint_s=0.0):
            wall_s = record["step_s"] + eval_s + checkpoint_s
            record.update(eval_s=eval_s, checkpoint_s=checkpoint_s, wall_s=wall_s,
                          wall_tokens_per_s=tokens_per_second(tokens, wall_s))
            if lead:
                log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update(1)

        for step in range(start, config.steps):
            batch, position = upcoming   # `position`: where the batch after this one starts
            metrics = trainer.launch(batch)
            if step + 1 < config.steps:
                upcoming = pipeline.next(position)   # on the host while the step runs on the device
            if unfetched is not None:
                write(measured(*unfetched))   # the previous step, while this one runs
                unfetched = None
            record = {"step": step + 1}
            last = step + 1 == config.steps
            evaluate = eval_batches is not None and (
                last or bool(config.eval_every and (step + 1) % config.eval_every == 0))
            if not (last or evaluate or checkpoints.should_save(step + 1)):
                unfetched = (record, metrics)   # fetched after the next step is launched
                continue
            measured(record, metrics)   # evaluation and checkpoints need this step's state and metrics
            eval_s = 0.0
            if evaluate:
                began = time.perf_counter()
                record.update({f"eval_{k}": v for k, v in trainer.evaluate(eval_batches()).items()})
                eval_s = time.perf_counter() - began
            began = time.perf_counter()
            checkpoints.save(step + 1, params=trainer.state["params"], opt_state=trainer.state["opt_state"],
                             position=position, config=model_config, run=run, metrics=record, force=last)
            checkpoint_s = time.perf_counter() - began
            timed = time.perf_counter()
            write(record, eval_s=eval_s, checkpoint_s=checkpoint_s)
        bar.close()
    records = log.read() if log.path.exists() else []
    if lead and records:
        curves = {"train": ([r["step"] for r in records], [r["loss"] for r in records])}
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            curves["held-out"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
        plot_losses(curves, out_dir / "loss.png", title=plot_title, smooth=max(1, min(20, len(records) // 20)))
    return records
