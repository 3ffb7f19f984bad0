"""Small, dependency-light data loading for evaluation: CIFAR-10 JPEG archives,
ImageFolder trees, and the speech manifest. Images come out as float tensors
normalised for the model (bicubic resize, mean/std).

The shared assets folder (real weights, CIFAR-10, speech clips) is, in order:
the folder given to :func:`set_assets_dir` (the CLI's ``--assets``), the
``TOKENPRUNE_ASSETS`` environment variable, or ``../shared/assets`` next to the
checkout that holds this package -- never a path relative to the current folder.

numpy, torch and PIL are imported by the functions that need them, so the
command line can parse its arguments without them.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ASSETS_ENV = "TOKENPRUNE_ASSETS"
_assets_override: Path | None = None


def checkout_assets_dir() -> Path:
    """``../shared/assets`` relative to the checkout holding the package (the package's parent folder)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def assets_dir() -> Path:
    """The shared assets folder: :func:`set_assets_dir`, else ``$TOKENPRUNE_ASSETS``, else
    :func:`checkout_assets_dir`."""
    if _assets_override is not None:
        return _assets_override
    env = os.environ.get(ASSETS_ENV)
    return Path(env).expanduser() if env else checkout_assets_dir()


def assets_source() -> str:
    """Where :func:`assets_dir` comes from, for messages."""
    if _assets_override is not None:
        return "--assets"
    return f"${ASSETS_ENV}" if os.environ.get(ASSETS_ENV) else "the checkout's ../shared/assets"


def set_assets_dir(path: str | Path | None) -> Path | None:
    """Use ``path`` as the assets folder (``None``: back to the default); returns the previous override."""
    global _assets_override
    previous = _assets_override
    _assets_override = Path(path).expanduser() if path is not None else None
    return previous


def default_asset(*parts: str) -> Path:
    """A file under the shared assets folder (:func:`assets_dir`)."""
    return assets_dir().joinpath(*parts)


def _sample_per_class(items, limit, seed):
    """``limit`` items spread evenly over classes (deterministic)."""
    if limit is None or limit >= len(items):
        return items
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    for v in by_class.values():
        rng.shuffle(v)
    out, i = [], 0
    classes = sorted(by_class)
    while len(out) < limit:
        c = classes[i % len(classes)]
        if by_class[c]:
            out.append(by_class[c].pop())
        i += 1
    return sorted(out, key=lambda t: (t[1], str(t[0])))


def load_image_folder(path, limit: int | None = None, seed: int = 0):
    """``(images: list[PIL.Image], labels: list[int], class_names)`` from a CIFAR-style
    ``.tar.gz`` of class folders or an ImageFolder directory."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    if path.is_file() and (path.name.endswith(".tar.gz") or path.name.endswith(".tar") or path.suffix == ".tgz"):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)]
            classes = sorted({Path(m.name).parent.name for m in members})
            index = {c: i for i, c in enumerate(classes)}
            items = [(m, index[Path(m.name).parent.name]) for m in members]
            items = _sample_per_class(sorted(items, key=lambda t: t[0].name), limit, seed)
            # read in archive order: a backward seek in a .tar.gz decompresses from the start again
            raw = {m.name: tar.extractfile(m).read() for m, _ in sorted(items, key=lambda t: t[0].offset_data)}
            images = [Image.open(io.BytesIO(raw[m.name])).convert("RGB") for m, _ in items]
            return images, [y for _, y in items], classes
    if path.is_dir():
        classes = sorted(d.name for d in path.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"{path} has no class sub-folders (ImageFolder layout expected)")
        items = [(f, i) for i, c in enumerate(classes) for f in sorted((path / c).iterdir())
                 if f.suffix.lower() in IMAGE_EXTS]
        items = _sample_per_class(items, limit, seed)
        return [Image.open(f).convert("RGB") for f, _ in items], [y for _, y in items], classes
    raise FileNotFoundError(f"{path} is neither an image archive (.tar.gz) nor an ImageFolder directory")


def to_tensor(images, size: int | tuple[int, int] = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL images -> ``[B, 3, size, size]`` float tensor (bicubic resize, normalised); ``size`` may be
    ``(height, width)`` for a model built for a non-square input."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if x.shape[-2] != h or x.shape[-1] != w:
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def load_speech_manifest(folder, limit: int | None = None):
    """``[(wav_path, transcript)]`` from a manifest.json of one JSON object per line."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    out = [(folder / r["audio_filepath"], r["text"]) for r in rows]
    return out[:limit] if limit else out
