"""experiments/decoder_lm.py: variant names, and a two-variant sweep on a tiny corpus through all three
phases (train, analyse, report) on the CPU."""

import dataclasses
import importlib.util
import json

import pytest
from _text_helpers import synthetic_text

from fffjax import cli
from fffjax.bench_cli import EXPERIMENTS


def _script():
    spec = importlib.util.spec_from_file_location("decoder_lm", EXPERIMENTS / "decoder_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_names_give_presets_and_any_tree_shape():
    script = _script()
    assert script.variant_config("small-fff-4x9").fff_trees == 4
    wide = script.variant_config("small-fff-1x15")
    assert (wide.ffn, wide.fff_trees, wide.fff_depth, wide.hidden_size) == ("fff", 1, 15, 256)
    assert script.variant_config("tiny-narrow-2x3").active_neurons == 8
    with pytest.raises(ValueError, match="variant 'small-wide': expected a preset"):
        script.variant_config("small-wide")
    plain, balanced = script.variant_config("small-fff-1x11"), script.variant_config("small-fff-1x11-lb")
    assert plain.load_balance == 0.0 and balanced == dataclasses.replace(plain, load_balance=script.LOAD_BALANCE)
    assert script.variant_config("tiny-fff-2x3-lb0.5").load_balance == 0.5
    assert script._ffn_description(balanced)[0] == f"FFF-v2 1x11, load balance {script.LOAD_BALANCE:g}"
    with pytest.raises(ValueError, match="'small-dense-lb': the load-balancing suffix '-lb' needs an FFF variant"):
        script.variant_config("small-dense-lb")


@pytest.mark.slow
def test_a_tiny_sweep_trains_analyses_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cache = tmp_path / "text"
    (cache / "corpus").mkdir(parents=True)
    for seed, name in enumerate(("sotu", "moby_dick")):
        (cache / "corpus" / f"{name}.txt").write_text(synthetic_text(400, seed=seed).replace("\n", "\n\n"))
    runs = tmp_path / "runs"
    common = ["--runs", str(runs), "--cache", str(cache), "--parallel", "2"]
    assert cli.main(["bench", "decoder_lm", "train", *common, "--variants", "tiny-none", "tiny-fff-2x3",
                     "--seeds", "0", "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-batches", "1",
                     "--sources", "sotu", "moby_dick", "--holdout", "0.1", "--float32"]) == 0
    assert cli.main(["bench", "decoder_lm", "analyse", *common, "--analyse-tokens", "256"]) == 0
    fff = json.loads((runs / "tiny-fff-2x3" / "seed0" / "analysis.json").read_text())
    assert len(fff["layers"]) == 2 and len(fff["layers"][0]["dead_fraction"]) == 4
    assert fff["layers"][0]["tokens"] == 256 and set(fff["samples"]) == set(_script().PROMPTS)
    assert cli.main(["bench", "decoder_lm", "report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "decoder_lm.json").read_text())
    assert report["variants"]["tiny-fff-2x3"]["ffn_neurons"] == 2 * 15
    assert report["variants"]["tiny-none"]["dead_fraction"] is None
    assert len(report["sweeps"]) == 1 and report["sweeps"][0]["steps"] == 2
    text = (tmp_path / "out" / "decoder_lm.md").read_text()
    assert "| tiny-fff-2x3 | FFF-v2 2x3 | 30 | 8 |" in text and "+0.0%" in text
    assert (tmp_path / "out" / "decoder_lm.png").stat().st_size > 0
