"""Which rotary position should a merged token carry? Measured on real merge groups.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/rope_positions.py --out docs/results/rope_positions   # CPU, minutes
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/rope_positions.py --out /tmp/rp --smoke              # < 1 minute

No RoPE model with trained weights is available offline, so the merge groups come from the real ViT-S/14 CIFAR-10
classifier (``../shared/assets/vit-s14-cifar10``, absolute positions) running tokenprune's ``merge`` (ToMe) on
real CIFAR-10 test images (upsampled), and the rotary embeddings are the real ones of timm's RoPE ViT-B/16 models,
built by timm itself with their own settings: ``eva02_base_patch16_clip_224`` (``RotaryEmbeddingCat``, index grid,
temperature 10000, ``ref_feat_shape`` 16 x 16), ``vit_base_patch16_rope_224`` (``RotaryEmbeddingCat``, index grid,
temperature 100, xy indexing) and ``vit_base_patch16_dinov3`` (``RotaryEmbeddingDinoV3``, centred coordinates in
[-1, 1], periods 100 ** (2 i / 32)). Each is asked (``model._pos_embed``, what the model itself uses in a forward)
for the table of the grid the merge groups live on: 16 x 16 at the classifier's 224 px (what the B/16 models use
for a 256 px input) and 14 x 14 with ``--sizes 196`` (the B/16 models' own 224 px grid; the classifier's position
embedding is resampled by timm). Head dim 64 (32 rotation pairs) for all three.

Per merge stage the recorded source maps give every token's group of input patches (all of size 1, so
"size-weighted" = the plain mean over the group's patches). For every merged token (two or more patches), three
positions (grid coordinates, patch units) are compared:

  (a) ``dest``     ToMe's destination: the patch that was never merged away (at each bipartite step the B token
                   whose row the merged token keeps, followed back through the stages);
  (b) ``nearest``  tokenprune's current choice, ``TokenState.positions()``: the group's patch nearest to the
                   centroid (ties: lowest index) -- computed by the library's own code on the recorded map;
  (c) ``centroid`` the exact (fractional) centroid; its rotary embedding is evaluated at fractional coordinates
                   with the same coordinate map and frequencies (``rope_angles``; checked here against timm's table
                   on the integer grid, and against timm's ``apply_rot_embed_cat`` for the logits);
  reference: ``best_row`` the grid position (any patch of the grid) whose rotary phasors e^{i theta(p)} are
                   nearest to the mean phasor of the group's patches: for isotropic content (below) the best any
                   table-row choice can do, per rope (not a practical rule: it depends on the frequencies).

Metrics, per merged group G with patches at p_i (i in G) and chosen position p*:

  (i)  ``dist``: |p* - mean_i p_i| in patch units (Euclidean on (row, column)); mean and p95 over groups.
  (ii) ``logit``: the rotary logit of a query at grid position a and a key at b with content q, k (one head) is
       l(a, b) = (R(a) q) . (R(b) k) = Re sum_c conj(Q_c) K_c e^{i (theta_c(b) - theta_c(a))}, with Q_c, K_c the
       rotation pairs of q, k as complex numbers and theta_c the rope's angle of pair c. For every query position
       a of the grid (all of them) and K content draws (q, k), the error of a choice is
           e(a) = | l(a, p*) - mean_i l(a, p_i) |
       i.e. how far the merged key's logit is from the mean of the logits its patches would have had with the same
       content (only the position effect: the content is shared, so (a)/(b)/(c) see the same content mixing).
       Reported relative to the logit scale S = RMS of l(a, b) over all grid pairs (a, b) and the K draws:
       per group the mean of e(a) / S over a and the draws; then mean and p95 over groups.
       Content: ``random`` = q, k independent and uniform on the unit sphere of R^64; ``vits`` = real q, k rows
       of the ViT-S (block ``--qk-block`` of the unpatched model, random head / image / tokens, unit-normalised;
       that model has no RoPE, so its q, k are "key-like" content, not a RoPE model's).
       For isotropic content the RMS of e over draws is the same for every a and proportional to
       |e^{i theta(p*)} - mean_i e^{i theta(p_i)}|: to first order in the group's spread the centroid minimises it.

Groups are pooled two ways: ``last`` = the groups of the final source map (those the last block runs on) and
``blocks`` = every stage's groups, each counted once per block that runs on them (the default schedule merges
after blocks 0..10, so blocks 1..11 each see one stage). Only merged groups (>= 2 patches) are counted; a single
patch has the same position under every choice.

Writes ``rope_positions.json`` (every number, with the command and versions) and ``rope_positions.md`` to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import tokenprune
from tokenprune import data
from tokenprune.models import load_timm
from tokenprune.reducers.merge import Merge
from tokenprune.registry import register
from tokenprune.state import TokenState

ROPES = ("eva02_base_patch16_clip_224", "vit_base_patch16_rope_224", "vit_base_patch16_dinov3")
CHOICES = ("dest", "nearest", "centroid", "best_row")
STAGES = "rope_positions_stages"  # key of the forward's own state.scratch
POOLINGS = {"last": "Groups of the final source map (the last block runs on them)",
            "blocks": "Every stage's groups, once per block that runs on them"}


@register("merge_recorded")
@dataclass
class RecordedMerge(Merge):
    """tokenprune's ``merge``, unchanged, that also keeps each stage's source maps in the forward's state.scratch."""

    def reduce(self, state, stage, qk):
        before, n_before = state.source.clone(), state.num_tokens
        if n_before - stage.keep > n_before // 2:
            raise RuntimeError("rope_positions: a stage merged more than half the tokens (several bipartite rounds); "
                               "the destination of each group is only recorded for single rounds")
        state = super().reduce(state, stage, qk)
        state.scratch.setdefault(STAGES, []).append((stage.block, before, n_before, state.source.clone(),
                                                     state.num_tokens))
        return state


