"""Triton kernels of ToMe's bipartite matching: each A token's best B partner without the Na x Nb similarity matrix
in memory (``bipartite_best``; ``merge_step`` for long inputs splits the B tokens over programs), and the long
inputs' ranking of the A tokens by their best similarity (``_merge_rank``, the second of ``merge_step``'s four
launches). Reference: ``reference.bipartite_best`` / ``merge_step``; NOTES.md section 3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (_alloc, _argmax_update, _at, _cdiv, _cosine_tile, _metric_rows, _p2, _sizes_at,
                             _unit_rows, _in_vectors, fast)


# ---------------------------------------------------------------------------------------------------
# 1. bipartite matching: best B partner of every A token without the Na x Nb matrix in memory
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bm_best(m_ptr, vb_ptr, best_ptr, idx_ptr, NA, NB, D, P, smb, smn, smh, svb, svn, VOFF, sib, NBS, sps,
             H: tl.constexpr, HAS_VALID: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, VEC: tl.constexpr = 1):
    # A token i is metric row P + 2i, B token j row P + 2j + 1; B token j is valid where vb[VOFF + j svn] > 0 (flags,
    # or merge_step's sizes: 0 marks a padding slot); the partner of A token i goes to idx[b sib + i] in idx's dtype.
    # Program (b, pa, s) searches the B tokens [s NBS, (s + 1) NBS) (NBS a multiple of BN) and writes its best and
    # partner sps elements on per s (long inputs at small batch: the splits fill the SMs; _merge_rank combines them).
    # D and the metric strides come divided by VEC (_triton_common._vec)
    _bm_tile(tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2), m_ptr, vb_ptr, best_ptr, idx_ptr, NA,
             NB, D, P, smb, smn, smh, svb, svn, VOFF, sib, NBS, sps, H, HAS_VALID, IS_F32, DP, BM, BN, VEC)


@triton.jit
def _bm_tile(b, pa, s, m_ptr, vb_ptr, best_ptr, idx_ptr, NA, NB, D, P, smb, smn, smh, svb, svn, VOFF, sib, NBS, sps,
             H: tl.constexpr, HAS_VALID: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, VEC: tl.constexpr):
    # _bm_best's program (b, pa, s) (also one phase of merge_long's one-launch step)
    D, smb, smn, smh = D * VEC, smb * VEC, smn * VEC, smh * VEC
    best_ptr += s * sps
    idx_ptr += s * sps
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_a = pa * BM + tl.arange(0, BM)
    amask = offs_a < NA
    base = m_ptr + b * smb
    # normalised in the metric's dtype, like the reference
    an = _unit_rows(_metric_rows(base, P + 2 * offs_a, offs_d, amask[:, None] & dmask[None, :], smn, smh, H))
    best = tl.full([BM], float("-inf"), tl.float32)
    arg = tl.zeros([BM], tl.int32)
    # no prefetch: with the mean given (H 1, fp16) it moved nothing at Whisper-large (run 15: 13.3 -> 12.7 us)
    for b0 in tl.range(s * NBS, tl.minimum(s * NBS + NBS, NB), BN, num_stages=1):
        offs_b = b0 + tl.arange(0, BN)
        bmask = offs_b < NB
        bt = _metric_rows(base, P + 2 * offs_b + 1, offs_d, bmask[:, None] & dmask[None, :], smn, smh, H)
        sim = _cosine_tile(an, bt, IS_F32)
        ok = bmask
        if HAS_VALID:
            ok = ok & (tl.load(vb_ptr + b * svb + VOFF + offs_b * svn, mask=bmask, other=0) > 0)
        sim = tl.where(ok[None, :], sim, float("-inf"))
        best, arg = _argmax_update(sim, offs_b, best, arg)  # ties: the lowest index, as torch.max
    tl.store(best_ptr + b * NA + offs_a, best, mask=amask)
    tl.store(idx_ptr + b * sib + offs_a, arg.to(idx_ptr.dtype.element_ty), mask=amask)


def bipartite_best(metric, valid_b=None):
    """``metric [B, N, d]`` (non-prefix tokens, may be a strided view). Same as ``reference.bipartite_best``."""
    best, idx = _best_partners(metric, valid_b)
    return best.to(metric.dtype), idx


def _best_partners(metric, valid_b=None):
    """``bipartite_best`` with the best similarities in float32 (their values are the metric dtype's); ``metric`` may
    be keys ``[B, H, N, d]``, averaged over heads (``merge_step``)."""
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    shape, sm = metric.shape, metric.stride()
    bsz, n, d = shape[0], shape[-2], shape[-1]
    heads, smh = (shape[1], sm[1]) if len(shape) == 4 else (1, 0)
    na, nbb = (n + 1) // 2, n // 2
    best = _alloc((bsz, na), metric.device, torch.float32)
    idx = _alloc((bsz, na), metric.device, torch.long)
    bm, bn = _bm_tiles(na, metric.dtype)
    vb = valid_b.to(torch.uint8) if valid_b is not None else best
    sv = vb.stride() if valid_b is not None else (0, 0)
    v, (dv, smb, smn, smh) = _in_vectors(metric.dtype, d, sm[0], sm[-2], smh)
    fast(_bm_best)[(bsz, _cdiv(na, bm))](metric, vb, best, idx, na, nbb, dv, 0, smb, smn, smh,
                                         sv[0], sv[1], 0, na, nbb, 0, H=heads, HAS_VALID=valid_b is not None,
                                         IS_F32=metric.dtype == torch.float32, DP=max(16, _p2(d)), BM=bm, BN=bn,
                                         VEC=v, num_warps=4)
    return best, idx


def _bm_tiles(na: int, dtype) -> tuple:
    """``_bm_best``'s A rows per program, B rows per tile (float32 on the FMA units: smaller, or they spill)."""
    bm = 64 if na > 32 else (32 if na > 16 else 16)
    return (min(bm, 32), 32) if dtype == torch.float32 else (bm, 64)


# ---------------------------------------------------------------------------------------------------
# 2. the long inputs' ranking (merge_step's second launch): the splits combined, each A token's rank
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _best_of(bp_ptr, ip_ptr, s_row, prm, b, offs, m, P, NA, S: tl.constexpr, sps, HAS_SIZES: tl.constexpr,
             PADDED: tl.constexpr, PERM: tl.constexpr):
    # the best similarity and partner of A tokens ``offs`` of sample b over _bm_best's S splits (ties: the earlier
    # split, whose B tokens come first, as torch.max); padding slots (size 0) +inf, merged first; -inf where masked
    # (".cg": from L2, never a stale L1 line; in _merge_long another program wrote them during the same launch)
    best = tl.load(bp_ptr + b * NA + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
    arg = tl.load(ip_ptr + b * NA + offs, mask=m, other=0, cache_modifier=".cg")
    for s in tl.static_range(1, S):
        v = tl.load(bp_ptr + s * sps + b * NA + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(ip_ptr + s * sps + b * NA + offs, mask=m, other=0, cache_modifier=".cg")
        better = v > best
        best = tl.where(better, v, best)
        arg = tl.where(better, i, arg)
    if PADDED:
        best = tl.where(_sizes_at(s_row, _at(prm, P + 2 * offs, m, PERM), m, HAS_SIZES) <= 0, float("inf"), best)
    return tl.where(m, best, float("-inf")), arg


@triton.jit
def _merge_rank(bp_ptr, ip_ptr, s_ptr, perm_ptr, rk_ptr, mt_ptr, P, NA, sps, ssb, sprm,
                S: tl.constexpr, HAS_SIZES: tl.constexpr, PADDED: tl.constexpr, PERM: tl.constexpr, NAP: tl.constexpr,
                BR: tl.constexpr, BT: tl.constexpr):
    # program (b, t): A tokens [t BR, (t + 1) BR) of sample b. Their best similarity and partner (_best_of), and
    # their rank by (best desc, index asc) among all NA, counted against tiles of BT (the R first are merged away):
    # ranks to rk [B, NA], partners to row 2b of mt (where _merge_plan and _merge_gather read them)
    _rank_tile(tl.program_id(0).to(tl.int64), tl.program_id(1), bp_ptr, ip_ptr, s_ptr, perm_ptr, rk_ptr, mt_ptr, P,
               NA, sps, ssb, sprm, S, HAS_SIZES, PADDED, PERM, NAP, BR, BT)


@triton.jit
def _rank_tile(b, t, bp_ptr, ip_ptr, s_ptr, perm_ptr, rk_ptr, mt_ptr, P, NA, sps, ssb, sprm, S: tl.constexpr,
               HAS_SIZES: tl.constexpr, PADDED: tl.constexpr, PERM: tl.constexpr, NAP: tl.constexpr, BR: tl.constexpr,
               BT: tl.constexpr):
    # _merge_rank's program (b, t) (also one phase of merge_long's one-launch step)
    offs = t * BR + tl.arange(0, BR)
    m = offs < NA
    s_row = s_ptr + b * ssb
    prm = perm_ptr + b * sprm
    best, arg = _best_of(bp_ptr, ip_ptr, s_row, prm, b, offs, m, P, NA, S, sps, HAS_SIZES, PADDED, PERM)
    rank = tl.zeros([BR], tl.int32)
    for t0 in tl.range(0, NA, BT, loop_unroll_factor=4):  # 4 tiles of loads in flight (run 15: 13.3 -> 11.1 us)
        ot = t0 + tl.arange(0, BT)
        om = ot < NA
        st, _ = _best_of(bp_ptr, ip_ptr, s_row, prm, b, ot, om, P, NA, S, sps, HAS_SIZES, PADDED, PERM)
        ahead = (st[None, :] > best[:, None]) | ((st[None, :] == best[:, None]) & (ot[None, :] < offs[:, None]))
        rank += tl.sum((ahead & om[None, :]).to(tl.int32), 1)
    tl.store(rk_ptr + b * NA + offs, rank, mask=m)
    tl.store(mt_ptr + (2 * b) * NAP + offs, arg, mask=m)
