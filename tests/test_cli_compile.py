"""tokenprune bench --compile: the modes a user picks from, and the clear error for a conflicting choice.

The errors are checked in this process through ``main`` (a fresh interpreter costs seconds of torch import
each; test_cli_errors.py runs ``python -m tokenprune.cli`` in a fresh process)."""
import subprocess
import sys

from tokenprune.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tokenprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_bench_help_lists_the_compile_modes():
    res = _cli("bench", "--help")
    assert res.returncode == 0
    assert "--compile" in res.stdout and "reduce-overhead" in res.stdout and "max-autotune" in res.stdout


def test_compile_and_cuda_graph_together_is_a_one_line_error(capsys):
    assert main(["bench", "--device", "cpu", "--compile", "default", "--cuda-graph"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and ("--cuda-graph" in lines[0]), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_unknown_compile_mode_is_refused(capsys):
    assert main(["bench", "--compile", "fast"]) == 2
    assert "invalid choice" in capsys.readouterr().err
