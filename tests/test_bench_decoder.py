"""experiments/bench_decoder.py: a smoke run of the tiny presets on the CPU writes a sane report."""

import json

import pytest

from fffjax import cli


def test_bench_decoder_runs_the_tiny_presets_on_the_cpu_and_writes_its_tables(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # the script's subprocess, also on a GPU machine
    argv = ["bench", "bench_decoder", "--device", "cpu", "--config", "tiny", "--fff", "2x5", "--batches", "1,2",
            "--prefill", "2x16",
            "--breakdown-batches", "1", "--prompt-length", "8", "--rounds", "1", "--min-rounds", "1", "--calls", "2",
            "--warmup", "1", "--flush-mb", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0, capfd.readouterr().err[-3000:]
    report = json.loads((tmp_path / "decoder_speed_cpu.json").read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["implementations"]["fff_v2_hard"] == ["cpu_ffi"]
    assert [(r["batch"], r["ratio"] > 0) for r in report["decode_ratios"]] == [(1, True), (2, True)]
    assert {(r["model"], r["tokens"]) for r in report["prefill"]} == {("fff", 16), ("dense", 16)}
    (parts,) = report["breakdown"]
    assert set(parts["parts"]["fff"]) == {"feedforward", "attention core", "vocabulary", "rest"}
    alone = parts["alone"]
    assert set(alone) == {"feedforward alone", "feedforward, new tokens", "norm + feedforward + residual, new tokens",
                          "feedforward after a cache flush"}
    flush_kinds = ("cache flush", "cache flush + feedforward")
    flushed = {(r["kind"], r["model"]): r["ms"] for r in report["decode"] if r.get("kind") in flush_kinds}
    for model in ("fff", "dense"):
        assert all(alone[kind][model] > 0 for kind in alone if kind != "feedforward after a cache flush")
        # the cold feedforward is the difference of two timed loops (either may be the noisier)
        assert flushed["cache flush", model] > 0 and flushed["cache flush + feedforward", model] > 0
        assert alone["feedforward after a cache flush"][model] == pytest.approx(
            flushed["cache flush + feedforward", model] - flushed["cache flush", model])
    assert "| feedforward alone after a cache flush, new inputs (x layers) |" in (
        tmp_path / "decoder_speed_cpu.md").read_text()
    floor = report["weight_floor"]["tiny"]
    # tiny: H 64, 2 layers; the dense FFN reads 2 * 4H * H values a layer, FFF 2x5 2 * 6 nodes of 2H + 1
    assert floor["dense_bytes"]["feedforward"] == 4 * 2 * 2 * 4 * 64 * 64
    assert floor["fff_bytes"]["feedforward"] == 4 * 2 * 2 * 6 * (2 * 64 + 1)
    assert (report["fff_trees"], report["fff_depth"]) == (2, 5)
    assert floor["ideal_speedup"] > 1
    text = (tmp_path / "decoder_speed_cpu.md").read_text()
    assert "| tiny | 1 |" in text and "| norm + feedforward + residual, new inputs (x layers) |" in text
    assert (tmp_path / "decoder_speed_cpu.png").stat().st_size > 0


def test_bench_decoder_refuses_a_tree_shape_without_trees(capfd):
    assert cli.main(["bench", "bench_decoder", "--device", "cpu", "--fff", "0x5"]) == 2
    assert "--fff must be KxD" in capfd.readouterr().err
