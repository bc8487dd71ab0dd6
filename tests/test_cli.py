"""The ``kvstream`` command: user errors end in one ``kvstream: error: ...`` line and exit 2, bugs keep their
traceback, ``--version`` prints the version."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

import kvstream
from kvstream import cli
from kvstream.errors import ConfigError
from kvstream.models import build_model, tiny_config


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstream: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def sliding_window_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral-sw")
    build_model(tiny_config("mistral", num_layers=1, sliding_window=16)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("argv,expected", [
    (["demo", "--model", "/nonexistent"], "'/nonexistent' is not a checkpoint directory"),
    (["demo", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["demo", "--level", "7"], "--level must be 0-3"),
    (["demo", "--store", "/proc/self"], "--store '/proc/self' cannot be written"),  # a directory no one can write
    (["demo", "--batch", "0"], "argument --batch"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["chat-demo", "--repeats", "2"], "--repeats 2"),
    (["chat-demo", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["nope"], "unknown command 'nope'"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, expected):
    assert expected in _one_line_error(capsys, argv)


def test_level_error_names_the_flag_or_the_variable(capsys, monkeypatch):
    assert "KVSTREAM_LEVEL" not in _one_line_error(capsys, ["demo", "--level", "7"])
    monkeypatch.setenv("KVSTREAM_LEVEL", "9")
    assert "KVSTREAM_LEVEL must be 0-3" in _one_line_error(capsys, ["demo"])


def test_store_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is not a directory" in _one_line_error(capsys, ["demo", "--store", str(f)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(capsys):
    assert "no CUDA GPU is available" in _one_line_error(capsys, ["demo", "--device", "cuda"])


def test_chat_demo_on_a_sliding_window_model(capsys, sliding_window_model):
    line = _one_line_error(capsys, ["chat-demo", "--model", sliding_window_model, "--turns", "2", "--turn-tokens",
                                    "24", "--new-tokens", "4"])
    assert "sliding window of 16 tokens" in line and "56" in line


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def boom(argv):
        raise RuntimeError("a bug")

    monkeypatch.setitem(sys.modules, "kvstream_test_boom", types.SimpleNamespace(main=boom))
    monkeypatch.setitem(cli.COMMANDS, "boom", ("kvstream_test_boom", "raises"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom"])

    def config_error(argv):
        raise ConfigError("bad\nvalue")  # a message over two lines still prints as one

    monkeypatch.setitem(sys.modules, "kvstream_test_boom", types.SimpleNamespace(main=config_error))
    assert cli.main(["boom"]) == 2


def test_flag_errors_keep_argparse_behaviour_outside_the_cli():
    import argparse

    cli.main(["--version"])
    with pytest.raises(SystemExit):  # the patch of ArgumentParser.error ends with the subcommand
        argparse.ArgumentParser(prog="x").parse_args(["--bogus"])


def test_version_and_errors_from_the_console_script():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "kvstream.cli", "--version"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"kvstream {kvstream.__version__}"
    out = subprocess.run([sys.executable, "-m", "kvstream.cli", "demo", "--device", "tpu"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "kvstream: error: --device 'tpu' is not a device: use cpu, cuda, cuda:N or auto"]
