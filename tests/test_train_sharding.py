"""fffjax.train.sharding: partition specs, and the named parallelism configurations (dp, fsdp, tp,
tree and their mixes) training the tiny crammed BERT to the single-device losses, on the 8 fake CPU
devices and across two processes.

Also a worker for the two-process test: `python tests/test_train_sharding.py PORT PROCESS_ID OUT`.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _distributed import run_two_processes
from flax import nnx

from fffjax import nn
from fffjax.train import sharding as shd


def test_spec_for_falls_back_to_replication_when_not_divisible():
    mesh = shd.make_mesh(4, 2, jax.devices()[:8])
    assert shd.spec_for("x.ffn.w_in", (7, 32), mesh) == jax.P(None, "model")
    assert shd.spec_for("x.ffn.w_in", (7, 33), mesh) == jax.P()
    assert shd.spec_for("x.norm.scale", (32,), mesh) == jax.P()
    assert shd.spec_for("x.other", (4, 6), mesh) == jax.P(None, "model")
    with pytest.raises(ValueError, match="model"):
        shd.make_mesh(1, 3, jax.devices()[:8])


TRAIN_STEPS = 20


def tiny_losses(parallelism, data, model_axis, devices=None):
    """Losses of the first TRAIN_STEPS optimizer steps of the tiny crammed BERT (MLM, random ids)."""
    from fffjax.models.config import get_config
    from fffjax.models.crammed_bert import CrammedBertMLM
    from fffjax.train import TrainConfig, Trainer, mlm_objective
    from fffjax.train import sharding as shd

    config = get_config("tiny")
    mesh = shd.make_mesh(data, model_axis, devices=devices or jax.devices()[: data * model_axis])
    model = CrammedBertMLM(config, implementation="xla", rngs=nnx.Rngs(0))
    config_train = TrainConfig(steps=TRAIN_STEPS, batch_size=8, learning_rate=1e-3, parallelism=parallelism)
    trainer = Trainer(model, mlm_objective, config_train, mesh=mesh)
    assert all(m.mesh is None for _, m in nnx.iter_graph(model) if isinstance(m, nn.UltraFastFF))  # not mutated
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(TRAIN_STEPS):
        ids = rng.integers(5, config.vocab_size, size=(8, 32), dtype=np.int32)
        positions = np.sort(np.stack([rng.choice(32, 8, replace=False) for _ in range(8)]), axis=1).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones((8, 32), np.int32), "mask_positions": positions,
                 "mask_labels": np.take_along_axis(ids, positions, 1), "mask_weights": np.ones((8, 8), np.float32)}
        losses.append(trainer.step(batch)["loss"])
    ffns = [m for _, m in nnx.iter_graph(trainer.model()) if isinstance(m, nn.UltraFastFF)]
    assert ffns and all((m.mesh is not None) == ("tree" in parallelism) for m in ffns)
    return np.asarray(losses)


@pytest.fixture(scope="module")
def single_device_losses():
    return tiny_losses("dp", 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism,data,model_axis", [
    ("dp", 8, 1), ("fsdp", 8, 1), ("tp", 2, 4), ("tree", 2, 4), ("tp+tree", 4, 2), ("fsdp+tree", 2, 4)])
def test_training_configurations_give_single_device_losses(single_device_losses, parallelism, data, model_axis):
    losses = tiny_losses(parallelism, data, model_axis)
    assert losses[-1] < losses[0]  # it trains
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def test_parallelism_names_are_checked():
    from fffjax.train import sharding as shd

    with pytest.raises(ValueError, match="parallelism"):
        shd.parallelism_rules("zero3")


def distributed_worker(port: int, process_id: int, out: str) -> None:
    """One of two processes (4 CPU devices each): the fsdp+tree configuration on a (2, 4) mesh whose
    model axis spans both processes, so the tokens' all-to-alls cross the process boundary."""
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
    interleaved = [d for pair in zip(*by_process) for d in pair]     # model groups = 2 + 2 devices
    losses = tiny_losses("fsdp+tree", 2, 4, devices=interleaved)
    Path(out).write_text(json.dumps({"process": jax.process_index(), "losses": losses.tolist()}))
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_tree_parallel_match_one_device(tmp_path, single_device_losses):
    results, _ = run_two_processes(__file__, tmp_path, timeout=500)
    assert results[0]["losses"] == results[1]["losses"]
    np.testing.assert_allclose(results[0]["losses"], single_device_losses, rtol=1e-5)


if __name__ == "__main__":
    distributed_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
