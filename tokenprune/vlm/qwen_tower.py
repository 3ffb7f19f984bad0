"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers run by tokenprune: visual tokens reduced INSIDE the tower.

:func:`run` does what the tower's own forward does (patch embedding, Qwen3-VL's interpolated position embedding,
2D rotary table, Qwen2.5-VL's window order, the blocks, Qwen3-VL's deepstack taps, the 2x2 patch merger), with
two differences:

- **attention in one launch per block.** transformers' SDPA path calls attention once per window / image / frame
  (a Python loop over ``cu_seqlens``: 108 calls per windowed block on a 1008x1344 image). Here every block makes
  q, k, v from the module's own weights and runs ONE fused attention over all segments (:class:`Segments`):
  ``"pad"`` (default) batches the segments, padded to the longest one with a key mask (no mask and no copy when
  all segments have the same length, as the windows of an unpruned image); ``"mask"`` is a single SDPA call over
  the whole sequence with a block-diagonal mask (computes every N x N tile: slower for windows, kept for
  comparison); ``"varlen"`` is ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, where torch has it;
  elsewhere ``"pad"``). The softmax is never materialised outside the fused kernel;
- **one reduction after block ``at``** (``-1``: before the first block), in units of the 2x2 merge group (the
  merger needs 4 patches): each group is one token ``[4 C]`` (its patches' features side by side) on the merged
  grid of its image / video. The reducer, through its interface only (``score_tokens`` / ``select``), keeps ``K``
  groups per item (``pool``: each pooled group is the mean of its member groups, patch slot by patch slot).
  Scores (``cls``) come from the q/k of the blocks ``score_blocks`` (each segment scored on its own, padding
  masked), averaged over each group's 4 patches. The later blocks, the merger and the deepstack mergers run on
  the kept groups only.

A kept group keeps its position: its 4 patches keep their rows of the rotary table, its window and its image /
frame (each window's kept groups stay contiguous, in the tower's order, so the segment lengths just shrink). A
pooled group takes the rotary rows, window and place of its first member group (the same member whose M-RoPE
position the language model gives it). Deepstack features computed before the reduction follow it (mean over
each output group's members: a copy for pruning). The merged tokens come back per item in the placeholder order
(raster over the merged grid), with the index of the placeholder each stands at.

Nothing is stored between calls: :class:`TowerPass` holds one forward's state and is passed explicitly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine import QK
from ..state import TokenState

try:  # torch >= 2.10 (varlen flash attention); "varlen" falls back to "pad" without it
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch version
    varlen_attn = None

ATTENTION = ("pad", "mask", "varlen")


class Segments:
    """A packed sequence of ``N`` tokens cut into contiguous segments (images, frames or windows) that attend only
    within themselves; :meth:`attend` runs all of them in one attention launch. Built once per forward and layout
    (one host read of the segment lengths)."""

    def __init__(self, lengths, device):
        lens = [int(n) for n in lengths if n > 0]
        self.lengths = lens
        self.count, self.width, self.n = len(lens), max(lens), sum(lens)
        self.padded = any(n != self.width for n in lens)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        self.cu = torch.tensor(starts, dtype=torch.int32, device=device)
        self.valid = self.rows = self.slots = None
        self._mask = None
        if self.padded:
            ar = torch.arange(self.width, device=device)
            self.valid = ar[None] < torch.tensor(lens, device=device)[:, None]  # [S, W]
            rows = self.cu[:-1].long()[:, None] + ar[None]
            self.rows = torch.where(self.valid, rows, 0).flatten()  # slot -> token (padding slots read token 0)
            self.slots = self.valid.flatten().nonzero().squeeze(1)  # token -> slot

    def batch(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[S, W, ...]`` (padding slots hold a copy of token 0: mask them)."""
        if self.padded:
            t = t.index_select(0, self.rows)
        return t.view(self.count, self.width, *t.shape[1:])

    def unbatch(self, t: torch.Tensor) -> torch.Tensor:
        """``[S, W, ...]`` -> ``[N, ...]`` (padding slots dropped)."""
        t = t.reshape(self.count * self.width, *t.shape[2:])
        return t.index_select(0, self.slots) if self.padded else t

    def key_bias(self, dtype) -> torch.Tensor | None:
        """``[S, 1, 1, W]``: 0 for real keys, -inf for padding slots (None without padding)."""
        if not self.padded:
            return None
        return torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device).masked_fill(
            ~self.valid, float("-inf"))[:, None, None, :]

    def attend(self, q, k, v, scale: float, how: str = "pad") -> torch.Tensor:
        """Attention of ``q, k, v`` ``[N, H, d]`` within each segment, one launch: ``[N, H * d]``."""
        n, h, d = q.shape
        if self.count == 1:
            how = "pad"  # one segment: plain SDPA, no mask
        if how == "varlen" and varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) \
                and scale == d ** -0.5:
            q, k, v = (t.contiguous() for t in (q, k, v))  # v is a strided slice of the qkv projection
            return varlen_attn(q, k, v, self.cu, self.cu, self.width, self.width).reshape(n, h * d)
        if how == "mask":
            if self._mask is None:
                seg = torch.repeat_interleave(torch.arange(self.count, device=q.device),
                                              torch.tensor(self.lengths, device=q.device))
                self._mask = seg[:, None] == seg[None, :]
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self._mask, scale=scale)
            return o[0].transpose(0, 1).reshape(n, h * d)
        qb, kb, vb = (self.batch(t).transpose(1, 2) for t in (q, k, v))
        mask = self.valid[:, None, None, :] if self.padded else None
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        return self.unbatch(o.transpose(1, 2)).reshape(n, h * d)


@dataclass
class Tower:
    """What :func:`run` needs to know about one model's vision tower (static, built at ``apply``)."""

    visual: torch.nn.Module
    kind: str  # "qwen2_vl", "qwen2_5_vl", "qwen3_vl"
    windowed: bool = False  # Qwen2.5-VL: window attention outside ``full_blocks``
    full_blocks: frozenset = frozenset()
    deepstack: tuple = ()  # Qwen3-VL: blocks after which a deepstack merger taps the patches

    @classmethod
    def of(cls, visual, kind: str) -> "Tower":
        vc = visual.config
        full = getattr(vc, "fullatt_block_indexes", None) or []
        windowed = kind == "qwen2_5_vl" and bool(full)
        deep = tuple(getattr(vc, "deepstack_visual_indexes", None) or ()) if kind == "qwen3_vl" else ()
        return cls(visual, kind, windowed, frozenset(full), deep)

    @property
    def depth(self) -> int:
        return len(self.visual.blocks)


@dataclass
class Reduction:
    """One in-tower reduction: after block ``at`` (-1: before block 0), ``items`` = ``(merged grid, K)`` per image /
    video of the call in order; ``score_blocks``: blocks whose q/k the reducer scores with (summed)."""

    reducer: object
    at: int
    items: list
    score_blocks: tuple = ()


@dataclass(eq=False)
class TowerPass:
    """One forward through the tower: current patch tokens (tower order), their rotary rows, the merge group each
    group of 4 rows came from (``anchor``: raster index over all items), per-group segment ids of each attention
    layout, the layouts built so far, deepstack taps and scores."""

    x: torch.Tensor
    rot: tuple
    anchor: torch.Tensor
    segment: dict
    layouts: dict = field(default_factory=dict)
    taps: list = field(default_factory=list)
    scores: torch.Tensor | None = None

    def layout(self, name: str) -> Segments:
        lay = self.layouts.get(name)
        if lay is None:
            lens = torch.bincount(self.segment[name]) * 4  # ids are sorted: segments stay contiguous
            lay = self.layouts[name] = Segments(lens.tolist(), self.x.device)
        return lay


def _group_segments(cu: torch.Tensor, device) -> torch.Tensor:
    """Segment id of every merge group from patch-unit ``cu_seqlens`` (segments hold whole groups)."""
    lens = (cu[1:] - cu[:-1]).long().to(device) // 4
    return torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)


def _rotate_half(t):
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), -1)


