"""tokenprune bench --compile: the modes a user picks from, and the clear error for a conflicting choice."""
import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tokenprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_bench_help_lists_the_compile_modes():
    res = _cli("bench", "--help")
    assert res.returncode == 0
    assert "--compile" in res.stdout and "reduce-overhead" in res.stdout and "max-autotune" in res.stdout


def test_compile_and_cuda_graph_together_is_a_one_line_error():
    res = _cli("bench", "--device", "cpu", "--compile", "default", "--cuda-graph")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and ("--cuda-graph" in lines[0]), res.stderr


def test_unknown_compile_mode_is_refused():
    res = _cli("bench", "--compile", "fast")
    assert res.returncode == 2 and "invalid choice" in res.stderr
