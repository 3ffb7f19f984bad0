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

Everything above the ``build_app`` section is free of Gradio (used by the tests).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 50_000_000  # refuse to decode larger images
MAX_SIDE = 1024  # larger images are downscaled first
MAX_AUDIO_SECONDS = 30.0  # one Whisper window
AUDIO_RATE = 16000
DEFAULT_METHODS = ("merge", "cls")
TINY_ENV = "TOKENPRUNE_DEMO_TINY"  # "1": tiny random ViT (fast; for tests)


class InputError(ValueError):
    """An upload the demo cannot use; the message is shown in the UI as is."""


# -- uploads -------------------------------------------------------------------------------------
def _path_of(upload) -> Path:
    if upload is None:
        raise InputError("No file given: upload an image or pick a sample.")
    path = Path(getattr(upload, "name", upload) if not isinstance(upload, (str, os.PathLike)) else upload)
    if not path.is_file():
        raise InputError(f"The uploaded file {path.name!r} could not be found on the server; upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name!r} is empty (0 bytes).")
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"{path.name!r} is {size / 2**20:.1f} MB; the demo accepts files up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MB.")
    return path


def load_image(upload) -> tuple["Image.Image", list[str]]:  # noqa: F821
    """Read an uploaded image: ``(RGB PIL image, notes)``; raises :class:`InputError` with a readable
    message for anything that is not a usable image. Alpha is composited on white, gray and palette
    images become RGB, animations give their first frame, images over ``MAX_SIDE`` are downscaled."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = _path_of(upload)
    notes: list[str] = []
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise InputError(f"{path.name!r} is not an image the demo can read; upload a PNG, JPEG, WebP, BMP "
                         "or GIF file.") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path.name!r} has too many pixels to open safely; upload an image under "
                         f"{MAX_PIXELS // 1_000_000} megapixels.") from None
    except OSError as e:
        raise InputError(f"{path.name!r} could not be read as an image ({e}).") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise InputError(f"{path.name!r} is {w} x {h} pixels ({w * h / 1e6:.0f} MP); the demo accepts images up to "
                         f"{MAX_PIXELS // 1_000_000} MP.")
    if w < 1 or h < 1:
        raise InputError(f"{path.name!r} has no pixels ({w} x {h}).")
    try:
        if getattr(im, "n_frames", 1) > 1:
            notes.append("animated image: using its first frame")
            im.seek(0)
        if im.format == "JPEG" and max(w, h) > 2 * MAX_SIDE:
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at a reduced scale
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path.name!r} is damaged or truncated and could not be decoded ({e}).") from None
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        im = Image.fromarray((np.clip(arr / hi, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
        notes.append(f"{mode} (high bit depth) image scaled to 8 bits")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
        notes.append("transparent pixels composited on white")
    elif mode in ("L", "1"):
        im = im.convert("RGB")
        notes.append("grayscale image: gray copied to the three colour channels")
    elif mode != "RGB":
        im = im.convert("RGB")
        notes.append(f"{mode} image converted to RGB")
    if max(im.size) > MAX_SIDE:
        before = im.size
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
        notes.append(f"large image ({before[0]} x {before[1]}) downscaled to {im.size[0]} x {im.size[1]}")
    return im, notes


def square_crop(im):
    """Centre crop to a square (the model sees a square input)."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Band-limited resampling through the FFT (whole clip at once; clips are at most 30 s)."""
    if sr == target:
        return x
    n_out = max(1, int(round(x.size * target / sr)))
    spec = np.fft.rfft(x)
    keep = n_out // 2 + 1
    out = np.zeros(keep, dtype=complex)
    m = min(keep, spec.size)
    out[:m] = spec[:m]
    return (np.fft.irfft(out, n_out) * (n_out / x.size)).astype(np.float32)


