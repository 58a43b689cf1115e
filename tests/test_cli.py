"""The `fffjax` command: `--version`, and user errors as one `fffjax: error:` line with status 2
(tracebacks only with `--debug`; a bug keeps its traceback)."""

import importlib.metadata
import tomllib
from pathlib import Path

import jax.numpy as jnp
import pytest

import fffjax
from fffjax import cli
from fffjax.train.checkpoint import PARAMS, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"fffjax {fffjax.__version__}\n"


def test_the_version_has_one_source():
    """pyproject reads the version from `fffjax.__version__`; the installed metadata agrees with it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fffjax.__version__"}
    assert importlib.metadata.version("fffjax") == fffjax.__version__


def test_license_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the fffjax authors\n")
    for upstream in ("pbelcak/fastfeedforward", "pbelcak/UltraFastBERT", "JonasGeiping/cramming"):
        assert upstream in text


def _user_error(capsys, argv) -> str:
    """Runs ``fffjax argv``, checks it failed as a user error, returns the message."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fffjax: error: "), captured.err
    return lines[0].removeprefix("fffjax: error: ")


def test_missing_path_is_one_line(capsys, tmp_path):
    message = _user_error(capsys, ["inspect", str(tmp_path / "nowhere")])
    assert message == f"checkpoint {tmp_path / 'nowhere'} does not exist"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "inspect", str(tmp_path / "nowhere")])


def test_existing_output_is_one_line(capsys, tmp_path):
    message = _user_error(capsys, ["import", str(tmp_path / "src"), str(tmp_path)])
    assert message.startswith(f"OUT {tmp_path} already exists")


def test_unknown_config_is_one_line(capsys, tmp_path):
    message = _user_error(capsys, ["pretrain", "--config", "no-such-preset", "--out", str(tmp_path / "run")])
    assert "config 'no-such-preset' is neither a preset" in message and "tiny" in message


def test_missing_corpus_is_one_line(capsys, tmp_path):
    message = _user_error(capsys, ["pretrain", "--config", "tiny", "--cache", str(tmp_path / "text"),
                                   "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    assert "not found at" in message and "experiments/fetch_text.sh" in message


def test_damaged_checkpoint_is_one_line(capsys, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones((2, 3))}, {"model": "test"})
    (path / PARAMS / "_METADATA").write_text("{not json")
    message = _user_error(capsys, ["inspect", str(path)])
    assert message.startswith(f"checkpoint {path} is unreadable")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from fffjax.convert import cmd_inspect

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cmd_inspect, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["inspect", str(tmp_path)])