# -- rotary embeddings at arbitrary coordinates --------------------------------------------------------------
@dataclass
class Rope:
    name: str
    grid: tuple[int, int]
    table: torch.Tensor  # timm's own [N0, 2 dim] (sin, cos) table for the grid
    half: bool  # rotate-half layout (pairs c, c + C) vs interleaved (2c, 2c + 1)
    freq: torch.Tensor  # [C / 2] float64, angle per unit of coordinate
    kind: str  # "index" | "pixel" | "centered"
    offset: float
    xy: bool  # coordinate channels (column, row) instead of (row, column)
    ref: tuple | None  # ref_feat_shape (EVA's rescale), in the grid's (row, column) order
    denom: tuple  # "centered" normalisation per axis (row, column)


def build_rope(name: str, grid: tuple[int, int]) -> Rope:
    """The rotary embedding of timm model ``name`` (built by timm, depth 1: rope does not depend on depth) for an
    input of ``grid`` patches, with its settings read off timm's module."""
    import timm

    patch = 16
    m = timm.create_model(name, pretrained=False, depth=1, img_size=(grid[0] * patch, grid[1] * patch)).eval()
    with torch.no_grad():
        _, table = m._pos_embed(m.patch_embed(torch.zeros(1, 3, grid[0] * patch, grid[1] * patch)))
    r = m.rope
    cls = type(r).__name__
    xy = getattr(r, "grid_indexing", "ij") == "xy"
    if cls == "RotaryEmbeddingDinoV3":
        freq = 2 * math.pi / r.periods.to(torch.float64)
        kind, ref = "centered", None
        mode = r.normalize_coords
        denom = {"separate": grid, "max": (max(grid),) * 2, "min": (min(grid),) * 2}[mode]
    elif cls == "RotaryEmbeddingCat":
        bands = r.bands if getattr(r, "bands", None) is not None else r._compute_bands()
        freq = bands.to(torch.float64)
        kind = getattr(r, "grid_type", None) or ("pixel" if r.in_pixels else "index")
        ref = tuple(r.ref_feat_shape) if r.ref_feat_shape is not None else None
        mode = getattr(r, "normalize_coords", "separate")
        denom = {"separate": grid, "max": (max(grid),) * 2, "min": (min(grid),) * 2}[mode]
    else:
        raise ValueError(f"rope_positions: {name} has {cls}; only RotaryEmbeddingCat / RotaryEmbeddingDinoV3")
    if ref is not None and xy:  # timm swaps ref_feat_shape with the grid for xy indexing; keep (row, column) order
        ref = ref[::-1]
    rope = Rope(name, grid, table.detach().to(torch.float64).reshape(-1, table.shape[-1]),
                bool(getattr(r, "rotate_half", False)), freq, kind, float(r.grid_offset), xy, ref, tuple(denom))
    check_rope(rope)
    return rope


