"""The Gradio demo driven in a real Chromium through Playwright.

Starts ``tokenprune demo --tiny`` (tiny random ViT, fast) on 127.0.0.1 in a
subprocess, uploads a non-image (expects a readable message), then an RGBA
image, runs two methods and checks each method's panel and kept-token count.
The screenshot goes to test-artifacts/demo.png.
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# one worker runs them all, in file order, on one page (pytest-xdist --dist loadgroup, set in conftest.py)
pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("TOKENPRUNE_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]


def _missing() -> str | None:
    for mod, pip in (("gradio", "gradio"), ("playwright", "playwright")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install {pip})"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    why = _missing()
    if why:
        pytest.skip(why)
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", TOKENPRUNE_DEMO_TINY="1", PYTHONUNBUFFERED="1")
    log = ARTIFACTS / "demo-server.log"
    ARTIFACTS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tokenprune.cli", "demo", "--tiny", "--host", "127.0.0.1",
                                 "--port", str(port), "--repeats", "1", "--threads", "1"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the demo server did not answer on {url} within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.external_requests = []
        pg.on("request", lambda r: pg.external_requests.append(r.url)
              if not r.url.startswith((server, "data:", "blob:")) else None)
        pg.goto(server, wait_until="domcontentloaded")
        pg.wait_for_selector("#tp-run")
        yield pg
        browser.close()


def test_random_model_warning_is_visible(page):
    warn = page.locator("#tp-model-warning")
    assert warn.is_visible()
    assert "RANDOM weights" in warn.inner_text()


def test_non_image_upload_gives_a_message(page, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    page.locator("#tp-upload input[type=file]").set_input_files(str(bad))
    msg = page.locator("#tp-input-msg .tp-msg-error")
    msg.wait_for()
    assert "not an image" in msg.inner_text()
    assert "Traceback" not in page.content()


def test_upload_and_compare_two_methods(page, tmp_path):
    from PIL import Image

    import tokenprune

    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 255, (90, 120, 3)), np.full((90, 120, 1), 200)], -1).astype(np.uint8)
    path = tmp_path / "upload.png"
    Image.fromarray(rgba, "RGBA").save(path)
    page.locator("#tp-upload input[type=file]").set_input_files(str(path))
    page.wait_for_function("document.querySelector('#tp-input-msg').innerText.includes('upload.png')")
    assert "composited on white" in page.locator("#tp-input-msg").inner_text()

    names = []
    for box in page.locator("#tp-methods input[type=checkbox]").all():
        name = box.evaluate("e => e.closest('label').innerText.trim()")
        names.append(name)
        if box.is_checked() != (name in ("merge", "cls")):
            box.click()
    assert {"merge", "cls"} <= set(names)
    page.click("#tp-run")
    page.wait_for_selector("#tp-done")
    assert page.locator("#tp-done").get_attribute("data-methods") == "2"

    k = tokenprune.keep_count(0.25, 64)  # tiny ViT: 64 x 64 input, 8 px patches, 64 tokens
    cards = page.locator("#tp-panels .tp-card")
    assert cards.count() == 3
    for method, kept in (("unreduced", 64), ("merge", k), ("cls", k)):
        card = page.locator(f'#tp-panels .tp-card[data-method="{method}"]')
        assert card.is_visible()
        assert card.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
        assert card.locator(".tp-kept").get_attribute("data-kept") == str(kept)
        assert f"tokens out: {kept} / 64" in card.locator(".tp-kept").inner_text()
        assert "ms" in card.locator(".tp-time").inner_text()
    assert page.locator('#tp-panels .tp-card[data-method="cls"]').inner_text().count("patches dropped") == 1
    assert page.locator("#tp-table").inner_text().count("merge") >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


def test_audio_tab_rejects_a_non_audio_file(page, tmp_path):
    bad = tmp_path / "clip.wav"
    bad.write_text("not audio at all")
    page.get_by_role("tab", name="Audio").click()
    page.locator("#tp-audio-upload input[type=file]").set_input_files(str(bad))
    # the file name may wrap ("clip" / ".wav") depending on the layout: compare without whitespace
    page.wait_for_function("document.querySelector('#tp-audio-upload').innerText.replace(/\\s+/g, '').includes('clip.wav')")
    page.click("#tp-audio-run")
    msg = page.locator("#tp-audio-msg .tp-msg-error")
    msg.wait_for()
    assert "not an audio file" in msg.inner_text()
    assert "Traceback" not in page.content()
    page.get_by_role("tab", name="Image").click()


def test_page_works_offline(page):
    # runs last among the page tests: nothing the page loaded or did left 127.0.0.1
    assert page.external_requests == []


def test_server_binds_localhost_only():
    # the default host of `tokenprune demo` is the loopback address
    import argparse

    from tokenprune.commands import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    assert p.parse_args([]).host == "127.0.0.1"
