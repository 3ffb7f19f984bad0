"""Hugging Face CLIP and SigLIP vision towers.

Accepted: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``
(only ``vision_model`` is reduced; ``get_image_features`` / the text tower
work as before), ``SiglipVisionModel`` and ``SiglipModel``.

- The encoder's layer loop becomes :func:`tokenprune.engine.run_blocks`; the
  layers are HF's own modules. Attention keeps SDPA through the
  ``tokenprune_sdpa`` kernel of :mod:`.hf_common`, which adds the size bias
  and records q/k.
- Positions: both families add learned absolute position embeddings before
  the first layer, so merged/pruned tokens carry their positions with them.
- CLIP: one prefix token ([CLS]); pooling reads it (unchanged).
- SigLIP: no [CLS] (``has_cls=False``): the ``cls`` reducer scores with its
  substitute (``substitute="received"`` by default, or the cheaper ``"mean_query"``).
  Scoring with the MAP head's probe query instead is not implemented; no
  real SigLIP weights are available offline to measure which substitute
  retains more (on Whisper, also [CLS]-less, ``"received"`` was clearly
  better than ``"mean_query"``). The MAP pooling head (one learned probe attending over all tokens) gets
  ``log(size)`` as a float key-padding mask, so a merged token counts as the
  tokens it stands for and padding slots are ignored; it is run with
  ``need_weights=False`` (same output as HF's call, fused path).
"""
from __future__ import annotations

import math

import torch

from ..engine import current_scope, forward_scope
from ..plan import EncoderInfo
from .base import Adapter, has_class, restore_class, swap_class
from .hf_common import AttentionRouting, hf_call_block, hf_capture, no_extra_kwargs, run_and_attach


def _attn(layer):
    return layer.self_attn


_call_block = hf_call_block(_attn, extra=(None,))  # layer(x, attention_mask=None)
_capture = hf_capture(_attn)


class _Encoder:
    """Mixin for ``CLIPEncoder`` / ``SiglipEncoder``."""

    def forward(self, inputs_embeds, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        no_extra_kwargs(dict(kwargs, attention_mask=attention_mask), "vision encoder")
        patch = self._tokenprune_patch
        n = inputs_embeds.shape[1] - patch.num_prefix
        out = run_and_attach(patch, self.layers, inputs_embeds, _call_block, _capture, patch.adapter.grid_for(n))
        return BaseModelOutput(last_hidden_state=out)


class _Tower:
    """Mixin for the vision tower: one scope per forward, so the pooling head sees the final sizes."""

    def forward(self, *args, **kwargs):
        with forward_scope():
            return super().forward(*args, **kwargs)


class _MapHead:
    """Mixin for ``SiglipMultiheadAttentionPoolingHead``: size-weighted keys, padding ignored."""

    def forward(self, hidden_state):
        scope = current_scope()
        state = scope.state if scope is not None else None
        if state is None or state.sizes is None:
            return super().forward(hidden_state)
        b = hidden_state.shape[0]
        probe = self.probe.repeat(b, 1, 1)
        key_bias = state.sizes.log().to(hidden_state.dtype)
        h = self.attention(probe, hidden_state, hidden_state, key_padding_mask=key_bias, need_weights=False)[0]
        residual = h
        h = self.layernorm(h)
        h = residual + self.mlp(h)
        return h[:, 0]


def vision_tower(model):
    """The module holding ``embeddings`` and ``encoder`` (the model itself or its ``vision_model``)."""
    t = model
    for _ in range(3):
        if t is None:
            break
        if hasattr(t, "embeddings") and hasattr(t, "encoder") and hasattr(t.encoder, "layers"):
            return t
        t = getattr(t, "vision_model", None)
    raise TypeError(f"tokenprune: cannot find the vision tower (embeddings + encoder.layers) of "
                    f"{type(model).__name__}; is this a transformers CLIP/SigLIP model?")


class HFClipAdapter(Adapter):
    family = "hf_clip"
    description = ("transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel and "
                   "SiglipVisionModel / SiglipModel (vision tower)")
    _classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPVisionTransformer",
                "SiglipVisionModel", "SiglipModel", "SiglipVisionTransformer")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *cls._classes)

    def __init__(self, model):
        super().__init__(model)
        self.tower = vision_tower(model)
        self.siglip = "siglip" in type(self.tower.encoder).__name__.lower()
        self._routing = AttentionRouting([_attn(layer) for layer in self.tower.encoder.layers], "vision tower")

    def info(self) -> EncoderInfo:
        c = self.tower.config
        side = c.image_size // c.patch_size
        p = 0 if self.siglip else 1
        return EncoderInfo(depth=len(self.tower.encoder.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=p, num_tokens=side * side, mlp_hidden=c.intermediate_size, grid=(side, side),
                           has_cls=not self.siglip, family=self.family)

    def grid_for(self, num_tokens: int):
        side = math.isqrt(num_tokens)
        return (side, side) if side * side == num_tokens else None

    def check(self, reducer) -> None:
        self._routing.check()

    def install(self, patch) -> None:
        t = self.tower
        self._routing.on()
        t.encoder._tokenprune_patch = patch
        swap_class(t.encoder, _Encoder)
        swap_class(t, _Tower)
        head = getattr(t, "head", None)
        if head is not None and hasattr(head, "probe"):
            swap_class(head, _MapHead)

    def uninstall(self) -> None:
        t = self.tower
        restore_class(t)
        restore_class(t.encoder)
        head = getattr(t, "head", None)
        if head is not None:
            restore_class(head)
        t.encoder.__dict__.pop("_tokenprune_patch", None)
        self._routing.off()
