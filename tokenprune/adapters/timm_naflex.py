"""timm ``NaFlexVit`` (``naflexvit_*``): a ViT that takes images or NaFlex patch dicts.

Inputs, as timm's ``forward`` takes them:

- an image batch ``[B, C, H, W]`` (any size the patch embedding accepts): one grid for the batch, read from the
  patch embedding, as for timm's ``VisionTransformer`` with ``dynamic_img_size``;
- NaFlex patches: a dict ``{"patches", "patch_coord", "patch_valid"}`` (timm's NaFlex collator) or the same as
  arguments. Row ``b``'s valid patches must be its first ``n_b``, with coordinates the row-major ``(h_b, w_b)`` grid
  (as timm's ``Patchify`` and collator make them; checked, one host sync). In a batch of one grid the padding never
  enters a block (the encoder runs on that grid). A batch mixing grids runs through
  :func:`tokenprune.mixed.run_mixed`: every image is reduced on its own grid to its own ``K_b = keep_count(budget,
  n_b)``, exactly as alone, while the blocks run once on the padded batch (padding slots have size 0, masked keys).

Blocks: timm's standard ``Block`` (run as :func:`.timm_vit._block`) or, for the RoPE / EVA configurations,
``EvaBlock`` (run as :func:`.timm_eva._block`, the rotary table of the grid built once per forward and taken at
the kept tokens' positions). RoPE is available for one grid per batch (an image batch, or NaFlex patches of one
shape); a NaFlex batch mixing grids with RoPE is refused. SDPA throughout, never timm's eager path.

Pooling: ``avg`` / ``max`` / ``avgmax`` weight tokens by size, ``map`` weights keys by size (both ignore padding),
``token`` reads [CLS]. ``forward_features`` returns the reduced tokens (image input) or timm's dict with the
tokens' ``sizes`` added (NaFlex input); ``forward_head`` needs those sizes (``forward_head(**features)`` passes
them). Refused: ``attn_mask``, gradient checkpointing, patch dropout in training, ``forward_intermediates``.
"""
from __future__ import annotations

import math

import torch

from ..engine import Forward, run_blocks
from ..mixed import grids_read_on_host, run_mixed
from ..plan import EncoderInfo
from ..state import log_sizes
from .base import Adapter, attach, detach, has_class
from .timm_eva import _ATTENTIONS, _BLOCKS, _mlp_hidden, _own
from .timm_eva import _block as _eva_block
from .timm_vit import _block as _vit_block
from .timm_vit import _standard_block, patch_grid, sized_pool

_SIZED_POOLS = ("avg", "max", "avgmax")
_UNSET = object()


