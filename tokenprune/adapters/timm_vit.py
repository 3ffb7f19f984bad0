"""timm ``VisionTransformer`` family (ViT, DeiT incl. distilled, DINOv2, registers, ...).

timm's own modules keep running: the block container's loop is replaced by
:func:`tokenprune.engine.run_blocks`, which calls each timm ``Block`` with
``attn_mask`` = the token-size key bias (``None`` while no bias is needed);
q and k are read from the ``q_norm`` / ``k_norm`` submodules every timm
``Attention`` calls (identity or q/k-norm), so LayerScale, q/k-norm and
``fused_attn`` are untouched. Pooling ('avg', 'avgmax', 'max', 'map') weights
tokens by their sizes and ignores padding; 'token' reads the class token.
"""
from __future__ import annotations

import inspect
import math
import os

import torch

from .. import kernels, ops
from ..engine import (HookCapture, attach_state, attached_state, attention_kernel, current_kernel, forward_scope,
                      residual_slot, run_blocks)
from ..plan import EncoderInfo
from .base import Adapter, has_class, restore_class, swap_class


def _call_block(block, x, bias):
    if bias is None:
        return block(x)
    attn = block.attn
    if (current_kernel() is None and not (attn.training and getattr(attn.attn_drop, "p", 0.0) > 0)
            and kernels.biased_attention_applies(bias, x.shape[1], attn.head_dim)):
        # a key bias sends SDPA to a slower masked kernel: the fused biased kernel instead (where
        # autograd records, kernels.biased_attention itself runs SDPA: the kernel has no backward)
        with attention_kernel(kernels.biased_attention):
            return block(x, attn_mask=bias)
    return block(x, attn_mask=bias)


def _capture(block, bias):
    attn = block.attn
    out = getattr(attn, "norm", None) or getattr(attn, "proj", None)  # input = per-head outputs, concatenated
    fold = attn.qkv if isinstance(attn.qkv, _FoldedQKV) else None
    return HookCapture(attn.q_norm, attn.k_norm, attn.scale, out_module=out, num_heads=attn.num_heads,
                       fold_module=fold)(bias)


def _foldable(attn) -> bool:
    """The head-mean key is linear in the block input: plain qkv Linear, no k-norm, [q | k | v] rows."""
    qkv = getattr(attn, "qkv", None)
    return (type(qkv) is torch.nn.Linear and type(getattr(attn, "k_norm", None)) is torch.nn.Identity
            and qkv.out_features == 3 * attn.num_heads * attn.head_dim)


FOLD_ROWS_MULTIPLE = 1  # pad the folded qkv weight with zero rows to a multiple of this (128 / 192: no gain, run 23)