def rotate(q, k, cos, sin):
    """Qwen's vision rotary embedding (``apply_rotary_pos_emb_vision``): in float32, back to the input dtype."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return (qf * cos + _rotate_half(qf) * sin).to(q.dtype), (kf * cos + _rotate_half(kf) * sin).to(k.dtype)


def qkv(blk, x, rot):
    """The block's rotated q, k and v ``[N, H, d]`` from its own weights."""
    attn = blk.attn
    q, k, v = attn.qkv(blk.norm1(x)).view(x.shape[0], 3, attn.num_heads, -1).unbind(1)
    q, k = rotate(q, k, *rot)
    return q, k, v


def block(blk, x, q, k, v, layout: Segments, how: str):
    """The rest of a vision block (``x + proj(attn)``, then ``x + mlp(norm2(x))``) given its q, k, v."""
    x = x + blk.attn.proj(layout.attend(q, k, v, blk.attn.scaling, how))
    return x + blk.mlp(blk.norm2(x))


def embed(tower: Tower, pixels, grid_thw):
    """``(patch tokens [N, C], (cos, sin) [N, D])`` in the raster/merge-block order, as the tower's forward."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    v = tower.visual
    x = v.patch_embed(pixels)
    if tower.kind == "qwen3_vl":  # the learned position grid, resampled to each image's grid
        idx, w = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=v.config.spatial_merge_size)
        x = x + (v.pos_embed(idx) * w[:, :, None]).sum(1).to(x.dtype)
    pos = get_vision_position_ids(grid_thw, v.spatial_merge_size)
    return x, tuple(v.rotary_pos_emb(x, pos))


def start(tower: Tower, pixels, grid_thw) -> TowerPass:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    x, rot = embed(tower, pixels, grid_thw)
    dev = x.device
    groups = x.shape[0] // 4
    segment = {"full": _group_segments(get_vision_cu_seqlens(grid_thw), dev)}
    anchor = torch.arange(groups, device=dev)
    if tower.windowed:
        vc = tower.visual.config
        wi, cu_w = get_vision_window_index(grid_thw, spatial_merge_size=vc.spatial_merge_size,
                                           window_size=vc.window_size, patch_size=vc.patch_size)
        anchor = wi.to(dev)  # tower position -> merge group (windows contiguous; frames stay contiguous too)
        x = _take_groups(x, anchor)
        rot = tuple(_take_groups(r, anchor) for r in rot)
        segment["window"] = _group_segments(cu_w, dev)
    return TowerPass(x, rot, anchor, segment)


def _take_groups(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of the merge groups ``idx`` (4 rows each), in that order."""
    return t.view(t.shape[0] // 4, 4, *t.shape[1:])[idx].reshape(idx.numel() * 4, *t.shape[1:])


def run(tower: Tower, pixels, grid_thw, reduction: Reduction | None = None, how: str = "pad"):
    """The tower on ``pixels`` (all images or all videos of a call). Returns ``(merged [K, D], anchor [K],
    deepstack [[K, D], ...])``: merged tokens in placeholder order (items one after another), ``anchor`` = the
    merge group (raster index over all items) whose placeholder each stands at."""
    if how not in ATTENTION:
        raise ValueError(f"tokenprune: attention {how!r} is not one of {ATTENTION}")
    p = start(tower, pixels, grid_thw)
    v = tower.visual
    at = reduction.at if reduction is not None else None
    if at == -1:
        _reduce(p, reduction)
    for i, blk in enumerate(v.blocks):
        layout = p.layout("window" if tower.windowed and i not in tower.full_blocks else "full")
        q, k, vv = qkv(blk, p.x, p.rot)
        if reduction is not None and i in reduction.score_blocks:
            s = _score(reduction.reducer, q, k, layout, blk.attn.scaling)
            p.scores = s if p.scores is None else p.scores + s
        p.x = block(blk, p.x, q, k, vv, layout, how)
        if i in tower.deepstack:
            p.taps.append(v.deepstack_merger_list[tower.deepstack.index(i)](p.x))
        if i == at:
            _reduce(p, reduction)
    merged = v.merger(p.x)
    order = p.anchor.argsort()
    return merged[order], p.anchor[order], [t[order] for t in p.taps]


def _score(reducer, q, k, layout: Segments, scale: float) -> torch.Tensor:
    """The reducer's score of every merge group ``[G]`` (tower order) from one block's q/k: each segment scored on
    its own (padding slots masked as keys and left out as queries), the 4 patches of a group averaged."""
    qb, kb = layout.batch(q).transpose(1, 2), layout.batch(k).transpose(1, 2)  # [S, H, W, d]
    s, w = qb.shape[0], qb.shape[2]
    sizes = layout.valid.float() if layout.padded else None
    state = TokenState(x=q.new_empty(s, w, 0), num_prefix=0, num_input=w, sizes=sizes, padded=layout.padded)
    scores = reducer.score_tokens(state, QK(qb, kb, scale, layout.key_bias(q.dtype)))  # [S, W]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # (a float64 model's scores stay float64)
    return layout.unbatch(scores[..., None])[:, 0].view(-1, 4).mean(1)


def _reduce(p: TowerPass, red: Reduction) -> None:
    """Reduce the merge groups of every item to its ``K`` through the reducer; the pass continues on them."""
    x = p.x
    g, c = x.shape[0] // 4, x.shape[1]
    to_tower = p.anchor.argsort()  # raster group -> tower position (the groups are all still there)
    xr = x.view(g, 4 * c)[to_tower]
    sr = p.scores[to_tower] if p.scores is not None else None
    offsets, off = [], 0
    for grid, _ in red.items:
        offsets.append(off)
        off += math.prod(grid)
    if off != g:
        raise ValueError(f"tokenprune: the items' grids hold {off} merge groups but the tower has {g}")
    buckets: dict = {}
    for i, (grid, keep) in enumerate(red.items):  # items of one grid and count are reduced in one call
        buckets.setdefault((tuple(grid), keep), []).append(i)
    out = [None] * len(red.items)
    for (grid, keep), idx in buckets.items():
        n = math.prod(grid)
        rows = torch.stack([xr[offsets[i]:offsets[i] + n] for i in idx])
        sc = torch.stack([sr[offsets[i]:offsets[i] + n] for i in idx]) if sr is not None else None
        state = red.reducer.select(TokenState.start(rows, 0, grid, track_source=True), keep, sc)
        for b, i in enumerate(idx):
            out[i] = (state.x[b], state.source[b])
    new_x, new_anchor = [], []
    dest = torch.full((g,), -1, dtype=torch.long, device=x.device)  # raster group -> new group (unsorted)
    slot = 0
    for i, (grid, _) in enumerate(red.items):
        xi, src = out[i]
        n, kept = math.prod(grid), xi.shape[0]
        ok = src >= 0
        first = torch.full((kept,), n, dtype=torch.long, device=x.device).scatter_reduce(
            0, src[ok], torch.arange(n, device=x.device)[ok], "amin")
        new_x.append(xi)
        new_anchor.append(first + offsets[i])
        dest[offsets[i]:offsets[i] + n] = torch.where(ok, src + slot, -1)
        slot += kept
    anchor = torch.cat(new_anchor)
    tpos = to_tower[anchor]  # the tower position of each new group's first member
    order = tpos.argsort()
    rank = order.argsort()
    keep_at = tpos[order]
    old_dest = dest[p.anchor]  # per old tower group
    old_dest = torch.where(old_dest >= 0, rank[old_dest.clamp(min=0)], -1)
    p.x = torch.cat(new_x)[order].view(-1, c)
    p.anchor = anchor[order]
    p.rot = tuple(_take_groups(r, keep_at) for r in p.rot)
    p.segment = {name: ids[keep_at] for name, ids in p.segment.items()}
    p.layouts = {}
    p.taps = [_regroup(t, old_dest, slot) for t in p.taps]
    p.scores = None


def _regroup(t: torch.Tensor, dest: torch.Tensor, count: int) -> torch.Tensor:
    """Rows ``t [G, D]`` to ``count`` new rows: each the mean of the rows sent to it by ``dest`` (-1: dropped)."""
    ok = dest >= 0
    acc = t.new_zeros(count, t.shape[1]).index_add_(0, dest[ok], t[ok])
    cnt = torch.bincount(dest[ok], minlength=count).to(t.dtype)
    return acc / cnt.clamp_min(1)[:, None]
