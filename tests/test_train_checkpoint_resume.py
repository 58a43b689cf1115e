"""Checkpoint/resume: a run killed with SIGKILL and resumed logs exactly the losses of an
uninterrupted run; a damaged latest checkpoint gives an error naming it and the resume falls back
to the previous good step.

The training runs of the SIGKILL test are subprocesses of this file
(`python tests/test_train_checkpoint_resume.py OUT SLEEP`), one CPU device each, so both compile the
same program.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STEPS, SAVE_EVERY, BATCH, VOCAB, SEQ = 12, 3, 8, 64, 16


def make_run(out: Path, *, sleep: float = 0.0):
    """(trainer, pipeline, fit keyword arguments) of the small run used by every test here."""
    import jax
    from flax import nnx

    from fffjax.data import pipeline
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS
    from fffjax.models import CrammedBertMLM, get_config
    from fffjax.train import TrainConfig, Trainer, mlm_objective
    from fffjax.train import sharding as shd

    config = dataclasses.replace(get_config("tiny"), vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                 max_seq_length=SEQ, fff_depth=2, head_dim=8)
    train = TrainConfig(steps=STEPS, batch_size=BATCH, learning_rate=3e-3, save_every=SAVE_EVERY, keep=2,
                        train_mode=True)
    trainer = Trainer(CrammedBertMLM(config, rngs=nnx.Rngs(0)), mlm_objective, train,
                      mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    rows = np.random.default_rng(0).integers(5, VOCAB, size=(40, SEQ)).astype(np.int32)
    # 5 batches per epoch: crosses epochs
    pipe = pipeline.mlm_pipeline(rows, BATCH, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)

    class Slowed:
        def next(self, position):
            time.sleep(sleep)
            return pipe.next(position)

    return trainer, Slowed(), dict(out_dir=out, model_config=config.to_dict(), progress=False)


def worker(out: str, sleep: float) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from fffjax.train import fit

    trainer, pipe, kwargs = make_run(Path(out), sleep=sleep)
    fit(trainer, pipe, **kwargs)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics steps repeat or go back: {steps}"
    return {r["step"]: r["loss"] for r in records}


def spawn(out: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, __file__, str(out), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(tmp_path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    ref_proc = spawn(reference, 0.0)
    proc = spawn(victim, 0.4)
    metrics = victim / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(victim))
    assert 8 <= killed_at < STEPS
    saved = sorted(int(p.name) for p in (victim / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < STEPS

    output = finish(spawn(victim, 0.0))
    resumed_from = int(output.split("resumed from ")[1].split()[0].rstrip("/").rsplit("/", 1)[1])
    assert 0 < resumed_from <= killed_at and resumed_from % SAVE_EVERY == 0
    finish(ref_proc)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(victim) == expected  # exact equality, every step


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aborted reads
def test_damaged_latest_checkpoint_is_named_and_resume_falls_back(tmp_path, damage):
    from fffjax.train import CheckpointCorruptError, RunCheckpoints, fit

    trainer, pipe, kwargs = make_run(tmp_path)
    first = fit(trainer, pipe, **kwargs)
    latest = tmp_path / "checkpoints" / str(STEPS)
    assert latest.is_dir()
    data_files = [p for p in (latest / "params" / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    assert data_files
    for path in data_files:  # the array data files of the params item
        blob = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(blob[: len(blob) // 2])
        else:  # same size, a few bytes changed in the middle
            for i in range(len(blob) // 2, min(len(blob), len(blob) // 2 + 4)):
                blob[i] ^= 0xFF
            path.write_bytes(bytes(blob))

    fresh, pipe2, kwargs2 = make_run(tmp_path)
    with RunCheckpoints(tmp_path / "checkpoints", save_every=SAVE_EVERY, keep=2) as checkpoints:
        with pytest.raises(CheckpointCorruptError, match=str(latest)):
            checkpoints.restore(STEPS, fresh.abstract_state())
        with pytest.warns(UserWarning, match=f"{latest} is unreadable.*falling back"):
            restored = checkpoints.restore_latest(fresh.abstract_state(), quarantine=False)
    assert restored["step"] == STEPS - SAVE_EVERY

    with pytest.warns(UserWarning, match=f"{latest} is unreadable.*moved to"):
        again = fit(fresh, pipe2, **kwargs2)
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # steps 10-12 retrained identically
    assert (tmp_path / "checkpoints.corrupt" / str(STEPS) / "params").is_dir()
    assert (latest / "params").is_dir()  # saved again by the resumed run


if __name__ == "__main__":
    worker(sys.argv[1], float(sys.argv[2]))
