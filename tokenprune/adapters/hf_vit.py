"""Hugging Face ViT and DINOv2 (``ViTModel``, ``ViTForImageClassification``, ``Dinov2Model``,
``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``, ``Dinov2WithRegistersForImageClassification``).

- Tokens: prefix = [CLS] (+ the register tokens of ``Dinov2WithRegisters``, never reduced), then the
  patch grid, row-major. The grid handed to grid-aware reducers is read from the input, ``pixel_values``'
  ``(H // patch, W // patch)`` -- so ``interpolate_pos_encoding`` inputs and DINOv2's any-size inputs
  get their real grid -- never guessed from a token count.
- Positions: absolute embeddings (interpolated for other sizes) are added in the embeddings, before the
  first layer, so merged/pruned tokens carry their positions with them.
- The layer loop becomes :func:`tokenprune.engine.run_blocks`. Each layer runs as a block function
  written out from HF's own submodules (pre-norm, attention, LayerScale / dropout / drop-path, MLP): the
  same arithmetic, and it also serves transformers 5.17, whose ``Dinov2Layer.forward`` takes no keyword
  arguments (5.25's passes them on). The attention module is called as ``attention(h, tokenprune=fwd)``;
  ViT's and DINOv2's attention (both layouts: 5.25's ``q_proj``/``o_proj`` module and 5.17's
  ``attention.attention`` + ``attention.output``) pass keyword arguments on to the attention function, so
  the ``tokenprune_sdpa`` kernel of :mod:`.hf_common` adds the size bias, records q/k and keeps SDPA.
  No attention mixin is needed. The block leaves its last residual add to a following merge (``fwd.slot``).
- Pooling: ViT classifies [CLS] (unchanged; ``ViTPooler`` reads [CLS] too). ``Dinov2(WithRegisters)
  ForImageClassification`` concatenates [CLS] with the mean of the patch tokens: that mean becomes
  size-weighted (padding slots weigh 0), i.e. the mean over the original patches.
- Not reduced: ``attention_mask`` / ``output_hidden_states`` / ``output_attentions`` (a clear error);
  ``ViTForMaskedImageModeling`` and ``Dinov2Backbone`` (they reshape every token back to the grid) are not
  accepted. Gradient checkpointing is refused in training (the written-out layers would skip it).
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..engine import Forward, run_blocks
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class, image_grid, named_holders
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned

_BASES = ("ViTModel", "Dinov2Model", "Dinov2WithRegistersModel")
_HEADS = ("ViTForImageClassification", "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
_VIT_PARTS = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
_DINO_PARTS = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _layers(base):
    layers = getattr(base, "layers", None)  # ViTModel (transformers 5)
    if layers is None and hasattr(base, "encoder"):  # Dinov2 / older ViT: encoder.layer
        layers = getattr(base.encoder, "layer", None)
    if layers is None:
        raise TypeError(f"tokenprune: cannot find the layers of this {type(base).__name__}")
    return layers


def _routed(layer):
    """The module whose ``config`` the attention function is looked up from (5.17 DINOv2: ``attention.attention``)."""
    a = layer.attention
    return a if hasattr(a, "config") else a.attention


def _attend(attention, h, fwd):
    out = attention(h, tokenprune=fwd)
    return out[0] if isinstance(out, tuple) else out  # 5.25 returns (out, weights); 5.17 DINOv2 the output only


def _last_add(x, y, fwd):
    if fwd.slot:  # a merge follows: it adds the branch in its row gather
        fwd.residual = y
        return x
    return x + y


def _vit_block(layer, x, fwd):
    """``ViTLayer.forward`` written out (pre-norm, attention, dropout, MLP)."""
    x = x + layer.dropout(_attend(layer.attention, layer.layernorm_before(x), fwd))
    return _last_add(x, layer.dropout(layer.mlp(layer.layernorm_after(x))), fwd)


def _dino_block(layer, x, fwd):
    """``Dinov2Layer.forward`` written out (pre-norm, attention, LayerScale, drop-path, MLP or SwiGLU)."""
    x = x + layer.drop_path(layer.layer_scale1(_attend(layer.attention, layer.norm1(x), fwd)))
    return _last_add(x, layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))), fwd)


class _Base(SaveAsOriginal):
    """Mixin for ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel``: embeddings, the reduced layer loop,
    the final norm and HF's pooling ([CLS]). A classifier passes its own context as ``tokenprune=``."""

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, tokenprune=None,
                **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        fwd = tokenprune if tokenprune is not None else Forward(self._tokenprune_patch)
        seq = self.layernorm(self._tokenprune_tokens(fwd, pixel_values, bool_masked_pos, interpolate_pos_encoding,
                                                     **kwargs))
        if hasattr(self, "pooler"):  # ViT: the optional ViTPooler over [CLS]
            pooled = self.pooler(seq) if self.pooler is not None else None
        else:  # DINOv2: [CLS]
            pooled = seq[:, 0, :]
        return returned(self, BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled), return_dict)

    def _tokenprune_tokens(self, fwd, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=None, **kwargs):
        kwargs.pop("return_dict", None)
        if kwargs.pop("attention_mask", None) is not None:  # a tensor: no_extra_kwargs cannot compare it
            raise ValueError(f"tokenprune: attention_mask cannot be combined with token reduction in the "
                             f"{type(self).__name__} encoder (the token count changes between layers); call "
                             "tokenprune.remove(model) first")
        no_extra_kwargs(kwargs, f"{type(self).__name__} encoder", self.config)
        layers = _layers(self)
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced ViT / DINOv2 in "
                               "training; call model.gradient_checkpointing_disable()")
        emb = self.embeddings
        if hasattr(self, "pooler"):  # ViT: its forward casts, and its embeddings take interpolate_pos_encoding
            pixel_values = pixel_values.to(emb.patch_embeddings.projection.weight.dtype)
            x = emb(pixel_values, bool_masked_pos=bool_masked_pos,
                    interpolate_pos_encoding=bool(interpolate_pos_encoding))
            block = _vit_block
        else:  # DINOv2 always interpolates its positions to the input size
            x = emb(pixel_values, bool_masked_pos=bool_masked_pos)
            block = _dino_block
        ph, pw = _pair(emb.patch_embeddings.patch_size)
        grid = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)  # the input's real grid
        if math.prod(grid) != x.shape[1] - fwd.patch.num_prefix:
            grid = None
        return run_blocks(fwd, layers, x, block, grid)


