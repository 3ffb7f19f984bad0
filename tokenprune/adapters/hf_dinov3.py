"""Hugging Face DINOv3 ViT (``DINOv3ViTModel``; transformers >= 5.17, where the class exists).

- Tokens: prefix = [CLS] + the register tokens (never reduced), then the patch grid, row-major; the grid is read
  from ``pixel_values`` (any input size).
- Positions: a rotary embedding inside every attention. The model's own ``rope_embeddings(pixel_values)`` builds
  the (cos, sin) table of the input grid once per forward; each layer gets its rows at the positions the tokens
  carry (:meth:`tokenprune.state.TokenState.positions`: pruned tokens their own, merged tokens the held patch
  nearest their centroid; see :mod:`.timm_eva`). HF's attention applies the rotation to the last ``N`` tokens
  (the table's length) and treats the rest as prefix, so a table of ``N`` rows is all it needs.
- Each layer runs written out from HF's submodules (pre-norm, attention, LayerScale, drop-path, MLP or gated
  MLP); the attention module is HF's, called with ``tokenprune=fwd``, which reaches the ``tokenprune_sdpa``
  kernel of :mod:`.hf_common` (size bias, q/k recording after the rotation, SDPA kept).
- Pooling: ``pooler_output`` is [CLS] (unchanged).
- Not accepted: ``DINOv3ViTBackbone`` (it reshapes every token back to the grid); ``output_hidden_states`` /
  ``output_attentions`` (clear error); gradient checkpointing in training; ``track_source=False``.
"""
from __future__ import annotations

import math

from .. import ops
from ..engine import Forward, run_blocks
from ..plan import EncoderInfo
from .base import Adapter, has_class, image_grid, named_holders, restore_class, swap_class
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned

_PARTS = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _rope(cos, sin, fwd: Forward):
    """(cos, sin) at the positions the current tokens carry (one gather per reduction stage)."""
    state = fwd.state
    pos = state.positions()
    if pos is None:
        return cos, sin
    cached = state.scratch.get("_rope")
    if cached is None or cached[0] is not pos:
        cached = (pos, (ops.position_rows(cos, pos), ops.position_rows(sin, pos)))
        state.scratch["_rope"] = cached
    return cached[1]


def _block(layer, x, fwd: Forward, cos, sin):
    """``DINOv3ViTLayer.forward`` written out."""
    h = layer.attention(layer.norm1(x), position_embeddings=_rope(cos, sin, fwd), tokenprune=fwd)
    h = h[0] if isinstance(h, tuple) else h
    a = layer.drop_path(layer.layer_scale1(h))
    x = fwd.reduce_mid(x, a) if fwd.mid else x + a  # stages inside the layer (placement='attn')
    y = layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
    if fwd.slot:
        fwd.residual = y
        return x
    return x + y


class _Base(SaveAsOriginal):
    """Mixin for ``DINOv3ViTModel``."""

    def forward(self, pixel_values=None, bool_masked_pos=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        seq = self.norm(self._tokenprune_tokens(Forward(self._tokenprune_patch), pixel_values, bool_masked_pos,
                                                **kwargs))
        out = BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=seq[:, 0, :])
        return returned(self, out, return_dict)

    def _tokenprune_tokens(self, fwd, pixel_values, bool_masked_pos=None, **kwargs):
        kwargs.pop("return_dict", None)
        if kwargs.pop("attention_mask", None) is not None:
            raise ValueError("tokenprune: attention_mask cannot be combined with token reduction in DINOv3ViTModel; "
                             "call tokenprune.remove(model) first")
        no_extra_kwargs(kwargs, "DINOv3ViTModel encoder", self.config)
        layers = self.model.layer
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced DINOv3 in training; "
                               "call model.gradient_checkpointing_disable()")
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        cos, sin = self.rope_embeddings(pixel_values)
        ph, pw = _pair(self.config.patch_size)
        grid = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)

        def block(layer, h, f):
            return _block(layer, h, f, cos, sin)

        return run_blocks(fwd, layers, x, block, grid)


class HFDinov3Adapter(Adapter):
    family = "hf_dinov3"
    mid_block = True
    description = "transformers DINOv3ViTModel (RoPE: rotary positions follow the kept tokens)"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", "DINOv3ViTModel")

    def __init__(self, model):
        super().__init__(model)
        layers = model.model.layer
        for i, layer in enumerate(layers):
            missing = [a for a in _PARTS if not hasattr(layer, a)]
            if missing:
                raise TypeError(f"tokenprune: DINOv3 layer {i} has no {', '.join(missing)}; this transformers "
                                "version lays out DINOv3 differently (5.17 and 5.25 are known)")
        self._routing = AttentionRouting([layer.attention for layer in layers], "DINOv3ViTModel")
        self._holders = named_holders(model, model.model)  # runs model.layer in transformers
        self._shells = named_holders(model, *layers)  # _block writes the layers out

    def info(self) -> EncoderInfo:
        c = self.model.config
        size, patch = _pair(c.image_size), _pair(c.patch_size)
        grid = (size[0] // patch[0], size[1] // patch[1])
        mlp = self.model.model.layer[0].mlp
        hidden = c.intermediate_size * (3 if hasattr(mlp, "gate_proj") else 2) // 2
        return EncoderInfo(depth=len(self.model.model.layer), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=1 + int(c.num_register_tokens or 0), num_tokens=math.prod(grid),
                           mlp_hidden=hidden, grid=grid, has_cls=True, family=self.family)

    def input_grid(self, input_shape):
        return image_grid(input_shape, self.model.config.patch_size)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, bool_masked_pos=None):
        fwd = Forward(self.model._tokenprune_patch)
        x = self.model._tokenprune_tokens(fwd, pixel_values, bool_masked_pos)
        return self.model.norm(x), fwd.state

    def install(self, patch) -> None:
        if not patch.track_source:
            raise ValueError("tokenprune: rotary positions follow the source map of the kept tokens; DINOv3 (RoPE) "
                             "needs track_source=True")
        self._routing.on()
        self.model._tokenprune_patch = patch
        swap_class(self.model, _Base)

    def uninstall(self) -> None:
        restore_class(self.model)
        self.model.__dict__.pop("_tokenprune_patch", None)
        self._routing.off()
