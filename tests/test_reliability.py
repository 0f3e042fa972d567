"""Faults injected on purpose: corrupt and truncated artifacts, signals, a full disk, read-only and shared
folders, racing exports. Each ends in one line and leaves nothing half-written (README: Reliability)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.core.artifacts import PARTIAL_MARK, remove_stale_partials, sha256_file, verify_manifest

QUESTION = "What is the capital of Brazil?"


def one_line_error(result) -> bool:
    """Click's result: exit 1, exactly one line, `Error: ...`, no traceback."""
    out = result.output.strip()
    return result.exit_code == 1 and out.startswith("Error:") and "\n" not in out and "Traceback" not in out


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in a child process (signals, limits and mounts need a process of their own)."""
    return subprocess.run([sys.executable, "-m", "aira_opt", *args], capture_output=True, text=True, **kwargs)


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# 1. One-line errors ------------------------------------------------------------------------------------------
def test_a_truncated_model_is_one_line_in_generate_and_inspect(tiny_export, tmp_path):
    folder = copy_export(tiny_export, tmp_path / "cut")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])  # a partial copy, a disk that filled up
    result = CliRunner().invoke(main, ["generate", "--onnx", str(folder), QUESTION])
    assert one_line_error(result) and "inspect" in result.output and "truncated or corrupt" in result.output
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.onnx: truncated" in result.output and "export again" in result.output


def _with_external_data(src: Path, dst: Path) -> Path:
    folder = copy_export(src, dst)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    return folder


@pytest.mark.parametrize("fault", ["short", "missing"])
def test_short_or_missing_external_data_is_one_line(tiny_export, tmp_path, fault):
    folder = _with_external_data(tiny_export, tmp_path / "ext")
    data = folder / "model.onnx_data"
    if fault == "short":
        data.write_bytes(data.read_bytes()[:1000])
    else:
        data.unlink()
    result = CliRunner().invoke(main, ["generate", "--onnx", str(folder), QUESTION])
    assert one_line_error(result) and "model.onnx_data" in result.output


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b"[1, 2]"])
def test_a_manifest_that_does_not_parse_is_one_line(tiny_export, tmp_path, content):
    folder = copy_export(tiny_export, tmp_path / "m")
    (folder / "manifest.json").write_bytes(content)
    for args in (["inspect", str(folder)], ["check", "--onnx", str(folder)], ["build", "--onnx", str(folder)]):
        result = CliRunner().invoke(main, args)
        assert one_line_error(result) and "manifest.json" in result.output, (args, result.output)


def test_a_wrong_config_is_one_line(tiny_export, tmp_path):
    folder = copy_export(tiny_export, tmp_path / "c")
    (folder / "config.json").write_text("[]")
    result = CliRunner().invoke(main, ["generate", "--onnx", str(folder), QUESTION])
    assert one_line_error(result) and "config.json" in result.output


def test_an_unexpected_exception_is_one_line_and_minus_v_shows_it(tiny_export, monkeypatch):
    import aira_opt.cli as cli_module

    def broken(folder):
        raise RuntimeError("the disk controller caught fire\nsecond line")

    monkeypatch.setattr(cli_module, "inspect_folder", broken)
    result = CliRunner().invoke(main, ["inspect", str(tiny_export)])
    assert one_line_error(result)
    assert "RuntimeError: the disk controller caught fire" in result.output and "-v" in result.output
    verbose = CliRunner().invoke(main, ["-v", "inspect", str(tiny_export)])
    assert isinstance(verbose.exception, RuntimeError)  # propagated: Python prints the traceback


def test_inspect_warns_about_unknown_files_and_fails_on_missing_ones(tiny_export, tmp_path):
    folder = copy_export(tiny_export, tmp_path / "x")
    (folder / "README.md").write_text("my notes")
    (folder / ".DS_Store").write_bytes(b"\0")
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 0 and "hashes: all match" in result.output
    assert "warning: not in the manifest" in result.output and "README.md" in result.output
    (folder / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 1 and "tokenizer.json: missing" in result.output


# 2. Signals and stale partial folders --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_export_cleans_up_like_ctrl_c(tmp_path, signum):
    out = tmp_path / "out" / "fp32"
    proc = subprocess.Popen([sys.executable, "-m", "aira_opt", "export", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "out").glob(".fp32.partial-*")):
        time.sleep(0.05)
    assert list((tmp_path / "out").glob(".fp32.partial-*")), "the export never started its partial folder"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"terminated by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partials_of_dead_processes_go_and_live_ones_stay(tmp_path):
    final = tmp_path / "fp32"
    dead = tmp_path / ".fp32.partial-dead"
    dead.mkdir()
    (dead / PARTIAL_MARK).write_text(f"{_dead_pid()} 12345\n")
    (dead / "model.onnx").write_bytes(b"half")
    reused = tmp_path / ".fp32.partial-reused"  # our own pid, but a different process start: pid reuse
    reused.mkdir()
    (reused / PARTIAL_MARK).write_text(f"{os.getpid()} 1\n")
    alive = tmp_path / ".fp32.partial-alive"
    alive.mkdir()
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (alive / PARTIAL_MARK).write_text(f"{os.getpid()} {start}\n")
    other = tmp_path / ".int4.partial-dead"  # another output's: not ours to judge here
    other.mkdir()
    assert sorted(remove_stale_partials(final)) == sorted([dead, reused])
    assert alive.is_dir() and other.is_dir() and not dead.exists() and not reused.exists()


def test_the_next_export_removes_a_stale_partial(tiny, tmp_path):
    from helpers import export_model

    stale = tmp_path / ".fp32.partial-killed"
    stale.mkdir()
    (stale / PARTIAL_MARK).write_text(f"{_dead_pid()} 1\n")
    export_model(tiny, "fp32", tmp_path / "fp32", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]


# 3. A full disk ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_the_old_export_untouched(tiny_export, tmp_path):
    out = copy_export(tiny_export, tmp_path / "out")
    before = sha256_file(out / "model.onnx")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB: model.onnx will not fit

    result = cli("export", "--output", str(out), "--force", preexec_fn=small_files)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and str(out) in lines[0] and "space" in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder
    assert sha256_file(out / "model.onnx") == before and verify_manifest(out) == []


# 4. Read-only and shared folders ---------------------------------------------------------------------------
def _read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI where `folder` is a read-only mount (a private mount namespace: even root cannot write)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(folder), sys.executable, "-m", "aira_opt",
                           *args], capture_output=True, text=True)


@pytest.mark.slow
def test_commands_work_on_a_read_only_export(tiny_export, tmp_path):
    if shutil.which("unshare") is None or _read_only(tmp_path, "--version").returncode != 0:
        pytest.skip("needs `unshare -m` and bind mounts (root in a mount namespace) to make a folder read-only")
    folder = copy_export(tiny_export, tmp_path / "ro")
    listing = sorted(p.name for p in folder.iterdir())
    for args in (["generate", "--onnx", str(folder), "--greedy", QUESTION], ["inspect", str(folder)],
                 ["check", "--onnx", str(folder), "--max-new-tokens", "4"],
                 ["bench", "--onnx", str(folder), "--backends", "ort", "--new-tokens", "4", "--prompt-lengths", "8",
                  "--warmup", "0", "--repeats", "1"]):
        result = _read_only(folder, *args)
        assert result.returncode == 0, (args, result.stderr[-2000:])
    assert sorted(p.name for p in folder.iterdir()) == listing


@pytest.mark.slow
def test_several_processes_generate_from_one_folder_at_once(tiny_export):
    procs = [subprocess.Popen([sys.executable, "-m", "aira_opt", "generate", "--onnx", str(tiny_export), "--greedy",
                               "--json", "-", QUESTION], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outputs]
    answers = {json.loads(out)["answers"][0] for out, _ in outputs}
    assert len(answers) == 1 and "Bras" in answers.pop()


@pytest.mark.slow
def test_two_exports_racing_to_one_output_end_with_one_folder_and_one_clean_error(tmp_path):
    out = tmp_path / "fp32"
    procs = [subprocess.Popen([sys.executable, "-m", "aira_opt", "export", "--output", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], errs
    loser = errs[[p.returncode for p in procs].index(1)]
    assert "Traceback" not in loser and ("already exists" in loser or "another export" in loser)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"] and verify_manifest(out) == []
