"""Hugging Face ViViT (``VivitModel``, ``VivitForVideoClassification``): the factorised-embedding ViViT whose encoder is
a plain ViT over tubelet tokens (joint space-time attention).

- Tokens: prefix = [CLS] (never reduced), then the tubelet grid ``(T / t, H / h, W / w)`` (time-major, as the 3D
  patch embedding flattens it), read from ``pixel_values``' shape and handed to grid-aware reducers (``pool``
  pools per frame).
- Positions: absolute embeddings added before the first layer.
- Layers are HF's: ``VivitLayer`` passes keyword arguments through ``VivitAttention`` to the attention function, so
  the ``tokenprune_sdpa`` kernel of :mod:`.hf_common` adds the size bias, records q/k and keeps SDPA (5.17 and 5.25
  lay ViViT out the same way).
- Pooling: the classifier and the pooler read [CLS]; their own forwards are exact on reduced tokens.
- Refused: ``attention_mask``, ``output_hidden_states`` / ``output_attentions``, gradient checkpointing in training.
"""
from __future__ import annotations

import math

from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned, run


def _triple(v) -> tuple[int, int, int]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class _Model(SaveAsOriginal):
    """Mixin for ``VivitModel``: embeddings, the reduced layer loop, the final norm and the [CLS] pooler."""

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, attention_mask=None, tokenprune=None,
                **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        fwd = tokenprune if tokenprune is not None else Forward(self._tokenprune_patch)
        seq = self.layernorm(self._tokenprune_tokens(fwd, pixel_values, interpolate_pos_encoding, attention_mask,
                                                     **kwargs))
        pooled = self.pooler(seq) if self.pooler is not None else None
        return returned(self, BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled), return_dict)

    def _tokenprune_tokens(self, fwd, pixel_values, interpolate_pos_encoding=False, attention_mask=None, **kwargs):
        kwargs.pop("return_dict", None)
        if attention_mask is not None:
            raise ValueError("tokenprune: attention_mask cannot be combined with token reduction in the ViViT encoder "
                             "(the token count changes between layers); call tokenprune.remove(model) first")
        no_extra_kwargs(kwargs, "ViViT encoder", self.config)
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced ViViT in training; "
                               "call model.gradient_checkpointing_disable()")
        x = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        tt, th, tw = _triple(self.config.tubelet_size)
        frames, _, height, width = pixel_values.shape[-4:]
        grid = (frames // tt, height // th, width // tw)  # the input's real tubelet grid
        if math.prod(grid) != x.shape[1] - 1:
            grid = None
        return run(fwd, self.layers, x, grid, extra=(None,))


class HFVivitAdapter(Adapter):
    family = "hf_vivit"
    description = "transformers VivitModel / VivitForVideoClassification"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", "VivitModel", "VivitForVideoClassification")

    def __init__(self, model):
        super().__init__(model)
        self.vivit = model if has_class(model, "transformers.", "VivitModel") else model.vivit
        layers = getattr(self.vivit, "layers", None)
        if layers is None or not all(hasattr(layer, "attention") for layer in layers):
            raise TypeError("tokenprune: this ViViT has no `layers` with `attention`; transformers 5.17 .. 5.25 lay it "
                            "out that way")
        self._routing = AttentionRouting([layer.attention for layer in layers], "ViViT model")

    def _grid(self, frames: int, size) -> tuple[int, int, int]:
        tt, th, tw = _triple(self.vivit.config.tubelet_size)
        h, w = _pair(size)
        return frames // tt, h // th, w // tw

    def info(self) -> EncoderInfo:
        c = self.vivit.config
        grid = self._grid(c.num_frames, c.image_size)
        return EncoderInfo(depth=len(self.vivit.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=1, num_tokens=math.prod(grid), mlp_hidden=c.intermediate_size, grid=grid,
                           has_cls=True, family=self.family)

    def input_grid(self, input_shape):
        """The tubelet grid of ``pixel_values`` of shape ``(..., frames, channels, H, W)``."""
        shape = tuple(int(v) for v in input_shape)
        if len(shape) < 4:
            raise ValueError(f"tokenprune: ViViT input_shape {shape} needs (frames, channels, H, W)")
        return self._grid(shape[-4], shape[-2:])

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, interpolate_pos_encoding=False):
        """Output tokens (the final layer norm applied, ``[B, 1 + K, C]``) and the final state."""
        fwd = Forward(self.vivit._tokenprune_patch)
        x = self.vivit._tokenprune_tokens(fwd, pixel_values, interpolate_pos_encoding)
        return self.vivit.layernorm(x), fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.vivit, _Model, patch)

    def uninstall(self) -> None:
        detach(self.vivit)
        self._routing.off()
