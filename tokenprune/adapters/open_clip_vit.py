"""open_clip ``VisionTransformer`` image towers (``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` models or ``model.visual``).

Only the image tower is reduced: ``model.encode_image`` returns the same kind of embedding, the
text tower is untouched.

- The tower's forward is open_clip's (``_embeds``, the transformer, ``_pool``, ``proj``), re-stated
  with the block loop as :func:`run_blocks`. Blocks are open_clip's ``ResidualAttentionBlock``;
  blocks that nothing asks anything of run as they are, the others run :func:`_block`: the same
  computation with the ``nn.MultiheadAttention`` written out from its own weights (one in-projection,
  SDPA with the ``log size`` key bias, the out-projection), so q and k come for free.
- Positions: learned absolute embeddings added before the blocks.
- Pooling: ``'tok'`` reads the class token (never reduced); ``'avg'`` is a size-weighted mean over the
  patch tokens (padding ignored); attentional poolers (CoCa) weight keys by size.
- Towers that are a timm trunk (``TimmModel``: ViT-B-16-SigLIP, SigLIP2, PE-Core, ...) are handed to the timm
  adapter of the trunk (:mod:`.timm_vit` or :mod:`.timm_eva`): ``apply(model)`` patches ``model.visual.trunk``,
  whose own pooling (token / avg / map) becomes size-weighted; the tower's head (projection) is unchanged.
  A head with its own attention pooling over the grid (``abs_attn`` / ``rot_attn``) is refused.
- Refused with a clear error: ``CustomResidualAttentionBlock`` towers (qk-norm / scaled-cosine
  attention), ModifiedResNet towers, open_clip < 3, ``attn_mask``, gradient checkpointing, patch dropout in
  training, ``forward_intermediates``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..engine import QK, Forward, run_blocks
from ..plan import EncoderInfo
from ..state import log_sizes
from .base import Adapter, attach, detach, has_class, image_grid
from .timm_eva import TimmEvaAdapter
from .timm_vit import TimmViTAdapter


def _attention(mha, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """Self-attention of ``nn.MultiheadAttention`` on batch-first ``x`` with the key bias of ``fwd``."""
    b, n, e = x.shape
    h = mha.num_heads
    d = e // h
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    if fwd.kernel is not None:
        o = fwd.kernel(q, k, v, fwd.bias)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=fwd.bias,
                                           dropout_p=mha.dropout if mha.training else 0.0)
    if fwd.want_qk:
        fwd.qk = QK(q, k, d ** -0.5, fwd.bias, o)
    return mha.out_proj(o.transpose(1, 2).reshape(b, n, e))


def _block(blk, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """One ``ResidualAttentionBlock`` on batch-first ``x`` (the loop runs batch-first)."""
    if fwd.bias is None and fwd.kernel is None and not fwd.want_qk and not fwd.slot and not fwd.mid \
            and blk.attn.batch_first:
        return blk(x)
    a = blk.ls_1(_attention(blk.attn, blk.ln_1(x), fwd))
    x = fwd.reduce_mid(x, a) if fwd.mid else x + a
    y = blk.ls_2(blk.mlp(blk.ln_2(x)))
    if fwd.slot:
        fwd.residual = y
        return x
    return x + y


def _attn_pool(pooler, x: torch.Tensor, sizes) -> torch.Tensor:
    """open_clip ``AttentionalPooler`` with keys weighted by size (``log size`` as a float key mask)."""
    if sizes is None:
        return pooler(x)
    x = pooler.ln_k(x)
    q = pooler.ln_q(pooler.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    return pooler.attn(q, x, x, key_padding_mask=log_sizes(sizes, x.dtype), need_weights=False)[0]


class _Visual:
    """Mixin for open_clip's ``VisionTransformer``: the tower's forward with the reduced block loop."""

    def forward(self, x):
        fwd = Forward(self._tokenprune_patch)
        x = self._tokenprune_tokens(x, fwd)
        pooled, tokens = self._tokenprune_pool(x, fwd.sizes)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled

    def _tokenprune_tokens(self, x, fwd: Forward):
        t = self.transformer
        if t.grad_checkpointing:
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced open_clip tower; "
                               "call model.set_grad_checkpointing(False)")
        if self.training and getattr(self.patch_dropout, "prob", 0.0) > 0:  # its random subset is no grid of patches
            raise RuntimeError("tokenprune: open_clip patch dropout (patch_dropout > 0) in training cannot be combined "
                               "with token reduction; call model.eval() or build the tower with patch_dropout=0")
        x = self._embeds(x)
        grid = fwd.patch.adapter.grid_for(x.shape[1] - 1)
        return run_blocks(fwd, t.resblocks, x, _block, grid)

    def _tokenprune_pool(self, x, sizes):
        if sizes is None:
            return self._pool(x)
        if self.attn_pool is not None:
            if self.attn_pool_contrastive is not None:
                x = self.ln_post(x)
                tokens = _attn_pool(self.attn_pool, x, sizes)
                if self.attn_pool_type == "parallel":
                    return _attn_pool(self.attn_pool_contrastive, x, sizes), tokens
                return self.attn_pool_contrastive(tokens), tokens
            x = self.ln_post(_attn_pool(self.attn_pool, x, sizes))
            return self._global_pool(x)
        if self.final_ln_after_pool:
            pooled, tokens = self._tokenprune_global_pool(x, sizes)
            return self.ln_post(pooled), tokens
        return self._tokenprune_global_pool(self.ln_post(x), sizes)

    def _tokenprune_global_pool(self, x, sizes):
        if self.pool_type == "avg":
            return ops.weighted_mean(x[:, 1:], sizes[:, 1:]), x[:, 1:]
        return self._global_pool(x)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("tokenprune: forward_intermediates is not reduced; call tokenprune.remove(model) "
                                  "or use the tower's forward")


def _timm_trunk_adapter(model):
    """The timm adapter of an open_clip ``TimmModel`` tower's trunk, or None for other towers."""
    v = getattr(model, "visual", model)
    trunk = getattr(v, "trunk", None)
    if trunk is None or not has_class(v, "open_clip.", "TimmModel"):
        return None
    head = getattr(v, "head", None)
    if head is not None and "pool" in getattr(head, "_modules", {}):
        raise TypeError("tokenprune: this open_clip timm tower pools with its own attention pooling over the full "
                        f"patch grid ({type(head.pool).__name__}), which cannot take reduced tokens")
    for cls in (TimmViTAdapter, TimmEvaAdapter):
        if cls.matches(trunk):
            return cls(trunk)
    raise TypeError(f"tokenprune: this open_clip tower's timm trunk is {type(trunk).__name__}; supported trunks are "
                    "timm VisionTransformer and Eva models")


