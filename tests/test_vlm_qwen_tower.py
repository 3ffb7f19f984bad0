"""Qwen vision towers reduced INSIDE the tower (vlm/qwen_tower.py): one attention launch per block, kept 2x2 merge
groups keep their rotary rows, windows and images / frames.

References are transformers' own modules: the model's vision blocks called with their own per-window attention loop
(``cu_seqlens``), the rotary rows and ``cu_seqlens`` the unpatched tower hands its blocks, its merger and deepstack
mergers, and transformers' window index. Tiny random configs (4 vision blocks of width 32, patch 2), float64, CPU.
"""
import math

import pytest
import torch

import tokenprune
from tokenprune.patch import get_patch
from tokenprune.reducers.pool import cell_index, pooled_grid
from tokenprune.vlm.qwen_tower import Reduction, Segments, block, qkv, run

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from test_vlm_qwen import IMG, VID, VS, VE, build as build_qwen  # noqa: E402

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
IMAGES = ((1, 8, 12), (1, 6, 10))  # 4x6 and 3x5 merge groups: Qwen2.5-VL's 2x2-group windows of 16, 8 and 4 patches
VIDEO = ((2, 8, 8),)  # 2 temporal steps of 8x8 patches


def build(kind):
    """4 vision blocks. Qwen2.5-VL: windows of 2x2 merge groups, full attention in blocks 1 and 3 (in-tower default:
    after block 1, then a windowed and a full block on the kept groups); Qwen2-VL / Qwen3-VL: default after block 0;
    Qwen3-VL taps deepstack features after blocks 0 (before the reduction) and 2 (after it)."""
    return build_qwen(kind, depth=4, full=(1, 3), deepstack=(0, 2)).double()


@pytest.fixture(scope="module")
def models():
    return {k: build(k) for k in KINDS}


def _pixels(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(math.prod(x) for x in grids), 24, generator=g, dtype=torch.float64)


