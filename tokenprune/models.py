"""Loading models by timm name, local weights file or Hugging Face id/path.

The hub path stays the normal one for users with network access; a local
``weights`` file (safetensors) is passed through timm's ``pretrained_cfg_overlay``
so no network is touched.
"""
from __future__ import annotations

import json
from pathlib import Path


def load_timm(name: str, weights: str | Path | None = None, num_classes: int | None = None,
              img_size: int | None = None, pretrained: bool | None = None, **kwargs):
    """``timm.create_model`` with an optional local weights file.

    ``weights`` may be a ``.safetensors``/``.pth`` file or a folder holding
    ``model.safetensors`` and a ``config.json`` (timm's layout); its
    ``num_classes`` and ``architecture`` are read from the config when present.
    """
    import timm

    if weights is not None:
        weights = Path(weights)
        if weights.is_dir():
            cfg_file = weights / "config.json"
            if cfg_file.exists():
                cfg = json.loads(cfg_file.read_text())
                num_classes = cfg.get("num_classes", num_classes) if num_classes is None else num_classes
                name = name or cfg.get("architecture")
                img_size = img_size or cfg.get("model_args", {}).get("img_size")
            weights = weights / "model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"weights file {weights} does not exist")
        # custom_load off: a name whose hub weights are a JAX .npz (vit_small_patch16_224's augreg) made timm 1.0.29
        # read the local safetensors / .pth file with that loader ("expected an original JAX/Flax NumPy .npz")
        overlay = dict(file=str(weights), custom_load=str(weights).endswith(".npz"))
        if num_classes is not None:
            overlay["num_classes"] = num_classes
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if img_size is not None:
            kwargs["img_size"] = img_size
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=bool(pretrained), **kwargs)
