"""timm ``Eva``: the RoPE ViTs (EVA02, DINOv3 ``vit_*_dinov3``, ``vit_*_rope_*`` incl. mixed RoPE, Perception
Encoder ``vit_pe_*``), and EVA-01 (absolute positions only).

These models add a rotary embedding to q and k inside every block's attention, at the token's grid position.
Through pruning and merging each token carries a position (:meth:`tokenprune.state.TokenState.positions`,
derived from the source map, so every reducer works unchanged): the model's rotary table for the input grid is
built once per forward by timm's own ``_pos_embed`` and each block gathers the rows of the positions its
tokens carry.

- Pruned tokens keep their own positions: a block on the kept tokens computes exactly what it would compute on
  those tokens at their original positions (tested in float64).
- Merged (and pooled) tokens take the position of the patch they hold that is nearest to the size-weighted
  centroid of all their patches (ties: the lowest index). Chosen over the exact centroid because it is a row of
  the model's own table (no rotary embedding evaluated at fractional coordinates, so it serves every timm rope
  type -- ``cat``, ``dinov3``, ``mixed`` (per-block, per-head tables), ``mrope`` -- and any other family whose
  rotary embedding is a table over the grid) and equals the destination token's own position when a patch is
  merged into a neighbour on the side of the lower index. Measured (``scripts/rope_positions.py``, README): as
  good as the best table row per group, better than ToMe's destination patch; the exact fractional centroid
  would cut the rotary logit error 2-3x.
- Blocks (``EvaBlock``, ``EvaBlockPostNorm``; attention ``EvaAttention`` or ``AttentionRope``, incl.
  grouped-query heads, q/k-norm, gated attention, scale-norm) run written out from timm's submodules: SDPA with
  the ``log size`` key bias, q/k (after the rotary embedding: the ones attention used) recorded for the reducer,
  MAELRE's kernel where asked. timm's unfused (eager) path is never entered.
- Pooling: ``avg`` / ``max`` / ``avgmax`` weight tokens by size, ``map`` weights keys by size, ``token`` reads
  [CLS]. ``forward_head(tokens)`` on reduced tokens needs ``sizes=state.sizes``.
- Refused: ``attn_mask`` / ``is_causal``, gradient checkpointing, patch dropout in training,
  ``track_source=False`` (positions follow the source map), ``forward_intermediates``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops
from ..engine import Forward, attend, run_blocks
from ..plan import EncoderInfo
from ..state import log_sizes
from .base import ORIGINAL, Adapter, has_class, restore_class, swap_class
from .timm_vit import _Model as _VitModel
from .timm_vit import PatchEmbedGrid, patch_grid, sized_pool

_BLOCKS = {"EvaBlock.forward", "EvaBlockPostNorm.forward"}
_ATTENTIONS = {("EvaAttention.forward", "timm.models.eva"), ("AttentionRope.forward", "timm.layers.attention")}


def _rotate(x: torch.Tensor, emb: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's ``apply_rot_embed_cat``: ``emb`` is ``[..., N, 2 d]`` = [sin, cos] (interleaved or half layout)."""
    sin, cos = emb.chunk(2, -1)
    if half:
        x1, x2 = x.chunk(2, -1)
        rot = torch.cat([-x2, x1], -1)
    else:
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + rot * sin).to(x.dtype)


def _attention(attn, x: torch.Tensor, rope, fwd: Forward) -> torch.Tensor:
    """``EvaAttention.forward`` / ``AttentionRope.forward`` (fused path) with the key bias, q/k recording and
    kernel choice of ``fwd``; ``rope`` already at the tokens' positions."""
    b, n, _ = x.shape
    h = attn.num_heads
    hk = getattr(attn, "num_kv_heads", h) or h
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, n, h, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, hk, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, hk, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], 2).type_as(v)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], 2).type_as(v)
    if hk != h:
        k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    o = attend(fwd, q, k, v, attn.scale, attn.attn_drop.p if attn.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _rope_for_block(rope, mixed: bool, fwd: Forward):
    """This block's rotary embedding at the positions its tokens carry (one gather per reduction stage)."""
    if rope is None:
        return None
    state = fwd.state
    pos = state.positions()
    if mixed:  # per-block (depth, heads, N0, E) tables
        return ops.position_rows(rope[state.block + 1], pos)
    if pos is None:
        return rope
    cached = state.scratch.get("_rope")
    if cached is not None and cached[0] is pos:
        return cached[1]
    out = ops.position_rows(rope, pos)
    state.scratch["_rope"] = (pos, out)
    return out


def _block(blk, x: torch.Tensor, fwd: Forward, rope=None, mixed: bool = False) -> torch.Tensor:
    """One ``EvaBlock`` / ``EvaBlockPostNorm``, written out. With ``fwd.slot`` the MLP branch goes to
    ``fwd.residual`` and the input of the last add is returned."""
    r = _rope_for_block(rope, mixed, fwd)
    if hasattr(blk, "gamma_1"):  # pre-norm EvaBlock, optional LayerScale
        a = _attention(blk.attn, blk.norm1(x), r, fwd)
        a = blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a)
        x = fwd.reduce_mid(x, a) if fwd.mid else x + a  # stages inside the block (placement='attn')
        y = blk.mlp(blk.norm2(x))
        y = blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)
    else:  # EvaBlockPostNorm
        a = blk.drop_path1(blk.norm1(_attention(blk.attn, x, r, fwd)))
        x = fwd.reduce_mid(x, a) if fwd.mid else x + a
        y = blk.drop_path2(blk.norm2(blk.mlp(x)))
    if fwd.slot:
        fwd.residual = y
        return x
    return x + y