def load_audio(upload) -> tuple[np.ndarray, list[str]]:
    """Read an uploaded clip: ``(mono float32 waveform at 16 kHz, notes)``; :class:`InputError` for
    files that are not audio, are empty or silent-length. Longer clips are cut to 30 s."""
    import soundfile as sf

    path = _path_of(upload)
    notes: list[str] = []
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises its own error types; all mean "not readable audio"
        raise InputError(f"{path.name!r} is not an audio file the demo can read; upload WAV, FLAC, OGG or MP3 "
                         f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}).") from None
    if data.size == 0 or data.shape[0] < sr * 0.1:
        raise InputError(f"{path.name!r} holds {data.shape[0] / max(sr, 1):.2f} s of audio; upload at least 0.1 s.")
    if data.shape[1] > 1:
        notes.append(f"{data.shape[1]} channels mixed down to mono")
    x = data.mean(1)
    if not np.isfinite(x).all():
        raise InputError(f"{path.name!r} contains invalid samples (NaN or infinity).")
    if x.size > MAX_AUDIO_SECONDS * sr:
        notes.append(f"clip of {x.size / sr:.1f} s cut to the first {MAX_AUDIO_SECONDS:.0f} s (one Whisper window)")
        x = x[: int(MAX_AUDIO_SECONDS * sr)]
    if sr != AUDIO_RATE:
        notes.append(f"resampled from {sr} Hz to {AUDIO_RATE} Hz")
        x = _resample(x.astype(np.float64), sr, AUDIO_RATE)
    return x.astype(np.float32), notes


def sample_images() -> dict[str, Path]:
    """Bundled sample images, name -> path."""
    return {p.stem: p for p in sorted(ASSETS_DIR.glob("*.png"))}


def sample_audio() -> Path | None:
    """The JFK clip from the shared assets, if it is there (nothing audio is bundled)."""
    from ..data import default_asset

    p = default_asset("speech-hifitts-6097", "jfk.wav")
    return p if p.is_file() else None


# -- models ----------------------------------------------------------------------------------------
@dataclass
class ImageModel:
    label: str
    model: object
    class_names: list[str]
    img_size: int
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    warning: str = ""  # shown in the UI (random weights)


REAL_LABEL = "ViT-S/14 CIFAR-10 (real weights)"
TINY_LABEL = "tiny ViT (random weights, fast)"
RANDOM_LABEL = "ViT-S/14 (RANDOM weights: no weights found)"


def default_model_dir() -> Path:
    from ..data import default_asset

    return default_asset("vit-s14-cifar10")


def model_choices(model_dir: Path | str | None = None) -> list[str]:
    """Labels of the models the demo can offer, default first."""
    d = Path(model_dir) if model_dir else default_model_dir()
    first = REAL_LABEL if (d / "model.safetensors").is_file() else RANDOM_LABEL
    return [first, TINY_LABEL]


def load_image_model(label: str, model_dir: Path | str | None = None) -> ImageModel:
    """Load one of :func:`model_choices` (eval mode, CPU)."""
    import timm
    import torch

    d = Path(model_dir) if model_dir else default_model_dir()
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if label == TINY_LABEL:
        torch.manual_seed(0)
        m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=48,
                              depth=4, num_heads=3, num_classes=10).eval()
        return ImageModel(label, m, [f"class {i}" for i in range(10)], 64,
                          warning="This tiny ViT has RANDOM weights: it shows how each method selects and merges "
                                  "tokens, but its predictions mean nothing.")
    if label == REAL_LABEL and (d / "model.safetensors").is_file():
        from ..models import load_timm

        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        pcfg = cfg.get("pretrained_cfg", {})
        m = load_timm(cfg.get("architecture", "vit_small_patch14_dinov2"), weights=d).eval()
        size = int(cfg.get("model_args", {}).get("img_size", 224))
        names = pcfg.get("label_names") or [f"class {i}" for i in range(m.num_classes)]
        return ImageModel(label, m, list(names), size, tuple(pcfg.get("mean", ImageModel.mean)),
                          tuple(pcfg.get("std", ImageModel.std)))
    if label in (RANDOM_LABEL, REAL_LABEL):
        torch.manual_seed(0)
        m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, img_size=224).eval()
        return ImageModel(RANDOM_LABEL, m, [f"class {i}" for i in range(10)], 224,
                          warning=f"No weights found at {d}: this ViT-S/14 has RANDOM weights, so its predictions "
                                  "and agreement numbers mean nothing. Set $TOKENPRUNE_ASSETS or pass "
                                  "--model-dir to a folder with model.safetensors and config.json.")
    raise InputError(f"unknown model {label!r}; choose one of: {', '.join(model_choices(d))}")


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
    import torch
    from PIL import Image

    from .. import adapters, api, viz
    from ..data import to_tensor
    from ..plan import check_budget

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
    from .. import api

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
    from ..data import default_asset

    d = default_asset("whisper-tiny.en")
    if not (d / "config.json").is_file():
        return False, f"Whisper tiny.en weights not found at {d}."
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False, "transformers is not installed (pip install 'tokenprune[hf]')."
    try:
        from ..adapters import adapter_classes

        names = {c.__name__ for c in adapter_classes()}
        if not any("Whisper" in n for n in names):
            return False, "tokenprune has no Whisper adapter yet."
    except Exception as e:
        return False, f"could not list adapters ({e})."
    return True, ""


