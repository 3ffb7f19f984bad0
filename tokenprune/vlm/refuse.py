"""VLM families not supported yet: refused at ``apply()`` with an error that says so (the bare ``...Model`` of
a supported family, without its LM head: an error naming the ``...ForConditionalGeneration`` to patch).

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
        name = next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")), "")
        full = name[:-len("Model")] + "ForConditionalGeneration" if name.endswith("Model") else ""
        if full in [s.strip() for s in SUPPORTED_VLMS.split(",")]:  # a supported family without its LM head
            raise TypeError(
                f"tokenprune: {type(model).__name__} is the {full} model without its language-model head; the "
                f"visual tokens are pruned on the way into the language model, in the top-level model's forward and "
                f"generate(): patch the {full} (tokenprune.apply(model, ...) on the model that holds this one as "
                f"its .model)")
        raise TypeError(
            f"tokenprune: {type(model).__name__} (model_type={mt!r}) is a vision-language model family tokenprune "
            f"does not support yet; supported VLMs: {SUPPORTED_VLMS}. Applying tokenprune to its vision tower "
            "alone is not supported either (the language model's image placeholders would no longer match); "
            "run the model unpatched")
