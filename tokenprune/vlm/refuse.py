"""VLM families not supported yet: refused at ``apply()`` with an error that says so.

Matched after the supported VLM families and before the encoder adapters, so a VLM is never patched as if
it were a plain vision encoder (which would fail later, inside ``generate()``). A model counts as a VLM when
its config has a ``vision_config``, a ``text_config`` and an image placeholder token id (Idefics3 / SmolVLM,
InternVL, Mistral3, Llama 4, Mllama, ...); CLIP / SigLIP dual encoders
have no placeholder token and go to their own adapter.
"""
from __future__ import annotations

from ..adapters.base import Adapter, class_names

SUPPORTED_VLMS = ("LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
                  "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
                  "Qwen3VLForConditionalGeneration, PaliGemmaForConditionalGeneration, "
                  "Gemma3ForConditionalGeneration, LlavaOnevisionForConditionalGeneration")


def is_vlm(model) -> bool:
    cfg = getattr(model, "config", None)
    return (any(m.startswith("transformers.") for m, _ in class_names(model)) and cfg is not None
            and getattr(cfg, "vision_config", None) is not None and getattr(cfg, "text_config", None) is not None
            and any(hasattr(cfg, n) for n in ("image_token_id", "image_token_index")))


class UnsupportedVLM(Adapter):
    family = "vlm-unsupported"

    @classmethod
    def matches(cls, model) -> bool:
        return is_vlm(model)

    def __init__(self, model):
        mt = getattr(model.config, "model_type", "?")
        raise TypeError(
            f"tokenprune: {type(model).__name__} (model_type={mt!r}) is a vision-language model family tokenprune "
            f"does not support yet; supported VLMs: {SUPPORTED_VLMS}. Applying tokenprune to its vision tower "
            "alone is not supported either (the language model's image placeholders would no longer match); "
            "run the model unpatched")
