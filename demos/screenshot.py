"""Take the README screenshot of the demo (docs/demo.png) with the real ViT-S/14 CIFAR-10 weights.

    python demos/screenshot.py [--sample dog] [--methods merge cls pool] [--budget 0.25] [--out docs/demo.png]

Starts the app on 127.0.0.1 (a free port) in this process, drives it with
Playwright in Debian's Chromium, and stores a palette-quantised PNG.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", default="dog")
    ap.add_argument("--methods", nargs="+", default=["merge", "cls", "pool"])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--colors", type=int, default=192, help="palette size of the stored PNG (0: keep RGB)")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from tokenprune.commands.demo import app as demo

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = demo.build_app(repeats=3)
    demo.launch(app, "127.0.0.1", port, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROME_ARGS)
            page = browser.new_page(viewport={"width": 1180, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#tp-run")
            page.locator("#tp-sample input").click()
            page.get_by_role("option", name=args.sample, exact=True).click()
            page.wait_for_function(f"document.querySelector('#tp-input-msg').innerText.includes(\"'{args.sample}'\")")
            for box in page.locator("#tp-methods input[type=checkbox]").all():
                name = box.evaluate("e => e.closest('label').innerText.trim()")
                if box.is_checked() != (name in args.methods):
                    box.click()
            budget = page.locator("#tp-budget input[type=number]")
            budget.fill(str(args.budget))
            budget.press("Enter")
            page.click("#tp-run")
            page.wait_for_selector("#tp-done")
            shot = Path(args.out)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        app.close()
    if args.colors:
        im = Image.open(shot).convert("RGB")
        im.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            shot, optimize=True)
    print(f"{shot}: {shot.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