def _visual(model):
    v = getattr(model, "visual", model)
    names = {c.__name__ for c in type(v).__mro__}
    if "VisionTransformer" not in names or not hasattr(v, "transformer"):
        raise TypeError(f"tokenprune: this open_clip model's image tower is {type(v).__name__}; only open_clip "
                        "VisionTransformer towers and timm-trunk towers (timm VisionTransformer / Eva) are supported")
    if not all(hasattr(v, a) for a in ("_embeds", "_pool", "_global_pool")):
        raise TypeError("tokenprune: this open_clip version's VisionTransformer has no _embeds/_pool; "
                        "open_clip_torch >= 3.0 is required")
    return v


class OpenClipViTAdapter(Adapter):
    writes_blocks = True  # hooks on the blocks are refused (engine.check_no_hooks)
    mid_block = True
    family = "open_clip"
    description = "open_clip CLIP / CustomTextCLIP / VisionTransformer image towers (model.visual), timm-trunk towers"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "open_clip.", "CLIP", "CustomTextCLIP", "VisionTransformer", "CoCa", "TimmModel")

    def __new__(cls, model=None):
        """A tower that is a timm trunk gets the timm adapter of its trunk (``__init__`` below is then not run).
        No model: unpickling (``torch.load``, ``copy.deepcopy`` of a patched model), which then sets the state."""
        trunk = _timm_trunk_adapter(model) if model is not None else None
        return trunk if trunk is not None else super().__new__(cls)

    def __init__(self, model):
        super().__init__(model)
        self.visual = _visual(model)
        for i, blk in enumerate(self.visual.transformer.resblocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim \
                    or hasattr(blk, "ln_1_kv"):
                raise TypeError(f"tokenprune: open_clip block {i} is {type(blk).__name__}; only "
                                "ResidualAttentionBlock (nn.MultiheadAttention self-attention) towers are supported")

    def info(self) -> EncoderInfo:
        v = self.visual
        blocks = v.transformer.resblocks
        grid = tuple(v.grid_size)
        return EncoderInfo(depth=len(blocks), dim=v.transformer.width, num_heads=blocks[0].attn.num_heads,
                           num_prefix=1, num_tokens=grid[0] * grid[1], mlp_hidden=blocks[0].mlp.c_fc.out_features,
                           grid=grid, has_cls=True, family=self.family)

    def block_holders(self) -> tuple:
        return (("transformer", self.visual.transformer),)  # open_clip runs self.transformer(x)

    def input_grid(self, input_shape):
        grid, own = image_grid(input_shape, self.visual.patch_size), tuple(self.visual.grid_size)
        if grid != own:  # its positional embedding is added as it is: another grid fails in open_clip's _embeds
            h, w = (int(v) for v in tuple(input_shape)[-2:])
            ih, iw = self.visual.image_size
            raise ValueError(f"tokenprune: this open_clip tower takes {ih}x{iw} images only (its positional embedding "
                             f"has {own[0]}x{own[1]} patches), not {h}x{w}; resize the image to {ih}x{iw}")
        return grid

    def grid_for(self, num_tokens: int):
        grid = tuple(self.visual.grid_size)
        return grid if grid[0] * grid[1] == num_tokens else None

    def features(self, x):
        fwd = Forward(self.visual._tokenprune_patch)
        return self.visual._tokenprune_tokens(x, fwd), fwd.state

    def written_blocks(self):
        return self.visual.transformer.resblocks

    def install(self, patch) -> None:
        attach(self.visual, _Visual, patch)

    def uninstall(self) -> None:
        detach(self.visual)