_WHISPER: dict = {}


def _load_whisper():
    if "model" not in _WHISPER:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from ..data import default_asset

        d = default_asset("whisper-tiny.en")
        _WHISPER["processor"] = WhisperProcessor.from_pretrained(str(d))
        _WHISPER["model"] = WhisperForConditionalGeneration.from_pretrained(str(d)).float().eval()
    return _WHISPER["model"], _WHISPER["processor"]


def _transcribe(model, processor, wave) -> str:
    """Greedy transcript of one clip (``generate`` is used the same way with and without reduction)."""
    feats = processor(wave, sampling_rate=AUDIO_RATE, return_tensors="pt").input_features
    ids = model.generate(feats, max_new_tokens=128)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def compare_audio(wave: np.ndarray, budget: float, methods) -> tuple[dict, list[dict]]:
    """Whisper on one clip, unreduced and per method: spectrogram overlays and transcripts."""
    import torch

    from .. import api, viz
    from ..plan import check_budget

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


# -- HTML of the result panels --------------------------------------------------------------------------------
def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CSS = """
.tp-results {display:flex; flex-wrap:wrap; gap:12px;}
.tp-card {border:1px solid #d0d4dc; border-radius:8px; padding:8px; width:240px; background:var(--block-background-fill);}
.tp-card img {width:100%; image-rendering:auto; border-radius:4px; display:block;}
.tp-card.tp-audio {width:100%;}
.tp-title {font-weight:700; font-size:1.05em; margin:4px 0;}
.tp-line {font-size:0.92em; margin:2px 0;}
.tp-ok {color:#0a7d28; font-weight:600;} .tp-bad {color:#b3261e; font-weight:600;}
.tp-error {color:#b3261e; white-space:pre-wrap;}
.tp-warning {background:#fff3cd; color:#6b4e00; border:2px solid #e0a800; border-radius:8px; padding:10px 14px;
             font-weight:600;}
.tp-msg-error {color:#b3261e; font-weight:600;}
.tp-legend span {display:inline-block; margin-right:12px; font-size:0.9em;}
"""


def results_html(ref: Result, results: list[Result], budget: float) -> str:
    def card(r: Result, reference: bool = False) -> str:
        m = html.escape(r.method)
        lines = [f'<div class="tp-card" data-method="{m}">']
        if r.overlay is not None:
            lines.append(f'<img alt="{m} overlay" src="{_png_uri(r.overlay)}">')
        lines.append(f'<div class="tp-title">{m}</div>')
        if r.error:
            lines.append(f'<div class="tp-error">failed: {html.escape(r.error)}</div></div>')
            return "\n".join(lines)
        pre = f" (+{r.prefix} prefix)" if r.prefix else ""
        lines.append(f'<div class="tp-line tp-kept" data-kept="{r.kept}" data-total="{r.total}">'
                     f'tokens out: <b>{r.kept}</b> / {r.total}{pre}</div>')
        if not reference:
            s = r.stats
            lines.append(f'<div class="tp-line">{s.get("dropped", 0)} patches dropped, '
                         f'{s.get("merged_tokens", 0)} merged tokens (largest holds {s.get("largest_group", 0)})</div>')
        speed = f" ({ref.ms / r.ms:.2f}x)" if not reference and r.ms > 0 else ""
        lines.append(f'<div class="tp-line tp-time">time: {r.ms:.1f} ms{speed}; FLOPs x{r.flop_ratio:.2f}</div>')
        lines.append(f'<div class="tp-line tp-pred">prediction: <b>{html.escape(r.label)}</b> ({r.prob:.1%})</div>')
        if not reference:
            cls, word = ("tp-ok", "same as unreduced") if r.agree else ("tp-bad", "differs from unreduced")
            lines.append(f'<div class="tp-line tp-agree {cls}" data-agree="{int(bool(r.agree))}">{word}</div>')
            lines.append(f'<div class="tp-line tp-cos">embedding cosine: {r.cosine:.4f}</div>')
        lines.append("</div>")
        return "\n".join(lines)

    legend = ('<div class="tp-legend"><span>dimmed: dropped patches</span><span>tinted: patches merged into one '
              'token (one colour per token)</span><span>white lines: token boundaries</span>'
              f'<span>budget {budget:g}</span></div>')
    return legend + '<div class="tp-results">' + "\n".join([card(ref, True)] + [card(r) for r in results]) + "</div>"


