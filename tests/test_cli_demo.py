"""`tokenprune demo` on the terminal: a WARNING line on stderr when it falls back to random weights,
and a one-line error for a --model-dir that holds no model (instead of a silent random model)."""
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# both tests run the demo in a subprocess: gradio is looked up, not imported here (its import costs seconds in
# every pytest-xdist worker that collects this module)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENPRUNE_ASSETS", "TOKENPRUNE_DEMO_TINY")}
    return {**env, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenprune.cli", "demo", "--model-dir", str(tmp_path / "nope"),
                           "--port", str(_free_port())], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tokenprune demo: error: --model-dir"), err


@pytest.mark.slow
def test_random_weights_fallback_warns_on_stderr(tmp_path):
    empty = tmp_path / "assets"
    empty.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tokenprune.cli", "demo", "--assets", str(empty), "--port",
                             str(_free_port()), "--threads", "1"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(180, proc.kill)  # never hang the suite
    timer.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("WARNING") or "demo on http" in line:
                break
    finally:
        timer.cancel()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    warning = next((line for line in lines if line.startswith("WARNING")), "")
    assert "RANDOM" in warning and str(empty / "vit-s14-cifar10") in warning, "".join(lines)[-2000:]
