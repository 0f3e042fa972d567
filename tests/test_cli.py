from __future__ import annotations

import pytest
from click.testing import CliRunner

from aira_opt import __version__
from aira_opt.cli import main

COMMANDS = ["export", "generate", "check", "bench", "build", "inspect"]


def test_version_flag_prints_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output and "--" in result.output


@pytest.mark.parametrize("command", ["generate", "check"])
def test_onnx_or_engine_must_be_given_exactly_once(command, tiny_export):
    result = CliRunner().invoke(main, [command, "Hi"] if command == "generate" else [command])
    assert result.exit_code == 1 and "give exactly one of --onnx DIR" in result.output
    result = CliRunner().invoke(main, [command, "--onnx", str(tiny_export), "--engine", str(tiny_export)])
    assert result.exit_code == 1 and "exactly one" in result.output and "Traceback" not in result.output


def test_a_folder_that_is_not_an_export_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--onnx", str(tmp_path), "Hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error:") and result.output.count("\n") == 1
