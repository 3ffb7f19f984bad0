"""The demo's inputs: uploaded images and clips checked and converted, with a readable
:class:`InputError` for anything unusable, and the bundled samples. No Gradio."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...speech import read_audio, resample

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 50_000_000  # refuse to decode larger images
MAX_SIDE = 1024  # larger images are downscaled first
MAX_AUDIO_SECONDS = 30.0  # one Whisper window
AUDIO_RATE = 16000


class InputError(ValueError):
    """An upload the demo cannot use; the message is shown in the UI as is."""


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


def load_audio(upload) -> tuple[np.ndarray, list[str]]:
    """Read an uploaded clip: ``(mono float32 waveform at 16 kHz, notes)``; :class:`InputError` for
    files that are not audio, are empty or silent-length. Longer clips are cut to 30 s. Reading and
    resampling are :mod:`tokenprune.speech`'s (the ones the WER evaluation uses)."""
    path = _path_of(upload)
    notes: list[str] = []
    try:
        data, sr = read_audio(path)
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
        x = resample(x, sr, AUDIO_RATE)
    return np.asarray(x, dtype=np.float32), notes


def sample_images() -> dict[str, Path]:
    """Bundled sample images, name -> path."""
    return {p.stem: p for p in sorted(ASSETS_DIR.glob("*.png"))}


def sample_audio() -> Path | None:
    """The JFK clip from the shared assets, if it is there (nothing audio is bundled)."""
    from ...data import default_asset

    p = default_asset("speech-hifitts-6097", "jfk.wav")
    return p if p.is_file() else None