class _Dinov2Classifier(SaveAsOriginal):
    """Mixin for ``Dinov2(WithRegisters)ForImageClassification``: [CLS] concatenated with the size-weighted mean of
    the patch tokens (registers excluded, as in HF)."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        seq = self.base_model(pixel_values, tokenprune=fwd, return_dict=True, **kwargs).last_hidden_state
        p = fwd.patch.num_prefix
        patches = seq[:, p:]
        sizes = fwd.sizes
        mean = ops.weighted_mean(patches, sizes[:, p:]) if sizes is not None else patches.mean(1)
        logits = self.classifier(torch.cat([seq[:, 0], mean], dim=1))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return returned(self, ImageClassifierOutput(loss=loss, logits=logits), return_dict)


class HFViTAdapter(Adapter):
    family = "hf_vit"
    description = ("transformers ViTModel / ViTForImageClassification / Dinov2Model / Dinov2ForImageClassification / "
                   "Dinov2WithRegistersModel / Dinov2WithRegistersForImageClassification")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *_BASES, *_HEADS)

    def __init__(self, model):
        super().__init__(model)
        self.base = model if has_class(model, "transformers.", *_BASES) else model.base_model
        self.head = model if self.base is not model else None
        self.dino = not hasattr(self.base, "pooler")
        parts = _DINO_PARTS if self.dino else _VIT_PARTS
        for i, layer in enumerate(_layers(self.base)):
            missing = [a for a in parts if not hasattr(layer, a)]
            if missing:
                raise TypeError(f"tokenprune: layer {i} ({type(layer).__name__}) has no {', '.join(missing)}; this "
                                "transformers version lays out ViT/DINOv2 layers differently (5.17 and 5.25 are known)")
        self._routing = AttentionRouting([_routed(layer) for layer in _layers(self.base)], type(self.base).__name__)
        encoder = self.base.encoder if getattr(self.base, "layers", None) is None else None  # DINOv2: encoder.layer
        self._holders = named_holders(model, encoder)
        self._shells = named_holders(model, *_layers(self.base))  # _vit_block / _dino_block write the layers out

    def info(self) -> EncoderInfo:
        c = self.base.config
        size, patch = _pair(c.image_size), _pair(c.patch_size)
        grid = (size[0] // patch[0], size[1] // patch[1])
        hidden = int(c.hidden_size * c.mlp_ratio) if self.dino else c.intermediate_size
        return EncoderInfo(depth=len(_layers(self.base)), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=1 + int(getattr(c, "num_register_tokens", 0) or 0), num_tokens=grid[0] * grid[1],
                           mlp_hidden=hidden, grid=grid, has_cls=True, family=self.family)

    def input_grid(self, input_shape):
        return image_grid(input_shape, self.base.config.patch_size)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values, interpolate_pos_encoding=None, bool_masked_pos=None):
        """Output tokens (the final layer norm applied, ``[B, P + K, C]``) and the final state."""
        fwd = Forward(self.base._tokenprune_patch)
        x = self.base._tokenprune_tokens(fwd, pixel_values, bool_masked_pos, interpolate_pos_encoding)
        return self.base.layernorm(x), fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.base, _Base, patch)
        if self.head is not None and self.dino:  # ViT's classifier reads [CLS]: its own forward is exact
            attach(self.head, _Dinov2Classifier, patch)

    def uninstall(self) -> None:
        if self.head is not None:
            detach(self.head)
        detach(self.base)
        self._routing.off()
