"""The demo's models and what it runs on them. Models come from the loader every command uses
(:func:`tokenprune.evaluate.load_model`); :func:`compare_image` and :func:`compare_audio` run the
unreduced model and each method on one input. No Gradio."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ... import adapters, api, viz
from ...data import default_asset, to_tensor
from ...evaluate import load_model
from ...plan import check_budget
from ...speech import transcribe_audio
from .inputs import AUDIO_RATE, InputError, square_crop
from .choices import RANDOM_LABEL, REAL_LABEL, TINY_LABEL, default_model_dir, model_choices


@dataclass
class ImageModel:
    label: str
    model: torch.nn.Module
    class_names: list[str]
    img_size: int
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    warning: str = ""  # shown in the UI (random weights)


TINY_ARGS = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3)


def load_image_model(label: str, model_dir: Path | str | None = None) -> ImageModel:
    """Load one of :func:`model_choices` (eval mode, CPU) with :func:`tokenprune.evaluate.load_model`."""
    d = Path(model_dir) if model_dir else default_model_dir()
    if label == TINY_LABEL:
        lm = load_model("vit_small_patch16_224", model_args=TINY_ARGS, num_classes=10, seed=0)
        warning = ("This tiny ViT has RANDOM weights: it shows how each method selects and merges tokens, but its "
                   "predictions mean nothing.")
    elif label == REAL_LABEL and (d / "model.safetensors").is_file():
        lm, warning = load_model(str(d)), ""
    elif label in (RANDOM_LABEL, REAL_LABEL):
        lm = load_model("vit_small_patch14_dinov2", model_args={"img_size": 224}, num_classes=10, seed=0)
        label = RANDOM_LABEL
        warning = (f"No weights found at {d}: this ViT-S/14 has RANDOM weights, so its predictions and agreement "
                   "numbers mean nothing. Set $TOKENPRUNE_ASSETS or pass --model-dir to a folder with "
                   "model.safetensors and config.json.")
    else:
        raise InputError(f"unknown model {label!r}; choose one of: {', '.join(model_choices(d))}")
    cfg_file = d / "config.json"
    names = None
    if label == REAL_LABEL and cfg_file.is_file():
        names = json.loads(cfg_file.read_text()).get("pretrained_cfg", {}).get("label_names")
    names = list(names or [f"class {i}" for i in range(lm.num_classes)])
    return ImageModel(label, lm.model, names, lm.img_size[0], lm.mean, lm.std, warning)


# -- running the methods ----------------------------------------------------------------------------
@dataclass
class Result:
    method: str
    overlay: np.ndarray | None = None
    kept: int = 0  # non-prefix tokens leaving the encoder
    total: int = 0  # non-prefix tokens entering it
    prefix: int = 0
    stats: dict = field(default_factory=dict)
    ms: float = 0.0
    label: str = ""
    prob: float = 0.0
    agree: bool | None = None
    cosine: float | None = None  # of the pooled embedding (pre-logits) with the unreduced one
    flop_ratio: float = 1.0
    error: str = ""


def _timed(fn, repeats: int):
    """``(result, best time in ms)``: one warm-up run (its result is returned), then ``repeats`` timed
    runs; the minimum is the least disturbed by other processes on a shared CPU."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, 1e3 * float(min(times)) if times else 0.0


def compare_image(entry: ImageModel, image, budget: float, methods, repeats: int = 3,
                  display: int = 320) -> tuple[Result, list[Result]]:
    """Run the unreduced model and each method on one image: ``(reference, [per method])``.

    ``image``: PIL or array (any size; centre-cropped to a square). Errors of a
    method (e.g. an option it cannot use on this model) land in its ``error``.
    """
    check_budget(budget)
    if not methods:
        raise InputError("Choose at least one method.")
    unknown = [m for m in methods if m not in api.methods()]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(api.methods())}")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(viz.as_rgb(image))
    image = square_crop(image.convert("RGB"))
    x = to_tensor([image], entry.img_size, entry.mean, entry.std)
    shown = image.resize((display, display), Image.BICUBIC)
    model = entry.model
    api.remove(model)

    def forward():
        if api.is_applied(model):
            feats, state = api.features(model, x)
            emb = model.forward_head(feats, pre_logits=True, sizes=state.sizes)
        else:
            feats, state = model.forward_features(x), None
            emb = model.forward_head(feats, pre_logits=True)
        return (feats, state), emb, model.head(emb)

    def describe(r: Result, logits):
        p = logits.softmax(-1)[0]
        i = int(p.argmax())
        r.label, r.prob = entry.class_names[i] if i < len(entry.class_names) else f"class {i}", float(p[i])
        return i

    with torch.no_grad():
        ((feats, _), emb0, logits0), ms0 = _timed(forward, repeats)
        info = adapters.for_model(model).info()
        ref = Result("unreduced", viz.as_rgb(shown), info.num_tokens, info.num_tokens, info.num_prefix, ms=ms0,
                     agree=True, cosine=1.0)
        ref.stats = {"tokens": info.num_tokens, "dropped": 0, "merged_tokens": 0}
        top0 = describe(ref, logits0)
        results = []
        for method in methods:
            r = Result(method, total=info.num_tokens, prefix=info.num_prefix)
            try:
                with api.applied(model, budget=budget, method=method):
                    r.flop_ratio = api.plan(model).flop_ratio
                    ((feats, state), emb, logits), r.ms = _timed(forward, repeats)
                if state is None or state.source is None:
                    raise RuntimeError("the reduced forward carried no source map")
                r.kept = int(state.kept_per_sample()[0])
                r.stats = viz.token_stats(state.source)
                r.overlay = viz.token_overlay(shown, state.source, info.grid or viz.input_grid(state))
                r.agree = describe(r, logits) == top0
                r.cosine = float(torch.nn.functional.cosine_similarity(emb.float(), emb0.float(), dim=-1)[0])
            except Exception as e:  # shown in the method's panel, never as a traceback
                r.error = f"{type(e).__name__}: {e}"
            finally:
                api.remove(model)
            results.append(r)
        if results and repeats:  # time the unreduced model again after the methods: same conditions
            ref.ms = min(ref.ms, _timed(forward, repeats)[1])
    return ref, results


