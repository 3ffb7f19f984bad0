"""Regenerate the bundled sample images in tokenprune/assets/ from the CIFAR-10 test archive.

For each listed class, takes the first test images (sorted by file name) and keeps the first one the
fine-tuned ViT-S/14 classifies correctly with probability >= 0.9; saves it upscaled (bicubic) as a PNG.

    python demos/make_samples.py  [--assets ../shared/assets]
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import torch
from PIL import Image

from tokenprune.data import default_asset, to_tensor
from tokenprune.models import load_timm

CLASSES = ["cat", "dog", "airplane", "ship", "horse", "bird"]
OUT = Path(__file__).resolve().parents[1] / "tokenprune" / "assets"


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=None)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    root = Path(args.assets) if args.assets else default_asset()
    torch.set_num_threads(1)
    model = load_timm("", weights=root / "vit-s14-cifar10", img_size=224).eval()
    names = json.loads((root / "vit-s14-cifar10" / "config.json").read_text())["pretrained_cfg"]["label_names"]
    with tarfile.open(root / "cifar10" / "cifar10_jpeg_test.tar.gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for cls in CLASSES:
            for m in [m for m in members if Path(m.name).parent.name == cls][:20]:
                im = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                p = model(to_tensor([im], 224)).softmax(-1)[0]
                if names[int(p.argmax())] == cls and float(p.max()) >= 0.9:
                    big = im.resize((args.size, args.size), Image.BICUBIC)
                    path = OUT / f"{cls}.png"
                    big.save(path, optimize=True)
                    print(f"{path.name}: {m.name} p={float(p.max()):.3f} {path.stat().st_size // 1024} KB")
                    break
            else:
                print(f"no confident {cls} in the first 20 test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