def _own(fn, qualname: str, module: str) -> bool:
    return getattr(fn, "__qualname__", "") == qualname and getattr(fn, "__module__", "") == module


class _Eva(_VitModel):
    """Mixin for timm's ``Eva``: the timm ViT mixin's forward, ``forward_head`` and refusals, with Eva's own
    features (rotary table per forward, blocks with rotary rows at the tokens' positions) and pooling."""

    def _tokenprune_features(self, x, fwd: Forward, attn_mask=None, is_causal=False):
        self._tokenprune_refuse(attn_mask, is_causal, "timm Eva")
        if self.training and self.patch_drop is not None:
            raise RuntimeError("tokenprune: timm patch dropout (patch_drop_rate > 0) in training cannot be combined "
                               "with token reduction; call model.eval() or build the model with patch_drop_rate=0")
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)  # the input's real grid
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        mixed = bool(getattr(self, "rope_mixed", False))

        def block(blk, h, f):
            return _block(blk, h, f, rope, mixed)

        x = run_blocks(fwd, self.blocks, x, block, grid)
        return self.norm(x)

    def _tokenprune_pool(self, x, sizes, pool_type=None):
        if self.attn_pool is not None:  # Eva's latent pooling attends over every token, prefix included
            return self.attn_pool(x, attn_mask=log_sizes(sizes, x.dtype)[:, None, None, :])
        pool_type = pool_type or self.global_pool
        p = self.num_prefix_tokens
        return sized_pool(x[:, p:], sizes[:, p:], pool_type)


def _mlp_hidden(mlp, dim: int) -> int:
    """The hidden width of a two-layer MLP with the same multiply-adds (GLU / SwiGLU MLPs have three matrices)."""
    n = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    return max(1, round(n / (2 * dim)))


class TimmEvaAdapter(PatchEmbedGrid, Adapter):
    family = "timm_eva"
    writes_blocks = True  # hooks on the blocks are refused (engine.check_no_hooks)
    mid_block = True  # the block function performs stages between attention and MLP (fwd.reduce_mid)
    description = ("timm Eva (RoPE ViTs: eva02_*, vit_*_dinov3, vit_*_rope_*, vit_pe_*; rotary positions follow the "
                   "kept tokens)")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "timm.", "Eva")

    def __init__(self, model):
        super().__init__(model)
        cls = type(model).__dict__.get(ORIGINAL, type(model))
        if getattr(cls.forward_features, "__qualname__", "") != "Eva.forward_features":
            raise TypeError(f"tokenprune: {type(model).__name__} has its own forward_features; only timm's Eva "
                            "forward is supported")
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) and not isinstance(blocks, torch.nn.Sequential) \
                or len(blocks) == 0:
            raise TypeError("tokenprune: this timm Eva model has no blocks")

    def info(self) -> EncoderInfo:
        m = self.model
        blk = m.blocks[0]
        grid = tuple(m.patch_embed.grid_size)
        return EncoderInfo(depth=len(m.blocks), dim=m.embed_dim, num_heads=blk.attn.num_heads,
                           num_prefix=m.num_prefix_tokens, num_tokens=math.prod(grid),
                           mlp_hidden=_mlp_hidden(blk.mlp, m.embed_dim), grid=grid,
                           has_cls=getattr(m, "cls_token", None) is not None, family=self.family)

    def grid_for(self, num_tokens: int):
        return self._grid if num_tokens == math.prod(self._grid) else None

    def input_grid(self, input_shape):
        """The grid timm's patch embedding makes of an image of ``input_shape`` (padded up with ``dynamic_img_pad``)."""
        return patch_grid(self.model.patch_embed, input_shape)

    def check(self, reducer) -> None:
        for i, blk in enumerate(self.model.blocks):
            attn = getattr(blk, "attn", None)
            ok = any(_own(type(blk).forward, q, "timm.models.eva") for q in _BLOCKS) and attn is not None and \
                any(_own(type(attn).forward, q, mod) for q, mod in _ATTENTIONS)
            if not ok:
                raise TypeError(f"tokenprune: block {i} of this timm Eva model is {type(blk).__name__} with "
                                f"{type(attn).__name__}; only EvaBlock / EvaBlockPostNorm with EvaAttention / "
                                "AttentionRope are supported")
        pool = self.model.attn_pool
        if pool is not None and getattr(pool, "pos_embed", None) is not None:
            raise TypeError("tokenprune: this Eva model's attention pooling adds a position embedding per input "
                            "token, which does not follow reduced tokens")

    def features(self, x):
        fwd = Forward(self.model._tokenprune_patch)
        return self.model._tokenprune_features(x, fwd), fwd.state

    def install(self, patch) -> None:
        if self.model.rope is not None and not patch.track_source:
            raise ValueError("tokenprune: rotary positions follow the source map of the kept tokens; this model "
                             "(RoPE) needs track_source=True")
        self.model._tokenprune_patch = patch
        swap_class(self.model, _Eva)

    def uninstall(self) -> None:
        restore_class(self.model)
        self.model.__dict__.pop("_tokenprune_patch", None)
