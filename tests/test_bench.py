"""fffjax.bench: the timing vocabulary, kernel profiles and result files, on tiny functions."""

import json
import math
import re
import time

import jax
import jax.numpy as jnp
import pytest

from fffjax import bench


@pytest.fixture(scope="module")
def tiny():
    fn = jax.jit(lambda x: jnp.sin(x) @ x)
    return fn, jnp.ones((32, 32), jnp.float32)


def _positive_finite(seconds: float) -> bool:
    return isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


def test_latency_stream_chained_return_positive_seconds(tiny):
    fn, x = tiny
    assert _positive_finite(bench.latency(fn, x, calls=3, warmup=1, repeats=2))
    assert _positive_finite(bench.stream(fn, x, calls=3, warmup=1, repeats=2))
    assert _positive_finite(bench.stream(fn, x, calls=None, warmup=2, repeats=2, budget_s=0.01))
    assert _positive_finite(bench.chained(fn, x, calls=4, budget_s=0.01, repeats=2))


def test_chained_layers_calls_each_weight_set_in_order():
    traced = []

    def fn(x, w):
        traced.append(w.shape)
        return jnp.sum(x) * w

    sets = [(jnp.ones((3,)), jnp.ones((n, n))) for n in (2, 3, 4)]
    assert _positive_finite(bench.chained_layers(fn, sets, budget_s=0.01, repeats=2))
    assert traced[-3:] == [(2, 2), (3, 3), (4, 4)]   # after eval_shape's trace of the first set, one call per set
    with pytest.raises(ValueError, match="calls"):
        bench.chained_layers(fn, [], budget_s=0.01)


def test_calls_in_order_keeps_every_call_in_the_compiled_program():
    # Only the last output is what a caller would read: XLA must still run every call.
    sets = [(jnp.ones((4, 8)), jnp.full((8, 8), float(i))) for i in range(5)]
    program = jax.jit(lambda *s: bench.calls_in_order(lambda x, w: x @ w, s))
    text = program.lower(*sets).compile().as_text()
    assert len(re.findall(r"\bdot\(", text)) == 5
    outs = program(*sets)
    assert [float(o[0, 0]) for o in outs] == [8.0 * i for i in range(5)]


def test_latency_waits_for_every_call_and_stream_only_sends():
    sent = []

    def fn():
        sent.append(1)
        return jnp.zeros(())

    bench.latency(fn, calls=3, warmup=2, repeats=4)
    assert len(sent) == 2 + 3 * 4
    sent.clear()
    bench.stream(fn, calls=5, warmup=1, repeats=2)
    assert len(sent) == 1 + 5 * 2


def test_stream_sizes_runs_from_the_last_warmup_call():
    sent = []

    def fn():
        sent.append(1)
        time.sleep(0.002)

    bench.stream(fn, calls=None, warmup=1, repeats=2, budget_s=0.02, max_calls=50)
    calls_per_run = (len(sent) - 1) / 2
    assert 1 <= calls_per_run <= 5          # 0.02 s / 2 ms / 2 runs, less the sleep's overshoot


def test_stream_and_side_by_side_reject_bad_arguments(tiny):
    fn, x = tiny
    with pytest.raises(ValueError, match="warmup"):
        bench.stream(fn, x, calls=None, warmup=0)
    with pytest.raises(ValueError, match="repeats"):
        bench.latency(fn, x, repeats=0)
    with pytest.raises(ValueError, match="variants"):
        bench.side_by_side({}, rounds=3)


def test_side_by_side_medians_and_ratio_against_the_first(tiny):
    fn, x = tiny
    times = bench.side_by_side({"tiny": lambda: fn(x), "slow": lambda: time.sleep(0.004)}, rounds=3, warmup=1)
    assert list(times) == ["tiny", "slow"]
    assert times["tiny"].vs_first == 1.0
    assert times["slow"].vs_first == pytest.approx(times["slow"].median_s / times["tiny"].median_s)
    assert times["slow"].median_s >= 0.004 > times["tiny"].median_s
    for t in times.values():
        assert len(t.samples_s) == len(t.cpu_samples_s) == 3
        assert t.min_s <= t.median_s and all(_positive_finite(s) for s in t.samples_s)


def test_side_by_side_counts_calls_and_gives_slow_variants_fewer_rounds_within_a_budget():
    sent = {"fast": 0, "slow": 0}

    def fast():
        sent["fast"] += 1

    def slow():
        sent["slow"] += 1
        time.sleep(0.01)

    times = bench.side_by_side({"fast": fast, "slow": slow}, rounds=10, calls=2, warmup=2, budget_s=0.02,
                               min_rounds=3)
    assert len(times["fast"].samples_s) == 10 and len(times["slow"].samples_s) == 3
    assert sent == {"fast": 2 + 10 * 2, "slow": 2 + 3 * 2}


