"""Multi-process training through `jax.distributed` on loopback: two CPU processes with two devices
each form a data=2 x model=2 mesh and give the losses of one process driving four devices.

Workers are subprocesses of this file: `python tests/test_train_trainer_multiprocess.py PORT PROCESS_ID OUT`.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _distributed import run_two_processes

STEPS, BATCH, VOCAB, SEQ = 8, 16, 96, 16


def losses_on(devices) -> list[float]:
    """Trains the small MLM for STEPS steps on a (2, 2) mesh over `devices`."""
    from flax import nnx

    from fffjax.data import pipeline
    from fffjax.data.tokenizer import WORDPIECE_SPECIALS
    from fffjax.models import CrammedBertMLM, get_config
    from fffjax.train import TrainConfig, Trainer, mlm_objective
    from fffjax.train import sharding as shd

    config = dataclasses.replace(get_config("tiny"), vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                 max_seq_length=SEQ, fff_depth=3, head_dim=16)
    train = TrainConfig(steps=STEPS, batch_size=BATCH, learning_rate=3e-3, train_mode=True)
    trainer = Trainer(CrammedBertMLM(config, rngs=nnx.Rngs(0)), mlm_objective, train,
                      mesh=shd.make_mesh(2, 2, devices))
    rows = np.random.default_rng(0).integers(5, VOCAB, size=(64, SEQ)).astype(np.int32)
    pipe = pipeline.mlm_pipeline(rows, BATCH, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
    position = pipeline.initial_position(0)
    out = []
    for _ in range(STEPS):
        batch, position = pipe.next(position)
        out.append(trainer.step(batch)["loss"])
    return out


def worker(port: int, process_id: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    losses = losses_on(jax.devices())
    Path(out).write_text(json.dumps({"process": jax.process_index(), "losses": losses}))
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process(tmp_path):
    import jax

    # Meanwhile, one process driving four devices gives the reference.
    results, reference = run_two_processes(__file__, tmp_path, timeout=400,
                                           meanwhile=lambda: losses_on(jax.devices()[:4]))
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["losses"] == results[1]["losses"]  # both processes see the same global loss
    np.testing.assert_allclose(results[0]["losses"], reference, rtol=1e-5, atol=0)
    assert reference[-1] < reference[0]


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
