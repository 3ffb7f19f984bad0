"""Triton kernels of attention: MAELRE's linear attention (two passes over the tokens) and softmax attention
with a per-key bias (proportional attention on short sequences). References: ``reference.efficient_attention``,
``reference.biased_attention``; NOTES.md sections 1 and 1b.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _alloc, _cdiv, _head_strides, _in_vectors, _key_bias, _metric_rows, _num_sms, _p2, fast

# (BLOCK_N, num_warps) per head dim, for pass 1 (K, V -> context) and pass 2 (Q -> out);
# scripts/gpu_kernels.py may override these to compare variants.
EA_CONFIG = {
    # pass 2 from scripts/gpu_ea_sweep.py on an H100 (docs/gpu/ea_sweep_h100.json); pass 1 (fixed shift, tiles,
    # programs per SM) from scripts/gpu_profile.py --only ea --ea-fixed 1 / 2 (docs/gpu/profile_h100_run15_ea_fixed.json,
    # profile_h100_run16_ea_fixed2.json; GPU time d=64 34/93/53/159 us at B1 N8k / B4 N8k / B1 N16k / B1 N64k,
    # d=128 78/236/435 us at B1 N8k / B2 N16k / B1 N64k); the other keys from docs/gpu/profile_h100_ea.json
    "pass1": {64: (64, 4), 128: (64, 8)},
    "pass2": {64: (128, 8), 128: (64, 4)},
    # per head dim, a number or {d: value}
    "programs_per_sm": {64: 2, 128: 1},  # pass 1 splits N until about this many programs per SM are busy (one wave)
    "ones_l": {64: False, 128: True},  # pass 1 takes the softmax row sums from the tensor cores (p^T @ ones)
    "combine_rows": 4,  # context rows per program of the split combine
    "combine_tile": 16384,  # elements of the [partials, rows, d] tile the combine reads at once
    "min_chunk": 512,  # fewest tokens one pass-1 program reduces before splitting N pays
}


def _cfg(table, d):
    """An ``EA_CONFIG`` entry for padded head dim ``d``: the value itself, or its ``{d: value}`` entry."""
    if not isinstance(table, dict):
        return table
    return table.get(d) or table[64 if d <= 64 else 128]


# ---------------------------------------------------------------------------------------------------
# 1. efficient attention: out = softmax_d(q) @ (softmax_N(k + bias)^T v)   (NOTES.md section 1)
#
#    Pass 1, program (b*h, chunk): the d x d context softmax_N(k + bias)^T v of its chunk of tokens, with
#    one fixed shift per context row (key feature) from the chunk's first tile (NOTES.md, session 6);
#    a combine kernel merges the chunks' partials when N is split; pass 2: softmax_d(q) @ context.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _ea_kmax(k_base, bias_base, start, end, skn, sbn, offs_d, dmask, HAS_BIAS: tl.constexpr, DP: tl.constexpr,
             BLOCK_N: tl.constexpr):
    # the shift of each context row: the max over tokens start..end-1 of its key (+ bias), 0 where every key is
    # -inf; a K-only loop with an elementwise running max, reduced across threads once at the end
    mt = tl.full([BLOCK_N, DP], float("-inf"), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                     other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            bt = tl.load(bias_base + offs_n * sbn, mask=nmask, other=0.0).to(tl.float32)
            kt = kt + bt[:, None]
        mt = tl.maximum(mt, kt)
    m = tl.max(mt, 0)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_d, dmask, m0,
              HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, ONES_L: tl.constexpr, DP: tl.constexpr,
              BLOCK_N: tl.constexpr):
    # the row sums l and the context acc of tokens start..end-1 with one fixed shift per context row, m0:
    # the loop has no reduction across threads and no rescaling. The row sums come from the tensor cores
    # (ONES_L) or an elementwise [BLOCK_N, DP] tile summed once at the end. exp(k - m0) may exceed the range
    # of the product's input type when a later key is far above m0 (fp16: by more than 11); the caller
    # checks the result for inf / NaN and then runs it again with the chunk's own max
    acc = tl.zeros([DP, DP], tl.float32)
    if ONES_L:
        lt = tl.zeros([DP, 16], tl.float32)
    else:
        lt = tl.zeros([BLOCK_N, DP], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                     other=0.0)
        if HAS_BIAS:
            bt = tl.load(bias_base + offs_n * sbn, mask=nmask, other=0.0).to(tl.float32)
            kt = kt + bt[:, None]
        p = tl.where(nmask[:, None], tl.exp(kt - m0[None, :]), 0.0)
        if IS_F32:
            pt = tl.trans(p)
            acc += tl.dot(pt, vt.to(tl.float32), input_precision="ieee")
        else:
            pt = tl.trans(p.to(vt.dtype))
            acc += tl.dot(pt, vt)
        if ONES_L:
            if IS_F32:
                lt += tl.dot(pt, tl.full([BLOCK_N, 16], 1.0, pt.dtype), input_precision="ieee")
            else:
                lt += tl.dot(pt, tl.full([BLOCK_N, 16], 1.0, pt.dtype))
        else:
            lt += p
    if ONES_L:
        l = tl.max(lt, 1)  # every column holds the row sum
    else:
        l = tl.sum(lt, 0)
    return l, acc


@triton.jit
def _ea_context(k_ptr, v_ptr, bias_ptr, ctx_ptr, part_ptr, m_ptr, l_ptr,
                N, H, D, chunk, S,
                skb, skh, skn, svb, svh, svn, sbb, sbn,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr,
                BLOCK_N: tl.constexpr, ONES_L: tl.constexpr):
    # program (bh, s): the context of the tokens of chunk s (all d context rows); SPLIT: stores the
    # unnormalised partial with its shifts and row sums for _ea_combine
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: batch strides of long inputs pass 2^31
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    start = s * chunk
    end = tl.minimum(start + chunk, N)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    bias_base = bias_ptr + b * sbb
    # one shift per row from the first tile (see _ea_fixed); the chunk's max if that overflowed
    m = _ea_kmax(k_base, bias_base, start, tl.minimum(start + BLOCK_N, end), skn, sbn, offs_d, dmask,
                 HAS_BIAS, DP, BLOCK_N)
    l, acc = _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_d, dmask, m,
                       HAS_BIAS, IS_F32, ONES_L, DP, BLOCK_N)
    bad = tl.sum(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32))
    bad += tl.sum(((l != l) | (l == float("inf"))).to(tl.int32))
    if bad > 0:  # redo with the chunk's own max (a K-only pass): every exponential is then <= 1
        m = _ea_kmax(k_base, bias_base, start, end, skn, sbn, offs_d, dmask, HAS_BIAS, DP, BLOCK_N)
        l, acc = _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_d, dmask, m,
                           HAS_BIAS, IS_F32, ONES_L, DP, BLOCK_N)
    offs_2 = offs_d[:, None] * DP + offs_d[None, :]
    if SPLIT:
        tl.store(part_ptr + (bh * S + s) * DP * DP + offs_2, acc)
        tl.store(m_ptr + (bh * S + s) * DP + offs_d, m)
        tl.store(l_ptr + (bh * S + s) * DP + offs_d, l)
    else:
        out = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(ctx_ptr + bh * DP * DP + offs_2, out.to(ctx_ptr.dtype.element_ty))


@triton.jit
def _ea_combine(part_ptr, m_ptr, l_ptr, ctx_ptr, S, DP: tl.constexpr, SP: tl.constexpr, RB: tl.constexpr,
                SC: tl.constexpr):
    # context row j (key feature j) only needs the S partials of that row: rows split over programs.
    # The partials are read SC at a time as one [SC, RB, DP] tile (independent loads in flight, not a
    # serial chain of S dependent loads)
    bh = tl.program_id(0)
    offs_r = tl.program_id(1) * RB + tl.arange(0, RB)
    offs_d = tl.arange(0, DP)
    offs_s = tl.arange(0, SP)
    smask = offs_s < S
    ms = tl.load(m_ptr + (bh * S + offs_s[:, None]) * DP + offs_r[None, :], mask=smask[:, None], other=float("-inf"))
    ls = tl.load(l_ptr + (bh * S + offs_s[:, None]) * DP + offs_r[None, :], mask=smask[:, None], other=0.0)
    mx = tl.max(ms, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(tl.exp(ms - mx[None, :]) * ls, 0)  # [RB]
    acc = tl.zeros([RB, DP], tl.float32)
    offs_c = tl.arange(0, SC)
    for s0 in range(0, S, SC):
        sc = s0 + offs_c
        cm = sc < S
        ws = tl.exp(tl.load(m_ptr + (bh * S + sc[:, None]) * DP + offs_r[None, :], mask=cm[:, None],
                            other=float("-inf")) - mx[None, :])  # [SC, RB]
        pt = tl.load(part_ptr + ((bh * S + sc[:, None, None]) * DP + offs_r[None, :, None]) * DP
                     + offs_d[None, None, :], mask=cm[:, None, None], other=0.0)  # [SC, RB, DP]
        acc += tl.sum(ws[:, :, None] * pt, 0)
    out = acc / tl.maximum(tot, 1e-30)[:, None]
    tl.store(ctx_ptr + bh * DP * DP + offs_r[:, None] * DP + offs_d[None, :], out.to(ctx_ptr.dtype.element_ty))


@triton.jit
def _ea_apply(q_ptr, ctx_ptr, o_ptr, N, H, D,
              sqb, sqh, sqn, sob, soh, son,
              IS_F32: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    nb = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: batch strides of long inputs pass 2^31
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    mask2 = nmask[:, None] & dmask[None, :]
    qt = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :], mask=mask2,
                 other=0.0).to(tl.float32)
    qt = tl.where(dmask[None, :], qt, float("-inf"))
    qt = tl.exp(qt - tl.max(qt, 1)[:, None])
    p = qt / tl.sum(qt, 1)[:, None]
    ctx = tl.load(ctx_ptr + bh * DP * DP + offs_d[:, None] * DP + offs_d[None, :])
    if IS_F32:
        o = tl.dot(p, ctx, input_precision="ieee")
    else:
        o = tl.dot(p.to(ctx.dtype), ctx)
    tl.store(o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mask2)


def efficient_attention(q, k, v, bias=None, split: int | None = None):
    """``[B, H, N, d]`` in, out laid out as ``[B, N, H, d]``; see ``reference.efficient_attention``. ``split``:
    chunks of N for pass 1 (None: enough for one wave of programs, chunks of at least ``min_chunk`` tokens)."""
    b, h, n, d = q.shape
    sq, sk, sv = _head_strides("efficient_attention", q, k, v)
    dp = max(16, _p2(d))
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    bh = b * h
    bn1, w1 = _cfg(EA_CONFIG["pass1"], dp)
    bn2, w2 = _cfg(EA_CONFIG["pass2"], dp)
    if dt == torch.float32:  # float32 products run on the FMA units: smaller tiles, or they spill
        bn1, bn2 = 32, 32
    if split is None:  # split N only as far as one wave of pass-1 programs fits (no partial second wave)
        slots = _cfg(EA_CONFIG["programs_per_sm"], dp) * _num_sms(q.device)
        split = max(1, min(max(1, slots // bh), n // EA_CONFIG["min_chunk"]))
    chunk = _cdiv(_cdiv(n, split), bn1) * bn1
    split = _cdiv(n, chunk)
    ctx = _alloc((bh, dp, dp), q.device, dt)
    bias2, sbb, sbn = _key_bias(bias, b, n, k)
    if split > 1:
        part = _alloc((bh, split, dp, dp), q.device, torch.float32)
        mpart = _alloc((bh, split, dp), q.device, torch.float32)
        lpart = _alloc((bh, split, dp), q.device, torch.float32)
    else:
        part = mpart = lpart = ctx
    fast(_ea_context)[(bh, split)](k, v, bias2, ctx, part, mpart, lpart, n, h, d, chunk, split,
                             sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sbb, sbn,
                             HAS_BIAS=bias is not None, SPLIT=split > 1,
                             IS_F32=dt == torch.float32, DP=dp, BLOCK_N=bn1,
                             ONES_L=bool(_cfg(EA_CONFIG["ones_l"], dp)), num_warps=w1)
    if split > 1:
        rb = min(EA_CONFIG["combine_rows"], dp)
        sc = max(1, min(_p2(split), EA_CONFIG["combine_tile"] // (rb * dp)))
        fast(_ea_combine)[(bh, dp // rb)](part, mpart, lpart, ctx, split, DP=dp, SP=_p2(split), RB=rb, SC=sc,
                                    num_warps=4)
    # written as [B, N, H, d] so the caller's transpose(1, 2).reshape(B, N, H * d) is free
    out = _alloc((b, n, h, d), q.device, q.dtype).transpose(1, 2)  # strides (n h d, d, h d, 1)
    fast(_ea_apply)[(bh, _cdiv(n, bn2))](q, ctx, out, n, h, d, sq[0], sq[1], sq[2], n * h * d, d, h * d,
                                         IS_F32=dt == torch.float32, DP=dp, BLOCK_N=bn2, num_warps=w2)
    return out


# ---------------------------------------------------------------------------------------------------
# 2. softmax attention with a per-key bias (proportional attention, padding): out = softmax(q k^T / sqrt(d) + b) v
#    (NOTES.md section 1b)
# ---------------------------------------------------------------------------------------------------
# SDPA has no fused path for an additive mask on short sequences: with the [B, 1, 1, N] log-size bias
# it leaves flash / cuDNN-flash for a masked kernel that is 1.5-3x slower at ViT sizes
# (docs/gpu/profile_h100_run1.json). This kernel adds the bias to the scores of one query tile at a
# time: the same online softmax as flash attention, the bias read once per key tile.
# (BLOCK_M, BLOCK_N, warps) for short and longer sequences, from the H100 run in
# docs/gpu/profile_h100_ba.json: 287 vs 485 us for SDPA with the bias at B256 H12 N197 d64; past ~1.5k
# tokens SDPA's masked kernel is as fast, so longer inputs keep it (max_n)
# "wide" (d <= 64): 128-query tiles where they pad no more query rows than 64-query tiles do (an even
# number of 64-row tiles): 268 vs 287 us at N=197, 93 vs 99 at N=99, while at N=148 (3 tiles of 64
# against 2 of 128) the 64-row tile wins, 174 vs 206 us (docs/gpu/profile_h100_run22_ea_split_ba.json;
# every 6th token count 20-320 in profile_h100_run24_ba_tokens.json: the rule holds to N=257)
BA_CONFIG = {"short": (64, 32, 4), "wide": (128, 32, 8), "long": (128, 64, 8), "short_max": 320, "max_n": 1024}


@triton.jit
def _ba_fwd(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, N, H, D, qk_scale,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbn, sob, soh, son, km_ptr, skmb, skmn, NBH,
            HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr = 1, KM_H: tl.constexpr = 0):
    # D and the q / k / v / out strides come divided by VEC (_triton_common._vec)
    D, sqb, sqh, sqn, skb, skh, skn = D * VEC, sqb * VEC, sqh * VEC, sqn * VEC, skb * VEC, skh * VEC, skn * VEC
    svb, svh, svn, sob, soh, son = svb * VEC, svh * VEC, svn * VEC, sob * VEC, soh * VEC, son * VEC
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mmask = offs_m < N
    dmask = offs_d < D
    if KM_H > 0:  # the programs past the NBH = B x H of the attention: the keys averaged over the KM_H heads
        if bh >= NBH:  # (ToMe's metric for the merge after this block), one query tile's rows of sample bh - NBH
            b = (bh - NBH).to(tl.int64)
            km = _metric_rows(k_ptr + b * skb, offs_m, offs_d, mmask[:, None] & dmask[None, :], skn, skh, KM_H)
            tl.store(km_ptr + b * skmb + offs_m[:, None] * skmn + offs_d[None, :], km,
                     mask=mmask[:, None] & dmask[None, :])
            return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    # a finite start: a row whose keys so far are all masked keeps exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    c = qk_scale * LOG2E
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IS_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # base-2 logits; the key bias (-inf past N) per key column, added in the same multiply-add
        if HAS_BIAS:
            kb = tl.load(bias_ptr + b * sbb + offs_n * sbn, mask=nmask, other=float("-inf")).to(tl.float32) * LOG2E
        else:
            kb = tl.where(nmask, 0.0, float("-inf"))
        s = s * c + kb[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IS_F32:
            acc = acc + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row whose keys are all masked gives 0, as SDPA does
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


def biased_attention_fits(n: int, d: int) -> bool:
    return n <= BA_CONFIG["max_n"] and d <= 128


def biased_attention(q, k, v, bias=None, key_mean: bool = False):
    """``[B, H, N, d]`` in, out laid out as ``[B, N, H, d]``; see ``reference.biased_attention``. ``key_mean``:
    returns ``(out, k.mean(1))`` (``[B, N, d]``, as ``reference.key_mean``), the mean from B more programs per
    query tile of the same launch."""
    b, h, n, d = q.shape
    sq, sk, sv = _head_strides("biased_attention", q, k, v)
    dp = max(16, _p2(d))
    is_f32 = q.dtype == torch.float32
    bias2, sbb, sbn = _key_bias(bias, b, n, k)
    kw = _ba_config(b, n, dp, is_f32)
    # written as [B, N, H, d] so the caller's transpose(1, 2).reshape(B, N, H * d) is free
    out = _alloc((b, n, h, d), q.device, q.dtype).transpose(1, 2)  # strides (n h d, d, h d, 1)
    km = _alloc((b, n, d), q.device, k.dtype) if key_mean else out
    vec, (dv, *st) = _in_vectors(q.dtype, d, *sq[:3], *sk[:3], *sv[:3], n * h * d, d, h * d)  # q k v out strides
    fast(_ba_fwd)[(b * h + (b if key_mean else 0), _cdiv(n, kw["BLOCK_M"]))](
        q, k, v, bias2, out, n, h, dv, d ** -0.5, *st[:9], sbb, sbn, *st[9:], km, n * d, d, b * h,
        HAS_BIAS=bias is not None, IS_F32=is_f32, DP=dp, VEC=vec, KM_H=h if key_mean else 0, **kw)
    return (out, km) if key_mean else out


def _ba_config(b: int, n: int, dp: int, is_f32: bool) -> dict:
    """``_ba_fwd``'s tile (``BLOCK_M``, ``BLOCK_N``) and warps for ``b`` samples of ``n`` tokens, padded head dim
    ``dp``; the grid follows ``BLOCK_M`` (``bench_forward.py --parts ba_tiles`` sweeps this)."""
    # the long-sequence tiles only for d <= 64 (at d = 128 they spill; 64x32 measured faster at N=257)
    bm, bn, warps = BA_CONFIG["short" if n <= BA_CONFIG["short_max"] or dp > 64 else "long"]
    if dp <= 64 and n <= BA_CONFIG["short_max"] and BA_CONFIG.get("wide") and _cdiv(n, bm) % 2 == 0:
        bm, bn, warps = BA_CONFIG["wide"]
    if is_f32:  # float32 products run on the FMA units: small tiles
        bm, bn, warps = 32, 32, 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)


