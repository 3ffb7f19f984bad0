"""Triton kernel of PiToMe's step order (``reducers.pitome``): every token's energy, the energy ranking and the
row order that hands the step to the merge kernels (``merge.merge_step`` with ``perm``), in one launch.
Reference: ``reference.pitome_order`` (energy: ``reference.pitome_energy``); NOTES.md section 7.

One program per sample. The metric may be a block's keys per head, averaged while loading (``_metric_rows``).
Pass 1: the unit-norm keys of a tile of ``BR`` rows (normalised once per tile, in the
metric's dtype) against column tiles of ``BT`` (one tensor-core product each, float32 sums), the margin
function and the row sums, so the ``N x N`` cosine matrix never reaches memory; the energies go to the
``[B, N]`` output. Pass 2: each token's rank among them (``_rank_desc``: energy descending, ties to the lower
index, as a stable sort) and its place in the order: prefix, protected tokens (rank >= ``CAND``) in spatial
order, then A (even ranks) in spatial order interleaved with B (odd ranks) in energy order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LaunchPlan, _alloc, _metric_rows, _p2, _rank_desc, _sig, cached_plan


@triton.jit
def _unit(t):
    # rows scaled to unit norm in t's own dtype (norm clamped at 1e-6, as the matching kernels and the reference)
    tf = t.to(tl.float32)
    nrm = tl.sqrt(tl.sum(tf * tf, 1))
    return (tf / tl.maximum(nrm, 1e-6)[:, None]).to(t.dtype)


@triton.jit
def _pitome_order(m_ptr, s_ptr, e_ptr, perm_ptr, P, N, D, CAND, margin, smb, smn, smh, ssb,
                  H: tl.constexpr, PADDED: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr,
                  BT: tl.constexpr, PP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    dm = offs_d < D
    m_row = m_ptr + b * smb + P * smn  # the non-prefix tokens
    s_row = s_ptr + b * ssb + P
    e_row = e_ptr + b * N
    T = P + N
    # -- the number of real tokens (the mean runs over them)
    nv = N
    if PADDED:
        nv = 0
        for c0 in range(0, N, BT):
            cols = c0 + tl.arange(0, BT)
            nv += tl.sum((tl.load(s_row + cols, mask=cols < N, other=0.0) > 0).to(tl.int32), 0)
    denom = tl.maximum(nv - 1, 1).to(tl.float32)
    # -- pass 1: E_i = mean over real j != i of f(cos(m_i, m_j))
    for r0 in range(0, N, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < N
        an = _unit(_metric_rows(m_row, rows, offs_d, rm[:, None] & dm[None, :], smn, smh, H))
        acc = tl.zeros([BR], tl.float32)
        for c0 in tl.range(0, N, BT, num_stages=1):  # as the merge kernels: no async prefetch
            cols = c0 + tl.arange(0, BT)
            cm = cols < N
            bn = _unit(_metric_rows(m_row, cols, offs_d, cm[:, None] & dm[None, :], smn, smh, H))
            if IS_F32:
                c = tl.dot(an, tl.trans(bn), input_precision="ieee")
            else:
                c = tl.dot(an, tl.trans(bn))
            f = tl.where(c >= margin, c, tl.exp(c - margin) - 1.0)
            ok = cm[None, :] & (rows[:, None] != cols[None, :])
            if PADDED:
                ok = ok & (tl.load(s_row + cols, mask=cm, other=0.0) > 0)[None, :]
            acc += tl.sum(tl.where(ok, f, 0.0), 1)
        e = acc / denom
        if PADDED:  # padding first
            e = tl.where(tl.load(s_row + rows, mask=rm, other=0.0) > 0, e, float("inf"))
        tl.store(e_row + rows, e, mask=rm)
    tl.debug_barrier()  # every energy is stored before pass 2 reads them all
    # -- pass 2: rank, role, place
    pv = T - CAND  # kept rows before the candidates: prefix + protected
    seen_a = 0
    seen_p = 0
    for r0 in range(0, N, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < N
        e = tl.load(e_row + rows, mask=rm, other=float("-inf"))
        rank = _rank_desc(e, rows, e_row, N, BT)
        is_a = rm & (rank < CAND) & ((rank % 2) == 0)
        is_p = rm & (rank >= CAND)
        ia = is_a.to(tl.int32)
        ip = is_p.to(tl.int32)
        pos_a = seen_a + tl.cumsum(ia, 0) - ia  # spatial order among A
        pos_p = seen_p + tl.cumsum(ip, 0) - ip  # spatial order among the protected
        place = tl.where(is_p, P + pos_p, tl.where(is_a, pv + 2 * pos_a, pv + 2 * (rank // 2) + 1))
        tl.store(perm_ptr + b * T + place, (P + rows).to(tl.int64), mask=rm)
        seen_a += tl.sum(ia, 0)
        seen_p += tl.sum(ip, 0)
    offs_p = tl.arange(0, PP)
    tl.store(perm_ptr + b * T + offs_p, offs_p.to(tl.int64), mask=offs_p < P)


# rows per tile (at most; float32 products run on the FMA units and spill above 32), columns per tile, warps.
# sm_90 build (compile_check), the mean as input: fp16 BR=256 117 registers, no spills (two programs per SM, so bs 256
# runs in one wave on an H200, and N <= 256 is one row tile); fp32 BR=64 spilled (71 local ld/st). The keys per head
# (averaged while loading, eager calls only: kernels._mean_first; the head count a compile-time constant since session
# 8, its loads unrolled): fp16 BR=256 184 registers (one program per SM), fp32 BR=32 48 registers, no spills (14 local
# ld/st before); not timed on a GPU alone
PITOME_ORDER_CONFIG = {"br": 256, "br_f32": 32, "bt": 32, "warps": 8}


def pitome_order(metric, sizes, p: int, cand: int, margin: float, padded: bool):
    """``(energy [B, N] float32, perm [B, P + N] long)``; see ``reference.pitome_order``. ``metric`` ``[B, T, d]``, or
    a block's keys ``[B, H, T, d]`` (any strides, the last dim contiguous), averaged over heads as they are loaded
    (``reference.key_mean``, as the merge kernels do: no mean in memory). Everything but the tensors is worked out
    once per input signature (an :class:`_OrderPlan`: eager batch 1 is bound by host time, and this runs every
    block)."""
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    has_s = bool(padded) and sizes is not None
    if has_s and sizes.stride(-1) != 1:
        sizes = sizes.contiguous()
    key = (metric.shape, metric.stride(), metric.dtype, metric.device, _sig(sizes) if has_s else None, p, cand,
           float(margin), *PITOME_ORDER_CONFIG.values())
    return cached_plan(_PLANS, key, _OrderPlan, metric, sizes if has_s else None, p, cand, margin)(metric, sizes)


_PLANS: dict = {}  # pitome_order's input signature -> its _OrderPlan


class _OrderPlan:
    """One signature's order step: the launch over ``(metric, sizes, energy, perm)`` (no sizes: the energy buffer
    stands for them)."""

    def __init__(self, metric, sizes, p, cand, margin):
        shape, sm = metric.shape, metric.stride()
        bsz, t, d = shape[0], shape[-2], shape[-1]
        heads, smh = (shape[1], sm[1]) if len(shape) == 4 else (1, 0)
        n = t - p
        self.has_s, self.dev, self.shapes = sizes is not None, metric.device, ((bsz, n), (bsz, t))
        cfg = PITOME_ORDER_CONFIG
        is32 = metric.dtype == torch.float32
        br = max(16, min(cfg["br_f32" if is32 else "br"], _p2(n)))
        self.launch = LaunchPlan(_pitome_order, (bsz,), range(4),
                                 (p, n, d, cand, float(margin), sm[0], sm[-2], smh,
                                  sizes.stride(0) if sizes is not None else 0),
                                 dict(H=heads, PADDED=sizes is not None, IS_F32=is32, DP=max(16, _p2(d)), BR=br,
                                      BT=cfg["bt"], PP=_p2(max(p, 1)), num_warps=cfg["warps"]),
                                 (0, 1) if sizes is not None else (0,))

    def __call__(self, metric, sizes):
        e = _alloc(self.shapes[0], self.dev, torch.float32)
        perm = _alloc(self.shapes[1], self.dev, torch.long)
        self.launch((metric, sizes if self.has_s else e, e, perm))
        return e, perm