class _FoldedQKV:
    """Mixin for a block's qkv ``nn.Linear`` when the reducer reads the keys' head mean (ToMe's metric).

    mean_h(x W_k,h^T + b_k,h) = x mean_h(W_k,h)^T + mean_h(b_k,h), so d more output rows in the qkv
    product give it without reading K again (``k.mean(1)`` is one more pass over K per merge step). The
    extra rows only run while the engine captures this block (``_tokenprune_qk`` set) and no gradient
    is recorded; the weight with them is cached and rebuilt when the qkv weights change (version
    counter, storage, dtype or device). Its memory: (3C + d) x C per block, next to the model's own."""

    def forward(self, x):
        qk = self.__dict__.get("_tokenprune_qk")
        if qk is None or torch.is_grad_enabled():
            return super().forward(x)
        w, b = self._tokenprune_folded()
        out = torch.nn.functional.linear(x, w, b)
        c = self.out_features
        qk.k_mean = out[..., c:c + c // (3 * self._tokenprune_heads)]
        return out[..., :c]  # a view: timm's reshape to [B, N, 3, H, d] splits the last dim, no copy

    def _tokenprune_folded(self):
        w, b = self.weight, self.bias
        try:
            key = (w._version, w.data_ptr(), w.dtype, w.device,
                   None if b is None else (b._version, b.data_ptr()), FOLD_ROWS_MULTIPLE)
        except RuntimeError:  # inference tensors have no version counter: rebuild every call
            key = None
        cached = self.__dict__.get("_tokenprune_fold")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        c = self.out_features // 3
        heads = self._tokenprune_heads
        acc = torch.promote_types(w.dtype, torch.float32)  # the mean in fp32 (fp64 stays fp64)
        wk = w[c:2 * c].to(acc).reshape(heads, c // heads, -1).mean(0)
        pad = -(w.shape[0] + wk.shape[0]) % FOLD_ROWS_MULTIPLE  # zero rows: a GEMM width its kernels tile well
        wf = torch.cat([w, wk.to(w.dtype), w.new_zeros(pad, w.shape[1])], 0)
        bf = None
        if b is not None:
            bf = torch.cat([b, b[c:2 * c].to(acc).reshape(heads, -1).mean(0).to(b.dtype), b.new_zeros(pad)], 0)
        self._tokenprune_fold = (key, wf, bf)
        return wf, bf


class _Blocks:
    """Mixin for ``model.blocks`` (an ``nn.Sequential``)."""

    def forward(self, x):
        patch = self._tokenprune_patch
        grid = patch.adapter.grid_for(x.shape[1] - patch.num_prefix)
        return run_blocks(patch, self, x, _call_block, _capture, grid)


def _plain_block(blk) -> bool:
    """timm's own ``Block`` forward (pre-norm, LayerScale, DropPath), with the submodules it calls."""
    fwd = type(blk).forward
    return (getattr(fwd, "__module__", "") == "timm.models.vision_transformer"
            and getattr(fwd, "__qualname__", "") == "Block.forward"
            and all(hasattr(blk, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2",
                                               "drop_path2")))


class _Block:
    """Mixin for timm ``Block``: while the engine offers a residual slot (a merge follows this block), the
    MLP branch goes into the slot and the block returns its input to the last add; the merge's row gather
    adds the two (the tokens are never written whole). Otherwise timm's own forward."""

    def forward(self, x, attn_mask=None, **kwargs):
        slot = residual_slot()
        if slot is None or kwargs:
            return super().forward(x, attn_mask=attn_mask, **kwargs)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        slot.y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class _KernelAttention:
    """Mixin for timm ``Attention``: runs the attention kernel in force (MAELRE's linear attention,
    or the fused key-bias kernel for blocks that see token sizes). Without a kernel in force it is
    timm's own forward."""

    def forward(self, x, attn_mask=None, is_causal=False):
        kernel = current_kernel()
        if kernel is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise ValueError("tokenprune: causal attention cannot use a replacement kernel")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = kernel(q, k, v, attn_mask)
        o = o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        o = self.norm(o) if hasattr(self, "norm") else o
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


class _Model:
    """Mixin for the ``VisionTransformer`` itself."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("tokenprune: attn_mask / is_causal cannot be combined with token reduction "
                             "(the token count changes between blocks); call tokenprune.remove(model) first")
        if getattr(self, "grad_checkpointing", False):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced timm model yet; "
                               "call model.set_grad_checkpointing(False)")
        with forward_scope() as scope:
            out = super().forward_features(x)
        return attach_state(out, scope.state)

    def pool(self, x, pool_type=None):
        state = attached_state(x)
        if state is None or state.sizes is None:
            return super().pool(x, pool_type)
        p = self.num_prefix_tokens
        sizes = state.sizes
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x, sizes = x[:, p:], sizes[:, p:]
            return self.attn_pool(x, attn_mask=sizes.log().to(x.dtype)[:, None, None, :])
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type or pool_type == "token":
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x, sizes = x[:, p:], sizes[:, p:]
        if pool_type == "avg":
            return ops.weighted_mean(x, sizes)
        if pool_type == "max":
            return ops.masked_max(x, sizes)
        if pool_type == "avgmax":
            return 0.5 * (ops.masked_max(x, sizes) + ops.weighted_mean(x, sizes))
        raise ValueError(f"tokenprune: unknown pool type {pool_type!r}")

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "tokenprune: forward_intermediates is not reduced (its outputs need the full grid at every block). "
            "Use model.forward_features and tokenprune.unmerge for dense outputs, or tokenprune.remove(model)")


class TimmViTAdapter(Adapter):
    family = "timm"
    description = "timm VisionTransformer family (vit_*, deit_*, dinov2, ...)"

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
        self._grid = self.info().grid

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

    def grid_for(self, num_tokens: int):  # called on every forward: no EncoderInfo rebuilt here
        if self._grid is not None and num_tokens == math.prod(self._grid):
            return self._grid
        side = math.isqrt(num_tokens)
        return (side, side) if side * side == num_tokens else None

    def check(self, reducer) -> None:
        for i, blk in enumerate(self.model.blocks):
            attn = getattr(blk, "attn", None)
            if not all(hasattr(attn, a) for a in ("q_norm", "k_norm", "scale", "num_heads")):
                raise TypeError(f"tokenprune: block {i}'s attention ({type(attn).__name__}) does not expose "
                                "q_norm/k_norm; only timm's standard Attention is supported")

    def install(self, patch) -> None:
        m = self.model
        m.blocks._tokenprune_patch = patch
        swap_class(m.blocks, _Blocks)
        swap_class(m, _Model)
        for blk in m.blocks:  # timm's own forward unless a kernel is in force (see _call_block)
            swap_class(blk.attn, _KernelAttention)
            if getattr(patch.reducer, "fuses_residual", False) and _plain_block(blk):
                swap_class(blk, _Block)
            if (getattr(patch.reducer, "uses_key_mean", False) and _foldable(blk.attn)
                    and os.environ.get("TOKENPRUNE_FOLD", "1") != "0"):
                blk.attn.qkv._tokenprune_heads = blk.attn.num_heads
                swap_class(blk.attn.qkv, _FoldedQKV)

    def uninstall(self) -> None:
        m = self.model
        restore_class(m)
        restore_class(m.blocks)
        for blk in m.blocks:
            restore_class(blk)
            restore_class(blk.attn)
            restore_class(blk.attn.qkv)
            for attr in ("_tokenprune_heads", "_tokenprune_fold", "_tokenprune_qk"):
                blk.attn.qkv.__dict__.pop(attr, None)
        m.blocks.__dict__.pop("_tokenprune_patch", None)
