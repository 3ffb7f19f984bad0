"""Model-family adapters, found by class name so unused libraries are never imported."""
from __future__ import annotations

import importlib

from .base import Adapter, class_names

# (module of the adapter, class name in it); tried in order
_ADAPTERS = [
    ("tokenprune.adapters.timm_vit", "TimmViTAdapter"),
    ("tokenprune.adapters.timm_eva", "TimmEvaAdapter"),
    ("tokenprune.adapters.timm_naflex", "TimmNaFlexAdapter"),
    ("tokenprune.adapters.timm_features", "TimmFeaturesRefused"),  # features_only=True: a clear refusal
    ("tokenprune.adapters.open_clip_vit", "OpenClipViTAdapter"),
    ("tokenprune.adapters.llava", "LlavaAdapter"),  # VLMs before the HF encoder adapters
    ("tokenprune.vlm.qwen", "QwenVLAdapter"),
    ("tokenprune.vlm.gemma", "GemmaVLAdapter"),
    ("tokenprune.vlm.onevision", "OneVisionAdapter"),
    ("tokenprune.vlm.refuse", "UnsupportedVLM"),  # any other VLM: a clear refusal
    ("tokenprune.adapters.hf_siglip2", "HFSiglip2Adapter"),
    ("tokenprune.adapters.hf_clip", "HFClipAdapter"),
    ("tokenprune.adapters.whisper", "WhisperAdapter"),
    ("tokenprune.adapters.hf_ast", "HFASTAdapter"),
    ("tokenprune.adapters.hf_videomae", "HFVideoMAEAdapter"),
    ("tokenprune.adapters.hf_vivit", "HFVivitAdapter"),
    ("tokenprune.adapters.hf_vit", "HFViTAdapter"),
    ("tokenprune.adapters.hf_dinov3", "HFDinov3Adapter"),
    ("tokenprune.adapters.hf_speech", "HFSpeechAdapter"),
]

SUPPORTED = [
    "timm VisionTransformer family (vit_*, deit_*, dinov2, ...)",
    "timm Eva (RoPE ViTs: eva02_*, vit_*_dinov3, vit_*_rope_*, vit_pe_*)",
    "timm NaFlexVit (naflexvit_*; images or NaFlex patch dicts, a batch may mix grids)",
    "open_clip CLIP / VisionTransformer image towers (model.visual)",
    "transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (visual tokens pruned between vision tower and LM)",
    "transformers Qwen2VL / Qwen2_5_VL / Qwen3VLForConditionalGeneration (images and video; visual tokens pruned between vision tower and LM)",
    "transformers PaliGemmaForConditionalGeneration / Gemma3ForConditionalGeneration (images; visual tokens pruned between vision tower and LM)",
    "transformers LlavaOnevisionForConditionalGeneration (images and video; visual tokens pruned between vision tower and LM)",
    "transformers CLIPModel / CLIPVisionModel(WithProjection) / SiglipModel / SiglipVisionModel (vision tower)",
    "transformers WhisperForConditionalGeneration / WhisperModel / WhisperEncoder (encoder)",
    "transformers ASTForAudioClassification / ASTModel",
    "transformers VideoMAEModel / VideoMAEForVideoClassification",
    "transformers VivitModel / VivitForVideoClassification",
    "transformers ViTModel / ViTForImageClassification / Dinov2(WithRegisters)Model / ...ForImageClassification",
    "transformers DINOv3ViTModel (RoPE)",
    "transformers Siglip2VisionModel / Siglip2Model / Siglip2ForImageClassification (NaFlex, mixed shapes too)",
    "transformers Wav2Vec2Model / HubertModel (encoder; WavLM refused: relative position bias inside attention)",
]


def register_adapter(module: str, name: str, description: str, first: bool = False) -> None:
    entry = (module, name)
    if entry not in _ADAPTERS:
        _ADAPTERS.insert(0, entry) if first else _ADAPTERS.append(entry)
        SUPPORTED.append(description)


def adapter_classes() -> list[type]:
    return [getattr(importlib.import_module(m), n) for m, n in _ADAPTERS]


def for_model(model) -> Adapter:
    for cls in adapter_classes():
        if cls.matches(model):
            return cls(model)
    name = type(model).__module__ + "." + type(model).__qualname__
    raise TypeError(f"tokenprune has no adapter for {name}. Supported model families: "
                    + "; ".join(SUPPORTED) + ".")


__all__ = ["Adapter", "for_model", "register_adapter", "adapter_classes", "class_names", "SUPPORTED"]