def usable_methods(model, budget: float = 0.25) -> list[str]:
    """Registered methods that plan on ``model`` with their default options (a method that needs
    options, e.g. a pipeline of reducers, is left out of the demo's choices)."""
    out = []
    for m in api.methods():
        try:
            api.plan(model, budget=budget, method=m)
        except Exception:
            continue
        out.append(m)
    return out


# -- audio ---------------------------------------------------------------------------------------------------
def whisper_status() -> tuple[bool, str]:
    """Whether the audio tab can run: ``(ok, message)``."""
    d = default_asset("whisper-tiny.en")
    if not (d / "config.json").is_file():
        return False, f"Whisper tiny.en weights not found at {d}."
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False, "transformers is not installed (pip install 'tokenprune[hf]')."
    try:
        names = {c.__name__ for c in adapters.adapter_classes()}
        if not any("Whisper" in n for n in names):
            return False, "tokenprune has no Whisper adapter yet."
    except Exception as e:
        return False, f"could not list adapters ({e})."
    return True, ""


_WHISPER: dict = {}


def _load_whisper():
    if "model" not in _WHISPER:
        lm = load_model(str(default_asset("whisper-tiny.en")))
        _WHISPER["model"], _WHISPER["processor"] = lm.model.float().eval(), lm.processor
    return _WHISPER["model"], _WHISPER["processor"]


def _transcribe(model, processor, wave) -> str:
    """Greedy transcript of one clip (``generate`` is used the same way with and without reduction)."""
    return transcribe_audio(model, processor, [wave])[0]


def compare_audio(wave: np.ndarray, budget: float, methods) -> tuple[dict, list[dict]]:
    """Whisper on one clip, unreduced and per method: spectrogram overlays and transcripts."""
    check_budget(budget)
    ok, why = whisper_status()
    if not ok:
        raise InputError(f"The audio comparison is not available: {why}")
    if not methods:
        raise InputError("Choose at least one method.")
    model, processor = _load_whisper()
    api.remove(model)
    feats = processor(wave, sampling_rate=AUDIO_RATE, return_tensors="pt").input_features
    frames = min(feats.shape[-1], int(np.ceil(wave.size / 160)))
    spec = feats[0, :, :frames].numpy()
    with torch.no_grad():
        t0 = time.perf_counter()
        text0 = _transcribe(model, processor, wave)
        ref = {"method": "unreduced", "image": viz.colorize(spec)[::-1].repeat(2, axis=0), "text": text0,
               "ms": 1e3 * (time.perf_counter() - t0), "kept": None}
        out = []
        for method in methods:
            row = {"method": method, "image": None, "text": "", "ms": 0.0, "kept": None, "error": ""}
            try:
                with api.applied(model, budget=budget, method=method):
                    state = api.features(model, feats)[1]
                    t0 = time.perf_counter()
                    row["text"] = _transcribe(model, processor, wave)
                    row["ms"] = 1e3 * (time.perf_counter() - t0)
                if state is not None and state.source is not None:
                    row["kept"] = int(state.kept_per_sample()[0])
                    row["total"] = int(state.num_input)
                    fpt = feats.shape[-1] / state.num_input
                    on_clip = state.source[0, : int(np.ceil(frames / fpt))]
                    row["on_clip"] = (int(on_clip[on_clip >= 0].unique().numel()), int(on_clip.numel()))
                    row["image"] = viz.spectrogram_overlay(spec, state.source, viz.input_grid(state) or (state.num_input,),
                                                           frames_per_token=feats.shape[-1] / state.num_input, strip=16)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                api.remove(model)
            out.append(row)
    return ref, out