def _merged(grid):
    t, h, w = grid
    return (h // 2, w // 2) if t == 1 else (t, h // 2, w // 2)


def _prompt(grids, token=IMG, pre=(1, 5), post=(7, 8, 9), per_frame=False):
    """Placeholders per item; ``per_frame`` (Qwen3-VL video): each temporal step its own run after a timestamp."""
    ids = list(pre)
    for i, (t, h, w) in enumerate(grids):
        if per_frame:
            for f in range(t):
                ids += [30 + f, 31, VS] + [token] * (h * w // 4) + [VE]
        else:
            ids += [VS] + [token] * (t * h * w // 4) + [VE]
        ids += [11] if i < len(grids) - 1 else []
    return torch.tensor([ids + list(post)])


def _inputs(grids=IMAGES, video=False, seed=1, **kw):
    token = VID if video else IMG
    ids = _prompt(grids, token, **kw)
    a = dict(input_ids=ids, mm_token_type_ids=(ids == token).int() * (2 if video else 1))
    if video:
        a.update(pixel_values_videos=_pixels(grids, seed), video_grid_thw=torch.tensor(grids),
                 second_per_grid_ts=torch.ones(len(grids)))
    else:
        a.update(pixel_values=_pixels(grids, seed), image_grid_thw=torch.tensor(grids))
    return a


# -- transformers' own tower, run block by block ---------------------------------------------------------------------
def hf_blocks(visual, pixels, grid):
    """What the unpatched tower hands each block: ``{i: (hidden in, cu_seqlens, (cos, sin))}``, and its output."""
    seen = {}

    def record(i):
        def hook(mod, a, kw):
            seen[i] = (a[0], kw["cu_seqlens"], kw["position_embeddings"])
        return hook

    hooks = [blk.register_forward_pre_hook(record(i), with_kwargs=True) for i, blk in enumerate(visual.blocks)]
    try:
        with torch.no_grad():
            out = visual(pixels, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def window_index(visual, grid, kind):
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // 4
    if kind != "qwen2_5_vl":
        return torch.arange(n)
    vc = visual.config
    return get_vision_window_index(grid, spatial_merge_size=2, window_size=vc.window_size, patch_size=vc.patch_size)[0]


def shrink_cu(cu, keep_tower, groups):
    """``cu_seqlens`` of the kept groups (tower positions ``keep_tower``, sorted): each segment keeps its own."""
    lens = (cu[1:] - cu[:-1]).long() // 4
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    assert seg.numel() == groups
    counts = torch.bincount(seg[keep_tower], minlength=lens.numel()) * 4
    return torch.unique_consecutive(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])).to(cu.dtype)


def reference(model, kind, pixels, grid, at, members):
    """The tower with the merge groups reduced after block ``at``: transformers' blocks (per-window attention loop)
    on all groups up to ``at``; then each output group = the mean of its ``members`` (raster group indices over all
    items; one member = pruning), with its first member's rotary rows, window and frame; the remaining blocks on
    those, then the merger. Returns ``(merged [K, D], anchors [K], deepstack)`` in placeholder order."""
    v = model.model.visual
    seen, _ = hf_blocks(v, pixels, grid)
    x, _, rot = seen[0]
    g, c = x.shape[0] // 4, x.shape[1]
    deep = list(getattr(v.config, "deepstack_visual_indexes", None) or []) if kind == "qwen3_vl" else []
    taps = []
    with torch.no_grad():
        for i in range(at + 1):
            x = v.blocks[i](x, cu_seqlens=seen[i][1], position_embeddings=rot)
            if i in deep:
                taps.append(v.deepstack_merger_list[deep.index(i)](x))
        to_tower = window_index(v, grid, kind).argsort()
        members = sorted(members, key=lambda ms: int(to_tower[min(ms)]))
        anchors = torch.tensor([min(ms) for ms in members])
        keep = to_tower[anchors]

        def regroup(t):
            return torch.stack([t.view(g, -1)[to_tower[torch.tensor(ms)]].mean(0) for ms in members])

        x = regroup(x).view(-1, c)
        taps = [regroup(t) for t in taps]
        rot = tuple(r.view(g, 4, -1)[keep].reshape(-1, r.shape[-1]) for r in rot)
        for i in range(at + 1, len(v.blocks)):
            x = v.blocks[i](x, cu_seqlens=shrink_cu(seen[i][1], keep, g), position_embeddings=rot)
            if i in deep:
                taps.append(v.deepstack_merger_list[deep.index(i)](x))
        out = v.merger(x)
    order = anchors.argsort()
    return out[order], anchors[order], [t[order] for t in taps]


def received_topk(model, kind, pixels, grid, at, keeps):
    """cls: per item, the K merge groups whose 4 patches receive the most attention (mean over queries and heads,
    each segment of block ``at`` on its own) from that block's eager attention. Raster indices over all items."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    v = model.model.visual
    seen, _ = hf_blocks(v, pixels, grid)
    x0, _, rot = seen[0]
    with torch.no_grad():
        x = x0
        for i in range(at):
            x = v.blocks[i](x, cu_seqlens=seen[i][1], position_embeddings=rot)
        attn = v.blocks[at].attn
        q, k, _ = attn.qkv(v.blocks[at].norm1(x)).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3) \
            .unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *rot)
    cu = seen[at][1].tolist()
    received = torch.cat([torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.scaling, -1)
                          .mean(1).mean(0) for s, e in zip(cu[:-1], cu[1:])])
    groups = received.view(-1, 4).mean(1)[window_index(v, grid, kind).argsort()]  # raster order
    out, off = [], 0
    for gr, kk in zip(grid.tolist(), keeps):
        n = math.prod(gr) // 4
        out += (groups[off:off + n].topk(kk).indices.sort().values + off).tolist()
        off += n
    return out


def _run_patched(model, grids, video, method, budget, **opts):
    """The adapter's in-tower pass on the call's pixels: ``(merged, anchors, deepstack, adapter)``."""
    inp = _inputs(grids, video)
    pv = inp["pixel_values_videos" if video else "pixel_values"]
    grid = torch.tensor(grids)
    with tokenprune.applied(model, budget=budget, method=method, **opts):
        ad = get_patch(model).adapter
        items = [(_merged(g), ad.kept_count(math.prod(g) // 4, _merged(g))) for g in grids]
        with torch.no_grad():
            out = run(ad.tower, pv, grid, Reduction(ad.reducer, ad.at, items, ad.score_blocks), "pad")
    return (*out, ad, items)


CASES = [(k, "image") for k in KINDS] + [("qwen2_5_vl", "video"), ("qwen3_vl", "video")]


@pytest.mark.parametrize("kind,inp", CASES)
@pytest.mark.parametrize("method", ["cls", "random", "pool"])
def test_in_tower_equals_blocks_run_on_the_kept_groups(models, kind, inp, method):
    """Pruned (cls, random) or pooled (pool) merge groups after block ``at``, then the rest of the tower: equal in
    float64 to transformers' blocks and merger run on exactly those groups with their original rotary rows, windows
    and frames. cls keeps the top-K groups by received attention; pool's groups are its cells (first member's
    place); counts are exact."""
    m = models[kind]
    grids = VIDEO if inp == "video" else IMAGES
    grid = torch.tensor(grids)
    opts = {"block": 1} if method == "pool" else {}
    out, anchor, deep, ad, items = _run_patched(m, grids, inp == "video", method, 0.25, **opts)
    want_at = {"qwen2_5_vl": 1, "qwen2_vl": 0, "qwen3_vl": 0}[kind] if method != "pool" else 1
    assert ad.at == want_at
    pv = _pixels(grids)
    keeps = [k for _, k in items]
    assert out.shape[0] == anchor.shape[0] == sum(keeps)
    if method == "pool":
        members, off = [], 0
        for g, k in items:
            cells = cell_index(g, pooled_grid(g, k))
            members += [(torch.nonzero(cells == c)[:, 0] + off).tolist() for c in range(int(cells.max()) + 1)]
            off += math.prod(g)
    else:
        kept = received_topk(m, kind, pv, grid, ad.at, keeps) if method == "cls" else anchor.tolist()
        if method == "cls":
            assert anchor.tolist() == kept
        members = [[a] for a in kept]
    ref, ref_anchor, ref_deep = reference(m, kind, pv, grid, ad.at, members)
    assert torch.equal(anchor, ref_anchor)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0), (out - ref).abs().max()
    assert len(deep) == len(ref_deep) == (2 if kind == "qwen3_vl" else 0)
    for a, b in zip(deep, ref_deep):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    # the reduction changed the later blocks' input: the unpruned tower's tokens at the same places differ
    full = hf_blocks(m.model.visual, pv, grid)[1].pooler_output
    assert not torch.allclose(out, full[anchor], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_unpruned_tower_equals_transformers(models, kind):
    """No reduction: the tower with one attention launch per block ("pad" and "mask") equals transformers' tower
    (its per-window / per-image loop), images of two sizes and a video, deepstack included."""
    v = models[kind].model.visual
    ad = None
    for grids in (IMAGES, VIDEO):
        grid = torch.tensor(grids)
        pv = _pixels(grids)
        with tokenprune.applied(models[kind], budget=0.5, method="cls"):
            ad = get_patch(models[kind]).adapter
            ref = hf_blocks(v, pv, grid)[1]
            for how in ("pad", "mask"):
                with torch.no_grad():
                    out, anchor, deep = run(ad.tower, pv, grid, None, how)
                assert torch.equal(anchor, torch.arange(out.shape[0]))
                assert torch.allclose(out, ref.pooler_output, atol=1e-12, rtol=0)
                for a, b in zip(deep, getattr(ref, "deepstack_features", None) or []):
                    assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lengths", [None, [4, 12, 8, 16, 4]])
@pytest.mark.parametrize("how", ["pad", "mask"])
def test_one_launch_attention_equals_the_per_window_loop(models, lengths, how):
    """A windowed block of Qwen2.5-VL: one attention launch over all windows (uneven windows of 16, 8 and 4 patches,
    or the uneven segments left after pruning) equals transformers' block with its loop over ``cu_seqlens``."""
    m = models["qwen2_5_vl"]
    v = m.model.visual
    grid = torch.tensor(IMAGES)
    seen, _ = hf_blocks(v, _pixels(IMAGES), grid)
    x, cu, rot = seen[0]  # block 0 is windowed
    if lengths is not None:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        x, rot = x[:cu[-1]], tuple(r[:cu[-1]] for r in rot)
    lens = (cu[1:] - cu[:-1]).tolist()
    assert len(set(lens)) > 1  # uneven: padded batch with a key mask / a block-diagonal mask
    blk = v.blocks[0]
    with torch.no_grad():
        want = blk(x, cu_seqlens=cu, position_embeddings=rot)
        q, k, vv = qkv(blk, x, rot)
        got = block(blk, x, q, k, vv, Segments(lens, x.device), how)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def _lm_input(model, **inp):
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append((kw["inputs_embeds"], kw["position_ids"][-3:], kw.get("tokenprune"))),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inp)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("kind,inp", CASES)
def test_lm_receives_the_kept_tokens_at_their_positions(models, kind, inp):
    """The LM input holds exactly K tokens per item, the in-tower features (reference: transformers' blocks on the
    kept groups) at the unpruned (t, h, w) M-RoPE positions of their placeholders; text keeps its positions."""
    m = models[kind]
    video = inp == "video"
    grids = VIDEO if video else IMAGES
    a = _inputs(grids, video, post=(7, 8, 9, 10), per_frame=video and kind == "qwen3_vl")
    token = VID if video else IMG
    emb_ref, pos_ref, _ = _lm_input(m, **a)
    out, anchor, _, ad, items = _run_patched(m, grids, video, "cls", 0.25)
    ref, ref_anchor, ref_deep = reference(m, kind, _pixels(grids), torch.tensor(grids), ad.at,
                                          [[i] for i in anchor.tolist()])
    with tokenprune.applied(m, budget=0.25, method="cls"):
        emb, pos, deep = _lm_input(m, **a)
    if kind == "qwen3_vl":  # the deepstack features of exactly the kept tokens go to the text model
        assert len(deep.embeds) == len(ref_deep) == 2
        for d, r in zip(deep.embeds, ref_deep):
            assert torch.allclose(d, r, atol=1e-10, rtol=0)
    ids = a["input_ids"][0]
    slots = torch.nonzero(ids == token)[:, 0]  # placeholder columns of the unpruned prompt
    k = sum(kk for _, kk in items)
    assert emb.shape[1] == ids.shape[0] - (slots.numel() - k)
    dropped = torch.zeros(ids.shape[0], dtype=torch.bool)
    dropped[slots] = True
    dropped[slots[ref_anchor]] = False
    kept_cols = torch.nonzero(~dropped)[:, 0]  # the unpruned prompt's columns the pruned one keeps
    assert kept_cols.numel() == emb.shape[1]
    assert torch.equal(pos[:, 0], pos_ref[:, 0, kept_cols])  # every column at its unpruned (t, h, w) position
    is_vis = torch.isin(kept_cols, slots)
    assert torch.allclose(emb[0, is_vis], ref, atol=1e-10, rtol=0)
    assert torch.equal(emb[0, ~is_vis], emb_ref[0, kept_cols[~is_vis]])


