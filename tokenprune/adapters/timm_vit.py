"""timm ``VisionTransformer`` family (ViT, DeiT incl. distilled, DINOv2, registers, ...).

The patched model's ``forward`` / ``forward_features`` are timm's, re-stated with one change: the
block loop is :func:`tokenprune.engine.run_blocks`, which hands each block a per-forward
:class:`~tokenprune.engine.Forward`. Each timm ``Block`` runs as :func:`_block`: the same computation
(pre-norm, LayerScale, DropPath, timm's own submodules and weights) written out, so that its attention
takes the token-size key bias, records q/k for the reducer and runs a replacement kernel when the
reducer asks for one. Written out, it also skips ``nn.Module.__call__`` for no-op submodules and calls
Linear / LayerNorm / GELU functionally: batch-1 forwards are bound by host time, and this makes the
patched model's own blocks cheaper to issue than timm's (same arithmetic, identical outputs).
Attention is always SDPA (or the fused key-bias kernel, or MAELRE's linear kernel), never N x N.

Pooling ('avg', 'avgmax', 'max', 'map') weights tokens by their sizes and ignores padding; 'token'
reads the class token. ``model.forward_head(tokens)`` or ``model.pool(tokens)`` called on its own gets no sizes:
pass them (``tokens, state = tokenprune.features(model, x); model.forward_head(tokens, sizes=state.sizes)``);
without them a size-weighted pooling of reduced tokens is refused.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..engine import Forward, attend, run_blocks
from ..plan import EncoderInfo
from ..state import log_sizes
from .base import ORIGINAL, Adapter, attach, detach, has_class, image_grid

_SIZED_POOLS = ("avg", "max", "avgmax")
_UNSET = object()
# module classes as globals: one lookup each where _call runs (and where torch.compile traces it)
_Identity, _Linear, _LayerNorm, _Dropout, _GELU = nn.Identity, nn.Linear, nn.LayerNorm, nn.Dropout, nn.GELU


def _call(m, x, training: bool):
    """``m(x)`` without ``nn.Module.__call__``'s cost where ``m`` is a no-op, a Linear, a LayerNorm (torch's, or
    timm's without its fast-norm option) or a GELU (batch-1 forwards are bound by host time; the arithmetic is
    the module's own, so results are identical). The checks are ordered by how often a ViT block meets them, and
    kept inline: ``torch.compile`` traces this function some 20 times per block."""
    t = type(m)
    if t is _Identity:
        return x
    if t is _Linear:
        return F.linear(x, m.weight, m.bias)
    if t is _LayerNorm or (t.__name__ == "LayerNorm" and t.__module__ == "timm.layers.norm"
                           and getattr(m, "_fast_norm", True) is False):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    if not training and (t is _Dropout or t.__name__ == "DropPath"):
        return x
    if t is _GELU:
        return F.gelu(x, approximate=m.approximate)
    return m(x)


def _attention(attn, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """timm ``Attention.forward`` (fused path) with the key bias, q/k recording and kernel choice of ``fwd``."""
    b, n, _ = x.shape
    tr = attn.training
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _call(attn.qkv, x, tr).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = _call(attn.q_norm, q, tr), _call(attn.k_norm, k, tr)
    o = attend(fwd, q, k, v, attn.scale, attn.attn_drop.p if tr else 0.0)
    o = _call(attn.norm, o.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim), tr)
    if gate is not None:
        o = o * gate
    return _call(attn.proj_drop, _call(attn.proj, o, tr), tr)


def _mlp(mlp, x: torch.Tensor, training: bool) -> torch.Tensor:
    if type(mlp).__name__ != "Mlp" or not hasattr(mlp, "drop2"):
        return mlp(x)
    x = _call(mlp.drop1, _call(mlp.act, _call(mlp.fc1, x, training), training), training)
    return _call(mlp.drop2, _call(mlp.fc2, _call(mlp.norm, x, training), training), training)


def _block(blk, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """One timm ``Block``, written out. With ``fwd.slot`` the MLP branch goes to ``fwd.residual`` and the input
    of the last add is returned (the merge after this block adds the two and never stores the sum). Stages
    inside the block (``fwd.mid``, ToMe's placement) run between the attention and the MLP."""
    tr = blk.training
    a = _call(blk.drop_path1, _call(blk.ls1, _attention(blk.attn, _call(blk.norm1, x, tr), fwd), tr), tr)
    x = fwd.reduce_mid(x, a) if fwd.mid else x + a  # a merge inside the block adds the branch in its row gather
    y = _call(blk.drop_path2, _call(blk.ls2, _mlp(blk.mlp, _call(blk.norm2, x, tr), tr), tr), tr)
    if fwd.slot:
        fwd.residual = y
        return x
    return x + y


def _standard_block(blk) -> bool:
    """timm's own ``Block`` and ``Attention`` forwards, with the submodules :func:`_block` calls."""
    def own(fn, qualname, module):
        return getattr(fn, "__qualname__", "") == qualname and getattr(fn, "__module__", "") == module
    attn = getattr(blk, "attn", None)
    return (own(type(blk).forward, "Block.forward", "timm.models.vision_transformer")
            and attn is not None and own(type(attn).forward, "Attention.forward", "timm.layers.attention")
            and all(hasattr(blk, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")))


def patch_grid(pe, input_shape) -> tuple[int, int]:
    """The grid timm's patch embedding ``pe`` makes of an image of ``input_shape`` (padded up with
    ``dynamic_img_pad``)."""
    shape = tuple(int(v) for v in input_shape)
    ph, pw = pe.patch_size
    img = getattr(pe, "img_size", None)
    if len(shape) >= 2 and img is not None:  # what timm's PatchEmbed asserts at the forward
        if getattr(pe, "strict_img_size", False) and tuple(shape[-2:]) != tuple(img):
            raise ValueError(f"tokenprune: this timm model takes {img[0]}x{img[1]} images only, not "
                             f"{shape[-2]}x{shape[-1]}; create it with dynamic_img_size=True (timm.create_model) "
                             "to plan and run other sizes")
        if not getattr(pe, "dynamic_img_pad", False):
            image_grid(shape, pe.patch_size)  # an image smaller than one patch: that error first
            if shape[-2] % ph or shape[-1] % pw:
                raise ValueError(f"tokenprune: a {shape[-2]}x{shape[-1]} image is not a multiple of the patch "
                                 f"size {ph}x{pw}; resize it, or create the model with dynamic_img_pad=True to pad it")
    if getattr(pe, "dynamic_img_pad", False):
        shape = (*shape[:-2], -(-shape[-2] // ph) * ph, -(-shape[-1] // pw) * pw)
    return image_grid(shape, pe.patch_size)


def sized_pool(x, sizes, pool_type: str):
    """timm's ``avg`` / ``max`` / ``avgmax`` pooling of ``x`` with each token weighted (or masked) by its size."""
    if pool_type == "avg":
        return ops.weighted_mean(x, sizes)
    if pool_type == "max":
        return ops.masked_max(x, sizes)
    if pool_type == "avgmax":
        return 0.5 * (ops.masked_max(x, sizes) + ops.weighted_mean(x, sizes))
    raise ValueError(f"tokenprune: unknown pool type {pool_type!r}")


class _Model:
    """Mixin for the ``VisionTransformer`` itself."""

    def forward(self, x, attn_mask=None, is_causal=False):
        fwd = Forward(self._tokenprune_patch)
        tokens = self._tokenprune_features(x, fwd, attn_mask, is_causal)
        return self.forward_head(tokens, sizes=fwd.sizes)

    def forward_features(self, x, attn_mask=None, is_causal=False):
        return self._tokenprune_features(x, Forward(self._tokenprune_patch), attn_mask, is_causal)

    def _tokenprune_refuse(self, attn_mask, is_causal, family: str) -> None:
        """The forward arguments and model settings a reduced forward cannot honour, as clear errors."""
        if attn_mask is not None or is_causal:
            raise ValueError("tokenprune: attn_mask / is_causal cannot be combined with token reduction "
                             "(the token count changes between blocks); call tokenprune.remove(model) first")
        if getattr(self, "grad_checkpointing", False):
            raise RuntimeError(f"tokenprune: gradient checkpointing is not supported on a reduced {family} model "
                               "yet; call model.set_grad_checkpointing(False)")

    def _tokenprune_features(self, x, fwd: Forward, attn_mask=None, is_causal=False):
        self._tokenprune_refuse(attn_mask, is_causal, "timm")
        if self.training and getattr(self.patch_drop, "prob", 0.0) > 0:  # its random subset is no grid of patches
            raise RuntimeError("tokenprune: timm patch dropout (patch_drop_rate > 0) in training cannot be combined "
                               "with token reduction; call model.eval() or build the model with patch_drop_rate=0")
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else None  # dynamic image size: NHWC, the real grid
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        if grid is None:
            grid = fwd.patch.adapter.grid_for(x.shape[1] - self.num_prefix_tokens)
        x = run_blocks(fwd, self.blocks, x, _block, grid)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False, sizes=_UNSET):
        """timm's ``forward_head`` with size-weighted pooling; ``sizes=state.sizes`` from
        :func:`tokenprune.features` (``None``: every token stands for one patch)."""
        if not self._tokenprune_sized(None):
            # 'token' / '' read tokens as they are: the model's own head (DeiT distilled: both heads averaged)
            return super().forward_head(x, pre_logits)
        x = self.head_drop(self.fc_norm(self.pool(x, sizes=sizes, _what="forward_head")))
        return x if pre_logits else self.head(x)

    def pool(self, x, pool_type=None, sizes=_UNSET, _what: str = "pool"):
        """timm's ``pool`` with size-weighted pooling; ``sizes=state.sizes`` from :func:`tokenprune.features`
        (``None``: every token stands for one patch)."""
        if not self._tokenprune_sized(pool_type):
            return super().pool(x, pool_type)
        if sizes is _UNSET:
            patch = self._tokenprune_patch
            # a budget below 1 reduces every input (one larger than the default keeps more tokens than the default
            # grid has, so the count alone cannot tell); at budget 1 only a reducer with stages (threshold: K is a
            # cap) drops tokens, and then a count below the full grid's is reduced (a smaller dynamic-size input's
            # full grid has fewer tokens too: with no stages nothing is reduced)
            if patch.budget < 1.0 or (x.shape[1] < patch.adapter.full_tokens and patch.plan_for().stages):
                kind = "map" if self.attn_pool is not None else pool_type or self.global_pool
                raise ValueError(
                    f"tokenprune: {_what} got reduced tokens without their sizes, and this model's pooling ({kind}) "
                    "weights tokens by size. Call model(x), or tokens, state = tokenprune.features(model, x); "
                    f"model.{_what}(tokens, sizes=state.sizes)")
            sizes = None
        if sizes is None:  # every token stands for one patch: timm's own pooling is exact
            return super().pool(x, pool_type)
        return self._tokenprune_pool(x, sizes, pool_type)

    def _tokenprune_sized(self, pool_type) -> bool:
        """Whether the pooling (``pool_type``, else the model's) weights tokens by their sizes."""
        return self.attn_pool is not None or (pool_type or self.global_pool) in _SIZED_POOLS

    def _tokenprune_pool(self, x, sizes, pool_type=None):
        p = self.num_prefix_tokens
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x, sizes = x[:, p:], sizes[:, p:]
            return self.attn_pool(x, attn_mask=log_sizes(sizes, x.dtype)[:, None, None, :])
        pool_type = pool_type or self.global_pool
        if not self.pool_include_prefix:
            x, sizes = x[:, p:], sizes[:, p:]
        return sized_pool(x, sizes, pool_type)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "tokenprune: forward_intermediates is not reduced (its outputs need the full grid at every block). "
            "Use tokenprune.features(model, x) and tokenprune.unmerge for dense outputs, or tokenprune.remove(model)")


class PatchEmbedGrid:
    """``_grid`` and ``full_tokens`` of a timm adapter, read from the model's patch embedding when asked
    (``model.set_input_size`` may change them after apply)."""

    @property
    def _grid(self):
        grid = getattr(self.model.patch_embed, "grid_size", None)
        return tuple(grid) if grid is not None else None

    @property
    def full_tokens(self) -> int:
        return self.model.num_prefix_tokens + (math.prod(self._grid) if self._grid else 0)


class TimmViTAdapter(PatchEmbedGrid, Adapter):
    family = "timm"
    description = "timm VisionTransformer family (vit_*, deit_*, dinov2, ...)"
    writes_blocks = True  # hooks on the blocks are refused (engine.check_no_hooks)
    mid_block = True

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "timm.", "VisionTransformer")

    def __init__(self, model):
        super().__init__(model)
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.Sequential) or len(blocks) == 0:
            raise TypeError("tokenprune: this timm model has no `blocks` nn.Sequential; is it a VisionTransformer?")
        for i, blk in enumerate(blocks):
            if "attn_mask" not in inspect.signature(blk.forward).parameters:
                raise TypeError(f"tokenprune: timm block {i} ({type(blk).__name__}) takes no attn_mask; "
                                "timm >= 1.0.15 is required")
        cls = type(model).__dict__.get(ORIGINAL, type(model))  # the model's own class when already patched
        own = getattr(cls.forward_features, "__qualname__", "")
        if own not in ("VisionTransformer.forward_features",):
            raise TypeError(f"tokenprune: {type(model).__name__} has its own forward_features; only timm's "
                            "VisionTransformer forward is supported")
        self.check(None)  # before info(), which reads blk.attn

    def info(self) -> EncoderInfo:
        m = self.model
        blk = m.blocks[0]
        grid = tuple(m.patch_embed.grid_size) if getattr(m.patch_embed, "grid_size", None) is not None else None
        n = math.prod(grid) if grid else m.patch_embed.num_patches
        mlp = getattr(blk, "mlp", None)
        hidden = mlp.fc1.out_features if mlp is not None and hasattr(mlp, "fc1") else 4 * m.embed_dim
        return EncoderInfo(depth=len(m.blocks), dim=m.embed_dim, num_heads=blk.attn.num_heads,
                           num_prefix=m.num_prefix_tokens, num_tokens=n, mlp_hidden=hidden, grid=grid,
                           has_cls=bool(getattr(m, "has_class_token", m.num_prefix_tokens > 0)), family=self.family)

    def grid_for(self, num_tokens: int):
        """The default grid when the count matches it; otherwise ``None`` (the real grid of a dynamic-size
        input is read from the patch embedding's output, never guessed from the count)."""
        if self._grid is not None and num_tokens == math.prod(self._grid):
            return self._grid
        return None

    def block_holders(self) -> tuple:
        return (("blocks", self.model.blocks),)  # timm runs self.blocks(x)

    def input_grid(self, input_shape):
        """The grid timm's patch embedding makes of an image of ``input_shape`` (padded up with ``dynamic_img_pad``)."""
        return patch_grid(self.model.patch_embed, input_shape)

    def check(self, reducer) -> None:
        for i, blk in enumerate(self.model.blocks):
            if not _standard_block(blk):
                raise TypeError(f"tokenprune: block {i} of this timm model is {type(blk).__name__} with "
                                f"{type(getattr(blk, 'attn', None)).__name__}; only timm's standard Block with "
                                "Attention is supported (not ParallelScalingBlock, ParallelThingsBlock, ResPostBlock, "
                                "DiffAttention, ...)")
        pool = getattr(self.model, "attn_pool", None)
        if pool is not None and "attn_mask" not in inspect.signature(pool.forward).parameters:
            raise TypeError(f"tokenprune: this timm model pools with {type(pool).__name__} (global_pool="
                            f"{self.model.global_pool!r}), which takes no key mask, so it cannot weight merged tokens "
                            "by size; use a model with global_pool 'token', 'avg', 'max', 'avgmax' or 'map'")

    def features(self, x):
        fwd = Forward(self.model._tokenprune_patch)
        return self.model._tokenprune_features(x, fwd), fwd.state

    def install(self, patch) -> None:
        attach(self.model, _Model, patch)

    def uninstall(self) -> None:
        detach(self.model)
