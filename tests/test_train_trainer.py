"""fffjax.train.trainer: the sharded step (1 device vs data=4 x model=2, the Pallas kernels per
device, parameter placement), gradient accumulation, bf16, the compiled-step cache, dropout
determinism, a classifier that learns. The model is crammed BERT shrunk to seconds per test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import BASE, SEQ, VOCAB, mlm_rows, small_config
from flax import nnx

from fffjax.data import pipeline
from fffjax.data.tokenizer import WORDPIECE_SPECIALS
from fffjax.models import CrammedBertClassifier, CrammedBertMLM
from fffjax.train import TrainConfig, Trainer, classification_objective, mlm_objective
from fffjax.train import sharding as shd


def run_losses(config: TrainConfig, mesh, *, ffn: str = "fff", steps: int | None = None) -> list[float]:
    model = CrammedBertMLM(small_config(ffn), rngs=nnx.Rngs(params=0, dropout=1))
    trainer = Trainer(model, mlm_objective, config, mesh=mesh)
    pipe = pipeline.mlm_pipeline(mlm_rows(), config.batch_size, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
    position = pipeline.initial_position(config.seed)
    losses = []
    for _ in range(steps or config.steps):
        batch, position = pipe.next(position)
        losses.append(trainer.step(batch)["loss"])
    return losses


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("ffn", ["fff", "dense"])
def test_one_device_and_data4_model2_give_the_same_losses(ffn):
    assert len(jax.devices()) >= 8
    config = BASE
    one = run_losses(config, shd.make_mesh(1, 1, jax.devices()[:1]), ffn=ffn)
    eight = run_losses(config, shd.make_mesh(4, 2, jax.devices()[:8]), ffn=ffn)
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=0)
    assert one[-1] < one[0]  # it is learning, so the comparison covers real updates


@pytest.mark.parametrize("ffn", ["fff", "dense"])
def test_pallas_kernels_run_per_device_on_the_data_axis(ffn):
    # Every Pallas kernel (interpret mode here): FFF, norms, attention (dropout off, so the fused form)
    # and the dense twin's GELU. On a GPU, GSPMD would run each on the whole gathered batch; inside
    # the Trainer they run per device (fffjax.ops.rows_per_device), with the single-device losses.
    from fffjax.ops import set_implementation

    def losses(mesh):
        config = dataclasses.replace(small_config(ffn), dropout=0.0)
        model = CrammedBertMLM(config, implementation="pallas", rngs=nnx.Rngs(params=0, dropout=1))
        for op in ("layer_norm", "attention", "gelu"):
            set_implementation(model, op, "pallas")
        trainer = Trainer(model, mlm_objective, dataclasses.replace(BASE, steps=4), mesh=mesh)
        pipe = pipeline.mlm_pipeline(mlm_rows(), BASE.batch_size, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS)
        batch, out = pipe.next(pipeline.initial_position(0))[0], []
        for _ in range(4):
            out.append(trainer.step(batch)["loss"])
        placed = trainer.place_batch(batch)
        with jax.set_mesh(mesh):
            text = jax.jit(trainer._train_step).lower(trainer.state, placed, trainer._seed).as_text()
        return out, text

    one, _ = losses(shd.make_mesh(1, 1, jax.devices()[:1]))
    eight, text = losses(shd.make_mesh(4, 2, jax.devices()[:8]))
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=0)
    assert text.count("sdy.manual_computation") >= 3, "the kernels did not run inside shard_map"


def test_parameters_are_sharded_by_the_rules():
    config = TrainConfig(steps=2, batch_size=16)
    model = CrammedBertMLM(small_config(), rngs=nnx.Rngs(0))
    trainer = Trainer(model, mlm_objective, config, mesh=shd.make_mesh(4, 2, jax.devices()[:8]))
    params = trainer.state["params"]["encoder"]
    assert params["layers"][0]["ffn"]["w_in"].sharding.spec == jax.P(None, "model")
    assert params["layers"][0]["attn"]["dense"]["kernel"].sharding.spec == jax.P("model", None)
    assert params["final_norm"]["scale"].sharding.spec == jax.P()
    mu = trainer.state["opt_state"][1][0].mu["encoder"]["layers"][0]["ffn"]["w_in"]
    assert mu.sharding.spec == jax.P(None, "model")  # Adam moments follow their parameter
    assert len(params["layers"][0]["ffn"]["w_in"].addressable_shards) == 8
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, mlm_objective, TrainConfig(batch_size=6), mesh=shd.make_mesh(4, 2))


# --------------------------------------------------------------------------- step variants


def test_gradient_accumulation_matches_one_big_batch():
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    whole = run_losses(BASE, mesh, steps=4)
    accumulated = run_losses(dataclasses.replace(BASE, grad_accum=4), mesh, steps=4)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)


def test_bf16_compute_tracks_float32_and_keeps_float32_weights():
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    f32 = run_losses(BASE, mesh, steps=5)
    config = dataclasses.replace(BASE, compute_dtype="bfloat16")
    # The VJP of jax.nn.dot_product_attention mixes float32 and bfloat16, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        bf16 = run_losses(config, mesh, steps=5)
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)
    assert bf16 != f32
    trainer = Trainer(CrammedBertMLM(small_config(), rngs=nnx.Rngs(0)), mlm_objective, config, mesh=mesh)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state["params"]))


@pytest.mark.parametrize("ffn", ["fff", "dense"])
def test_bf16_compute_runs_every_matmul_in_bf16(ffn):
    # A float32-built model: the trainer must switch its modules, not only cast the parameters
    # (float32 modules would promote the bf16 copies back to float32 matmuls).
    import re

    config = dataclasses.replace(BASE, compute_dtype="bfloat16")
    model = CrammedBertMLM(small_config(ffn), rngs=nnx.Rngs(0))
    trainer = Trainer(model, mlm_objective, config, mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    batch, _ = pipeline.mlm_pipeline(mlm_rows(), config.batch_size, vocab_size=VOCAB, specials=WORDPIECE_SPECIALS).next(
        pipeline.initial_position(0))
    text = jax.jit(lambda p, b: trainer._loss(p, b, 0, 0, 0)[0]).lower(
        trainer.state["params"], trainer.place_batch(batch)).as_text()
    operands = [re.search(r"\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", line).groups()
                for line in text.splitlines() if "dot_general" in line]
    assert len(operands) >= 5 and all(o == ("bf16", "bf16") for o in operands), operands
    assert model.encoder.layers[0].attn.dense.dtype == jnp.float32          # the caller's model is untouched


def test_trainers_of_one_structure_share_one_compiled_step():
    # The step is cached by jax.jit on a static description of the program: a second Trainer that
    # differs only in run-time fields (seed, checkpoint interval) reuses it; another recipe does not.
    from fffjax.train import trainer as trainer_module

    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    run_losses(BASE, mesh, steps=2)
    size = trainer_module._jit_train_step._cache_size()
    run_losses(dataclasses.replace(BASE, seed=3, save_every=7, keep=1), mesh, steps=2)
    assert trainer_module._jit_train_step._cache_size() == size
    run_losses(dataclasses.replace(BASE, learning_rate=1e-2), mesh, steps=1)
    assert trainer_module._jit_train_step._cache_size() > size


def test_dropout_is_a_pure_function_of_seed_and_step():
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    config = dataclasses.replace(BASE, train_mode=True)
    first = run_losses(config, mesh, steps=3)
    assert run_losses(config, mesh, steps=3) == first
    no_dropout = run_losses(BASE, mesh, steps=3)
    assert no_dropout != first
    # another seed: other dropout masks, data order and init (the same compiled step)
    assert run_losses(dataclasses.replace(config, seed=5), mesh, steps=3) != first


def test_classifier_learns_a_separable_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=64).astype(np.int32)
    ids = rng.integers(5, VOCAB, size=(64, SEQ)).astype(np.int32)
    ids[:, 1::2] = np.where(labels == 1, 7, 8)[:, None]  # the label is written in every other token
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    config = TrainConfig(steps=40, batch_size=16, learning_rate=3e-3, peak_fraction=0.1)
    trainer = Trainer(CrammedBertClassifier(small_config(), rngs=nnx.Rngs(0)), classification_objective,
                      config, mesh=shd.make_mesh(2, 1, jax.devices()[:2]))
    pipe = pipeline.BatchPipeline(data, 16)
    position = pipeline.initial_position(0)
    for _ in range(config.steps):
        batch, position = pipe.next(position)
        trainer.step(batch)
    result = trainer.evaluate([{k: v[:32] for k, v in data.items()}, {k: v[32:] for k, v in data.items()}])
    assert result["accuracy"] == 1.0 and result["loss"] < 0.5  # chance: 0.69
    assert (trainer.predict({k: v[:16] for k, v in data.items()}).argmax(-1) == labels[:16]).all()