def results_table(ref: Result, results: list[Result]) -> list[list]:
    rows = [["unreduced", ref.kept, ref.total, round(ref.ms, 1), ref.label, round(ref.prob, 4), "", 1.0, 1.0]]
    for r in results:
        if r.error:
            rows.append([r.method, None, r.total, None, "", None, "error", None, None])
        else:
            rows.append([r.method, r.kept, r.total, round(r.ms, 1), r.label, round(r.prob, 4),
                         "yes" if r.agree else "no", round(r.cosine, 4), round(r.flop_ratio, 3)])
    return rows


TABLE_HEADERS = ["method", "tokens out", "tokens in", "time ms", "prediction", "prob", "agrees",
                 "embedding cosine", "FLOP ratio"]


def audio_html(ref: dict, rows: list[dict]) -> str:
    parts = ['<div class="tp-results">',
             f'<div class="tp-card tp-audio" data-method="unreduced"><img alt="spectrogram" src="{_png_uri(ref["image"])}">'
             f'<div class="tp-title">unreduced</div><div class="tp-line tp-text">{html.escape(ref["text"])}</div>'
             f'<div class="tp-line">transcription time: {ref["ms"]:.0f} ms</div></div>']
    for r in rows:
        m = html.escape(r["method"])
        parts.append(f'<div class="tp-card tp-audio" data-method="{m}">')
        if r.get("image") is not None:
            parts.append(f'<img alt="{m} kept regions" src="{_png_uri(r["image"])}">')
        parts.append(f'<div class="tp-title">{m}</div>')
        if r.get("error"):
            parts.append(f'<div class="tp-error">failed: {html.escape(r["error"])}</div>')
        else:
            if r.get("kept") is not None:
                parts.append(f'<div class="tp-line tp-kept" data-kept="{r["kept"]}">tokens out: <b>{r["kept"]}</b>'
                             f' / {r.get("total", "?")} (the encoder always sees 30 s; padding counts)</div>')
                if r.get("on_clip"):
                    held, span = r["on_clip"]
                    parts.append(f'<div class="tp-line">{held} tokens hold the {span} time steps of the clip</div>')
            parts.append(f'<div class="tp-line tp-text">{html.escape(r["text"])}</div>'
                         f'<div class="tp-line">transcription time: {r["ms"]:.0f} ms (encoder + greedy decoding)</div>')
        parts.append("</div>")
    return "\n".join(parts) + "</div>"


def _warning_html(text: str) -> str:
    return f'<div class="tp-warning" id="tp-model-warning">&#9888; {html.escape(text)}</div>' if text else ""


def _msg(notes: list[str] | None = None, error: str | None = None) -> str:
    if error:
        return f'<div class="tp-msg-error">{html.escape(error)}</div>'
    return ("<div>" + "; ".join(html.escape(n) for n in notes) + "</div>") if notes else ""


