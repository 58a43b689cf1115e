"""Training: the AdamW recipe, losses, the sharded step (1 device vs data=4 x model=2), gradient
accumulation, bf16, dropout determinism, and the run loop's outputs (metrics JSONL, plot,
checkpoints). The model is crammed BERT shrunk to seconds per test."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fffjax.data import pipeline
from fffjax.models import CrammedBertClassifier, CrammedBertMLM, get_config
from fffjax.train import TrainConfig, Trainer, classification_objective, fit, mlm_objective
from fffjax.train import sharding as shd
from fffjax.train.metrics import read_metrics
from fffjax.train.objectives import gather_positions, mlm_loss
from fffjax.train.optim import decay_mask, make_optimizer, triangle_schedule

VOCAB, SEQ = 96, 16


def small_config(ffn: str = "fff"):
    base = get_config("tiny" if ffn == "fff" else "tiny-dense")
    return dataclasses.replace(base, vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                               max_seq_length=SEQ, fff_depth=3, dense_width=64, head_dim=16)


# One TrainConfig shared by most tests, so their Trainers share one compiled step.
BASE = TrainConfig(steps=20, batch_size=16, learning_rate=3e-3)


def mlm_rows(n: int = 96, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(5, VOCAB, size=(n, SEQ)).astype(np.int32)
    rows[:, 0] = 2
    return rows


def run_losses(config: TrainConfig, mesh, *, ffn: str = "fff", steps: int | None = None) -> list[float]:
    model = CrammedBertMLM(small_config(ffn), rngs=nnx.Rngs(params=0, dropout=1))
    trainer = Trainer(model, mlm_objective, config, mesh=mesh)
    pipe = pipeline.mlm_pipeline(mlm_rows(), config.batch_size, vocab_size=VOCAB)
    position = pipeline.initial_position(config.seed)
    losses = []
    for _ in range(steps or config.steps):
        batch, position = pipe.next(position)
        losses.append(trainer.step(batch)["loss"])
    return losses


# --------------------------------------------------------------------------- optimizer pieces


def test_triangle_schedule_shape():
    schedule = triangle_schedule(1e-3, 100, 0.5)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0 and values.argmax() == 50 and np.isclose(values[50], 1e-3)
    assert np.isclose(values[25], 5e-4) and np.isclose(values[75], 5e-4) and values[100] == 0.0
    assert np.all(np.diff(values[:51]) > 0) and np.all(np.diff(values[50:]) < 0)


def test_decay_mask_excludes_norms_and_biases_of_the_real_model():
    model = CrammedBertClassifier(small_config(), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = {shd.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert not mask["encoder.layers.0.norm1.scale"] and not mask["encoder.final_norm.bias"]
    assert not mask["encoder.layers.0.ffn.b_in"] and not mask["head.bias"] and not mask["pooler.dense.bias"]
    assert mask["encoder.layers.0.ffn.w_in"] and mask["encoder.layers.0.attn.query_key_value.kernel"]
    assert mask["encoder.embedding.word_embedding.embedding"] and mask["head.kernel"]


def test_optimizer_is_adamw_with_recipe_constants_and_clipping():
    config = TrainConfig(steps=10, learning_rate=1e-2, peak_fraction=0.1)
    tx = make_optimizer(config)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    grads = {"w": jnp.full((2, 2), 100.0), "norm": {"scale": jnp.zeros((2,))}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # step 0 of the triangle has lr 0: nothing moves; step 1 (lr = peak) moves w by lr * (1 + wd)
    assert float(optax.tree.norm(updates)) == 0.0
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    lr = 1e-2
    m_hat = (0.1 * 0.25 + 0.09 * 0.25) / (1 - 0.9 ** 2)  # clipped grad of w is 0.5 / 2 = 0.25 per entry
    v_hat = (0.02 * 0.0625 + 0.0196 * 0.0625) / (1 - 0.98 ** 2)
    expected_w = -lr * (m_hat / (np.sqrt(v_hat) + 1e-12) + 0.01 * 1.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected_w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["norm"]["scale"]), 0.0)  # zero grad, no weight decay


def test_mlm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3)).astype(np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    loss, metrics = mlm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * weights).sum() / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), ((logits.argmax(-1) == labels) * weights).sum() / 3)


def test_sparse_decode_equals_gathered_full_logits():
    model = CrammedBertMLM(small_config(), rngs=nnx.Rngs(0))
    model.eval()
    batch = {k: jnp.asarray(v) for k, v in pipeline.mlm_pipeline(mlm_rows(), 8, vocab_size=VOCAB).batch_at(
        pipeline.initial_position(0)).items()}
    sparse, _ = mlm_objective(model, batch)
    full = gather_positions(model(batch["input_ids"], batch["attention_mask"]), batch["mask_positions"])
    dense_loss, _ = mlm_loss(full, batch["mask_labels"], batch["mask_weights"])
    np.testing.assert_allclose(float(sparse), float(dense_loss), rtol=1e-6)


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
        pipe = pipeline.mlm_pipeline(mlm_rows(), BASE.batch_size, vocab_size=VOCAB)
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


def test_spec_for_falls_back_to_replication_when_not_divisible():
    mesh = shd.make_mesh(4, 2, jax.devices()[:8])
    assert shd.spec_for("x.ffn.w_in", (7, 32), mesh) == jax.P(None, "model")
    assert shd.spec_for("x.ffn.w_in", (7, 33), mesh) == jax.P()
    assert shd.spec_for("x.norm.scale", (32,), mesh) == jax.P()
    assert shd.spec_for("x.other", (4, 6), mesh) == jax.P(None, "model")
    with pytest.raises(ValueError, match="model"):
        shd.make_mesh(1, 3, jax.devices()[:8])


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
    batch, _ = pipeline.mlm_pipeline(mlm_rows(), config.batch_size, vocab_size=VOCAB).next(
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


# --------------------------------------------------------------------------- the run loop


def test_fit_writes_metrics_plot_and_checkpoints(tmp_path):
    config = dataclasses.replace(BASE, steps=6, save_every=3, eval_every=3)
    trainer = Trainer(CrammedBertMLM(small_config(), rngs=nnx.Rngs(0)), mlm_objective, config,
                      mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    pipe = pipeline.mlm_pipeline(mlm_rows(), 16, vocab_size=VOCAB)
    held = [pipeline.mlm_pipeline(mlm_rows(32, seed=1), 16, vocab_size=VOCAB).batch_at(pipeline.initial_position(9))]
    records = fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(),
                  eval_batches=lambda: held, progress=False, tokens_per_example=SEQ)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_s"} <= set(records[0])
    assert "eval_loss" in records[2] and "eval_loss" in records[5] and "eval_loss" not in records[3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    from fffjax.train.checkpoint import restore_checkpoint

    params, model_config = restore_checkpoint(tmp_path / "checkpoints" / "6")
    assert model_config == small_config().to_dict()
    np.testing.assert_array_equal(np.asarray(params["encoder"]["final_norm"]["scale"]),
                                  np.asarray(trainer.state["params"]["encoder"]["final_norm"]["scale"]))
    with pytest.raises(FileExistsError, match="out_dir"):  # no silent overwrite of a finished run
        fit(trainer, pipe, out_dir=tmp_path, model_config=small_config().to_dict(), resume=False, progress=False)


# --------------------------------------------------------------------------- the commands


def _fake_text_cache(root):
    from _text_helpers import synthetic_text  # pytest puts tests/ on the import path

    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "sotu.txt").write_text(synthetic_text(400))
    spam_root = root / "raw/spam-assassin/package/data"
    for group, n in (("easy-ham-1", 24), ("spam-1", 16)):
        (spam_root / group).mkdir(parents=True)
        for i in range(n):
            words = "win money now" if "spam" in group else "the whale meeting notes"
            text = f"Subject: {words} {i}\nFrom: a@b.c\n\n{words} " * 3
            (spam_root / group / f"{i:05d}.json").write_text(json.dumps({"id": f"{i:05d}", "group": group, "text": text}))


@pytest.mark.slow
def test_pretrain_and_finetune_commands_end_to_end(tmp_path):
    import argparse

    from fffjax.train import finetune, pretrain

    cache = tmp_path / "text"
    _fake_text_cache(cache)
    run_config = tmp_path / "run.json"
    run_config.write_text(json.dumps({
        "model": small_config().to_dict(),
        "train": {"steps": 4, "batch_size": 8, "save_every": 2, "eval_every": 2, "learning_rate": 3e-3},
        "data": {"sources": ["sotu"], "seq_length": SEQ, "holdout": 0.1, "eval_batches": 1}}))

    def invoke(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return module.run(parser.parse_args(argv))

    out = tmp_path / "pretrain"
    assert invoke(pretrain, ["--config", str(run_config), "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_loss" in records[-1]
    assert (out / "loss.png").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    # running it again resumes at the last step: nothing to train, the log is unchanged
    assert invoke(pretrain, ["--config", str(run_config), "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    assert read_metrics(out / "metrics.jsonl") == records

    ft = tmp_path / "finetune"
    assert invoke(finetune, ["--config", str(run_config), "--task", "spam", "--init", str(out), "--out", str(ft),
                             "--cache", str(cache), "--steps", "3", "--no-progress"]) == 0
    result = json.loads((ft / "result.json").read_text())
    assert result["n_test"] == 8 and 0.0 <= result["test_accuracy"] <= 1.0
    assert [r["step"] for r in read_metrics(ft / "metrics.jsonl")] == [1, 2, 3]
