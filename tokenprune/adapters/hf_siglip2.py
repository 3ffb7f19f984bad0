"""Hugging Face SigLIP2 NaFlex vision towers (``Siglip2VisionModel``, ``Siglip2Model`` (vision tower only; text
tower untouched), ``Siglip2ForImageClassification``).

NaFlex inputs are patch sequences ``pixel_values [B, L, C p p]`` padded to ``L`` with ``pixel_attention_mask`` and the
patch grid of every image in ``spatial_shapes [B, 2]``.

- Padding: row ``b``'s real patches are the first ``h_b w_b`` (its ``spatial_shapes``), as the processor makes them;
  the mask is checked to say so. In a batch of one shape, those padding slots are dropped before the first layer
  (they are masked keys in HF's model, so the real tokens' outputs are unchanged) and the encoder runs on the
  ``(h, w)`` grid, which grid-aware reducers (``pool``) use; the outputs are the reduced tokens (no padding slots).
  A batch mixing shapes runs through :func:`tokenprune.mixed.run_mixed`: every image is reduced on its own grid with
  its own budget (``K_b = keep_count(budget, h_b w_b)``), exactly as alone, while the layers run once on the whole
  batch, each row padded with masked slots of size 0. Its outputs are ``[B, K_max, C]``: row ``b``'s ``K_b`` tokens,
  then padding slots (``tokenprune.features`` gives the sizes; 0 = padding). The tower's output (dict form) marks the
  real tokens in ``out["tokenprune_mask"]`` ``[B, K_max]``; the input's ``pixel_attention_mask`` no longer fits
  ``last_hidden_state`` (its padding was dropped), at budget 1.0 too.
- Positions: absolute (resized per image) and added before the first layer.
- Layers are HF's; attention keeps SDPA through ``tokenprune_sdpa`` (``Siglip2Attention`` does not pass keyword
  arguments on, so it gets :class:`.hf_common.ProjAttention`, as SigLIP does).
- Reading ``spatial_shapes`` and checking the mask happen on the host (one sync per forward), so a compiled
  SigLIP2 forward has a graph break there (``fullgraph=True`` is not available for this family).
- Pooling: the MAP head weights keys by size (``log size``, so padding slots are masked keys);
  ``Siglip2ForImageClassification``'s mean over tokens is size-weighted (padding weighs 0). No [CLS]: ``cls``
  scores with its substitute (see :mod:`.hf_clip`).
"""
from __future__ import annotations

import torch

from .. import ops
from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, has_class, image_grid, named_holders, restore_class, swap_class
from .hf_clip import _map_head
from ..mixed import grids_read_on_host, run_mixed
from .hf_common import (AttentionRouting, ProjAttention, SaveAsOriginal, block_fn, no_extra_kwargs, returned,
                         returns_dict)


MASK_KEY = "tokenprune_mask"  # [B, K] bool of the output's real tokens (False: a mixed batch's padding slots)


def _grids(spatial_shapes: torch.Tensor, mask: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    """The (h, w) of every image; checks the mask marks exactly the first ``h w`` patches of every row."""
    grids_read_on_host("SigLIP2 patch sequences (spatial_shapes)")
    grids = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    counts = [h * w for h, w in grids]
    if max(counts) > length:
        raise ValueError(f"tokenprune: spatial_shapes {grids[counts.index(max(counts))]} is more than the {length} "
                         "patches given")
    if mask is not None:
        want = torch.arange(length, device=mask.device)[None, :] < torch.tensor(counts, device=mask.device)[:, None]
        if not bool((mask.bool() == want).all()):
            raise ValueError("tokenprune: pixel_attention_mask must mark the first h*w patches of every image (as the "
                             "SigLIP2 processor makes it); got another pattern")
    return grids


class _Tower(SaveAsOriginal):
    """Mixin for ``Siglip2VisionModel``."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        hidden = self.post_layernorm(self._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes,
                                                             **kwargs))
        pooled = _map_head(self.head, hidden, fwd.sizes) if self.use_head else None
        out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
        if not returns_dict(self, return_dict):
            return returned(self, out, False)  # HF's tuple; the mask is a field of the dict form only
        out[MASK_KEY] = fwd.sizes > 0 if fwd.sizes is not None else hidden.new_ones(hidden.shape[:2], dtype=torch.bool)
        return out

    def _tokenprune_tokens(self, fwd, pixel_values, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        kwargs.pop("return_dict", None)
        no_extra_kwargs(kwargs, "SigLIP2 vision tower", self.config)
        if spatial_shapes is None:
            raise ValueError("tokenprune: SigLIP2 needs spatial_shapes (as the processor returns it)")
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.encoder.layers):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced SigLIP2 in training; "
                               "call model.gradient_checkpointing_disable()")
        grids = _grids(spatial_shapes, pixel_attention_mask, pixel_values.shape[1])
        hidden = self.embeddings(pixel_values, spatial_shapes)
        return run_mixed(fwd, self.encoder.layers, hidden, grids, block_fn(None))


class _Classifier(SaveAsOriginal):
    """Mixin for ``Siglip2ForImageClassification``: the classifier over the size-weighted mean of the tower's
    (normed) tokens, i.e. HF's masked mean over the real patches."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        tower = self.vision_model
        fwd = Forward(self._tokenprune_patch)
        seq = tower.post_layernorm(tower._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes,
                                                            **kwargs))
        pooled = ops.weighted_mean(seq, fwd.sizes) if fwd.sizes is not None else seq.mean(1)
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return returned(self, ImageClassifierOutput(loss=loss, logits=logits), return_dict)


class HFSiglip2Adapter(Adapter):
    family = "hf_siglip2"
    description = ("transformers Siglip2VisionModel / Siglip2Model / Siglip2ForImageClassification (NaFlex; a batch "
                   "may mix spatial shapes)")
    _classes = ("Siglip2VisionModel", "Siglip2Model", "Siglip2ForImageClassification")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *cls._classes)

    placeholder_input = True  # num_patches is the position table's size; every input brings its spatial_shapes

    def __init__(self, model):
        super().__init__(model)
        self.tower = model if has_class(model, "transformers.", "Siglip2VisionModel") else model.vision_model
        self.head = model if has_class(model, "transformers.", "Siglip2ForImageClassification") else None
        self._routing = AttentionRouting([layer.self_attn for layer in self.tower.encoder.layers], "SigLIP2 tower")
        # the encoder runs the layers in transformers; a classifier calls the tower's forward too
        self._holders = named_holders(model, self.tower if self.tower is not model else None, self.tower.encoder)

    def info(self) -> EncoderInfo:
        c = self.tower.config
        side = int(c.num_patches ** 0.5)  # the default: a square image of num_patches patches
        return EncoderInfo(depth=len(self.tower.encoder.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=0, num_tokens=side * side, mlp_hidden=c.intermediate_size, grid=(side, side),
                           has_cls=False, family=self.family)

    def input_grid(self, input_shape):
        """The patch grid of an image of ``input_shape`` (``(..., H, W)`` pixels, as its ``spatial_shapes`` row)."""
        return image_grid(input_shape, self.tower.config.patch_size)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        """The tower's ``last_hidden_state`` (after the post-layernorm, as in transformers) and the final state."""
        fwd = Forward(self.tower._tokenprune_patch)
        x = self.tower._tokenprune_tokens(fwd, pixel_values, pixel_attention_mask, spatial_shapes)
        return self.tower.post_layernorm(x), fwd.state

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