# -- the Gradio app ---------------------------------------------------------------------------------------------
def build_app(model_dir: Path | str | None = None, default_model: str | None = None, repeats: int = 3):
    """The Gradio ``Blocks`` app (not launched)."""
    import gradio as gr

    from .. import api

    choices = model_choices(model_dir)
    if default_model is None:
        default_model = TINY_LABEL if os.environ.get(TINY_ENV) == "1" else choices[0]
    cache: dict[str, ImageModel] = {}

    def get_model(label: str) -> ImageModel:
        if label not in cache:
            cache[label] = load_image_model(label, model_dir)
        return cache[label]

    first = get_model(default_model)
    samples = sample_images()
    methods = usable_methods(first.model)
    default_methods = [m for m in DEFAULT_METHODS if m in methods] or methods[:2]

    def prepare(im):
        return np.asarray(square_crop(im))

    def on_upload(upload):
        # the file box is emptied after each upload so the next file can be dropped straight in
        if upload is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            im, notes = load_image(upload)
        except InputError as e:
            return None, _msg(error=str(e)), None, None
        except Exception as e:  # any other decoder failure: still a message, not a traceback
            return None, _msg(error=f"could not read {Path(str(upload)).name!r} as an image ({e})."), None, None
        notes.insert(0, f"loaded {Path(str(upload)).name} ({im.size[0]} x {im.size[1]}); centre-cropped to a square")
        return prepare(im), _msg(notes), None, None

    def on_sample(name):
        if not name or name not in samples:
            return gr.update(), gr.update()
        im, notes = load_image(samples[name])
        return prepare(im), _msg([f"sample '{name}' ({im.size[0]} x {im.size[1]})"] + notes)

    def on_model(label):
        try:
            entry = get_model(label)
        except Exception as e:
            return _msg(error=f"could not load {label}: {e}")
        return _warning_html(entry.warning)

    def on_run(image, label, budget, chosen):
        try:
            if image is None:
                raise InputError("No image: upload one or pick a sample first.")
            entry = get_model(label)
            ref, results = compare_image(entry, image, float(budget), list(chosen or []), repeats=repeats)
        except (InputError, ValueError, TypeError) as e:
            return _msg(error=str(e)), "", None
        except Exception as e:  # never a traceback in the page
            return _msg(error=f"unexpected error: {type(e).__name__}: {e}"), "", None
        done = sum(not r.error for r in results)
        status = (f'<div id="tp-done" data-methods="{done}">{done} of {len(results)} methods ran on '
                  f"{html.escape(entry.label)} at budget {float(budget):g}; times are the best of {repeats} "
                  "CPU forwards of one image (the unreduced model timed before and after the methods).</div>")
        return status, results_html(ref, results, float(budget)), results_table(ref, results)

    audio_ok, audio_why = whisper_status()
    jfk = sample_audio()

    def on_audio(upload, use_sample, budget, chosen):
        try:
            src = jfk if (use_sample and upload is None) else upload
            if src is None:
                raise InputError("No clip: upload an audio file" + (" or tick the JFK sample." if jfk else "."))
            wave, notes = load_audio(src)
            if not audio_ok:
                import tokenprune.viz as viz

                spec = viz.log_spectrogram(wave)
                img = viz.colorize(spec)[::-1]
                ref = {"method": "input", "image": img, "text": "(no transcript: " + audio_why + ")", "ms": 0.0}
                return (_msg(notes + [f"Not available yet: {audio_why} Showing the clip's spectrogram only."]),
                        audio_html(ref, []))
            ref, rows = compare_audio(wave, float(budget), list(chosen or []))
        except (InputError, ValueError, TypeError) as e:
            return _msg(error=str(e)), ""
        except Exception as e:
            return _msg(error=f"unexpected error: {type(e).__name__}: {e}"), ""
        done = sum(not r.get("error") for r in rows)
        info = (f'<div id="tp-audio-done" data-methods="{done}">{done} of {len(rows)} methods ran on Whisper '
                f"tiny.en at budget {float(budget):g}; {wave.size / AUDIO_RATE:.1f} s clip.</div>")
        return info + _msg(notes), audio_html(ref, rows)

    with gr.Blocks(title="tokenprune demo", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown("# tokenprune: which tokens does each method keep?\n"
                    "Pick an input, a budget (the fraction of the input's non-prefix tokens kept (that leave the "
                    "encoder)) and methods; "
                    "each panel shows the tokens that method kept on the image, with its time and its agreement "
                    "with the unreduced model.")
        with gr.Tab("Image"):
            warning = gr.HTML(_warning_html(first.warning), elem_id="tp-warning-box")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Upload an image", file_count="single", type="filepath",
                                     elem_id="tp-upload")
                    sample = gr.Dropdown(choices=list(samples), value=next(iter(samples), None), label="...or pick a bundled sample",
                                         elem_id="tp-sample")
                    first_img = prepare(load_image(next(iter(samples.values())))[0]) if samples else None
                    preview = gr.Image(value=first_img, label="Model input", type="numpy", interactive=False,
                                       elem_id="tp-preview", height=240)
                    input_msg = gr.HTML(_msg([f"sample '{next(iter(samples))}'"]) if samples else "",
                                        elem_id="tp-input-msg")
                with gr.Column(scale=1):
                    model_dd = gr.Dropdown(choices=choices, value=default_model, label="Model", elem_id="tp-model")
                    budget = gr.Slider(0.05, 1.0, value=0.25, step=0.05,
                                       label="Budget: fraction of the input's non-prefix tokens kept (that leave "
                                             "the encoder)", elem_id="tp-budget")
                    chosen = gr.CheckboxGroup(choices=methods, value=default_methods, label="Methods",
                                              elem_id="tp-methods")
                    run = gr.Button("Compare", variant="primary", elem_id="tp-run")
            status = gr.HTML("", elem_id="tp-status")
            panels = gr.HTML("", elem_id="tp-panels")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Numbers", interactive=False, elem_id="tp-table")
        with gr.Tab("Audio"):
            note = ("" if audio_ok else
                    f'<div class="tp-warning" id="tp-audio-unavailable">Not available yet: {html.escape(audio_why)} '
                    "The tab shows the clip's spectrogram; the per-method comparison and transcripts appear "
                    "once tokenprune can reduce Whisper.</div>")
            gr.HTML(note)
            with gr.Row():
                with gr.Column():
                    audio_up = gr.File(label="Upload a clip (WAV, FLAC, OGG, MP3; up to 30 s used)",
                                       elem_id="tp-audio-upload")
                    use_jfk = gr.Checkbox(value=jfk is not None, interactive=jfk is not None,
                                          label="use the JFK sample" + ("" if jfk else " (not found locally)"))
                with gr.Column():
                    audio_budget = gr.Slider(0.05, 1.0, value=0.5, step=0.05,
                                             label="Budget: fraction of the input's non-prefix tokens kept (that "
                                                   "leave the encoder)")
                    audio_methods = gr.CheckboxGroup(choices=methods, value=default_methods[:1], label="Methods")
                    audio_run = gr.Button("Transcribe and compare", variant="primary", elem_id="tp-audio-run")
            audio_msg = gr.HTML("", elem_id="tp-audio-msg")
            audio_panels = gr.HTML("", elem_id="tp-audio-panels")

        upload.upload(on_upload, [upload], [preview, input_msg, upload, sample])
        sample.change(on_sample, [sample], [preview, input_msg])
        model_dd.change(on_model, [model_dd], [warning])
        run.click(on_run, [preview, model_dd, budget, chosen], [status, panels, table])
        audio_run.click(on_audio, [audio_up, use_jfk, audio_budget, audio_methods], [audio_msg, audio_panels])
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    return app.launch(server_name=host, server_port=port, css=CSS, max_file_size=MAX_UPLOAD_BYTES,
                      footer_links=[], quiet=True, **kwargs)


