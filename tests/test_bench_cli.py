"""`fffjax bench`: lists the scripts of experiments/ and runs one by name."""

import pytest

from fffjax import bench_cli, cli


def test_bench_lists_the_experiment_scripts_with_their_descriptions(capsys):
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["bench_cpu"])
    assert "CPU benchmark" in line
    assert all(name in out for name in ("bench_gpu", "bench_bert_gpu", "comm_model", "fff_paper"))


def test_every_script_has_a_one_line_description():
    found = bench_cli.scripts()
    assert "bench_cpu" in found and len(found) >= 10
    assert {name: description for name, (_, description) in found.items() if not description.endswith(".")} == {}


def test_bench_runs_a_script_with_its_arguments(capfd):
    assert cli.main(["bench", "comm_model", "--help"]) == 0
    assert "usage: comm_model.py" in capfd.readouterr().out


def test_bench_prefix_may_be_left_out():
    available = bench_cli.scripts()
    assert bench_cli.resolve("cpu", available) == "bench_cpu"
    assert bench_cli.resolve("fff_paper", available) == "fff_paper"


def test_unknown_benchmark_names_the_choices(capsys):
    assert cli.main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no_such_bench'" in err and "bench_cpu" in err and "comm_model" in err


def test_missing_experiments_folder_says_where_the_scripts_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install -e"):
        bench_cli.scripts(tmp_path / "experiments")
