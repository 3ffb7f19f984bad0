"""Triton kernels of ToMe's bipartite merging: the size-weighted merged rows in one pass (``merge_rows``, also the row
gather ``gather_rows``), and the whole merge step in one launch, two at large batches, four for long inputs (one at
batch 1) (``merge_step``); the matching (``bipartite_best``) and the long inputs' ranking are in ``match.py``, the
long inputs' plan, row gather and one-launch kernel in ``merge_long.py``.
References: ``reference.bipartite_best`` / ``merge_rows`` / ``gather_rows`` / ``merge_step``; NOTES.md sections 3, 6.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (LaunchGroup, LaunchPlan, cached_plan, _alloc, _argmax_update, _at, _cdiv, _column_groups,
                             _compose_source, _copy_prefix, _cosine_tile, _exact_lowp, _interpreted, _metric_rows,
                             _num_sms, _p2, _last_contiguous, _rank_desc, _sig, _sizes_at, _tokens_at,
                             _top_k_mask_count, _unit_rows, _in_vectors, _workspace, fast)
from .match import _bm_best, _bm_tiles, _merge_rank
from .merge_long import _merge_gather, _merge_long, _merge_plan


# ---------------------------------------------------------------------------------------------------
# 2. merged rows: one pass over the tokens that build the output (gather + size-weighted scatter-reduce)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _merge_rows(x_ptr, s_ptr, prim_ptr, start_ptr, cnt_ptr, mem_ptr, o_ptr, NOUT, R, C,
                sxb, sxn, ssb, sob, son,
                HAS_SIZES: tl.constexpr, HAS_MEMBERS: tl.constexpr, PRIM_IN_SUM: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0)
    b = (row // NOUT).to(tl.int64)
    o = row % NOUT
    pr = tl.load(prim_ptr + row)
    if HAS_MEMBERS:
        st = tl.load(start_ptr + row)
        cnt = tl.load(cnt_ptr + row)
    for c0 in range(0, C, BC):
        offs = c0 + tl.arange(0, BC)
        cm = offs < C
        xp = tl.load(x_ptr + b * sxb + pr * sxn + offs, mask=cm, other=0.0)
        res = xp.to(tl.float32)
        if HAS_MEMBERS:
            if cnt > 0:
                if HAS_SIZES:
                    sp = tl.load(s_ptr + b * ssb + pr).to(tl.float32)
                else:
                    sp = pr.to(tl.float32) * 0.0 + 1.0
                if not PRIM_IN_SUM:
                    sp = sp * 0.0
                acc = res * sp
                tot = sp
                for i in range(0, cnt):
                    mi = tl.load(mem_ptr + b * R + st + i)
                    if HAS_SIZES:
                        si = tl.load(s_ptr + b * ssb + mi).to(tl.float32)
                    else:
                        si = mi.to(tl.float32) * 0.0 + 1.0
                    acc += si * tl.load(x_ptr + b * sxb + mi * sxn + offs, mask=cm, other=0.0).to(tl.float32)
                    tot += si
                res = tl.where(tot > 0, acc / tl.maximum(tot, 1e-30), res)
        tl.store(o_ptr + b * sob + o * son + offs, res.to(o_ptr.dtype.element_ty), mask=cm)


def merge_rows(x, sizes, prim, members=None, owner=None, include_prim: bool = True):
    """Size-weighted merged rows ``[B, len(prim), C]``; see ``reference.merge_rows``."""
    bsz, t, c = x.shape
    n_out = prim.shape[1]
    r = 0 if members is None else members.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    prim32 = prim.to(torch.int32).contiguous()
    if r:
        order = owner.argsort(dim=1, stable=True)
        mem = members.gather(1, order).to(torch.int32).contiguous()
        cnt = torch.zeros((bsz, n_out), device=x.device, dtype=torch.int32)
        cnt.scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.int32))
        start = (cnt.cumsum(1, dtype=torch.int32) - cnt).contiguous()
    else:
        mem = cnt = start = prim32  # not read
    out = _alloc((bsz, n_out, c), x.device, x.dtype)
    s = (sizes if sizes.stride(1) == 1 else sizes.contiguous()) if sizes is not None else x
    ssb = s.stride(0) if sizes is not None else 0
    fast(_merge_rows)[(bsz * n_out,)](x, s, prim32, start, cnt, mem, out, n_out, max(r, 1), c,
                                x.stride(0), x.stride(1), ssb, out.stride(0), out.stride(1),
                                HAS_SIZES=sizes is not None, HAS_MEMBERS=r > 0, PRIM_IN_SUM=include_prim,
                                BC=min(1024, _p2(c)), num_warps=4)
    return out


def gather_rows(x, rows):
    """``out[b, o] = x[b, rows[b, o]]`` in one pass (16-byte row copies)."""
    return merge_rows(x, None, rows)


# ---------------------------------------------------------------------------------------------------
# 3. the whole bipartite merge step in one launch (one program per sample; up to 256 tokens), or two at
#    large batches (the matching, then the row gather); NOTES.md sections 3 and 6, sessions 4-8
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _merge_match(m_ptr, s_ptr, bst_ptr, b, g, G, P, NA, NB, smb, smn, smh, H: tl.constexpr, ssb, offs_a, offs_d, am,
                 dm, sa, row_a, prm, PADDED: tl.constexpr, IS_F32: tl.constexpr, NAP: tl.constexpr, BT: tl.constexpr,
                 PERM: tl.constexpr, UNROLL: tl.constexpr, R, RANK: tl.constexpr):
    # -- matching: cosine similarity in the metric dtype, best B partner (lowest index on ties),
    #    B in column tiles so no NA x NB matrix lives in registers; ``row_a``: the A tokens' rows (PERM: the
    #    B tokens' rows come from the order ``prm`` too); UNROLL (MODE 0, small batches): as _metric_rows, and with
    #    the mean given (H 1) the B tiles prefetched
    an = _unit_rows(_metric_rows(m_ptr + b * smb, row_a, offs_d, am[:, None] & dm[None, :], smn, smh, H, UNROLL))
    best = tl.full([NAP], float("-inf"), tl.float32)
    arg = tl.zeros([NAP], tl.int32)
    for j0 in tl.range(0, NB, BT, num_stages=(3 if H == 1 else 1) if UNROLL else 1):  # H > 1: no prefetch
        # (prefetching the H loads per tile took twice the shared memory)
        offs_t = j0 + tl.arange(0, BT)
        tm = offs_t < NB
        rt = _at(prm, P + 2 * offs_t + 1, tm, PERM)
        mt = _metric_rows(m_ptr + b * smb, rt, offs_d, tm[:, None] & dm[None, :], smn, smh, H, UNROLL)
        sim = _cosine_tile(an, mt, IS_F32)
        okt = tm
        if PADDED:
            okt = okt & (tl.load(s_ptr + b * ssb + rt, mask=tm, other=0.0) > 0)
        sim = tl.where(okt[None, :], sim, float("-inf"))
        best, arg = _argmax_update(sim, offs_t, best, arg)
    if PADDED:
        best = tl.where(sa <= 0, float("inf"), best)  # padding slots are merged first
    # -- the R best-matched A tokens are merged away, by (best desc, index asc). RANK (MODE 2, which writes them
    #    in rank order): each one's rank, counted against tiles of the A tokens read back from scratch; else
    #    only which ones, each one's rank counted in registers (run 50: 2-3 us less than a sort at 128 A tokens)
    best = tl.where(am, best, float("-inf"))
    if RANK:
        bst_row = bst_ptr + (b * G + g) * NAP  # one scratch row per program
        tl.store(bst_row + offs_a, best)
        tl.debug_barrier()
        rank = _rank_desc(best, offs_a, bst_row, NA, BT)
        return arg, rank, (rank < R) & am
    return arg, arg, _top_k_mask_count(best, offs_a, R) & am  # (no ranks: arg stands in for them, unused)


@triton.jit
def _merge_step(x_ptr, y_ptr, m_ptr, s_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr, scr_ptr, bst_ptr, mt_ptr, ob_ptr,
                rows_ptr, perm_ptr, P, NA, NB, R, C, D, N0, G,
                sxb, sxn, syb, syn, smb, smn, smh, ssb, srcb, oxb, oxn, sprm, H: tl.constexpr,
                HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, PADDED: tl.constexpr, HAS_SOURCE: tl.constexpr,
                IS_F32: tl.constexpr, LOWP: tl.constexpr, NAP: tl.constexpr, NBP: tl.constexpr, DP: tl.constexpr,
                BC: tl.constexpr, BS: tl.constexpr, PP: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr,
                LOG_SIZES: tl.constexpr, PERM: tl.constexpr = False, PT: tl.constexpr = 32, VEC: tl.constexpr = 1,
                SIDE: tl.constexpr = False):
    # MODE 0, program (b, g): every program of sample b matches and ranks (cheap: the metric is small)
    # and writes the column tiles g, g + G, ... of the output rows; program g = 0 also writes the sizes
    # and the source map. G > 1 spreads one sample's row traffic over several SMs (bs 1: one program
    # alone spends most of its time waiting on the serial column loop). SIDE: one more program, g = G, writes the
    # sizes and the source map and no columns (program 0 then only its columns).
    # Large batches run two launches instead: MODE 2 (one program per sample) matches, ranks, writes
    # the sizes and the source map, and leaves each A token's partner and the merged A tokens in rank
    # order in ``mt`` and each output row's source row in ``rows``; then _merge_gather writes the rows
    # (session 5's per-column-tile MODE 1 lost to it: NOTES.md, session 7).
    # PERM: the step runs on the rows in the order ``perm`` (place v holds row perm[v]; pitome's protected tokens
    # join the prefix, PT rows at a time in MODE 0): every input read and the source map go through it.
    # D and the metric strides come divided by VEC (_triton_common._vec)
    D, smb, smn, smh = D * VEC, smb * VEC, smn * VEC, smh * VEC
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs_p = tl.arange(0, PP)
    pm = offs_p < P
    offs_a = tl.arange(0, NAP)
    offs_b = tl.arange(0, NBP)
    offs_d = tl.arange(0, DP)
    am = offs_a < NA
    bm = offs_b < NB
    dm = offs_d < D
    prm = perm_ptr + b * sprm
    row_a = _at(prm, P + 2 * offs_a, am, PERM)  # token index of A token i in x
    row_b = _at(prm, P + 2 * offs_b + 1, bm, PERM)
    row_p = _at(prm, offs_p, pm, PERM)
    sa = _sizes_at(s_ptr + b * ssb, row_a, am, HAS_SIZES)
    sb = _sizes_at(s_ptr + b * ssb, row_b, bm, HAS_SIZES)
    arg, rank, is_src = _merge_match(m_ptr, s_ptr, bst_ptr, b, g, G, P, NA, NB, smb, smn, smh, H, ssb, offs_a, offs_d,
                                     am, dm, sa, row_a, prm, PADDED, IS_F32, NAP, BT, PERM, MODE == 0, R, MODE == 2)
    if MODE == 2:  # each A token's partner and, in rank order, the A tokens merged away
        tl.store(mt_ptr + (2 * b) * NAP + offs_a, arg)
        tl.store(mt_ptr + (2 * b + 1) * NAP + tl.where(is_src, rank, 0), offs_a, mask=is_src)
    is_unm = am & ~is_src
    pos = tl.cumsum(is_unm.to(tl.int32), 0) - is_unm.to(tl.int32)  # spatial order among kept A tokens
    n_unm = NA - R
    out_a = P + pos
    out_b = P + n_unm + offs_b
    # merge weights: W[j, i] = s_a[i] if A token i merges into B token j
    sa_src = tl.where(is_src, sa, 0.0)
    tot = sb + tl.sum(tl.where(arg[None, :] == offs_b[:, None], sa_src[None, :], 0.0), 1)
    # -- tokens: prefix copied, kept A copied, B = size-weighted mean with its merged A tokens
    if MODE == 2:  # output row -> source row; -1 for the B rows that receive merged tokens (_merge_gather)
        nrow = P + n_unm + NB
        tl.store(rows_ptr + b * nrow + out_a, row_a, mask=is_unm)
        tl.store(rows_ptr + b * nrow + out_b, row_b, mask=bm)
        tl.store(rows_ptr + b * nrow + offs_p, row_p, mask=pm)
        tl.debug_barrier()  # the B rows' entries above are written before the -1 below overwrites some
        tl.store(rows_ptr + b * nrow + P + n_unm + arg, tl.full([NAP], -1, tl.int32), mask=is_src)
    c_end = C if MODE == 0 else 0  # MODE 2: no rows (_merge_gather writes them)
    if SIDE:
        c_end = tl.where(g < G, c_end, 0)
    for c0 in range(g * BC, c_end, G * BC):
        offs_c = c0 + tl.arange(0, BC)
        cm = offs_c < C
        # the tokens (HAS_Y: x + y, a block's last residual add left to this kernel)
        xa = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_a, offs_c, sxn, syn, am[:, None] & cm[None, :], HAS_Y)
        xb = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_b, offs_c, sxn, syn, bm[:, None] & cm[None, :], HAS_Y)
        # W[j, i] = s_a[i] if A token i merges into B token j (rebuilt per tile: fewer live registers)
        w = tl.where(arg[None, :] == offs_b[:, None], sa_src[None, :], 0.0)
        if LOWP:  # sizes are exact in the token dtype: products exact, sums in fp32
            acc = tl.dot(w.to(xa.dtype), xa)
        else:
            acc = tl.dot(w, xa.to(tl.float32), input_precision="ieee")
        xbf = xb.to(tl.float32)
        xb_new = tl.where((tot > 0)[:, None], (acc + sb[:, None] * xbf) / tl.maximum(tot, 1e-30)[:, None], xbf)
        tl.store(ox_ptr + b * oxb + out_a[:, None] * oxn + offs_c[None, :], xa, mask=is_unm[:, None] & cm[None, :])
        tl.store(ox_ptr + b * oxb + out_b[:, None] * oxn + offs_c[None, :], xb_new.to(ox_ptr.dtype.element_ty),
                 mask=bm[:, None] & cm[None, :])
        if PERM:  # the prefix and protected rows, PT at a time
            for p0 in range(0, P, PT):
                o_p = p0 + tl.arange(0, PT)
                m_p = (o_p < P)[:, None] & cm[None, :]
                xp = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, _at(prm, o_p, o_p < P, PERM), offs_c, sxn, syn, m_p,
                                HAS_Y)
                tl.store(ox_ptr + b * oxb + o_p[:, None] * oxn + offs_c[None, :], xp, mask=m_p)
        else:
            _copy_prefix(x_ptr + b * sxb, y_ptr + b * syb, ox_ptr + b * oxb, sxn, syn, oxn, offs_p, pm, offs_c, cm,
                         HAS_Y)
    if g == (G if SIDE else 0):  # sizes and source map: written once per sample, by program 0 (SIDE: G)
        # -- sizes
        nout = P + n_unm + NB
        tl.store(os_ptr + b * nout + out_a, sa, mask=is_unm)
        tl.store(os_ptr + b * nout + out_b, tot, mask=bm)
        sp = _sizes_at(s_ptr + b * ssb, row_p, pm, HAS_SIZES)
        tl.store(os_ptr + b * nout + offs_p, sp, mask=pm)
        if LOG_SIZES:  # the next blocks' attention bias, log(size) in the token dtype (log 0 = -inf)
            bt = ob_ptr.dtype.element_ty
            tl.store(ob_ptr + b * nout + out_a, tl.log(tl.where(is_unm, sa, 1.0)).to(bt), mask=is_unm)
            tl.store(ob_ptr + b * nout + out_b, tl.log(tl.where(bm, tot, 1.0)).to(bt), mask=bm)
            tl.store(ob_ptr + b * nout + offs_p, tl.log(tl.where(pm, sp, 1.0)).to(bt), mask=pm)
        # -- source map: old token -> new token, then compose with the current map
        if HAS_SOURCE:
            nt = P + NA + NB
            tl.store(scr_ptr + b * nt + row_a, tl.where(is_src, P + n_unm + arg, out_a), mask=am)
            tl.store(scr_ptr + b * nt + row_b, out_b, mask=bm)
            tl.store(scr_ptr + b * nt + row_p, offs_p, mask=pm)
            tl.debug_barrier()  # the scratch map written above is read below by other threads of this program
            _compose_source(src_ptr + b * srcb, scr_ptr + b * nt, osrc_ptr + b * N0, N0, BS)


MERGE_STEP_MAX_A = 128  # A tokens (half the non-prefix tokens) one program holds: N <= 256 tokens
MERGE_STEP_WARPS = 8
MERGE_STEP_BC = 32  # output columns per tile (64 spills)
MERGE_STEP_BT = 128  # one launch: the matching's B tile (_match_tile). H100, ViT-B's step at 197 / 171 / 145 / 119
# tokens (run 50, --parts merge_match): 32-token tiles and a sort 14.0 / 13.2 / 13.1 / 8.0 us, this tile and ranks
# by count 11.1 / 11.0 / 11.1 / 6.6 us
MERGE_STEP_PROGRAMS_PER_SM = 1  # small batches: a sample's columns split over programs up to about this many per SM
MERGE_STEP_SIDE_PROGRAM = True  # small batches: the sizes and the source map from one more program, not program 0
# (run 57, H100, ViT-B bs-1 reduce-overhead merge: 0.897x -> 0.907x, with the key mean from the attention 0.916x ->
# 0.926x; False: program 0 writes them after its column tile)
# From min_batch on: two launches, the matching (_merge_step MODE 2, one program per sample, mwarps warps;
# a register cap of mmaxnreg once the batch exceeds the SM count, so two programs share an SM and the
# samples take one wave) and _merge_gather, which copies whole rows through a row map (rb rows, gbc
# columns at a time, gwarps warps) and computes only the B rows that receive merged tokens (fbc columns
# per program, fbc_many above 32 merged tokens); None: always one launch (137 us at bs 256 N=196 r=13).
# H100, graph replay, C=768
# (gpu_profile.py --only ms; docs/gpu/profile_h100_run25_ms.json for the sweep of rows / columns / warps,
# profile_h100_run28_ms.json): bs 256 N=196 r=13 99.5 us for session 5's per-column-tile rows -> 81.3
# (76.3 with the register cap: 55 us of it the row copy, 91% of the copy bound), r=48 110.5 -> 77.5,
# N=98 46.9 -> 39.7; bs 128 51.2 -> 41.9; bs 64 28.8 -> 23.4; bs 32 17.3 -> 16.0
MERGE_STEP_SPLIT = {"min_batch": 32, "rb": 16, "gbc": 256, "gwarps": 4, "fbc": 64, "fbc_many": 128, "mwarps": 8,
                    "mmaxnreg": 128}
_LARGE_SPLIT = {"rb": 16, "gbc": 256, "gwarps": 4, "fbc": 64, "fbc_many": 128}  # the row gather's tiles when
# MERGE_STEP_SPLIT is None (tests switch the large-batch split off; above MERGE_STEP_MAX_A there is no one launch)


MERGE_PLAN_MAX_A = 8192  # above MERGE_STEP_MAX_A: _bm_best, _merge_rank, _merge_plan and _merge_gather (four launches)
MERGE_GATHER_TILE = 64  # above 128 merged tokens, _merge_gather's fix-up takes them in [64, 64] tiles (up to 128:
# one [R, R] tile, as tuned at batch 256 in runs 25-28)
MERGE_GATHER_MAX_R = 512  # the fix-up's work grows as R^2 x C (every merged token against every other: which share a
# partner); above, ops.bipartite_merge's PyTorch glue (scatter-adds, linear in R: maelre's steps of thousands)
MERGE_PLAN_TILES = (128, 8)  # _merge_plan's A tile, warps
# long inputs (four launches): _bm_best's B tokens split over up to MERGE_BEST_SPLIT programs per A tile while the
# batch leaves SMs idle; _merge_rank's A tile, compare tile and warps (bench_forward --parts whisper_step sweeps both)
MERGE_BEST_SPLIT = 4
MERGE_RANK_TILES = (32, 64, 4)
# at batch 1 the long inputs' four launches run as one (_merge_long; batch 1 is bound by host time). H200, run 55:
# eager Whisper-large every-block merge @0.5 1.041x -> 1.144x (about 34 us of wall a step), the step's GPU time under
# graph replay 60.9 -> 63.3 us (docs/results/h200/forward_run54_2026-12-06.md); False: four launches. Its warps (one
# count for every phase; _merge_plan alone runs with 8)
MERGE_LONG_ONE_LAUNCH = True
MERGE_LONG_WARPS = 4


def _best_split(bsz: int, na: int, nb: int, dtype, device) -> tuple:
    """``_bm_best``'s B-token splits in ``merge_step``'s long-input form, and the B tokens per split: up to
    MERGE_BEST_SPLIT while the A tiles alone leave SMs idle (batch 1), none empty."""
    bm, bn = _bm_tiles(na, dtype)
    tiles = _cdiv(nb, bn)
    want = max(1, min(MERGE_BEST_SPLIT, tiles, _num_sms(device) // (bsz * _cdiv(na, bm))))
    nbs = _cdiv(tiles, want) * bn
    return _cdiv(nb, nbs), nbs


def _match_tile(nb: int, lowp: bool) -> int:
    """The one launch's matching tile: MERGE_STEP_BT up to the B tokens padded, at least 32 (16: pitome's small
    steps spill), 64 at most with float32 products (128 spills there)."""
    return max(32, min(MERGE_STEP_BT, 128 if lowp else 64, _p2(nb)))


def merge_step_fits(n: int, r: int = 0) -> bool:
    """Whether :func:`merge_step` handles ``n`` non-prefix tokens, ``r`` of them merged away."""
    na = (n + 1) // 2
    return na <= MERGE_STEP_MAX_A or (na <= MERGE_PLAN_MAX_A and r <= MERGE_GATHER_MAX_R)


def merge_step(x, metric, sizes, source, p: int, r: int, padded: bool, max_size: int | None = None,
               log_sizes: bool = False, residual=None, perm=None, scratch=None):
    """``ops.bipartite_merge`` in one launch: returns ``(new_x, new_sizes, new_source)``, and with
    ``log_sizes`` also ``log(new_sizes)`` in ``x``'s dtype (the proportional-attention bias).
    ``metric`` ``[B, T, d]``, or a block's keys ``[B, H, T, d]`` (any strides, the last dim contiguous): the
    matching averages them over heads as it loads them (``reference.key_mean``; no mean in memory).
    ``residual``: the tokens are ``x + residual`` (a block's last residual add, left undone); the kernel
    that writes the rows (one launch, or the large-batch row gather) reads both and never stores the sum.
    ``perm`` ``[B, T]`` long: the step runs on the rows in that order (``reference.merge_step``); the kernels
    read every row through it, nothing is permuted in memory. ``scratch``: a dict for one forward in which the step
    keeps its scratch buffers for the next steps (``_workspace``).
    Host time (batch 1 is bound by it): everything but the tensors is worked out once per input signature
    (shapes, strides, dtypes, arguments and this module's settings) into a :class:`_StepPlan`."""
    key = (x.shape, x.stride(), x.dtype, x.device, metric.shape, metric.stride(), metric.dtype, _sig(sizes),
           _sig(source), _sig(residual), _sig(perm), p, r, padded, max_size, log_sizes, MERGE_STEP_MAX_A,
           MERGE_STEP_WARPS, MERGE_STEP_BC, MERGE_STEP_BT, MERGE_STEP_PROGRAMS_PER_SM, MERGE_STEP_SIDE_PROGRAM,
           id(MERGE_STEP_SPLIT),
           MERGE_PLAN_TILES, MERGE_BEST_SPLIT, MERGE_RANK_TILES, MERGE_GATHER_TILE, MERGE_GATHER_MAX_R,
           MERGE_LONG_ONE_LAUNCH, MERGE_LONG_WARPS)
    plan = cached_plan(_PLANS, key, _StepPlan, x, metric, sizes, source, p, r, padded, max_size, log_sizes, residual,
                       perm)
    return plan(x, metric, sizes, source, residual, perm, scratch)


_PLANS: dict = {}  # merge_step's input signature -> its _StepPlan


class _StepPlan:
    """One signature's merge step: output shapes, and its launches as ``LaunchPlan``s over the tuple of tensors
    ``(x, y, metric, sizes, source, out, out sizes, out source, scratch map, scratch best, mt, log sizes, rows, perm,
    split partners, ranks)`` (four launches: then the metric and sizes the matching ``_bm_best`` reads, with ``perm``
    copies in that order; it leaves each B-token split's best similarities in scratch best and partners in split
    partners, and ``_merge_rank`` the ranks and, in ``mt``, the partners; ``fused``, their one launch at batch 1,
    ``_merge_long``: then its zeroed counters last), absent ones stood for by another."""

    def __init__(self, x, metric, sizes, source, p, r, padded, max_size, log_sizes, residual, perm):
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            raise ValueError(f"merge_step: residual {tuple(residual.shape)} {residual.dtype} does not match "
                             f"the tokens {tuple(x.shape)} {x.dtype}")
        args = (x, metric, sizes, source, residual, perm)
        self.copy = any(a is not None and a.stride(-1) != 1 for a in args)  # copied per call (rare)
        x, metric, sizes, source, residual, perm = [_last_contiguous(a) for a in args]
        bsz, t, c = x.shape
        n = t - p
        na, nb = (n + 1) // 2, n // 2
        nout = p + na - r + nb
        heads, d = (metric.shape[1] if metric.dim() == 4 else 1), metric.shape[-1]
        sm, sx = metric.stride(), x.stride()
        smh = sm[1] if heads > 1 else 0
        sy = residual.stride() if residual is not None else sx
        self.large = large = na > MERGE_STEP_MAX_A  # one program cannot hold the matching: four launches
        self.split_cfg = MERGE_STEP_SPLIT  # (the key holds its id)
        split = large or (MERGE_STEP_SPLIT is not None and bsz >= MERGE_STEP_SPLIT["min_batch"])
        cfg = MERGE_STEP_SPLIT or _LARGE_SPLIT
        self.dev, self.dtype, self.log_sizes = x.device, x.dtype, log_sizes
        n0 = source.shape[1] if source is not None else 0
        ssb = sizes.stride(0) if sizes is not None else 0
        srcb = source.stride(0) if source is not None else 0
        sprm = perm.stride(0) if perm is not None else 0
        # sizes never exceed the input token count; products in the token dtype are exact while sizes are
        # (without a bound from the caller or a source map, sizes are unbounded: fp32 products)
        if sizes is None:
            max_size = 1
        elif max_size is None:
            max_size = n0 if source is not None else float("inf")
        lowp = _exact_lowp(x.dtype, max_size)
        nap = max(16, _p2(na))
        groups = 1 if split else _column_groups(c, MERGE_STEP_BC, bsz, MERGE_STEP_PROGRAMS_PER_SM, x.device)
        self.shapes = ((bsz, nout, c), (bsz, nout), (bsz, n0))
        # scratch: the old -> new row map (with a source map), best similarities, and (split) mt and the row map
        nsplit, nbs = _best_split(bsz, na, nb, metric.dtype, x.device) if large else (1, 0)
        self.work = (bsz * t if source is not None else 0, bsz * (nsplit * na if large else groups * nap),
                     bsz * 2 * nap if split else 0, bsz * nout if split else 0,
                     nsplit * bsz * na if large else 0, bsz * na if large else 0)
        # the tensors the caller hands in (their alignment picks the compiled kernel): x, y, metric, sizes, source, perm
        inputs = {0, 2, 16, 17} | {i for i, a in ((1, residual), (3, sizes), (4, source), (13, perm)) if a is not None}
        flags = dict(HAS_SIZES=sizes is not None, HAS_SOURCE=source is not None, PADDED=bool(padded),
                     LOG_SIZES=log_sizes, PERM=perm is not None)

        def plan(kernel, grid, take, args, **kw):
            return LaunchPlan(kernel, grid, take, args, kw, tuple(i for i in take if i in inputs))

        def step(mode, grid, g, warps, **extra):
            v, (dv, smb, smn, smh_) = _in_vectors(metric.dtype, d, sm[0], sm[-2], smh)
            return plan(_merge_step, grid, range(14),
                        (p, na, nb, r, c, dv, n0, g, sx[0], sx[1], sy[0], sy[1], smb, smn, smh_,
                         ssb, srcb, nout * c, c, sprm), VEC=v,
                        HAS_Y=residual is not None and mode == 0, IS_F32=metric.dtype == torch.float32, LOWP=lowp,
                        NAP=nap, NBP=max(16, _p2(nb)), DP=max(16, _p2(d)), BC=MERGE_STEP_BC, BS=256, PP=_p2(max(p, 1)),
                        BT=_match_tile(nb, lowp) if mode == 0 else 32, MODE=mode, H=heads, num_warps=warps, **flags,
                        **extra)

        if large:  # the matching (_bm_best), the ranking (_merge_rank), then _merge_plan
            self.valid = valid = bool(padded) and sizes is not None  # B tokens of size 0 (padding): no partners
            smb, smn, smh_, svb = sm[0], sm[-2], smh, ssb
            if perm is not None:  # the matching reads copies gathered in the step's order (contiguous)
                smb, smn, smh_, svb = metric.shape[1:].numel(), d, t * d if heads > 1 else 0, t
            bm, bn = _bm_tiles(na, metric.dtype)
            br, bt, rwarps = MERGE_RANK_TILES
            sps = bsz * na  # one split's best / partner block
            vec, (dv, smb, smn, smh_) = _in_vectors(metric.dtype, d, smb, smn, smh_)
            # each phase's constexprs (_merge_long takes all of them)
            bm_kw = dict(H=heads, HAS_VALID=valid, IS_F32=metric.dtype == torch.float32, DP=max(16, _p2(d)), BM=bm,
                         BN=bn, VEC=vec)
            rank_kw = dict(S=nsplit, HAS_SIZES=sizes is not None, PADDED=bool(padded), PERM=perm is not None, NAP=nap,
                           BR=br, BT=bt)
            plan_kw = dict(NAP=nap, BA=MERGE_PLAN_TILES[0], BS=256, PP=_p2(max(p, 1)),
                           **{k: v for k, v in flags.items() if k != "PADDED"})
            self.launches = [plan(_bm_best, (bsz, _cdiv(na, bm), nsplit), (16, 17, 9, 14),
                                  (na, nb, dv, p, smb, smn, smh_, svb if valid else 0,
                                   2 if valid else 0, p + 1 if valid else 0, na, nbs, sps), **bm_kw, num_warps=4),
                             plan(_merge_rank, (bsz, _cdiv(na, br)), (9, 14, 3, 13, 15, 10),
                                  (p, na, sps, ssb, sprm), **rank_kw, num_warps=rwarps),
                             plan(_merge_plan, (bsz,), (15, 3, 4, 6, 7, 8, 10, 11, 12, 13),
                                  (p, na, nb, r, n0, ssb, srcb, sprm), **plan_kw, num_warps=MERGE_PLAN_TILES[1])]
        elif split:
            cap = cfg.get("mmaxnreg") if bsz > _num_sms(x.device) else None
            self.launches = [step(2, (bsz, 1), 1, cfg.get("mwarps", MERGE_STEP_WARPS),
                                  **({"maxnreg": cap} if cap and not _interpreted(_merge_step) else {}))]
        else:
            side = MERGE_STEP_SIDE_PROGRAM
            self.launches = [step(0, (bsz, groups + side), groups, MERGE_STEP_WARPS, SIDE=side)]
        if split:
            fbc = 32 if not lowp else cfg.get("fbc_many", cfg["fbc"]) if r > 32 else cfg["fbc"]  # fp32: or it spills
            ng, ncf = _cdiv(nout, cfg["rb"]), _cdiv(c, fbc)
            rp = max(16, _p2(r)) if r <= 128 else MERGE_GATHER_TILE  # the fix-up's tile of merged tokens
            gather_kw = dict(HAS_SIZES=sizes is not None, HAS_Y=residual is not None, LOWP=lowp, NAP=nap, RP=rp,
                             ONE=r <= rp, RB=cfg["rb"], BC=min(cfg["gbc"], _p2(c)), BCF=fbc, PERM=perm is not None)
            self.launches.append(plan(
                _merge_gather, (bsz, ng + _cdiv(r, rp) * ncf), (0, 1, 3, 10, 12, 5, 13),
                (p, na, r, c, nout, ng, ncf, sx[0], sx[1], sy[0], sy[1], ssb, nout * c, c, sprm), **gather_kw,
                num_warps=cfg["gwarps"] if rp <= 64 and r <= rp else 8))  # 4 warps spill a [128, 128] fix-up tile
            # (and the tiled fix-up's [64, 128] accumulator and tile at 4 warps take 231-255 registers)
        self.fused = large and bsz == 1 and MERGE_LONG_ONE_LAUNCH and rp <= 64 and r <= rp
        if self.fused:  # the four launches' programs in one (_merge_long), with its counters (t[18])
            t1, t2, t4 = _cdiv(na, bm) * nsplit, _cdiv(na, br), ng + _cdiv(r, rp) * ncf
            self.launches = [plan(
                _merge_long, (t1 + t2 + 1 + t4,), (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18),
                (p, na, nb, r, c, dv, n0, nout, smb, smn, smh_, svb if valid else 0, 2 if valid else 0,
                 p + 1 if valid else 0, nbs, sps, ssb, srcb, sprm, sx[0], sx[1], sy[0], sy[1], nout * c, c, ng, ncf,
                 t1, t2, t4), **{**bm_kw, **rank_kw, **plan_kw, **gather_kw}, num_warps=MERGE_LONG_WARPS)]
        self.launches = LaunchGroup(self.launches)  # one host check per step, not per launch

    def __call__(self, x, metric, sizes, source, residual, perm, scratch):
        if self.copy:
            x, metric, sizes, source, residual, perm = [_last_contiguous(a) for a in (x, metric, sizes, source,
                                                                                      residual, perm)]
        dev, (so, ssz, ssrc) = self.dev, self.shapes
        out = _alloc(so, dev, self.dtype)
        osz = _alloc(ssz, dev, torch.float32)
        osrc = _alloc(ssrc, dev, torch.long) if source is not None else osz
        scr, bst, mt, rows, ip, rk = _workspace(scratch, "_merge_step", dev, self.work,  # never poisoned
                                                (torch.int32, torch.float32, torch.int32, torch.int32, torch.int32,
                                                 torch.int32))
        ob = _alloc(ssz, dev, self.dtype) if self.log_sizes else osz
        t = (x, x if residual is None else residual, metric, osz if sizes is None else sizes,
             osz if source is None else source, out, osz, osrc, scr, bst, mt, ob, rows, x if perm is None else perm,
             ip, rk)
        if self.large and perm is not None:  # the matching reads copies of the metric and sizes in the step's order
            metric = metric.gather(-2, (perm[:, None, :, None] if metric.dim() == 4 else perm[..., None]).expand(
                *metric.shape[:-1], metric.shape[-1]))
            t += (metric, sizes.gather(1, perm) if self.valid else metric)
        elif self.large:
            t += (metric, t[3])
        if self.fused:  # _merge_long's counters: zero, and the launch leaves them at zero (kept for the next steps)
            ctr = scratch.get("_merge_long") if scratch is not None else None
            if ctr is None or ctr.device != dev:
                ctr = torch.zeros(8, device=dev, dtype=torch.int32)
                if scratch is not None:
                    scratch["_merge_long"] = ctr
            t += (ctr,)
        self.launches(t)
        if self.log_sizes:
            return out, osz, (osrc if source is not None else None), ob
        return out, osz, (osrc if source is not None else None)
