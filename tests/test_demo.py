"""`fffjax demo` end to end at a tiny size, and the CLI around it."""

import importlib.util

import numpy as np
import pytest

from fffjax import cli, demo
from fffjax.convert import load
from fffjax.data.vision import load_digits
from fffjax.train import flat
from fffjax.train.checkpoint import restore_checkpoint

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "fastfeedforward"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = demo.DemoConfig(out=str(out), epochs=3, hardening_epochs=2, depth=2, leaf_width=4,
                             timing_repeats=3, timing_calls=2)
    lines = []
    result = demo.run_demo(config, print_fn=lines.append)
    return config, result, lines


def test_demo_trains_and_reports(tiny_run):
    config, result, lines = tiny_run
    for acc in (result.fff_soft_accuracy, result.fff_hard_accuracy_before, result.fff_hard_accuracy,
                result.ff_accuracy):
        assert 0.3 < acc <= 1.0  # chance is 0.1 on ten classes
    assert result.fff_hard_seconds > 0 and result.ff_seconds > 0
    assert result.speedup == pytest.approx(result.ff_seconds / result.fff_hard_seconds)
    text = "\n".join(lines)
    assert f"hard {result.fff_hard_accuracy:.4f}" in text and "speedup" in text


def _restore_models(path):
    """The demo's FFF and FF specs and parameters, from the checkpoint alone (config item + params item)."""
    params, config = restore_checkpoint(path)
    specs = {name: flat.ModelSpec(**spec) for name, spec in config["specs"].items()}
    return specs, params, config


def test_checkpoint_restores_the_trained_models(tiny_run):
    config, result, _ = tiny_run
    assert result.checkpoint.is_dir()
    specs, params, saved_config = _restore_models(result.checkpoint)
    assert saved_config["depth"] == config.depth and saved_config["leaf_width"] == config.leaf_width
    assert specs["fff"].depth == config.depth and specs["fff"].width == config.leaf_width
    assert saved_config["results"]["fff_hard_accuracy"] == result.fff_hard_accuracy
    data = load_digits(seed=config.seed)
    assert flat.accuracy(specs["fff"], params["fff"], data.x_test, data.y_test) == result.fff_hard_accuracy
    assert flat.accuracy(specs["ff"], params["ff"], data.x_test, data.y_test) == result.ff_accuracy


def test_export_holds_the_checkpointed_parameters(tiny_run):
    pytest.importorskip("safetensors")
    config, result, _ = tiny_run
    assert result.export.is_file()
    _, params, _ = _restore_models(result.checkpoint)
    exported = load(result.export)
    assert exported["depth"].shape == () and exported["depth"].dtype == np.int64
    assert int(exported["depth"]) == config.depth
    for name in ("node_weights", "w1s", "b1s", "w2s", "b2s"):
        np.testing.assert_array_equal(np.asarray(params["fff"][name]), exported[name])
    np.testing.assert_array_equal(np.asarray(params["fff"]["node_biases"])[:, None], exported["node_biases"])
    assert params["ff"]["w1"].shape == (64, 2**config.depth * config.leaf_width)


def test_inspect_reads_the_demo_checkpoint_and_export_refuses_it(tiny_run, capsys, tmp_path):
    _, result, _ = tiny_run
    for path in (result.checkpoint, result.checkpoint.parent):  # the checkpoint, or the demo's --out folder
        capsys.readouterr()
        assert cli.main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"checkpoint  {result.checkpoint}" in out and "fffjax.nn.FFF" in out
        assert " fff " in out and " ff " in out  # parameter counts of both models
        assert cli.main(["export", str(path), str(tmp_path / "hf")]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "Traceback" not in captured.err
        assert captured.err.count("\n") == 1 and captured.err.startswith(
            f"fffjax: error: checkpoint {result.checkpoint} holds the FFF-v1 and FF models of `fffjax demo`, "
            "not a crammed-BERT model (the only kind `fffjax export` writes")
        assert str(result.checkpoint.parent / "fff.safetensors") in captured.err  # the demo's own export
        assert not (tmp_path / "hf").exists()


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and fastfeedforward")
def test_export_agrees_with_fastfeedforward(tiny_run):
    _, result, lines = tiny_run
    assert result.torch_agreement == 1.0
    assert result.torch_max_abs_diff < 1e-5
    assert result.legacy_agreement == 1.0
    assert result.legacy_max_abs_diff < 1e-5
    assert any("argmax agreement 100.00%" in line for line in lines)


def test_cli_lists_demo_and_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["demo", "--depth", "-1"]) == 2
    assert capsys.readouterr().err == "fffjax: error: --depth must be >= 0, got -1\n"
    assert cli.main(["demo", "--leaf-width", "0"]) == 2
    assert capsys.readouterr().err == "fffjax: error: --leaf-width must be >= 1, got 0\n"
    with pytest.raises(SystemExit):  # argparse: missing command
        cli.main([])