def add_arguments(p):
    from ._common import port_arg, positive_int, nonnegative_int

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
    import sys

    from ._common import UsageError, warn

    if args.model_dir is not None and not (Path(args.model_dir) / "model.safetensors").is_file():
        raise UsageError(f"--model-dir {args.model_dir} has no model.safetensors (a folder with "
                         "model.safetensors and config.json is expected)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("tokenprune demo needs Gradio: pip install 'tokenprune[demo]'") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.tiny:
        os.environ[TINY_ENV] = "1"
        warn("--tiny: the demo starts on a tiny ViT with RANDOM weights; its predictions mean nothing")
    elif model_choices(args.model_dir)[0] == RANDOM_LABEL:
        from ..data import assets_source

        warn(f"no weights at {default_model_dir()} (from {assets_source()}): the demo runs a ViT-S/14 with RANDOM "
             "weights; its predictions and agreement numbers mean nothing. Pass --assets or --model-dir, or set "
             "$TOKENPRUNE_ASSETS.")
    print("tokenprune demo: loading the model and building the app", file=sys.stderr, flush=True)
    app = build_app(args.model_dir, repeats=max(1, args.repeats))
    print(f"tokenprune demo on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    try:
        launch(app, args.host, args.port)
    except OSError as e:  # port taken, address not available
        raise UsageError(f"could not serve on {args.host}:{args.port}: {e}; try another --port") from None
    return 0
