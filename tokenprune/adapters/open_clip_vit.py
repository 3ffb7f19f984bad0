"""open_clip ``VisionTransformer`` image towers (``CLIP`` / ``CustomTextCLIP`` models or ``model.visual``).

Only the image tower is reduced: ``model.encode_image`` returns the same kind
of embedding, the text tower is untouched.

- Blocks: open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``
  called with ``need_weights=False``, fused). The tower's
  ``Transformer.forward`` loop becomes :func:`run_blocks`. Batch-first and
  sequence-first transformers both work.
- Size bias: ``nn.MultiheadAttention`` takes a float ``key_padding_mask``
  ``[B, N]`` that it adds to every query row (``[B*H, 1, N]`` internally, no
  ``N x N`` mask is built); the block's attention module gets ``log(size)``
  there (``None`` while all sizes are 1, keeping the unmasked path).
- q/k capture: ``nn.MultiheadAttention`` fuses its in-projection, so the
  q and k a reducer needs are recomputed from the attention's input with the
  first two thirds of ``in_proj_weight`` -- an extra ``2 N D^2`` multiply-adds
  in the blocks where a reducer reads q/k (merge: every reducing block; cls:
  its pruning blocks), about 1/6 of such a block's linear-layer FLOPs.
- Positions: learned absolute embeddings added before the blocks.
- Pooling: ``'tok'`` reads the class token (never reduced); ``'avg'`` becomes
  a size-weighted mean over the patch tokens (padding ignored); attentional
  poolers (CoCa) get ``log(size)`` as their key-padding mask.
- Refused with a clear error: ``CustomResidualAttentionBlock`` towers (qk-norm
  / scaled-cosine attention), non-ViT towers (timm trunks, ModifiedResNet),
  ``attn_mask``, gradient checkpointing, ``forward_intermediates``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..engine import QK, current_kernel, current_scope, forward_scope, run_blocks
from ..plan import EncoderInfo
from .base import Adapter, has_class, restore_class, swap_class


@dataclass
class _Call:
    modules: tuple
    bias: torch.Tensor | None
    qk: QK | None = None


_CALL: contextvars.ContextVar["_Call | None"] = contextvars.ContextVar("tokenprune_open_clip", default=None)


def _project_qk(mha, x: torch.Tensor):
    """q, k ``[B, H, N, d]`` of ``nn.MultiheadAttention`` for batch-first input ``x`` ``[B, N, E]``."""
    e, h = mha.embed_dim, mha.num_heads
    b = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        qk = F.linear(x, mha.in_proj_weight[: 2 * e], b[: 2 * e] if b is not None else None)
        q, k = qk.split(e, dim=-1)
    else:
        q = F.linear(x, mha.q_proj_weight, b[:e] if b is not None else None)
        k = F.linear(x, mha.k_proj_weight, b[e: 2 * e] if b is not None else None)
    bsz, n = x.shape[:2]
    return (q.view(bsz, n, h, e // h).transpose(1, 2), k.view(bsz, n, h, e // h).transpose(1, 2))


class _MHA:
    """Mixin for ``nn.MultiheadAttention`` inside the image tower: size bias as key-padding mask, q/k capture."""

    def forward(self, query, key, value, key_padding_mask=None, *args, **kwargs):
        call = _CALL.get()
        kernel = current_kernel()
        if kernel is not None and (call is None or any(self is m for m in call.modules)):
            return self._kernel_forward(kernel, query, call.bias if call is not None else None, call)
        if call is not None and any(self is m for m in call.modules):
            if call.qk is not None:
                xb = query if self.batch_first else query.transpose(0, 1)
                call.qk.q, call.qk.k = _project_qk(self, xb)
                call.qk.scale = (self.embed_dim // self.num_heads) ** -0.5
            if call.bias is not None:
                bias = call.bias[:, 0, 0, :].to(query.dtype)
                key_padding_mask = bias if key_padding_mask is None else key_padding_mask + bias
        return super().forward(query, key, value, key_padding_mask, *args, **kwargs)

    def _kernel_forward(self, kernel, query, bias, call):
        """Self-attention with a replacement kernel (MAELRE's linear blocks): same projections, no SDPA."""
        xb = query if self.batch_first else query.transpose(0, 1)
        q, k = _project_qk(self, xb)
        e, h = self.embed_dim, self.num_heads
        w = self.in_proj_weight[2 * e:] if self._qkv_same_embed_dim else self.v_proj_weight
        b = self.in_proj_bias[2 * e:] if self.in_proj_bias is not None else None
        bsz, n = xb.shape[:2]
        v = F.linear(xb, w, b).view(bsz, n, h, e // h).transpose(1, 2)
        if call is not None and call.qk is not None:
            call.qk.q, call.qk.k, call.qk.scale = q, k, (e // h) ** -0.5
        o = kernel(q, k, v, bias).transpose(1, 2).reshape(bsz, n, e)
        o = self.out_proj(o)
        return (o if self.batch_first else o.transpose(0, 1)), None


@contextlib.contextmanager
def _with_call(call: _Call):
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)


def _call_block(block, x, bias):
    """Run one ``ResidualAttentionBlock`` on batch-first ``x``; the key bias reaches its attention."""
    outer = _CALL.get()
    qk = outer.qk if outer is not None and block.attn in outer.modules else None
    seq_first = not block.attn.batch_first
    xin = x.transpose(0, 1) if seq_first else x
    if bias is None and qk is None:
        out = block(xin)
    else:
        with _with_call(_Call((block.attn,), bias, qk)):
            out = block(xin)
    return out.transpose(0, 1) if seq_first else out


@contextlib.contextmanager
def _capture(block, bias):
    qk = QK(bias=bias)
    with _with_call(_Call((block.attn,), bias, qk)):
        yield qk


class _Transformer:
    """Mixin for the tower's ``Transformer``: the block loop runs through ``run_blocks``."""

    def forward(self, x, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("tokenprune: attn_mask cannot be combined with token reduction (the token count "
                             "changes between blocks); call tokenprune.remove(model) first")
        if self.grad_checkpointing:
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced open_clip tower; "
                               "call model.set_grad_checkpointing(False)")
        patch = self._tokenprune_patch
        grid = patch.adapter.grid_for(x.shape[1] - patch.num_prefix)
        return run_blocks(patch, self.resblocks, x, _call_block, _capture, grid)


class _Visual:
    """Mixin for open_clip's ``VisionTransformer``: one scope per forward; size-aware pooling."""

    def forward(self, x):
        with forward_scope():
            return super().forward(x)

    def _state(self, x):
        scope = current_scope()
        state = scope.state if scope is not None else None
        if state is None or state.sizes is None or state.sizes.shape[1] != x.shape[1]:
            return None
        return state

    def _pool(self, x):
        state = self._state(x)
        if state is None or self.attn_pool is None:
            return super()._pool(x)
        modules = [self.attn_pool.attn]
        if self.attn_pool_contrastive is not None and self.attn_pool_type == "parallel":
            modules.append(self.attn_pool_contrastive.attn)
        with _with_call(_Call(tuple(modules), state.attn_bias(x.dtype))):
            return super()._pool(x)

    def _global_pool(self, x):
        state = self._state(x)
        if state is None or self.pool_type != "avg":
            return super()._global_pool(x)
        return ops.weighted_mean(x[:, 1:], state.sizes[:, 1:]), x[:, 1:]

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("tokenprune: forward_intermediates is not reduced; call tokenprune.remove(model) "
                                  "or use the tower's forward")


def _visual(model):
    v = getattr(model, "visual", model)
    names = {c.__name__ for c in type(v).__mro__}
    if "VisionTransformer" not in names or not hasattr(v, "transformer"):
        raise TypeError(f"tokenprune: this open_clip model's image tower is {type(v).__name__}; only open_clip "
                        "VisionTransformer towers are supported (timm-trunk and ResNet towers are not)")
    return v


class OpenClipViTAdapter(Adapter):
    family = "open_clip"
    description = "open_clip CLIP / CustomTextCLIP / VisionTransformer image towers (model.visual)"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "open_clip.", "CLIP", "CustomTextCLIP", "VisionTransformer", "CoCa")

    def __init__(self, model):
        super().__init__(model)
        self.visual = _visual(model)
        for i, blk in enumerate(self.visual.transformer.resblocks):
            if not isinstance(getattr(blk, "attn", None), torch.nn.MultiheadAttention):
                raise TypeError(f"tokenprune: open_clip block {i} is {type(blk).__name__}; only "
                                "ResidualAttentionBlock (nn.MultiheadAttention) towers are supported")

    def info(self) -> EncoderInfo:
        v = self.visual
        blocks = v.transformer.resblocks
        grid = tuple(v.grid_size)
        return EncoderInfo(depth=len(blocks), dim=v.transformer.width, num_heads=blocks[0].attn.num_heads,
                           num_prefix=1, num_tokens=grid[0] * grid[1], mlp_hidden=blocks[0].mlp.c_fc.out_features,
                           grid=grid, has_cls=True, family=self.family)

    def grid_for(self, num_tokens: int):
        grid = tuple(self.visual.grid_size)
        return grid if grid[0] * grid[1] == num_tokens else None

    def _mhas(self):
        v = self.visual
        mods = [blk.attn for blk in v.transformer.resblocks]
        for pool in (getattr(v, "attn_pool", None), getattr(v, "attn_pool_contrastive", None)):
            if pool is not None:
                mods.append(pool.attn)
        return mods

    def install(self, patch) -> None:
        v = self.visual
        v.transformer._tokenprune_patch = patch
        for m in self._mhas():
            swap_class(m, _MHA)
        swap_class(v.transformer, _Transformer)
        swap_class(v, _Visual)

    def uninstall(self) -> None:
        v = self.visual
        restore_class(v)
        restore_class(v.transformer)
        for m in self._mhas():
            restore_class(m)
        v.transformer.__dict__.pop("_tokenprune_patch", None)
