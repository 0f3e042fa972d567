from __future__ import annotations

import pytest
from click.testing import CliRunner

from aira_opt import __version__
from aira_opt.cli import main

COMMANDS = sorted(main.commands)  # every command the CLI has, never a list kept by hand


def test_the_cli_has_the_commands_the_readme_names():
    assert set(COMMANDS) >= {"export", "generate", "check", "bench", "build", "inspect", "triton-repo", "serve"}


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


def test_serve_listens_on_this_machine_only_unless_told():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "[default: 127.0.0.1]" in " ".join(result.output.split())


def test_a_domain_error_is_one_error_line_with_its_exit_code(tmp_path):
    """aira-opt's errors know nothing of Click; the CLI's boundary prints them as Click's `Error:` line."""
    from aira_opt.core.errors import AiraOptError, OptionError

    assert not any(cls.__module__.startswith("click") for cls in AiraOptError.__mro__)
    result = CliRunner().invoke(main, ["export", "--precision", "fp32", "--kernels", "dynamic",
                                       "--output", str(tmp_path / "x")])
    assert result.exit_code == OptionError.exit_code == 2
    assert result.output.startswith("Error: --kernels dynamic applies to --precision int8 or int4 only")
    assert not (tmp_path / "x").exists()
