"""experiments/bench_gpu.py --tree-shapes --from-json: the tree-shape table redrawn with the decoder
experiments' quality, one column each, its timings kept."""

import json
import shutil
from pathlib import Path

from fffjax import cli

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def test_tree_shape_redraw_shows_each_decoder_experiments_perplexity(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    report = tmp_path / "tree_shapes_cpu.json"
    shutil.copy(RESULTS / "tree_shapes_cpu.json", report)
    before = json.loads(report.read_text())["results"]
    assert cli.main(["bench", "gpu", "--tree-shapes", "--from-json", str(report)]) == 0, capfd.readouterr().err[-3000:]
    after = json.loads(report.read_text())
    assert after["results"] == before
    sources = [c["source"] for c in after["quality"]]
    assert sources[0] == "decoder_lm_cpu.json" and len(sources) == len(set(sources))
    decoder = json.loads((RESULTS / "decoder_lm_cpu.json").read_text())["variants"]
    text = (tmp_path / "tree_shapes_cpu.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    assert header.count("| perplexity, ") == len(sources)
    row_1x11 = next(line for line in text.splitlines() if line.startswith("| 1x11 |"))
    assert f"{decoder['tiny-fff-1x11']['perplexity_mean']:.1f} ± " in row_1x11
    assert f"({decoder['tiny-dense']['perplexity_mean']:.1f})" in row_1x11
    small = json.loads((RESULTS / "decoder_lm_gpu.json").read_text())["variants"]   # another size, another device
    assert "perplexity, small, " in header
    assert f"{small['small-fff-1x11']['perplexity_mean']:.1f} ± " in row_1x11
    assert f"({small['small-dense']['perplexity_mean']:.1f})" in row_1x11