def naflex_grids(patch_coord: torch.Tensor, patch_valid: torch.Tensor) -> list[tuple[int, int]]:
    """The ``(h, w)`` of every row of a NaFlex batch; checks that the valid patches are the row's first ``h w`` and
    their coordinates the row-major ``(h, w)`` grid."""
    grids_read_on_host("NaFlex patch dicts (patch_coord, patch_valid)")
    valid = patch_valid.bool()
    b, n = valid.shape
    y, x = patch_coord[..., 0].long(), patch_coord[..., 1].long()
    h = y.masked_fill(~valid, -1).amax(1) + 1
    w = x.masked_fill(~valid, -1).amax(1) + 1
    idx = torch.arange(n, device=valid.device)[None, :]
    counts = valid.sum(1)
    ww = w.clamp(min=1)[:, None]
    ok = (valid == (idx < counts[:, None])).all() & ((h * w) == counts).all() & \
        ((y == idx // ww) & (x == idx % ww) | ~valid).all() & (counts > 0).all()
    if not bool(ok):
        raise ValueError("tokenprune: NaFlex patches must be each image's row-major grid of patches first, then "
                         "padding (patch_valid True for the first h*w patches, patch_coord (y, x) = (i // w, i % w)), "
                         "as timm's Patchify and NaFlex collator make them; got another layout")
    return [(int(a), int(c)) for a, c in zip(h.tolist(), w.tolist())]


class _NaFlex:
    """Mixin for ``NaFlexVit``."""

    def forward(self, x, patch_coord=None, patch_valid=None, attn_mask=None):
        fwd = Forward(self._tokenprune_patch)
        tokens = self._tokenprune_features(fwd, x, patch_coord, patch_valid, attn_mask)
        return self.forward_head(tokens, sizes=fwd.sizes)

    def forward_features(self, patches, patch_coord=None, patch_valid=None, attn_mask=None):
        fwd = Forward(self._tokenprune_patch)
        tokens = self._tokenprune_features(fwd, patches, patch_coord, patch_valid, attn_mask)
        if patch_coord is None and not isinstance(patches, dict):
            return tokens
        sizes = fwd.sizes
        valid = None if sizes is None else sizes[:, self.num_prefix_tokens:] > 0
        return {"patches": tokens, "patch_valid": valid, "sizes": sizes}

    def _tokenprune_features(self, fwd: Forward, x, patch_coord=None, patch_valid=None, attn_mask=None):
        if isinstance(x, dict):
            patch_valid = x.get("patch_valid", patch_valid)
            patch_coord = x.get("patch_coord", patch_coord)
            attn_mask = x.get("attn_mask", attn_mask)
            x = x["patches"]
        if attn_mask is not None:
            raise ValueError("tokenprune: attn_mask cannot be combined with token reduction (the token count changes "
                             "between blocks; padding follows patch_valid); call tokenprune.remove(model) first")
        if getattr(self, "grad_checkpointing", False):
            raise RuntimeError("tokenprune: gradient checkpointing is not supported on a reduced NaFlexVit; call "
                               "model.set_grad_checkpointing(False)")
        if self.training and self.patch_drop is not None:
            raise RuntimeError("tokenprune: timm patch dropout (patch_drop_rate > 0) in training cannot be combined "
                               "with token reduction; call model.eval() or build the model with patch_drop_rate=0")
        grids = None
        if patch_coord is not None:
            if patch_valid is None:
                raise ValueError("tokenprune: NaFlex patches need patch_valid (as timm's NaFlex collator gives it)")
            grids = naflex_grids(patch_coord, patch_valid)
            x, _ = self.embeds(x, patch_coord=patch_coord, patch_valid=patch_valid)
        else:
            x, grid = self.embeds(x)
            grids = [tuple(int(v) for v in grid)]
        one = len(set(grids)) == 1
        rope = None
        if self.rope is not None:
            if not one:
                raise ValueError("tokenprune: a NaFlexVit with RoPE takes one patch grid per batch when reduced; this "
                                 f"batch mixes {sorted(set(grids))}. Run each shape in its own batch")
            rope = self.rope.get_embed(shape=grids[0])
        x = self.norm_pre(x)
        if self._tokenprune_patch.adapter.eva:
            mixed = bool(self.rope_is_mixed)

            def block(blk, h, f):
                return _eva_block(blk, h, f, rope, mixed)
        else:
            block = _vit_block
        if one:
            grid = grids[0]
            x = run_blocks(fwd, self.blocks, x[:, : self.num_prefix_tokens + math.prod(grid)], block, grid)
        else:
            x = run_mixed(fwd, self.blocks, x, grids, block)
        return self.norm(x)

    def forward_head(self, patches, pre_logits: bool = False, patch_valid=None, sizes=_UNSET):
        """timm's ``forward_head`` with size-weighted pooling; ``sizes`` from ``forward_features`` (NaFlex dict) or
        :func:`tokenprune.features` (``None``: every token stands for one patch, no padding)."""
        if sizes is _UNSET:
            if self.attn_pool is not None or self.global_pool in _SIZED_POOLS:
                raise ValueError(
                    "tokenprune: forward_head got tokens without their sizes, and this model's pooling "
                    f"({'map' if self.attn_pool is not None else self.global_pool}) weights tokens by size. Call "
                    "model(x), pass the dict forward_features returns (forward_head(**features)), or tokens, state = "
                    "tokenprune.features(model, x); model.forward_head(tokens, sizes=state.sizes)")
            return super().forward_head(patches, pre_logits, patch_valid)
        if sizes is None:
            return super().forward_head(patches, pre_logits, None)
        x = self.head_drop(self.fc_norm(self._tokenprune_pool(patches, sizes)))
        return x if pre_logits else self.head(x)

    def _tokenprune_pool(self, x, sizes):
        p = self.num_prefix_tokens
        xs, ss = (x, sizes) if self.pool_include_prefix else (x[:, p:], sizes[:, p:])
        if self.attn_pool is not None:
            return self.attn_pool(xs, attn_mask=log_sizes(ss, x.dtype)[:, None, None, :])
        if self.global_pool in _SIZED_POOLS:
            return sized_pool(xs, ss, self.global_pool)
        return super()._pool(x)  # 'token' / '': no weighting

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "tokenprune: forward_intermediates is not reduced (its outputs need the full grid at every block). "
            "Use tokenprune.features(model, x) and tokenprune.unmerge for dense outputs, or tokenprune.remove(model)")


def _eva_blocks(blocks) -> bool:
    return all(any(_own(type(blk).forward, q, "timm.models.eva") for q in _BLOCKS)
               and getattr(blk, "attn", None) is not None
               and any(_own(type(blk.attn).forward, q, mod) for q, mod in _ATTENTIONS) for blk in blocks)


class TimmNaFlexAdapter(Adapter):
    family = "timm_naflex"
    writes_blocks = True  # hooks on the blocks are refused (engine.check_no_hooks)
    mid_block = True  # one grid per batch: the timm block functions reduce between attention and MLP
    inside_blocks = False  # not for a batch mixing grids: placement "auto" reduces after the block on every input
    placeholder_input = True  # the default grid is the position table's (or img_size's): inputs bring their own
    description = "timm NaFlexVit (naflexvit_*; images or NaFlex patch dicts, a batch may mix grids)"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "timm.", "NaFlexVit")

    def __init__(self, model):
        super().__init__(model)
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.Sequential) or len(blocks) == 0:
            raise TypeError("tokenprune: this NaFlexVit has no blocks")
        self.eva = _eva_blocks(blocks)
        # the default input (plan() without input_shape): the image size given at creation when the embedding kept
        # it, else the position embedding's grid (naflexvit_*: 16 x 16); NaFlex inputs bring their own grids
        pe = model.embeds
        if getattr(pe, "default_img_size", None) is not None:
            self._grid = tuple(s // p for s, p in zip(pe.default_img_size, pe.patch_size))
        elif getattr(pe, "pos_embed_grid_size", None) is not None:
            self._grid = tuple(int(v) for v in pe.pos_embed_grid_size)
        else:
            self._grid = (14, 14)

    def info(self) -> EncoderInfo:
        m = self.model
        blk = m.blocks[0]
        return EncoderInfo(depth=len(m.blocks), dim=m.embed_dim, num_heads=blk.attn.num_heads,
                           num_prefix=m.num_prefix_tokens, num_tokens=math.prod(self._grid),
                           mlp_hidden=_mlp_hidden(blk.mlp, m.embed_dim), grid=self._grid,
                           has_cls=bool(m.has_class_token), family=self.family)

    def grid_for(self, num_tokens: int):
        return self._grid if num_tokens == math.prod(self._grid) else None

    def input_grid(self, input_shape):
        """The grid of an image of ``input_shape`` (padded up with ``dynamic_img_pad``); for NaFlex patches plan
        with ``num_tokens=h*w`` or run ``tokenprune.get_patch(model).plan_for(h * w, (h, w))``."""
        return patch_grid(self.model.embeds, input_shape)

    def check(self, reducer) -> None:
        m = self.model
        if not self.eva and not all(_standard_block(blk) for blk in m.blocks):
            raise TypeError("tokenprune: only NaFlexVit models with timm's standard Block + Attention or EvaBlock + "
                            "EvaAttention / AttentionRope are supported (not attn_layer='diff', custom block_fn, ...)")
        pool = m.attn_pool
        if pool is not None and getattr(pool, "pos_embed", None) is not None:
            raise TypeError("tokenprune: this NaFlexVit's attention pooling adds a position embedding per input token, "
                            "which does not follow reduced tokens")

    def features(self, x, patch_coord=None, patch_valid=None):
        """Tokens after the final norm and the final state (image batch, NaFlex dict, or patches with
        ``patch_coord`` / ``patch_valid``)."""
        fwd = Forward(self.model._tokenprune_patch)
        return self.model._tokenprune_features(fwd, x, patch_coord, patch_valid), fwd.state

    def install(self, patch) -> None:
        if self.model.rope is not None and not patch.track_source:
            raise ValueError("tokenprune: rotary positions follow the source map of the kept tokens; this NaFlexVit "
                             "(RoPE) needs track_source=True")
        attach(self.model, _NaFlex, patch)

    def uninstall(self) -> None:
        detach(self.model)
