"""experiments/bench_few_tokens.py: a smoke run on the CPU times and checks each variant it is given."""

import json

from fffjax import cli


def test_bench_few_tokens_times_the_walk_variants(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # the script's subprocess, also on a GPU machine
    # --kernels runs the forced Pallas variants in interpret mode off a GPU; every FFF output is checked
    # against the float32 reference before it is timed.
    argv = ["bench", "few_tokens", "--layers", "4x9", "--tokens", "1", "--kernels", "--variants", "fff_default",
            "fff_walk_tree_rows", "fff_walk_dense4", "--budget-s", "0.01", "--rounds", "2", "--chain", "2",
            "--layer-sets", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 0, capfd.readouterr().err[-3000:]
    report = json.loads((tmp_path / "few_tokens_cpu.json").read_text())
    rows = {row["impl"]: row for row in report["results"]}
    assert set(rows) == {"fff_default", "fff_walk_tree_rows", "fff_walk_dense4", "dense_4095"}
    for name in ("fff_default", "fff_walk_tree_rows", "fff_walk_dense4"):
        assert rows[name]["max_rel_error"] < 1e-4
        assert rows[name]["us"] > 0 and rows[name]["device_us"] > 0
        assert rows[name]["layers_us"] > 0
    text = (tmp_path / "few_tokens_cpu.md").read_text()
    assert "| fff_walk_tree_rows |" in text and "## 4x9: per call in a jitted loop" in text
    assert "## 4x9: per call over distinct weights, as a model's layers" in text


def test_bench_few_tokens_refuses_no_layer_calls(capfd, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cli.main(["bench", "few_tokens", "--layer-sets", "0"]) != 0
    assert "--layer-sets: expected a positive number of calls, got 0" in capfd.readouterr().err