def test_left_padded_batch_of_two_image_sizes_equals_each_alone(models):
    """Qwen2.5-VL, cls in the tower (after block 1; a windowed and a full block on the kept groups): a left-padded
    batch of two prompts with images of different sizes (uneven windows) gives each prompt what it gives alone."""
    m = models["qwen2_5_vl"]
    a = _inputs((IMAGES[0],), seed=1, pre=(1, 5, 6, 7, 8, 9))
    b = _inputs((IMAGES[1],), seed=2, pre=(1, 2))
    pad = a["input_ids"].shape[1] - b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], torch.cat([torch.zeros(1, pad, dtype=torch.long), b["input_ids"]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    both = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
                mm_token_type_ids=(ids == IMG).int())
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with tokenprune.applied(m, budget=0.25, method="cls"):
        out = m.generate(**both, **kw)
        one = m.generate(**a, **kw)
        two = m.generate(**b, **kw)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    assert torch.equal(out.sequences[0, ids.shape[1]:], one.sequences[0, la:])
    assert torch.equal(out.sequences[1, ids.shape[1]:], two.sequences[0, lb:])
    for s, s1, s2 in zip(out.scores, one.scores, two.scores):
        assert torch.allclose(s[0], s1[0], atol=1e-9) and torch.allclose(s[1], s2[0], atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["cls", "random", "pool"])
def test_budget_one_is_the_unpatched_model_and_remove_is_exact(models, kind, method):
    m = models[kind]
    a = _inputs()
    gen = dict(max_new_tokens=3, do_sample=False)
    ref = m.generate(**a, **gen)
    with tokenprune.applied(m, budget=1.0, method=method):
        assert torch.equal(m.generate(**a, **gen), ref)
    with tokenprune.applied(m, budget=0.25, method=method):
        pruned = m.generate(**a, **gen)
    assert pruned.shape == ref.shape
    assert torch.equal(m.generate(**a, **gen), ref)


def test_layers_choose_the_block_and_bad_values_are_refused(models):
    m = models["qwen2_5_vl"]
    for opts, at, scored in (({}, 1, (1,)), ({"layers": [2]}, 2, (2,)), ({"variant": "sum"}, 1, (0, 1))):
        with tokenprune.applied(m, budget=0.25, method="cls", **opts):
            ad = get_patch(m).adapter
            assert (ad.at, ad.score_blocks) == (at, scored)
    for method, opts, at in (("random", {}, 1), ("random", {"layers": [-1]}, -1), ("pool", {}, -1),
                             ("pool", {"block": 3}, 3), ("apet", {"k": 2}, None)):
        with tokenprune.applied(m, budget=0.25, method=method, **opts):
            assert get_patch(m).adapter.at == at
            m(**_inputs())  # runs
    with pytest.raises(ValueError, match="outside"):
        tokenprune.apply(m, budget=0.25, method="cls", layers=[4])
    with pytest.raises(ValueError, match="outside"):
        tokenprune.apply(m, budget=0.25, method="pool", block=4)
    assert not tokenprune.is_applied(m)
    with tokenprune.applied(m, budget=0.25, method="cls"):
        get_patch(m).adapter.attention = "loop"
        with pytest.raises(ValueError, match="attention 'loop'"):
            m(**_inputs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("how", ["pad", "mask", "varlen"])
def test_one_launch_tower_on_cuda_fp16(how):
    """On the GPU in fp16: each attention layout gives transformers' tower output (its per-window loop)."""
    m = build("qwen2_5_vl").to("cuda", torch.float16)
    grid = torch.tensor(IMAGES, device="cuda")
    pv = _pixels(IMAGES).to("cuda", torch.float16)
    with tokenprune.applied(m, budget=0.5, method="cls"), torch.no_grad():
        ad = get_patch(m).adapter
        want = m.model.visual(pv, grid_thw=grid).pooler_output.float()
        got = run(ad.tower, pv, grid, None, how)[0].float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
