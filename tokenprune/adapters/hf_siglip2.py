"""Hugging Face SigLIP2 NaFlex vision towers (``Siglip2VisionModel``, ``Siglip2Model`` (vision tower only; text
tower untouched), ``Siglip2ForImageClassification``).

NaFlex inputs are patch sequences ``pixel_values [B, L, C p p]`` padded to ``L`` with ``pixel_attention_mask`` and the
patch grid of every image in ``spatial_shapes [B, 2]``.

- Padding: in a batch whose images share one ``spatial_shapes`` (h, w) -- one image, or a batch of one
  resolution/aspect -- the real patches are the first ``h w`` of every row and the mask is the same for all rows.
  Those padding slots are dropped before the first layer (they are masked keys in HF's model, so the real tokens'
  outputs are unchanged) and the encoder runs on the ``(h, w)`` grid, which grid-aware reducers (``pool``) use. The
  outputs are the reduced tokens (no padding slots); ``pixel_attention_mask`` is consistent because no padding
  enters the blocks. A batch mixing spatial shapes is refused with a clear error (reduce it image by image or
  group the images by shape): each sample would need its own grid and its own budget.
- Positions: absolute (resized per image) and added before the first layer.
- Layers are HF's; attention keeps SDPA through ``tokenprune_sdpa`` (``Siglip2Attention`` does not pass keyword
  arguments on, so it gets :class:`.hf_common.ProjAttention`, as SigLIP does).
- Reading ``spatial_shapes`` and checking the mask happen on the host (one sync per forward), so a compiled
  SigLIP2 forward has a graph break there (``fullgraph=True`` is not available for this family).
- Pooling: the MAP head weights keys by size (``log size``); ``Siglip2ForImageClassification``'s mean over tokens is
  size-weighted. No [CLS]: ``cls`` scores with its substitute (see :mod:`.hf_clip`).
"""
from __future__ import annotations

import torch

from .. import ops
from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, has_class, restore_class, swap_class
from .hf_clip import _map_head
from .hf_common import AttentionRouting, ProjAttention, no_extra_kwargs, run


def _grid(spatial_shapes: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[int, int]:
    """The one (h, w) of the batch; checks the mask marks exactly the first ``h w`` patches of every row."""
    shapes = spatial_shapes.tolist()
    if any(s != shapes[0] for s in shapes):
        raise ValueError("tokenprune: this SigLIP2 batch mixes spatial_shapes " f"{sorted(set(map(tuple, shapes)))}; "
                         "token reduction needs one patch grid per batch. Run the images of each shape in their own "
                         "batch (or one by one), or call tokenprune.remove(model) first")
    h, w = int(shapes[0][0]), int(shapes[0][1])
    if h * w > length:
        raise ValueError(f"tokenprune: spatial_shapes {h}x{w} is more than the {length} patches given")
    if mask is not None:
        want = torch.zeros(length, dtype=torch.bool, device=mask.device)
        want[: h * w] = True
        if not bool((mask.bool() == want).all()):
            raise ValueError("tokenprune: pixel_attention_mask must mark the first h*w patches of every image (as the "
                             "SigLIP2 processor makes it); got another pattern")
    return h, w


class _Tower:
    """Mixin for ``Siglip2VisionModel``."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        fwd = Forward(self._tokenprune_patch)
        hidden = self.post_layernorm(self._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes,
                                                             **kwargs))
        pooled = _map_head(self.head, hidden, fwd.sizes) if self.use_head else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    def _tokenprune_tokens(self, fwd, pixel_values, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        kwargs.pop("return_dict", None)
        no_extra_kwargs(kwargs, "SigLIP2 vision tower")
        if spatial_shapes is None:
            raise ValueError("tokenprune: SigLIP2 needs spatial_shapes (as the processor returns it)")
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.encoder.layers):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced SigLIP2 in training; "
                               "call model.gradient_checkpointing_disable()")
        h, w = _grid(spatial_shapes, pixel_attention_mask, pixel_values.shape[1])
        hidden = self.embeddings(pixel_values, spatial_shapes)[:, : h * w]  # the padding slots never enter
        return run(fwd, self.encoder.layers, hidden, (h, w), extra=(None,))


class _Classifier:
    """Mixin for ``Siglip2ForImageClassification``: the classifier over the size-weighted mean of the tower's
    (normed) tokens, i.e. HF's masked mean over the real patches."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        tower = self.vision_model
        fwd = Forward(self._tokenprune_patch)
        seq = tower.post_layernorm(tower._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes,
                                                            **kwargs))
        pooled = ops.weighted_mean(seq, fwd.sizes) if fwd.sizes is not None else seq.mean(1)
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class HFSiglip2Adapter(Adapter):
    family = "hf_siglip2"
    description = ("transformers Siglip2VisionModel / Siglip2Model / Siglip2ForImageClassification (NaFlex; one "
                   "spatial shape per batch)")
    _classes = ("Siglip2VisionModel", "Siglip2Model", "Siglip2ForImageClassification")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *cls._classes)

    def __init__(self, model):
        super().__init__(model)
        self.tower = model if has_class(model, "transformers.", "Siglip2VisionModel") else model.vision_model
        self.head = model if has_class(model, "transformers.", "Siglip2ForImageClassification") else None
        self._routing = AttentionRouting([layer.self_attn for layer in self.tower.encoder.layers], "SigLIP2 tower")

    def info(self) -> EncoderInfo:
        c = self.tower.config
        side = int(c.num_patches ** 0.5)  # the default: a square image of num_patches patches
        return EncoderInfo(depth=len(self.tower.encoder.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=0, num_tokens=side * side, mlp_hidden=c.intermediate_size, grid=(side, side),
                           has_cls=False, family=self.family)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        """Tokens after the encoder's last layer (before the post-layernorm) and the final state."""
        fwd = Forward(self.tower._tokenprune_patch)
        x = self.tower._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes)
        return x, fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        self.tower._tokenprune_patch = patch
        swap_class(self.tower, _Tower)
        for layer in self.tower.encoder.layers:
            swap_class(layer.self_attn, ProjAttention)
        if self.head is not None:
            self.head._tokenprune_patch = patch
            swap_class(self.head, _Classifier)

    def uninstall(self) -> None:
        if self.head is not None:
            restore_class(self.head)
            self.head.__dict__.pop("_tokenprune_patch", None)
        for layer in self.tower.encoder.layers:
            restore_class(layer.self_attn)
        restore_class(self.tower)
        self.tower.__dict__.pop("_tokenprune_patch", None)
        self._routing.off()
