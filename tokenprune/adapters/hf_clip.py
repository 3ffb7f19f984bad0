"""Hugging Face CLIP and SigLIP vision towers.

Accepted: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``
(only ``vision_model`` is reduced; ``get_image_features`` / the text tower
work as before), ``SiglipVisionModel`` and ``SiglipModel``, and the task heads
``CLIPForImageClassification`` / ``SiglipForImageClassification``: they
average the tower's output tokens (CLIP without [CLS]), and that mean becomes
size-weighted (padding slots weigh 0), i.e. the mean over the original patches.

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

from .. import ops
from ..engine import Forward
from ..plan import EncoderInfo
from ..state import log_sizes
from .base import Adapter, attach, detach, has_class, image_grid, named_holders, restore_class, swap_class
from .hf_common import AttentionRouting, ProjAttention, SaveAsOriginal, no_extra_kwargs, returned, run


def _attn(layer):
    return layer.self_attn


def _map_head(head, hidden, sizes):
    """``SiglipMultiheadAttentionPoolingHead`` with keys weighted by size (``log size`` as a float key mask)."""
    if sizes is None:
        return head(hidden)
    probe = head.probe.repeat(hidden.shape[0], 1, 1)
    h = head.attention(probe, hidden, hidden, key_padding_mask=log_sizes(sizes, hidden.dtype), need_weights=False)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


class _Tower(SaveAsOriginal):
    """Mixin for the vision tower (the module with ``embeddings`` and ``encoder``): its forward with the
    reduced layer loop; the pooling head gets the final sizes."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        hidden = self._tokenprune_tokens(fwd, pixel_values, interpolate_pos_encoding, **kwargs)
        if hasattr(self, "pre_layrnorm"):  # CLIP: the [CLS] token, normed
            pooled = self.post_layernorm(hidden[:, 0, :])
        else:  # SigLIP: norm, then the MAP head over the (size-weighted) tokens
            hidden = self.post_layernorm(hidden)
            pooled = _map_head(self.head, hidden, fwd.sizes) if getattr(self, "use_head", False) else None
        return returned(self, BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled), return_dict)

    def _tokenprune_tokens(self, fwd, pixel_values, interpolate_pos_encoding=False, **kwargs):
        kwargs.pop("return_dict", None)
        no_extra_kwargs(kwargs, "vision tower", self.config)
        hidden = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if hasattr(self, "pre_layrnorm"):
            hidden = self.pre_layrnorm(hidden)
        patch = self.embeddings.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        if math.prod(grid) != hidden.shape[1] - fwd.patch.num_prefix:
            grid = None
        return run(fwd, self.encoder.layers, hidden, grid, extra=(None,))


class _Classifier(SaveAsOriginal):
    """Mixin for ``CLIPForImageClassification`` / ``SiglipForImageClassification``: the classifier over the
    size-weighted mean of the tower's ``last_hidden_state`` (CLIP: the patch tokens, before the post-layernorm as in
    HF; SigLIP: every token, after it)."""

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=False, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        tower = vision_tower(self)
        fwd = Forward(self._tokenprune_patch)
        seq = tower._tokenprune_tokens(fwd, pixel_values, interpolate_pos_encoding, **kwargs)
        if not hasattr(tower, "pre_layrnorm"):  # SigLIP's last_hidden_state is normed
            seq = tower.post_layernorm(seq)
        p, sizes = fwd.patch.num_prefix, fwd.sizes
        seq = seq[:, p:]
        pooled = ops.weighted_mean(seq, sizes[:, p:]) if sizes is not None else seq.mean(1)
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return returned(self, ImageClassifierOutput(loss=loss, logits=logits), return_dict)


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
    description = ("transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel / "
                   "CLIPForImageClassification and SiglipVisionModel / SiglipModel / SiglipForImageClassification "
                   "(vision tower)")
    _heads = ("CLIPForImageClassification", "SiglipForImageClassification")
    _classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPVisionTransformer",
                "SiglipVisionModel", "SiglipModel", "SiglipVisionTransformer", *_heads)

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *cls._classes)

    def __init__(self, model):
        super().__init__(model)
        self.tower = vision_tower(model)
        self.siglip = "siglip" in type(self.tower.encoder).__name__.lower()
        self.head = model if has_class(model, "transformers.", *self._heads) else None
        self._routing = AttentionRouting([_attn(layer) for layer in self.tower.encoder.layers], "vision tower")
        # the encoder runs the layers in transformers; a classifier calls the tower's forward too
        bypassed = self.tower if self.head is not None and self.tower is not model else None
        self._holders = named_holders(model, bypassed, self.tower.encoder)

    def info(self) -> EncoderInfo:
        c = self.tower.config
        side = c.image_size // c.patch_size
        p = 0 if self.siglip else 1
        return EncoderInfo(depth=len(self.tower.encoder.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=p, num_tokens=side * side, mlp_hidden=c.intermediate_size, grid=(side, side),
                           has_cls=not self.siglip, family=self.family)

    def grid_for(self, num_tokens: int):
        grid = self.info().grid
        return grid if math.prod(grid) == num_tokens else None

    def input_grid(self, input_shape):
        """The patch grid of ``pixel_values`` of ``input_shape`` (``(..., H, W)``; a size other than the config's
        runs with ``interpolate_pos_encoding=True``, as in transformers)."""
        return image_grid(input_shape, self.tower.config.patch_size)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, interpolate_pos_encoding=False):
        """The tower's ``last_hidden_state`` (SigLIP: after its post-layernorm; CLIP: before it, as in transformers,
        where it norms the pooled [CLS] only) and the final state."""
        fwd = Forward(self.tower._tokenprune_patch)
        x = self.tower._tokenprune_tokens(fwd, pixel_values, interpolate_pos_encoding)
        return (x if hasattr(self.tower, "pre_layrnorm") else self.tower.post_layernorm(x)), fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.tower, _Tower, patch)
        if self.siglip:  # SiglipAttention does not pass its keyword arguments on
            for layer in self.tower.encoder.layers:
                swap_class(_attn(layer), ProjAttention)
        if self.head is not None:
            attach(self.head, _Classifier, patch)

    def uninstall(self) -> None:
        if self.head is not None:
            detach(self.head)
        for layer in self.tower.encoder.layers:
            restore_class(_attn(layer))
        detach(self.tower)
        self._routing.off()
