"""The image models the demo offers, by label, and where the default one's weights are. No torch: the command
line reads these to warn about random weights before it imports anything heavy."""
from __future__ import annotations

from pathlib import Path

from ...data import default_asset

REAL_LABEL = "ViT-S/14 CIFAR-10 (real weights)"
TINY_LABEL = "tiny ViT (random weights, fast)"
RANDOM_LABEL = "ViT-S/14 (RANDOM weights: no weights found)"


def default_model_dir() -> Path:
    return default_asset("vit-s14-cifar10")


def model_choices(model_dir: Path | str | None = None) -> list[str]:
    """Labels of the models the demo can offer, default first."""
    d = Path(model_dir) if model_dir else default_model_dir()
    first = REAL_LABEL if (d / "model.safetensors").is_file() else RANDOM_LABEL
    return [first, TINY_LABEL]
