"""CLI errors are one line on stderr with exit code 2 (devices too); a closed output pipe ends
quietly, without a traceback. (The method check in a fresh process is in test_cli_help.py, in the process
that checks --help imports no torch.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _one_error_line(capsys, command):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"tokenprune {command}: error:" if command else "tokenprune: error:"), err
    assert "Traceback" not in captured.err + captured.out
    return err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "gpu"], "unknown device 'gpu'"),
    (["eval", "--device", "gpu"], "unknown device 'gpu'"),
    (["bench", "--device", "tpu:0"], "unknown device"),
    (["plan", "--bogus-option"], "unrecognized arguments"),
    (["plan", "--budget", "1.5"], "budget must be in (0, 1]"),
    (["plan", "--budget", "nan"], "budget must be in (0, 1]"),
    (["quickstart", "--images", "0"], "--images"),
    (["demo", "--port", "70000"], "--port"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_arguments_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = _one_error_line(capsys, argv[0] if argv[0] != "nosuchcommand" else "")
    assert message in err


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["bench", "--device", "cuda"], ["bench", "--device", "cuda:0"],
                                  ["eval", "--device", "cuda"]])
def test_cuda_without_cuda_is_one_line_exit_2(argv, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = _one_error_line(capsys, argv[0])
    assert "CUDA is not available" in err


def test_cuda_index_beyond_the_devices_is_one_line(capsys, tmp_path):
    argv = ["bench", "--device", f"cuda:{max(torch.cuda.device_count(), 1) + 7}", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = _one_error_line(capsys, "bench")
    assert "CUDA" in err


@pytest.mark.slow
def test_closed_output_pipe_ends_quietly():
    """`tokenprune plan ... | head -0`: the reader has gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write to the pipe fails with EPIPE
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, "-m", "tokenprune.cli", "plan", "--model", "vit_small_patch16_224",
                               "--method", "cls", "--budget", "0.5"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT, timeout=300)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141), (proc.returncode, proc.stderr)
