"""Start a local Gradio app that compares, side by side, the tokens each method keeps.

Image tab: upload an image (or pick a bundled sample), choose a model, a budget
and methods; each method's panel shows the overlay of kept / merged / dropped
patches on the image, the kept-token count, the forward time and whether the
prediction (and the embedding) agree with the unreduced model.
Audio tab: the spectrogram of a clip with the time regions each method keeps
and the Whisper transcript with and without reduction (when a Whisper adapter
is available).

Offline: the default model is the ViT-S/14 CIFAR-10 classifier in the shared
assets folder (``--assets``, else ``$TOKENPRUNE_ASSETS``, else ``../shared/assets``
next to the tokenprune checkout), or the one in ``--model-dir``; without it the
app runs a randomly initialised ViT and says so on the page and in a WARNING
line on stderr. Analytics are off and the server binds to 127.0.0.1 unless
``--host`` says otherwise.
"""
# (This docstring is the command's --help.) Modules: ``choices`` (the models offered; no torch), ``inputs`` (upload
# checks), ``models`` (loading through the CLI's loader, the comparisons), ``render`` (HTML panels), ``app`` (the
# Gradio page; the only one importing Gradio). This module holds the command line only and imports nothing heavy.
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ...data import assets_source
from .._common import UsageError, info, nonnegative_int, port_arg, positive_int, set_threads, warn
from .choices import RANDOM_LABEL, default_model_dir, model_choices

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def add_arguments(p):
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port_arg, default=7860, help="TCP port to serve on")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="folder with model.safetensors + config.json (default: vit-s14-cifar10 in the assets "
                        "folder; a RANDOM-weight ViT, with a warning, if it is missing)")
    p.add_argument("--tiny", action="store_true", help="start with a tiny random ViT (fast, meaningless predictions)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed forwards per method (the best is reported)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: leave torch's default)")


def run(args) -> int:
    if args.model_dir is not None and not (Path(args.model_dir) / "model.safetensors").is_file():
        raise UsageError(f"--model-dir {args.model_dir} has no model.safetensors (a folder with "
                         "model.safetensors and config.json is expected)")
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("tokenprune demo needs Gradio: pip install 'tokenprune[demo]'")
    # the warnings come at once, before anything imports torch (set_threads does) or Gradio: seconds
    if args.tiny:
        os.environ["TOKENPRUNE_DEMO_TINY"] = "1"  # read by app.build_app
        warn("--tiny: the demo starts on a tiny ViT with RANDOM weights; its predictions mean nothing")
    elif model_choices(args.model_dir)[0] == RANDOM_LABEL:
        warn(f"no weights at {default_model_dir()} (from {assets_source()}): the demo runs a ViT-S/14 with RANDOM "
             "weights; its predictions and agreement numbers mean nothing. Pass --assets or --model-dir, or set "
             "$TOKENPRUNE_ASSETS.")
    set_threads(args.threads)
    info("tokenprune demo: loading the model and building the app")
    # imported here, not at the top: they import torch and Gradio, which `tokenprune demo --help` must not pay for
    from .app import build_app, launch

    app = build_app(args.model_dir, repeats=max(1, args.repeats))
    print(f"tokenprune demo on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    try:
        launch(app, args.host, args.port)
    except OSError as e:  # port taken, address not available
        raise UsageError(f"could not serve on {args.host}:{args.port}: {e}; try another --port") from None
    return 0
