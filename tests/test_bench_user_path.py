"""experiments/bench_user_path_gpu.py: a smoke run on the CPU writes every phase of its report."""

import json

from fffjax import cli


def test_bench_user_path_times_forward_training_and_checks_gradients(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # the script's subprocess, also on a GPU machine
    argv = ["bench", "bench_user_path_gpu", "--tokens", "1024", "--check-tokens", "256", "--rounds", "1",
            "--budget-s", "0.01", "--chunk-tokens", "512", "--out", str(tmp_path)]
    assert cli.main(argv) == 0, capfd.readouterr().err[-3000:]
    report = json.loads((tmp_path / "user_path_gpu.json").read_text())
    # No torch timing off a GPU; the one-pass layout needs a GPU (Triton), so its failure is reported.
    assert set(report["forward"]) == {"fff_args", "fff_closed", "dense_xla", "fff_chunk512"}
    assert "interpret" in report["forward"].pop("fff_chunk512")["error"]
    for row in report["forward"].values():
        assert row["ms"] > 0 and row["chained_ms"] > 0 and row["compile_s"] > 0
    assert report["roofline_ms"] > 0 and report["copy_bandwidth"] > 0
    assert set(report["training"]) == {"fff_public_op", "masked_reference", "fp32_gradient_check"}
    assert all(e < 1e-4 for e in report["training"]["fp32_gradient_check"]["max_rel_error_dx_dw_in_db_in_dw_out"])
    text = (tmp_path / "user_path_gpu.md").read_text()
    assert "| fff_args |" in text and "| masked_reference | 1,024 |" in text
    assert "Failed to build: fff_chunk512" in text
