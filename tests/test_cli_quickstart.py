"""`tokenprune quickstart`: assets found from --assets / $TOKENPRUNE_ASSETS / the checkout (never the
current folder), progress lines and warnings on stderr, methods checked before loading, and both
models timed warm with the FLOP bound beside the speed-up."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import tokenprune
from tokenprune.bench import device_busy_ms, host_time_ms, pipelined_ms, time_fn
from tokenprune.cli import main
from tokenprune.commands.quickstart import speed_report

from conftest import tiny_vit
from test_cli import tiny  # noqa: F401  (fixture: tiny timm checkpoint + 3-class ImageFolder)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_assets(tiny, tmp_path_factory):  # noqa: F811
    """An assets folder laid out like the shared one, holding the tiny model and data."""
    root = tmp_path_factory.mktemp("assets")
    shutil.copytree(tiny["ckpt"], root / "vit-s14-cifar10")
    (root / "cifar10").mkdir()
    with tarfile.open(root / "cifar10" / "cifar10_jpeg_test.tar.gz", "w:gz") as tar:
        tar.add(tiny["data"], arcname="test")
    return root


def _quick(*extra):
    return ["quickstart", "--images", "6", "--batch-size", "3", "--repeats", "3", "--threads", "1", *extra]


def test_quickstart_uses_the_assets_option_and_reports_warm_timings(tiny_assets, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPRUNE_ASSETS", str(tmp_path / "not-here"))  # --assets wins over the variable
    monkeypatch.chdir(tmp_path)
    assert main(_quick("--assets", str(tiny_assets), "--budget", "0.5")) == 0
    cap = capsys.readouterr()
    model_dir = (tiny_assets / "vit-s14-cifar10").resolve()
    assert "loading vit-s14-cifar10" in cap.err and str(model_dir) in cap.err
    assert "evaluating on 6 images" in cap.err
    assert "WARNING" not in cap.err and "RANDOM" not in cap.out
    assert f"data: 6 images from {tiny_assets / 'cifar10'}" in cap.out
    # the FLOP bound printed is 1 / the plan's FLOP ratio for this model and budget
    plan = tokenprune.plan(tiny_vit(num_classes=3), budget=0.5, method="merge")
    m = re.search(r"speed-up ([\d.]+)x \[([\d.]+)-([\d.]+)\]; FLOP bound ([\d.]+)x", cap.out)
    assert m, cap.out
    speedup, low, high, bound = map(float, m.groups())
    assert bound == pytest.approx(1 / plan.flop_ratio, abs=0.006)
    assert low <= speedup <= high
    assert "median of 3" in cap.out
    assert ("above the FLOP bound" in cap.out) == (speedup > bound)
    assert "top-1 accuracy: unreduced" in cap.out  # real weights, matching head: accuracy reported


def test_speed_report_compares_medians_with_the_flop_bound():
    fast = time_fn(lambda: time.sleep(0.004), "cpu", warmup=1, repeats=5)
    slow = time_fn(lambda: time.sleep(0.040), "cpu", warmup=1, repeats=5)
    above = speed_report(slow, fast, flop_ratio=0.5, method="merge", n_images=8)  # ~10x against a bound of 2x
    assert any(line.startswith("note:") and "above the FLOP bound 2.00x" in line for line in above)
    below = speed_report(fast, slow, flop_ratio=0.5, method="merge", n_images=8)  # ~0.1x
    assert not any(line.startswith("note:") for line in below)
    m = re.search(r"speed-up ([\d.]+)x", below[1])
    assert float(m.group(1)) == pytest.approx(fast.median_ms / slow.median_ms, abs=0.006)


def test_host_time_is_the_median_of_the_calls():
    calls = []

    def fn():  # every third call takes 20 ms, the others 1 ms: the median is a 1 ms call
        calls.append(None)
        time.sleep(0.020 if len(calls) % 3 == 0 else 0.001)

    t = host_time_ms(fn, "cpu", repeats=9)
    assert len(calls) == 9
    assert 1.0 <= t < 15.0


def test_pipelined_time_is_the_best_loop_per_call():
    calls = []

    def fn():  # the first loop's calls (after one untimed call) take 20 ms, later ones 1 ms: the best loop's
        calls.append(None)
        time.sleep(0.020 if len(calls) <= 5 else 0.001)

    t = pipelined_ms(fn, "cpu", calls=4, repeats=3)
    assert len(calls) == 1 + 3 * 4
    assert 1.0 <= t < 10.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipelined_time_hides_host_time_behind_the_device():
    """A call whose host part (a sleep) is shorter than its kernels: one call with the device idle at its start
    takes host + kernels, back-to-back calls about the kernels alone."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)  # ~1.5 ms a product
    one = time_fn(lambda: a @ a, "cuda", warmup=3, repeats=10).median_ms

    def call():
        time.sleep(one / 4e3)  # a quarter of a product's time on the host before the launch
        a @ a

    single = time_fn(call, "cuda", warmup=3, repeats=10).median_ms
    piped = pipelined_ms(call, "cuda", calls=20)
    assert single > one * 1.2 and piped < single - one / 8


def test_device_busy_time_is_none_off_cuda():
    assert device_busy_ms(lambda: torch.ones(4) @ torch.ones(4), "cpu") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_busy_time_counts_kernels_not_host_waits():
    """A call that sleeps on the host between two matmuls: its wall time holds the sleep, its busy time only the
    kernels (here twice one matmul's time, within the profiler's rounding)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)  # ~0.2 ms a product: launch gaps are noise
    one = time_fn(lambda: a @ a, "cuda", warmup=3, repeats=10).median_ms

    def call():
        a @ a
        torch.cuda.synchronize()
        time.sleep(0.050)
        a @ a

    busy = device_busy_ms(call, "cuda")
    assert 1.0 * one <= busy <= 4 * one + 0.05
    assert busy < 25.0  # the 50 ms sleep is not in it


def test_unknown_method_fails_before_loading_anything(tiny_assets, capsys):
    t0 = time.perf_counter()
    assert main(_quick("--assets", str(tiny_assets), "--method", "tome")) == 2
    cap = capsys.readouterr()
    assert time.perf_counter() - t0 < 20
    assert cap.out == ""  # nothing loaded, nothing printed
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokenprune quickstart: error: unknown method 'tome'")
    for m in tokenprune.methods():
        assert m in err


def test_missing_assets_warn_of_random_weights_on_stderr(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["quickstart", "--assets", str(empty), "--images", "1", "--batch-size", "1", "--repeats", "1",
            "--threads", "1"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    warnings = [line for line in cap.err.splitlines() if line.startswith("WARNING")]
    assert any("RANDOM" in w and str(empty / "vit-s14-cifar10") in w for w in warnings), cap.err
    assert any("random images" in w for w in warnings), cap.err
    assert "not meaningful" in cap.out and "top-1 accuracy" not in cap.out


def test_default_assets_do_not_depend_on_the_current_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TOKENPRUNE_ASSETS"}
    env["PYTHONPATH"] = str(ROOT)
    code = "from tokenprune.data import default_asset; print(default_asset('x'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT.parent / "shared" / "assets" / "x"
    env["TOKENPRUNE_ASSETS"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert Path(out.stdout.strip()) == tmp_path / "x"