def rope_angles(rope: Rope, coords: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` rotation angles at ``coords`` ``[..., 2]`` (row, column; fractional allowed), float64, in the
    order of timm's table: first axis' frequencies, then the second's (timm's ``_build_grid`` coordinate map)."""
    axes = []
    for ax in range(2):
        u, s = coords[..., ax].to(torch.float64), rope.grid[ax]
        if rope.kind == "index":
            t = u + rope.offset
        elif rope.kind == "pixel":
            t = -1.0 + 2.0 * u / max(s - 1, 1)
        else:
            t = (u + 0.5 + rope.offset) / rope.denom[ax]
        if rope.ref is not None:
            t = t / s * rope.ref[ax]
        if rope.kind == "centered":
            t = 2.0 * t - 1.0
        axes.append(t)
    if rope.xy:
        axes = axes[::-1]
    return torch.cat([a[..., None] * rope.freq for a in axes], -1)


def phasors(rope: Rope, coords: torch.Tensor) -> torch.Tensor:
    return torch.polar(torch.ones((), dtype=torch.float64), rope_angles(rope, coords))


def pairs(rope: Rope, v: torch.Tensor) -> torch.Tensor:
    """``[..., 2C]`` vectors -> ``[..., C]`` complex rotation pairs in the rope's layout."""
    c = v.shape[-1] // 2
    re, im = (v[..., :c], v[..., c:]) if rope.half else (v[..., 0::2], v[..., 1::2])
    return torch.complex(re.to(torch.float64), im.to(torch.float64))


def grid_coords(grid) -> torch.Tensor:
    idx = torch.arange(grid[0] * grid[1])
    return torch.stack([idx // grid[1], idx % grid[1]], -1).to(torch.float64)


def check_rope(rope: Rope) -> None:
    """Our angles reproduce timm's table on the integer grid, and our complex logits timm's rotated dot products."""
    from timm.layers import apply_rot_embed_cat

    ang = rope_angles(rope, grid_coords(rope.grid))
    lay = (lambda a: torch.cat([a, a], -1)) if rope.half else (lambda a: a.repeat_interleave(2, -1))
    mine = torch.cat([lay(ang.sin()), lay(ang.cos())], -1)
    err = (mine - rope.table).abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"rope_positions: our {rope.name} angles differ from timm's table by {err:.2e}")
    g = torch.Generator().manual_seed(0)
    d = rope.table.shape[-1] // 2
    q, k = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(8, d, generator=g, dtype=torch.float64)
    a, b = torch.randint(0, len(rope.table), (2, 8), generator=g)
    ref = (apply_rot_embed_cat(q, rope.table[a], half=rope.half)
           * apply_rot_embed_cat(k, rope.table[b], half=rope.half)).sum(-1)
    e = phasors(rope, grid_coords(rope.grid))
    ours = (pairs(rope, q).conj() * pairs(rope, k) * e[b] * e[a].conj()).real.sum(-1)
    err = ((ours - ref).abs() / (q.norm(dim=-1) * k.norm(dim=-1))).max().item()  # timm's table is float32
    if err > 1e-5:
        raise AssertionError(f"rope_positions: our {rope.name} logits differ from timm's rotated q.k by {err:.2e}")


# -- merge groups from real forwards -------------------------------------------------------------------------
@dataclass
class Groups:
    """Merged groups (>= 2 patches) of one pooling, flattened over images and stages."""

    image: torch.Tensor  # [G] image index
    members: torch.Tensor  # [G, N0] bool, the group's input patches
    dest: torch.Tensor  # [G] input patch of ToMe's destination
    nearest: torch.Tensor  # [G] input patch tokenprune carries (TokenState.positions)
    weight: torch.Tensor  # [G] blocks that run on this group


def stage_groups(before, n_before, after, n_after, dest_prev, p, grid, blocks):
    """One stage: the new tokens' ToMe destinations (followed back to an input patch), the library's positions,
    and the merged groups (``blocks``: how many blocks run on them)."""
    b, n0 = after.shape
    old_to_new = torch.empty(b, p + n_before, dtype=torch.long)
    old_to_new.scatter_(1, before, after)  # merging drops nothing: every old token holds an input patch
    new_of = old_to_new[:, p:] - p  # [B, n_before]
    off = torch.arange(n_before)
    is_b = off % 2 == 1  # ops.bipartite_merge: non-prefix rows alternate A (even) / B (odd)
    n_unm = n_after - int(is_b.sum())
    # its output order is [prefix, kept A, B]: B tokens keep their rows, in order, after the kept A tokens
    if not torch.equal(new_of[:, is_b], (n_unm + torch.arange(int(is_b.sum()))).expand(b, -1)):
        raise AssertionError("rope_positions: the merge output order is not [prefix, kept A, B]")
    surv = torch.full((b, n_after + 1), -1, dtype=torch.long)
    surv.scatter_(1, new_of[:, is_b], off[is_b].expand(b, -1))
    a_new = new_of[:, ~is_b]
    surv.scatter_(1, torch.where(a_new < n_unm, a_new, n_after), off[~is_b].expand(b, -1))
    surv = surv[:, :n_after]
    if (surv < 0).any():
        raise AssertionError("rope_positions: a merged token without a destination")
    dest = dest_prev.gather(1, surv)  # [B, n_after] input patch of each token's destination
    st = TokenState(x=torch.zeros(b, p + n_after, 1), num_prefix=p, num_input=n0, grid=grid, source=after,
                    input_grid=grid)
    nearest = st.positions()
    tok = after - p
    count = torch.zeros(b, n_after, dtype=torch.long).scatter_add_(1, tok, torch.ones_like(tok))
    img, j = (count >= 2).nonzero(as_tuple=True)
    members = tok[img] == j[:, None]
    rows = torch.arange(len(img))
    if not (members[rows, dest[img, j]].all() and members[rows, nearest[img, j]].all()):
        raise AssertionError("rope_positions: a destination or nearest patch outside its group")
    weight = torch.full((len(img),), blocks, dtype=torch.long)
    return dest, Groups(img, members, dest[img, j], nearest[img, j], weight)


def cat_groups(gs: list[Groups]) -> Groups:
    return Groups(*(torch.cat([getattr(g, f) for g in gs]) for f in ("image", "members", "dest", "nearest", "weight")))


def merge_groups(model, images: torch.Tensor, budget: float, batch: int):
    """Run ``merge`` at ``budget`` on ``images``; groups of the final map and of every stage, and top-1 labels."""
    tokenprune.apply(model, budget, "merge_recorded")
    p = model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    depth = len(model.blocks)
    last, every, preds = [], [], []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = images[i:i + batch]
                feats, state = tokenprune.features(model, x)
                preds.append(model.forward_head(feats, pre_logits=False).argmax(-1))
                stages = state.scratch[STAGES]
                dest = torch.arange(state.num_input).expand(len(x), -1)
                for s, (block, before, n_before, after, n_after) in enumerate(stages):
                    # a stage after block j serves blocks j + 1 .. (the next stage's block, or the last block)
                    blocks = (stages[s + 1][0] if s + 1 < len(stages) else depth - 1) - block
                    dest, g = stage_groups(before, n_before, after, n_after, dest, p, grid, blocks)
                    g.image += i
                    if blocks > 0:
                        every.append(g)
                    if s == len(stages) - 1:  # the final map, each group once
                        last.append(Groups(g.image, g.members, g.dest, g.nearest, torch.ones_like(g.weight)))
    finally:
        tokenprune.remove(model)
    return cat_groups(last), cat_groups(every), torch.cat(preds)


# -- metrics -------------------------------------------------------------------------------------------------
def content_random(k: int, d: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    q, kk = torch.randn(k, d, generator=gen, dtype=torch.float64), torch.randn(k, d, generator=gen, dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True), kk / kk.norm(dim=-1, keepdim=True)


def content_vits(model, images: torch.Tensor, block: int, k: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` (q, k) pairs of the unpatched ViT-S at ``block``: random image, head, query token, key token."""
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for blk in model.blocks[:block]:
            x = blk(x)
        attn = model.blocks[block].attn
        b, n, c = x.shape
        qkv = attn.qkv(model.blocks[block].norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, kk = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, N, d]
    p = model.num_prefix_tokens
    i = torch.randint(0, b, (k,), generator=gen)
    h = torch.randint(0, attn.num_heads, (k,), generator=gen)
    tq, tk = torch.randint(p, n, (2, k), generator=gen)
    q, kk = q[i, h, tq].to(torch.float64), kk[i, h, tk].to(torch.float64)
    return q / q.norm(dim=-1, keepdim=True), kk / kk.norm(dim=-1, keepdim=True)


def quantiles(v: torch.Tensor, w: torch.Tensor) -> dict:
    v = v.repeat_interleave(w)
    if v.numel() == 0:
        return {"mean": float("nan"), "p95": float("nan")}
    return {"mean": v.mean().item(), "p95": torch.quantile(v, 0.95).item()}


def measure(rope: Rope, groups: Groups, contents: dict, chunk: int = 1024) -> dict:
    coords = grid_coords(rope.grid)  # [N0, 2]
    e_grid = phasors(rope, coords)  # [N0, C]
    qre = torch.cat([e_grid.real, e_grid.imag], -1).T.to(torch.float32)  # [2C, N0]: Re(w conj e) = wr er + wi ei
    zs, scales = {}, {}
    for cname, (q, k) in contents.items():
        zs[cname] = pairs(rope, q).conj() * pairs(rope, k)  # [K, C]
        # the logit scale: RMS of l(a, b) = Re sum_c z_c e_c(b) conj(e_c(a)) over every grid pair and draw
        sq = sum(((e_grid.conj() * zk) @ e_grid.T).real.square().mean() for zk in zs[cname]) / len(zs[cname])
        scales[cname] = sq.sqrt().item()
    size, dist = [], {ch: [] for ch in CHOICES}
    logit = {c: {ch: [] for ch in CHOICES} for c in contents}
    for s in range(0, len(groups.weight), chunk):
        mem = groups.members[s:s + chunk].to(torch.float64)
        n = mem.sum(-1, keepdim=True)
        centroid = mem @ coords / n
        e_mean = (mem.to(torch.complex128) @ e_grid) / n  # mean phasor of the group's patches
        best = (e_mean @ e_grid.conj().T).real.argmax(-1)  # the grid row nearest to it
        chosen = {"dest": coords[groups.dest[s:s + chunk]], "nearest": coords[groups.nearest[s:s + chunk]],
                  "centroid": centroid, "best_row": coords[best]}
        size.append(n[:, 0])
        for ch, pos in chosen.items():
            dist[ch].append((pos - centroid).norm(dim=-1))
            diff = phasors(rope, pos) - e_mean  # [g, C]
            for cname, z in zs.items():
                w = (z[None] * diff[:, None]).to(torch.complex64)  # [g, K, C]
                err = torch.cat([w.real, w.imag], -1) @ qre  # [g, K, N0]: l(a, p*) - mean_i l(a, p_i)
                logit[cname][ch].append(err.abs().mean((1, 2)).to(torch.float64) / scales[cname])
    w = groups.weight
    return {"groups": len(w), "group_blocks": int(w.sum()), "mean_size": quantiles(torch.cat(size), w)["mean"],
            "dist": {ch: quantiles(torch.cat(v), w) for ch, v in dist.items()},
            "logit": {c: {"scale": scales[c], **{ch: quantiles(torch.cat(v), w) for ch, v in d.items()}}
                      for c, d in logit.items()}}


# -- run -----------------------------------------------------------------------------------------------------
def fmt(d: dict) -> str:
    return f"{d['mean']:.3f} / {d['p95']:.3f}"


def tables(rows: list[dict], pooling: str) -> list[str]:
    head = ("| grid | budget | rope | groups | mean size | " + " | ".join(CHOICES) + " |",
            "|---|---|---|---|---|" + "---|" * len(CHOICES))
    what = [("distance to the centroid, patches", lambda m: m["dist"]),
            ("logit error / logit scale, random unit q, k", lambda m: m["logit"]["random"]),
            ("logit error / logit scale, ViT-S q, k", lambda m: m["logit"]["vits"])]
    out = []
    for title, get in what:
        out += [f"**{title}** (pooling `{pooling}`; mean / p95 over merged groups)", "", *head]
        for r in rows:
            m = r[pooling]
            out.append(f"| {r['grid']} | {r['budget']} | {r['rope']} | {m['groups']} | {m['mean_size']:.2f} | "
                       + " | ".join(fmt(get(m)[ch]) for ch in CHOICES) + " |")
        out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=256, help="CIFAR-10 test images (spread over the classes)")
    ap.add_argument("--budgets", default="0.5,0.25,0.1")
    ap.add_argument("--sizes", default="224,196", help="classifier input sizes (224: 16 x 16 grid, 196: 14 x 14)")
    ap.add_argument("--draws", type=int, default=16, help="content draws (q, k) per content type")
    ap.add_argument("--qk-block", type=int, default=6, help="ViT-S block whose q, k give the 'vits' content")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="8 images, one size, budgets 0.5 / 0.1, 4 draws")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.images, args.sizes, args.budgets, args.draws = 8, "224", "0.5,0.1", 4
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pil, labels, _ = data.load_image_folder(data.default_asset("cifar10", "cifar10_jpeg_test.tar.gz"),
                                            limit=args.images, seed=args.seed)
    labels = torch.tensor(labels)
    rows = []
    for size in sizes:
        model = load_timm("vit_small_patch14_dinov2", weights=data.default_asset("vit-s14-cifar10"),
                          img_size=size).eval()
        grid = tuple(model.patch_embed.grid_size)
        images = data.to_tensor(pil, size=size)
        gen = torch.Generator().manual_seed(args.seed)
        d = 64
        contents = {"random": content_random(args.draws, d, gen),
                    "vits": content_vits(model, images[:16], args.qk_block, args.draws, gen)}
        ropes = [build_rope(name, grid) for name in ROPES]
        for budget in budgets:
            last, every, pred = merge_groups(model, images, budget, args.batch)
            top1 = (pred == labels).float().mean().item()
            for rope in ropes:
                row = {"rope": rope.name, "size": size, "grid": f"{grid[0]}x{grid[1]}", "budget": budget,
                       "top1_merge": top1,
                       "last": measure(rope, last, contents), "blocks": measure(rope, every, contents)}
                rows.append(row)
                lg = row["blocks"]["logit"]["random"]
                print(f"{size}px {rope.name:30s} budget {budget}: dist nearest {fmt(row['blocks']['dist']['nearest'])}"
                      f" | logit dest {fmt(lg['dest'])} nearest {fmt(lg['nearest'])} centroid {fmt(lg['centroid'])}"
                      f"  ({time.time() - t0:.0f} s)", flush=True)
    import timm

    meta = {"command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
            "images": args.images, "draws": args.draws, "qk_block": args.qk_block, "seed": args.seed,
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "seconds": round(time.time() - t0, 1)}
    (out / "rope_positions.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# Rotary position of a merged token: dest / nearest / centroid / best_row", "",
          f"`{meta['command']}` ({args.images} CIFAR-10 test images, {args.draws} content draws, "
          f"timm {meta['timm']}, {meta['seconds']} s)", ""]
    for pooling in ("last", "blocks"):
        md += [f"## {POOLINGS[pooling]}", ""] + tables(rows, pooling)
    (out / "rope_positions.md").write_text("\n".join(md))
    print(f"wrote {out / 'rope_positions.json'} and {out / 'rope_positions.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
