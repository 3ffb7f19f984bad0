"""Triton kernel that keeps the k best-scored tokens in spatial order, with their sizes and the composed
source map, in one launch (cls / random pruning; ApET's selection through ``topk_sorted``). References:
``reference.keep_step`` / ``reference.topk_sorted``; NOTES.md section 6.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (LaunchPlan, cached_plan, _alloc, _cdiv, _column_groups, _compose_source,
                             _copy_prefix, _last_contiguous, _order_keys, _p2, _sig, _top_k_mask)

# ---------------------------------------------------------------------------------------------------
# keep the k best-scored tokens in spatial order (cls / random pruning, ApET's selection)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _keep_step(x_ptr, sc_ptr, s_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr, idx_ptr, scr_ptr, th_ptr, cnt_ptr, rk_ptr,
               P, N, K, C, N0, G, TH,
               sxb, sxn, scb, ssb, srcb, oxb, oxn,
               WRITE_X: tl.constexpr, HAS_SIZES: tl.constexpr, HAS_SOURCE: tl.constexpr, THRESH: tl.constexpr,
               RANKED: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr, RT: tl.constexpr, BC: tl.constexpr,
               BS: tl.constexpr):
    # program (b, g). Every program selects sample b's K best scores (by score desc, index asc: a sort of
    # the row in registers) and keeps them in spatial order. Program g writes the column tiles g, g + G, ...
    # of the prefix and kept rows; program 0 also writes the kept indices, the sizes and the source map.
    # THRESH (1: the threshold is TH, 2: it is read at th_ptr): K is then the cap, and the sample keeps
    # clamp(#{score > threshold}, 1, K) tokens, the best of them; program 0 writes that count to cnt_ptr (fp32). The
    # outputs stay K rows wide (their strides), the rows past the count unwritten: the caller cuts them off.
    # RANKED: the selection was made before (rk_ptr [B, N] int8, 1 = kept: _keep_rank's counts, or the caller's own
    # mask of exactly K per row): no sort here.
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = tl.arange(0, NP)
    nm = offs < N
    if RANKED:  # (the scores are not read: rk_ptr holds the selection)
        keep = nm & (tl.load(rk_ptr + b * N + offs, mask=nm, other=0) != 0)
    else:
        sc = tl.load(sc_ptr + b * scb + offs, mask=nm, other=float("-inf")).to(tl.float32)
        kk = K
        if THRESH != 0:
            if THRESH == 2:
                th = tl.load(th_ptr).to(tl.float32)
            else:
                th = TH
            kk = tl.minimum(tl.maximum(tl.sum((sc > th).to(tl.int32), 0), 1), K)  # (padding: -inf, never above)
            if g == 0:
                tl.store(cnt_ptr + b, kk.to(tl.float32))
        keep = nm & _top_k_mask(sc, offs, kk)
    ki = keep.to(tl.int32)
    pos = tl.cumsum(ki, 0) - ki  # slot among the kept tokens, spatial order
    orow = tl.where(keep, P + pos, -1)  # output row of every non-prefix token, -1 if dropped
    scr = scr_ptr + (b * G + g) * (PP + NP)  # [P + N] old -> new rows, one scratch row per program
    offs_p = tl.arange(0, PP)
    pm = offs_p < P
    tl.store(scr + offs_p, offs_p, mask=pm)
    tl.store(scr + P + offs, orow, mask=nm)
    tl.debug_barrier()  # the map written above is read below by other threads of this program
    if WRITE_X:
        for c0 in range(g * BC, C, G * BC):
            offs_c = c0 + tl.arange(0, BC)
            cm = offs_c < C
            _copy_prefix(x_ptr + b * sxb, x_ptr + b * sxb, ox_ptr + b * oxb, sxn, sxn, oxn, offs_p, pm, offs_c, cm, False)
            for t0 in range(0, N, RT):
                ot = t0 + tl.arange(0, RT)
                orr = tl.load(scr + P + ot, mask=ot < N, other=-1)
                ok = orr >= 0
                xt = tl.load(x_ptr + b * sxb + (P + ot)[:, None] * sxn + offs_c[None, :], mask=ok[:, None] & cm[None, :])
                tl.store(ox_ptr + b * oxb + orr[:, None] * oxn + offs_c[None, :], xt, mask=ok[:, None] & cm[None, :])
    if g == 0:
        tl.store(idx_ptr + b * K + pos, offs.to(tl.int64), mask=keep)
        if HAS_SIZES:
            nout = P + K
            tl.store(os_ptr + b * nout + offs_p, tl.load(s_ptr + b * ssb + offs_p, mask=pm), mask=pm)
            tl.store(os_ptr + b * nout + P + pos, tl.load(s_ptr + b * ssb + P + offs, mask=keep), mask=keep)
        if HAS_SOURCE:
            _compose_source(src_ptr + b * srcb, scr, osrc_ptr + b * N0, N0, BS)


@triton.jit
def _keep_rank(sc_ptr, rk_ptr, N, K, scb, BR: tl.constexpr, BT: tl.constexpr):
    # program (b, t): scores [t BR, (t + 1) BR) of sample b. Each one's rank among all N by (score desc, index asc)
    # (_order_keys), counted against tiles of BT; rk = 1 where the rank is below K (_top_k_mask's set)
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BR + tl.arange(0, BR)
    m = offs < N
    key = _order_keys(tl.load(sc_ptr + b * scb + offs, mask=m, other=float("-inf")), offs)
    rank = tl.zeros([BR], tl.int32)
    for t0 in tl.range(0, N, BT, loop_unroll_factor=4):
        ot = t0 + tl.arange(0, BT)
        om = ot < N
        kt = _order_keys(tl.load(sc_ptr + b * scb + ot, mask=om, other=float("-inf")), ot)
        rank += tl.sum(((kt[None, :] < key[:, None]) & om[None, :]).to(tl.int32), 1)
    tl.store(rk_ptr + b * N + offs, (rank < K).to(tl.int8), mask=m)


def topk_sorted(scores, k: int):
    """Indices ``[B, k]`` of the k best scores per row in ascending order (ties: lowest index first)."""
    return keep_step(scores.unsqueeze(2), scores, None, None, 0, k, write_x=False)[3]


KEEP_STEP_MAX_N = 4096  # non-prefix tokens one program sorts (in registers)
KEEP_STEP_BC = 64  # output columns per tile
# from this many non-prefix tokens, up to KEEP_RANK_MAX_BATCH samples are ranked by counting in a launch of their own
# (_keep_rank: the compares spread over N / KEEP_RANK_BR programs) rather than sorted in every program of _keep_step
# (Whisper-large, bs 1, H100: _keep_step 60 us at 1500 tokens and 58 at 1191 in run 61, mostly the sort of 2048
# keys; ranked, 18 + 13 and 15 + 11 us in run 66; at SigLIP's 729 tokens ranking lost, 1.34x against 1.38x)
KEEP_RANK_MIN_N, KEEP_RANK_MAX_BATCH, KEEP_RANK_BR, KEEP_RANK_BT = 1024, 4, 64, 64


def keep_step_fits(n: int) -> bool:
    return n <= KEEP_STEP_MAX_N


def keep_step(x, scores, sizes, source, p: int, k: int, write_x: bool = True, threshold=None):
    """``ops.topk_sorted`` + ``ops.gather_tokens`` (no padding) in one launch:
    returns ``(new_x | None, new_sizes | None, new_source | None, keep_idx [B, k])``. Everything but the tensors is
    worked out once per input signature (a :class:`_KeepPlan`: batch 1 is bound by host time).

    ``threshold`` (a float, or a one-element tensor read on the device): ``k`` is a cap, and each sample keeps
    ``clamp(#{score > threshold}, 1, k)`` of its best tokens (``ops.keep_above`` without padding). The outputs are
    still ``k`` rows wide, the rows past a sample's count unwritten (the indices too), and a fifth output ``[B]``
    float32 holds the counts: the caller reads them and cuts the rows (at batch 1 the cut of a contiguous tensor is
    contiguous).

    ``scores`` may instead be the selection itself, a bool ``[B, N]`` with exactly ``k`` True per row (a caller that
    has chosen its tokens, e.g. ``diverse``): no ranking at all, the kept rows in spatial order."""
    th = None if threshold is None else "tensor" if isinstance(threshold, torch.Tensor) else float(threshold)
    if scores.dtype == torch.bool:  # the selection itself, exactly k per row: read as _keep_rank's output (RANKED)
        if th is not None:
            raise ValueError("keep_step: a threshold needs scores, not a bool selection")
        scores = scores.contiguous()
    key = (x.shape, x.stride(), x.dtype, x.device, scores.shape, scores.stride(), scores.dtype, _sig(sizes),
           _sig(source), p, k, write_x, KEEP_STEP_BC, th, KEEP_RANK_MIN_N, KEEP_RANK_MAX_BATCH)
    return cached_plan(_PLANS, key, _KeepPlan, x, scores, sizes, source, p, k, write_x, th)(
        x, scores, sizes, source, threshold)


_PLANS: dict = {}  # keep_step's input signature -> its _KeepPlan


class _KeepPlan:
    """One signature's keep step: output shapes and the launch over ``(x, scores, sizes, source, out, out sizes,
    out source, kept indices, scratch, threshold, counts)``, absent ones stood for by another."""

    def __init__(self, x, scores, sizes, source, p, k, write_x, th):
        args = (x, scores, sizes, source)
        self.copy = any(a is not None and a.stride(-1) != 1 for a in args)  # copied per call (rare)
        x, scores, sizes, source = [_last_contiguous(a) for a in args]
        bsz, t, c = x.shape
        n = t - p
        self.dev, self.dtype, self.write_x, self.thresh = x.device, x.dtype, write_x, th is not None
        np_, pp = max(16, _p2(n)), _p2(max(p, 1))
        groups = _column_groups(c, KEEP_STEP_BC, bsz, 2, x.device) if write_x else 1
        n0 = source.shape[1] if source is not None else 0
        self.shapes = ((bsz, p + k, c), (bsz, p + k), (bsz, n0), (bsz, k), (bsz * groups, pp + np_), (bsz,))
        self.sizes_dtype = sizes.dtype if sizes is not None else None
        sx = x.stride()
        so = ((p + k) * c, c) if write_x else sx  # out: contiguous when written
        inputs = ((0, 1) + ((2,) if sizes is not None else ()) + ((3,) if source is not None else ())
                  + ((9,) if th == "tensor" else ()))
        self.mask = scores.dtype == torch.bool  # the caller's selection: RANKED, read from the scores
        ranked = self.mask or (th is None and n >= KEEP_RANK_MIN_N and bsz <= KEEP_RANK_MAX_BATCH)
        self.rank = None if self.mask or not ranked else LaunchPlan(
            _keep_rank, (bsz, _cdiv(n, KEEP_RANK_BR)), (0, 1), (n, k, scores.stride(0)),
            dict(BR=KEEP_RANK_BR, BT=KEEP_RANK_BT, num_warps=4), (0,))
        self.shapes += ((bsz, n),)
        self.launch = LaunchPlan(_keep_step, (bsz, groups), range(12),
                                 (p, n, k, c, n0, groups, th if isinstance(th, float) else 0.0, sx[0], sx[1],
                                  scores.stride(0), sizes.stride(0) if sizes is not None else 0,
                                  source.stride(0) if source is not None else 0, so[0], so[1]),
                                 dict(WRITE_X=write_x, HAS_SIZES=sizes is not None, HAS_SOURCE=source is not None,
                                      THRESH=0 if th is None else 2 if th == "tensor" else 1, RANKED=ranked,
                                      NP=np_, PP=pp, RT=64, BC=KEEP_STEP_BC, BS=256,
                                      num_warps=16 if np_ >= 4096 else 8 if np_ >= 512 else 4), inputs)

    def __call__(self, x, scores, sizes, source, threshold=None):
        if self.copy:
            x, scores, sizes, source = [_last_contiguous(a) for a in (x, scores, sizes, source)]
        dev, (so, ssz, ssrc, sidx, sscr, scnt, srk) = self.dev, self.shapes
        out = _alloc(so, dev, self.dtype) if self.write_x else x
        osz = _alloc(ssz, dev, self.sizes_dtype) if sizes is not None else scores
        osrc = _alloc(ssrc, dev, torch.long) if source is not None else scores
        idx = _alloc(sidx, dev, torch.long)
        scr = torch.empty(*sscr, device=dev, dtype=torch.int32)
        cnt = _alloc(scnt, dev, torch.float32) if self.thresh else scores
        th = threshold if isinstance(threshold, torch.Tensor) else scores
        rk = scores.view(torch.int8) if self.mask else scores
        if self.rank is not None:
            rk = _alloc(srk, dev, torch.int8)
            self.rank((scores, rk))
        self.launch((x, scores, osz if sizes is None else sizes, scores if source is None else source, out, osz, osrc,
                     idx, scr, th, cnt, rk))
        outs = (out if self.write_x else None, osz if sizes is not None else None,
                osrc if source is not None else None, idx)
        return outs + (cnt,) if self.thresh else outs