def test_kernel_summary_groups_ops_and_measures_span_and_busy_time():
    events = [{"ts": 0.0, "dur": 10.0, "name": "k1", "args": {"hlo_op": "fusion.12"}},
              {"ts": 20.0, "dur": 5.0, "name": "k2", "args": {"hlo_op": "fusion.3"}},
              {"ts": 30.0, "dur": 20.0, "name": "triton_gemm", "args": {"hlo_op": "command_buffer.1"}}]
    summary = bench.kernel_summary(events)
    assert summary["span_ms"] == pytest.approx(0.05) and summary["busy_ms"] == pytest.approx(0.035)
    assert summary["kernels"] == 3
    assert summary["ops"] == [{"op": "triton_gemm", "calls": 1, "ms": pytest.approx(0.02)},
                              {"op": "fusion", "calls": 2, "ms": pytest.approx(0.015)}]
    assert bench.kernel_summary([]) == {"span_ms": 0.0, "busy_ms": 0.0, "kernels": 0, "ops": []}


def test_device_events_keep_gpu_lines_or_else_hlo_ops():
    gpu = {"traceEvents": [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
                           {"ph": "X", "pid": 7, "ts": 0, "dur": 1, "name": "kernel", "args": {}},
                           {"ph": "X", "pid": 1, "ts": 0, "dur": 1, "name": "host", "args": {"hlo_op": "x"}}]}
    assert [e["name"] for e in bench.device_events(gpu)] == ["kernel"]
    cpu = {"traceEvents": gpu["traceEvents"][1:]}
    assert [e["name"] for e in bench.device_events(cpu)] == ["host"]


def test_profile_kernels_and_per_layer_on_the_cpu(tiny):
    fn, x = tiny
    summary = bench.profile_kernels(fn, x, warmup=1)
    assert summary["kernels"] >= 1 and summary["busy_ms"] > 0
    kernel_ms, wall_ms, again = bench.per_layer(fn, x, layers=2, calls=2, warmup=1, repeats=2)
    assert kernel_ms == pytest.approx(again["busy_ms"] / 2) and wall_ms > 0


def test_copy_bandwidth_is_bytes_per_second():
    assert _positive_finite(bench.copy_bandwidth(n_bytes=2**20))


def test_provenance_records_command_date_and_device():
    record = bench.provenance("experiments/bench_cpu.py", ["--tokens", "128", "a b"])
    assert record["command"] == "python experiments/bench_cpu.py --tokens 128 'a b'"
    assert record["device_kind"] == jax.devices()[0].device_kind == record["machine"]["device_kind"]
    assert record["machine"]["jax"] == jax.__version__ and record["machine"]["cores"] >= 1
    assert record["date_utc"].endswith("UTC")
    line = bench.provenance_line(record)
    assert record["command"] in line and record["device_kind"] in line and jax.__version__ in line
    legacy = bench.provenance_line({"command": "python x.py", "device": "NVIDIA H200", "jax_version": "0.9"})
    assert legacy == "Produced by `python x.py` (NVIDIA H200, jax 0.9)."
    merged = bench.provenance_line({"commands": ["python x.py", "python x.py --tokens 8"]})
    assert merged == "Produced by `python x.py` and `python x.py --tokens 8`."


def test_write_results_writes_json_markdown_and_figure(tmp_path):
    report = {**bench.provenance("experiments/bench_cpu.py", []), "rows": [{"ms": 1.5}]}
    plt = bench.pyplot()
    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = bench.write_results(tmp_path / "out", "demo", report=report, markdown="# title", figure=figure)
    assert [p.name for p in paths] == ["demo.json", "demo.md", "demo.png"]
    saved = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert saved["command"] == "python experiments/bench_cpu.py" and saved["device_kind"] == report["device_kind"]
    assert saved["rows"] == [{"ms": 1.5}]
    assert (tmp_path / "out" / "demo.md").read_text() == "# title\n"
    assert (tmp_path / "out" / "demo.png").stat().st_size > 0
    assert bench.write_results(tmp_path, "nested/run", markdown="x") == [tmp_path / "nested" / "run.md"]
    with pytest.raises(ValueError, match="at least one"):
        bench.write_results(tmp_path, "nothing")


def test_parse_fields_gives_keyword_arguments():
    names = ("block_q", "num_warps", "heads_per_program", "num_stages")
    assert bench.parse_fields("128x8", names) == {"block_q": 128, "num_warps": 8}
    assert bench.parse_fields("64x4x2x3", names) == {"block_q": 64, "num_warps": 4, "heads_per_program": 2,
                                                     "num_stages": 3}
    for bad in ("", "128x", "1x2x3x4x5", "ax4"):
        with pytest.raises(ValueError, match="block_qxnum_warps"):
            bench.parse_fields(bad, names)


def test_bench_user_path_smoke_run_records_every_forward_variant_and_training_stage(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_user_path.py"
    spec = importlib.util.spec_from_file_location("bench_user_path", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--tokens-log2", "6", "6", "--hidden", "32", "--depth", "3", "--dense-width", "64",
                 "--budget-s", "0.005", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "user_path_cpu.json").read_text())
    assert [(r["path"], r["weights"]) for r in report["forward"]] == [
        ("public", "arguments"), ("public", "constants"), ("kernel", "arguments"), ("kernel", "constants"),
        ("dense", "arguments")]
    assert all(r["one_call_ms"] > 0 and r["in_loop_ms"] > 0 for r in report["forward"])
    assert [r["stage"].split(",")[1].strip() for r in report["training"]] == ["public", "masked reference"]
    assert max(report["gradient_check"]["max_rel_error_x_w_in_b_in_w_out"]) < 1e-5
