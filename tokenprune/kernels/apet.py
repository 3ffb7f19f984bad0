"""Triton kernels of ApET: the reconstruction error of every token from a basis (``apet_errors``, the
x-based path), one stage from the per-sample Gram matrix (``gram``, ``apet_stage``, ``apet_assign``) and the
merge into the kept tokens in one launch (``apet_merge``). References: ``reference.apet_errors`` / ``gram`` /
``apet_stage`` / ``apet_assign`` / ``apet_merge``; NOTES.md sections 4, 5 and 6.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (LaunchGroup, LaunchPlan, cached_plan, _alloc, _argmax_update, _cdiv, _column_groups,
                             _copy_prefix, _exact_lowp, _last_contiguous, _num_sms, _p2, _rows_contiguous, _sig,
                             _sizes_at, _top_k_mask, fast)

# ---------------------------------------------------------------------------------------------------
# 1. reconstruction error: e_i = ||x_i - S^T G^-1 S x_i||, G = S S^T + eps I (float32; NOTES.md section 4)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _apet_err(x_ptr, w_ptr, s_ptr, e_ptr, N, C, K, sxb, sxn,
              KP: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pn = tl.program_id(1)
    offs_n = pn * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_k = tl.arange(0, KP)
    kmask = offs_k < K
    coef = tl.zeros([BN, KP], tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        cm = offs_c < C
        xt = tl.load(x_ptr + b * sxb + offs_n[:, None] * sxn + offs_c[None, :], mask=nmask[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + (b * K + offs_k[None, :]) * C + offs_c[:, None], mask=cm[:, None] & kmask[None, :],
                     other=0.0)  # [BC, KP] = (G^-1 S)^T
        coef += tl.dot(xt, wt, input_precision="ieee")
    acc = tl.zeros([BN], tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        cm = offs_c < C
        xt = tl.load(x_ptr + b * sxb + offs_n[:, None] * sxn + offs_c[None, :], mask=nmask[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        st = tl.load(s_ptr + (b * K + offs_k[:, None]) * C + offs_c[None, :], mask=kmask[:, None] & cm[None, :],
                     other=0.0)  # [KP, BC]
        r = xt - tl.dot(coef, st, input_precision="ieee")
        acc += tl.sum(r * r, 1)
    tl.store(e_ptr + b * N + offs_n, tl.sqrt(acc), mask=nmask)


def apet_errors(x, basis, eps: float = 1e-5):
    """``[B, N]`` float32 errors of ``x [B, N, C]`` from ``basis [B, k, C]``; see ``reference.apet_errors``."""
    bsz, n, c = x.shape
    k = basis.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = basis.float().contiguous()
    g = s @ s.transpose(-1, -2) + eps * torch.eye(k, device=x.device)
    w = torch.linalg.solve_ex(g, s)[0].contiguous()  # G^-1 S, [B, k, C]; SPD (ridge): no host-side error check
    e = _alloc((bsz, n), x.device, torch.float32)
    bn = 64
    fast(_apet_err)[(bsz, _cdiv(n, bn))](x, w, s, e, n, c, k, x.stride(0), x.stride(1),
                                         KP=max(16, _p2(k)), BN=bn, BC=64, num_warps=8)
    return e


# ---------------------------------------------------------------------------------------------------
# 2. one stage from the per-sample Gram matrix: x read once (Gram), everything else from G (NOTES.md section 5)
#
#    Numerical trade-off (read before trusting small errors): e_i^2 = sq_i - 2 c.b + c^T G0 c is a
#    difference of terms of the size of |x_i|^2, so in float32 it carries an absolute error of about
#    1e-7 x |x_i|^2 x (a small factor): an error far below |x_i| (a token the basis explains almost
#    exactly) comes out as noise of ~3e-4 |x_i| (clamped at 0), while the x-based path resolves it.
#    ApET only ranks the errors and keeps the LARGEST, so the cut falls among large errors where this
#    is harmless. Distances and cosines are computed in float32 from G; the x-based CUDA path rounds
#    its FPS / cosine dot products to the token dtype (fp16), so the two can choose differently where
#    two candidates tie within that rounding.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _gram(x_ptr, g_ptr, N, C, T, P, sxb, sxn, sxc, sgb, sgn,
          IS_F32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # one BM x BM tile (ti, tj), tj >= ti, of G = X X^T over the rows P.. of x; the mirror tile is stored transposed
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    ti = t // T
    tj = t % T
    if tj >= ti:
        ri = ti * BM + tl.arange(0, BM)
        rj = tj * BM + tl.arange(0, BM)
        mi = ri < N
        mj = rj < N
        offs_k = tl.arange(0, BK)
        xb = x_ptr + b * sxb + P * sxn
        acc = tl.zeros([BM, BM], tl.float32)
        for k0 in range(0, C, BK):
            kk = k0 + offs_k
            km = kk < C
            a = tl.load(xb + ri[:, None] * sxn + kk[None, :] * sxc, mask=mi[:, None] & km[None, :], other=0.0)
            c = tl.load(xb + rj[:, None] * sxn + kk[None, :] * sxc, mask=mj[:, None] & km[None, :], other=0.0)
            if IS_F32:
                acc += tl.dot(a, tl.trans(c), input_precision="ieee")
            else:  # fp16 / bf16 products are exact in fp32; fp32 accumulation
                acc = tl.dot(a, tl.trans(c), acc)
        gb = g_ptr + b * sgb
        tl.store(gb + ri[:, None] * sgn + rj[None, :], acc, mask=mi[:, None] & mj[None, :])
        if tj > ti:
            tl.store(gb + rj[:, None] * sgn + ri[None, :], tl.trans(acc), mask=mj[:, None] & mi[None, :])


def gram(x):
    """``G = X X^T`` ``[B, N, N]`` float32 (fp32 accumulation) of ``x [B, N, C]`` (fp16 / bf16 / fp32, any
    strides) and ``sq = diag(G)`` ``[B, N]`` (a view of G). Same as ``reference.gram``."""
    bsz, n, c = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    is32 = x.dtype == torch.float32
    g = _alloc((bsz, n, n), x.device, torch.float32)  # strides (n n, n, 1)
    kw = _gram_config(n, is32, bsz, x.device)
    t = _cdiv(n, kw["BM"])  # tiles per side
    sx = x.stride()
    fast(_gram)[(bsz, t * t)](x, g, n, c, t, 0, sx[0], sx[1], sx[2], n * n, n, **kw)
    return g, g.diagonal(dim1=1, dim2=2)


def _gram_config(n: int, is32: bool, bsz: int, device) -> dict:
    """The launch constants of ``_gram`` for ``n`` tokens of ``bsz`` samples on ``device`` (``cdiv(n, BM)`` tiles per
    side). fp16 / bf16: 128-row tiles, or 64-row ones (BK 64, 4 warps) where the 128-row grid would leave most SMs
    idle (small batches). Both accumulate every element's products in the same order, so G is the same bit for bit
    either way (and a sample's G the same alone as in a batch): H100, `bench_forward.py --parts gram_tiles`, ViT-B's
    196 / 123 / 78 tokens at batch 1: 9.7 / 8.2 / 7.4 -> 5.0 / 5.0 / 4.8 us; at batch 256 the 128-row tiles stay
    faster (114 against 120 us)."""
    bm = min(64 if is32 else 128, max(16, _p2(n)))  # float32 products on the FMA units: smaller tiles
    bk = 16 if is32 else 32
    if not is32 and bm == 128:
        t = _cdiv(n, bm)
        if bsz * t * (t + 1) // 2 < _num_sms(device):
            bm, bk = 64, 64
    return dict(IS_F32=is32, BM=bm, BK=bk, num_warps=8 if bm >= 128 else 4)


@triton.jit
def _apet_stage(g_ptr, v_ptr, basis_ptr, e_ptr, idx_ptr, N, K, KN, eps, pmin, sgb, sgn, svb, vo,
                HAS_VALID: tl.constexpr, SELECT: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                BR: tl.constexpr):
    # one program per sample; G row-major (last stride 1). Valid tokens: v[b, vo + i] > 0 (a bool mask, or the
    # sizes with vo = P). SELECT (apet_step): e holds ApET's selection scores instead (the error; +inf for the
    # basis, always kept; -inf for padding), and the KN best of them go to idx in spatial order (topk_sorted's
    # ranking); the basis is not stored
    b = tl.program_id(0).to(tl.int64)
    gb = g_ptr + b * sgb
    offs = tl.arange(0, NP)
    nm = offs < N
    sq = tl.load(gb + offs * (sgn + 1), mask=nm, other=0.0)
    if HAS_VALID:
        ok = nm & (tl.load(v_ptr + b * svb + vo + offs, mask=nm, other=0) > 0)
    else:
        ok = nm
    w = ok.to(tl.float32)
    # -- distance to the mean of the valid tokens: r_i = sum_{valid j} G_ij, over column tiles
    r = tl.zeros([NP], tl.float32)
    for j0 in range(0, N, BT):
        cj = j0 + tl.arange(0, BT)
        cm = cj < N
        if HAS_VALID:
            wj = (tl.load(v_ptr + b * svb + vo + cj, mask=cm, other=0) > 0).to(tl.float32)
        else:
            wj = cm.to(tl.float32)
        tile = tl.load(gb + offs[:, None] * sgn + cj[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
        r += tl.sum(tile * wj[None, :], 1)
    nv = tl.maximum(tl.sum(w, 0), 1.0)
    s = tl.sum(r * w, 0)
    dist = sq - 2.0 * r / nv + s / (nv * nv)
    dist = tl.where(ok, dist, float("-inf"))
    # -- farthest-point sampling: one row of G per step. The arg-max is one reduction: each distance as an int32 in
    #    the float order, in the high half of an int64 whose low half is NP - 1 - index, so the max is the first
    #    index of the max, as torch.argmax; |c|^2 = G_cc is loaded with its row (no second reduction per step)
    offs_k = tl.arange(0, KP)
    km = offs_k < K
    chosen = tl.zeros([KP], tl.int32)
    taken = offs < 0
    for j in range(0, K):
        bits = dist.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # negative floats: reversed order
        c = NP - 1 - (tl.max((key << 32) | (NP - 1 - offs).to(tl.int64), 0) & 0xFFFFFFFF).to(tl.int32)
        chosen = tl.where(offs_k == j, c, chosen)
        taken = taken | (offs == c)
        gc = tl.load(gb + c.to(tl.int64) * sgn + offs, mask=nm, other=0.0)
        sqc = tl.load(gb + c.to(tl.int64) * (sgn + 1))
        d = sq - 2.0 * gc + sqc
        dist = tl.where(j == 0, d, tl.minimum(dist, d))
        dist = tl.where(ok & (~taken), dist, float("-inf"))
    if not SELECT:
        tl.store(basis_ptr + b * K + offs_k, chosen.to(tl.int64), mask=km)
    # -- G_S^-1 by Gauss-Jordan on the k x k ridge matrix (SPD: no pivoting); padded rows are I
    eye = offs_k[:, None] == offs_k[None, :]
    g0 = tl.load(gb + chosen[:, None].to(tl.int64) * sgn + chosen[None, :], mask=km[:, None] & km[None, :], other=0.0)
    a = g0 + tl.where(eye, tl.where(km[:, None], eps, 1.0), 0.0)
    inv = tl.where(eye, 1.0, 0.0)
    for p in range(0, K):
        rsel = offs_k[:, None] == p
        rowp = tl.sum(tl.where(rsel, a, 0.0), 0)
        invp = tl.sum(tl.where(rsel, inv, 0.0), 0)
        # exact pivots of an SPD matrix + eps I are >= eps; float32 cancellation on a (near-)collinear
        # basis can take one to 0 or below: clamp, so the result stays finite
        piv = tl.maximum(tl.sum(tl.where(offs_k == p, rowp, 0.0), 0), pmin)
        rowp = rowp / piv
        invp = invp / piv
        f = tl.sum(tl.where(offs_k[None, :] == p, a, 0.0), 1)  # column p
        a = tl.where(rsel, rowp[None, :], a - f[:, None] * rowp[None, :])
        inv = tl.where(rsel, invp[None, :], inv - f[:, None] * invp[None, :])
    inv_t = tl.trans(inv)
    # -- errors, rows in tiles: c_i^T = b_i^T G_S^-T, e^2 = sq - 2 c.b + c^T G0 c
    for i0 in range(0, N, BR):
        ri = i0 + tl.arange(0, BR)
        rm = ri < N
        bt = tl.load(gb + ri[:, None] * sgn + chosen[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        sqi = tl.load(gb + ri * (sgn + 1), mask=rm, other=0.0)
        cf = tl.dot(bt, inv_t, input_precision="ieee")
        q = tl.dot(cf, g0, input_precision="ieee")
        e2 = sqi - 2.0 * tl.sum(cf * bt, 1) + tl.sum(q * cf, 1)
        e = tl.sqrt(tl.maximum(e2, 0.0))
        if SELECT:
            if HAS_VALID:
                e = tl.where(tl.load(v_ptr + b * svb + vo + ri, mask=rm, other=0) > 0, e, float("-inf"))
            basis_row = tl.sum(((ri[:, None] == chosen[None, :]) & km[None, :]).to(tl.int32), 1) > 0
            e = tl.where(basis_row, float("inf"), e)
        tl.store(e_ptr + b * N + ri, e, mask=rm)
    if SELECT:  # -- the KN best scores in spatial order (rank by score desc, index asc, as topk_sorted)
        tl.debug_barrier()  # the scores stored above are read below by other threads of this program
        sc = tl.load(e_ptr + b * N + offs, mask=nm, other=float("-inf"))
        keep = nm & _top_k_mask(sc, offs, KN)
        ki = keep.to(tl.int32)
        tl.store(idx_ptr + b * KN + tl.cumsum(ki, 0) - ki, offs.to(tl.int64), mask=keep)


APET_STAGE_MAX_N = 1024  # tokens one program holds (vectors of N in registers, G rows streamed)
APET_STAGE_MAX_K = 32  # basis tokens (the k x k solve lives in registers)


def apet_stage_fits(n: int, k: int) -> bool:
    return 1 <= k <= min(n, APET_STAGE_MAX_K) and n <= APET_STAGE_MAX_N


def apet_stage(g, valid, k: int, eps: float = 1e-5):
    """Basis ``[B, k]`` long and errors ``[B, N]`` float32 from ``g [B, N, N]``; see ``reference.apet_stage``."""
    bsz, n, _ = g.shape
    if not apet_stage_fits(n, k):
        raise ValueError(f"apet_stage kernel: N={n}, k={k} does not fit (N <= {APET_STAGE_MAX_N}, "
                         f"k <= {APET_STAGE_MAX_K}, k <= N)")
    if g.dtype != torch.float32:
        g = g.float()
    g, sg = _rows_contiguous(g)
    dev = g.device
    basis = _alloc((bsz, k), dev, torch.long)
    err = _alloc((bsz, n), dev, torch.float32)
    if valid is not None:
        v, sv = _rows_contiguous(valid.to(torch.uint8))
        svb = sv[0]
    else:
        v, svb = basis, 0
    fast(_apet_stage)[(bsz,)](g, v, basis, err, basis, n, k, 0, float(eps), max(float(eps), 1e-30), sg[0], sg[1], svb,
                              0, **_stage_config(n, k, valid is not None, False))
    return basis, err


def _stage_config(n: int, k: int, has_valid: bool, select: bool) -> dict:
    """The launch constants of ``_apet_stage`` for ``n`` tokens and ``k`` basis tokens."""
    np_ = max(16, _p2(n))
    return dict(HAS_VALID=has_valid, SELECT=select, NP=np_, KP=max(16, _p2(k)), BT=min(np_, max(4, 8192 // np_)),
                BR=min(np_, 64), num_warps=8 if np_ >= 256 else 4)


@triton.jit
def _apet_assign(g_ptr, keep_ptr, t_ptr, N, KN, sgb, sgn, BM: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ri = tl.program_id(1) * BM + tl.arange(0, BM)
    rm = ri < N
    gb = g_ptr + b * sgb
    invi = 1.0 / tl.maximum(tl.sqrt(tl.load(gb + ri * (sgn + 1), mask=rm, other=1.0)), 1e-6)
    best = tl.full([BM], float("-inf"), tl.float32)
    arg = tl.zeros([BM], tl.int32)
    own = tl.full([BM], -1, tl.int32)
    for j0 in range(0, KN, BK):
        sj = j0 + tl.arange(0, BK)
        jm = sj < KN
        kj = tl.load(keep_ptr + b * KN + sj, mask=jm, other=0)
        invj = 1.0 / tl.maximum(tl.sqrt(tl.load(gb + kj * (sgn + 1), mask=jm, other=1.0)), 1e-6)
        gt = tl.load(gb + ri[:, None] * sgn + kj[None, :], mask=rm[:, None] & jm[None, :], other=0.0)
        cos = gt * invi[:, None] * invj[None, :]
        cos = tl.where(jm[None, :], cos, float("-inf"))
        best, arg = _argmax_update(cos, sj, best, arg)  # ties: the lowest slot
        own = tl.maximum(own, tl.max(tl.where((kj[None, :] == ri[:, None]) & jm[None, :], sj[None, :], -1), 1))
    arg = tl.where(own >= 0, own, arg)
    tl.store(t_ptr + b * N + ri, arg.to(tl.int64), mask=rm)


def apet_assign(g, keep_idx):
    """Slot of the most cosine-similar kept token, ``[B, N]`` long, from ``g``; see ``reference.apet_assign``."""
    bsz, n, _ = g.shape
    kn = keep_idx.shape[1]
    if g.dtype != torch.float32:
        g = g.float()
    g, sg = _rows_contiguous(g)
    keep = keep_idx.contiguous()
    out = _alloc((bsz, n), g.device, torch.long)
    kw = _assign_config(n, kn)
    fast(_apet_assign)[(bsz, _cdiv(n, kw["BM"]))](g, keep, out, n, kn, sg[0], sg[1], **kw)
    return out


def _assign_config(n: int, kn: int) -> dict:
    """The launch constants of ``_apet_assign`` for ``n`` tokens and ``kn`` kept ones (``cdiv(n, BM)`` row tiles)."""
    bm = min(64, max(16, _p2(n)))
    return dict(BM=bm, BK=min(64, max(16, _p2(kn))), num_warps=8 if bm >= 64 else 4)


# ---------------------------------------------------------------------------------------------------
# 3. the merge in one launch: every token averaged (size-weighted) into its kept slot (NOTES.md section 6)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _apet_merge(x_ptr, s_ptr, t_ptr, keep_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr,
                P, N, K, C, N0, G, sxb, sxn, ssb, srcb, oxb, oxn,
                HAS_SIZES: tl.constexpr, HAS_SOURCE: tl.constexpr, LOWP: tl.constexpr, PP: tl.constexpr,
                BK: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    # program (b, g): output rows P + j (slot j of K) = sum_i s_i x_i / sum_i s_i over the tokens i
    # with target_i == j, as products W x with W[j, i] = s_i [target_i == j] on the tensor cores (no
    # sort, no scatter); a slot whose sizes sum to 0 copies its kept token. Program g writes the column
    # tiles g, g + G, ...; program 0 also writes the sizes (prefix, then the slot sums) and the source map
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs_p = tl.arange(0, PP)
    pm = offs_p < P
    for c0 in range(g * BC, C, G * BC):
        offs_c = c0 + tl.arange(0, BC)
        cm = offs_c < C
        _copy_prefix(x_ptr + b * sxb, x_ptr + b * sxb, ox_ptr + b * oxb, sxn, sxn, oxn, offs_p, pm, offs_c, cm, False)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            km = offs_k < K
            acc = tl.zeros([BK, BC], tl.float32)
            den = tl.zeros([BK], tl.float32)
            for i0 in range(0, N, BI):
                offs_i = i0 + tl.arange(0, BI)
                im = offs_i < N
                tg = tl.load(t_ptr + b * N + offs_i, mask=im, other=-1)
                si = _sizes_at(s_ptr + b * ssb, P + offs_i, im, HAS_SIZES)
                w = tl.where(tg[None, :] == offs_k[:, None], si[None, :], 0.0)  # [BK, BI]
                xt = tl.load(x_ptr + b * sxb + (P + offs_i)[:, None] * sxn + offs_c[None, :],
                             mask=im[:, None] & cm[None, :], other=0.0)
                if LOWP:  # sizes are exact in the token dtype: exact products, fp32 sums
                    acc += tl.dot(w.to(xt.dtype), xt)
                else:
                    acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
                den += tl.sum(w, 1)
            kidx = tl.load(keep_ptr + b * K + offs_k, mask=km, other=0)
            own = tl.load(x_ptr + b * sxb + (P + kidx)[:, None] * sxn + offs_c[None, :], mask=km[:, None] & cm[None, :],
                          other=0.0)
            out = tl.where((den > 0)[:, None], acc / tl.maximum(den, 1e-30)[:, None], own.to(tl.float32))
            tl.store(ox_ptr + b * oxb + (P + offs_k)[:, None] * oxn + offs_c[None, :], out.to(ox_ptr.dtype.element_ty),
                     mask=km[:, None] & cm[None, :])
            if g == 0:
                if c0 == 0:
                    tl.store(os_ptr + b * (P + K) + P + offs_k, den, mask=km)
    if g == 0:
        sp = _sizes_at(s_ptr + b * ssb, offs_p, pm, HAS_SIZES)
        tl.store(os_ptr + b * (P + K) + offs_p, sp, mask=pm)
        if HAS_SOURCE:
            for s0 in range(0, N0, BS):
                offs_s = s0 + tl.arange(0, BS)
                sm_ = offs_s < N0
                old = tl.load(src_ptr + b * srcb + offs_s, mask=sm_, other=-1)
                isp = old < P
                tgt = tl.load(t_ptr + b * N + tl.maximum(old - P, 0), mask=sm_ & (old >= P), other=0)
                new = tl.where(old < 0, -1, tl.where(isp, old, P + tgt))
                tl.store(osrc_ptr + b * N0 + offs_s, new.to(tl.int64), mask=sm_)


APET_MERGE_BC = 64
APET_MERGE_BK = 128
APET_MERGE_PROGRAMS_PER_SM = 4
# apet_merge pays where launches dominate: H100, ViT-B sizes (gpu_profile.py --only am): 10.9 us per stage
# at batch 1 (the sort + merge_rows + glue path: about 50 us in ~15 launches) but 222-257 us at batch 256,
# where that path takes about 70 us; so it runs up to this batch size
APET_MERGE_MAX_BATCH = 32


def apet_merge_fits(batch: int) -> bool:
    return batch <= APET_MERGE_MAX_BATCH  # a sample's column tiles split over programs until about this many per SM


def apet_merge(x, sizes, target, keep_idx, source, p: int, max_size: int | None = None):
    """ApET's merge step: returns ``(new_x [B, P + K, C], new_sizes [B, P + K] float32, new_source)``;
    see ``Apet.reduce`` (its PyTorch path) for the meaning. ``target [B, N]``: slot of each token."""
    bsz, t, c = x.shape
    k = keep_idx.shape[1]
    dev = x.device
    x, sx = _rows_contiguous(x)
    ssb = srcb = 0
    if sizes is not None:
        sizes, ss = _rows_contiguous(sizes)
        ssb = ss[0]
    target, keep_idx = target.contiguous(), keep_idx.contiguous()
    if source is not None:
        source, ssrc = _rows_contiguous(source)
        srcb = ssrc[0]
    out = _alloc((bsz, p + k, c), dev, x.dtype)  # strides ((p + k) c, c, 1)
    osz = _alloc((bsz, p + k), dev, torch.float32)
    n0 = source.shape[1] if source is not None else 0
    osrc = _alloc((bsz, n0), dev, torch.long) if source is not None else osz
    groups, args, kw = _merge_config(x, sx, sizes, ssb, srcb, source, p, k, max_size)
    fast(_apet_merge)[(bsz, groups)](x, sizes if sizes is not None else osz, target, keep_idx,
                                     source if source is not None else osz, out, osz, osrc, *args, **kw)
    return out, osz, (osrc if source is not None else None)


def _merge_config(x, sx, sizes, ssb: int, srcb: int, source, p: int, k: int, max_size):
    """``(column groups, int arguments, launch constants)`` of ``_apet_merge`` (tokens ``x`` with strides ``sx``)."""
    bsz, t, c = x.shape
    n0 = source.shape[1] if source is not None else 0
    bound = 1 if sizes is None else (max_size if max_size is not None else float("inf"))
    groups = _column_groups(c, APET_MERGE_BC, bsz, APET_MERGE_PROGRAMS_PER_SM, x.device)
    bk = min(APET_MERGE_BK, max(16, _p2(k)))  # slots per tile: every token tile is read once per slot tile
    return groups, (p, t - p, k, c, n0, groups, sx[0], sx[1], ssb, srcb, (p + k) * c, c), dict(
        HAS_SIZES=sizes is not None, HAS_SOURCE=source is not None, LOWP=_exact_lowp(x.dtype, bound), PP=_p2(max(p, 1)),
        BK=bk, BI=64, BC=APET_MERGE_BC, BS=256, num_warps=8 if bk >= 128 else 4)


# ---------------------------------------------------------------------------------------------------
# 4. the whole stage in four launches (small batches: batch 1 is bound by host time): Gram matrix, basis + errors +
#    selection, assignment, merge; everything but the tensors worked out once per input signature
# ---------------------------------------------------------------------------------------------------
APET_STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apet_step_fits(batch: int, n: int, k: int, dtype) -> bool:
    """Whether :func:`apet_step` runs ``batch`` samples of ``n`` non-prefix tokens of ``dtype`` with ``k`` basis tokens."""
    return apet_stage_fits(n, k) and apet_merge_fits(batch) and dtype in APET_STEP_DTYPES


def apet_step(x, sizes, source, p: int, k: int, keep: int, eps: float = 1e-5, padded: bool = False,
              max_size: int | None = None):
    """One ApET stage (``Apet.reduce`` on the Gram path; ``reference.apet_step``): returns ``(new_x [B, P + keep, C],
    new_sizes [B, P + keep] float32, new_source | None)``. ``padded``: size-0 slots are padding (``TokenState.padded``).
    Launches ``_gram`` (rows P.. of x), ``_apet_stage`` with the selection folded in (the scores' masking and the
    ranking: no aten op between the kernels), ``_apet_assign`` and ``_apet_merge``, planned once per input signature
    (an :class:`_ApetPlan`)."""
    key = (x.shape, x.stride(), x.dtype, x.device, _sig(sizes), _sig(source), p, k, keep, eps, padded, max_size,
           APET_MERGE_BC, APET_MERGE_BK, APET_MERGE_PROGRAMS_PER_SM)
    return cached_plan(_PLANS, key, _ApetPlan, x, sizes, source, p, k, keep, eps, padded, max_size)(x, sizes, source)


_PLANS: dict = {}  # apet_step's input signature -> its _ApetPlan


class _ApetPlan:
    """One signature's ApET stage: output and scratch shapes and the four launches over the tuple ``(x, sizes, source,
    G, scores, kept indices, target, out, out sizes, out source)``, absent ones stood for by another."""

    def __init__(self, x, sizes, source, p, k, keep, eps, padded, max_size):
        bsz, t, c = x.shape
        n = t - p
        if not apet_step_fits(bsz, n, k, x.dtype) or not k <= keep <= n:
            raise ValueError(f"apet_step: batch {bsz}, N={n}, k={k}, keep={keep}, {x.dtype} does not fit (batch <= "
                             f"{APET_MERGE_MAX_BATCH}, k <= keep <= N <= {APET_STAGE_MAX_N}, k <= {APET_STAGE_MAX_K}, "
                             f"fp16 / bf16 / fp32); use the separate kernels (Apet.reduce)")
        self.copy = any(a is not None and a.stride(-1) != 1 for a in (x, sizes, source))  # copied per call (rare)
        x, sizes, source = [_last_contiguous(a) for a in (x, sizes, source)]
        sx = x.stride()
        valid = padded and sizes is not None
        ssb = sizes.stride(0) if sizes is not None else 0
        srcb = source.stride(0) if source is not None else 0
        n0 = source.shape[1] if source is not None else 0
        self.dev, self.dtype, self.has_source = x.device, x.dtype, source is not None
        self.shapes = ((bsz, n, n), (bsz, n), (bsz, keep), (bsz, n), (bsz, p + keep, c), (bsz, p + keep), (bsz, n0))
        kg = _gram_config(n, x.dtype == torch.float32, bsz, x.device)
        ka = _assign_config(n, keep)
        tg, ta = _cdiv(n, kg["BM"]), _cdiv(n, ka["BM"])  # the grids follow the tiles
        groups, am, km = _merge_config(x, sx, sizes, ssb, srcb, source, p, keep, max_size)
        self.launches = LaunchGroup((
            LaunchPlan(_gram, (bsz, tg * tg), (0, 3), (n, c, tg, p, sx[0], sx[1], sx[2], n * n, n), kg, (0,)),
            LaunchPlan(_apet_stage, (bsz,), (3, 1 if valid else 4, 4, 4, 5),
                       (n, k, keep, float(eps), max(float(eps), 1e-30), n * n, n, ssb if valid else 0, p),
                       _stage_config(n, k, valid, True), (1,) if valid else ()),
            LaunchPlan(_apet_assign, (bsz, ta), (3, 5, 6), (n, keep, n * n, n), ka, ()),
            LaunchPlan(_apet_merge, (bsz, groups), (0, 1, 6, 5, 2, 7, 8, 9), am, km,
                       (0,) + ((1,) if sizes is not None else ()) + ((2,) if source is not None else ()))))

    def __call__(self, x, sizes, source):
        if self.copy:
            x, sizes, source = [_last_contiguous(a) for a in (x, sizes, source)]
        dev, (sg, se, si, st, so, ssz, ssrc) = self.dev, self.shapes
        f32 = torch.float32
        osz = _alloc(ssz, dev, f32)
        osrc = _alloc(ssrc, dev, torch.long) if self.has_source else osz
        t = (x, osz if sizes is None else sizes, osz if source is None else source, _alloc(sg, dev, f32),
             _alloc(se, dev, f32), _alloc(si, dev, torch.long), _alloc(st, dev, torch.long), _alloc(so, dev, self.dtype),
             osz, osrc)
        self.launches(t)
        return t[7], osz, (osrc if self.has_source else None)
