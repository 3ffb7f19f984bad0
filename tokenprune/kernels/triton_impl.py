"""Triton kernels of the hot paths. Imported only when a CUDA tensor asks for one (or by the tests,
under ``TRITON_INTERPRET=1`` on CPU). Same signatures and outputs as ``reference.py``.

Every kernel reads its inputs once and writes its outputs once (plus small fp32 partials), so they are
memory-bound; NOTES.md has the byte and FLOP counts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, num_warps) per head dim, for pass 1 (K, V -> context) and pass 2 (Q -> out);
# scripts/gpu_kernels.py may override these to compare variants.
EA_CONFIG = {
    # pass 2 from scripts/gpu_ea_sweep.py on an H100 (docs/gpu/ea_sweep_h100.json); pass 1 (fixed shift, tiles,
    # programs per SM) from scripts/gpu_profile.py --only ea --ea-fixed 1 / 2 (docs/gpu/profile_h100_run15_ea_fixed.json,
    # profile_h100_run16_ea_fixed2.json; GPU time d=64 34/93/53/159 us at B1 N8k / B4 N8k / B1 N16k / B1 N64k,
    # d=128 78/236/435 us at B1 N8k / B2 N16k / B1 N64k); the other keys from docs/gpu/profile_h100_ea.json
    "pass1": {64: (64, 4), 128: (64, 8)},
    "pass2": {64: (128, 8), 128: (64, 4)},
    "rows1": {64: 64, 128: 128},  # context rows (key features) one pass-1 program owns; < d re-reads V
    "stages": (None, None),  # software-pipelining depth of pass 1 / pass 2 (None: Triton's default)
    "maxnreg1": None,  # register cap per thread for pass 1 ({d: n}; None: the compiler's choice)
    # per head dim, a number or {d: value}
    "programs_per_sm": {64: 2, 128: 1},  # pass 1 splits N until about this many programs per SM are busy
    "dual": False,  # pass 1 runs two independent online-softmax chains per program (slower on H100)
    "ones_l": {64: False, 128: True},  # pass 1 takes the softmax row sums from the tensor cores (p^T @ ones)
    # pass 1 shifts each row by the max of its chunk's first tile and never rescales (no reduction across
    # threads per tile); a chunk whose exponentials overflowed is redone with its own max
    "fixed": True,
    "sub": 0,  # > 0: pass 1 takes the max over SUB tiles first, then exponentiates them (two loops, K re-read from L2)
    "combine_rows": 4,  # context rows per program of the split combine
    "combine_tile": 16384,  # elements of the [partials, rows, d] tile the combine reads at once
    "split_fill": True,  # split N only as far as one wave of programs fits (no partial second wave)
    "min_chunk": 512,  # fewest tokens one pass-1 program reduces before splitting N pays
}


POISON = False  # fill every buffer a kernel writes with NaN / -7 first (correctness checks: all written?)


def _alloc(shape, device, dtype):
    if not POISON:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, device=device, dtype=dtype)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _interpreted(kernel) -> bool:
    """True under TRITON_INTERPRET=1 (the interpreter takes no compiler options such as maxnreg)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _cfg(table, d):
    if not isinstance(table, dict):
        return table
    return table.get(d) or table[64 if d <= 64 else 128]


@triton.jit
def _unit_rows(t):
    # rows scaled to unit norm in t's own dtype, like the references (norm rounded, then the division)
    tf = t.to(tl.float32)
    nrm = tl.sqrt(tl.sum(tf * tf, 1)).to(t.dtype).to(tl.float32)
    return (tf / tl.maximum(nrm, 1e-6)[:, None]).to(t.dtype)


@triton.jit
def _rank_desc(vals, offs, row_ptr, N, BT: tl.constexpr):
    # rank of each value among the N values at row_ptr: how many come first by (value desc, index asc);
    # vals[i] is the value at index offs[i] of that row, counted against it in tiles of BT
    rank = tl.zeros(vals.shape, tl.int32)
    for t0 in range(0, N, BT):
        ot = t0 + tl.arange(0, BT)
        om = ot < N
        st = tl.load(row_ptr + ot, mask=om, other=float("-inf")).to(tl.float32)
        ahead = (st[None, :] > vals[:, None]) | ((st[None, :] == vals[:, None]) & (ot[None, :] < offs[:, None]))
        rank += tl.sum((ahead & om[None, :]).to(tl.int32), 1)
    return rank


@triton.jit
def _sizes_at(s_row, idx, mask, HAS_SIZES: tl.constexpr):
    # token sizes at rows idx of one sample's size row, in fp32 (1 without sizes); 0 where masked off
    if HAS_SIZES:
        return tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, 1.0, 0.0)


@triton.jit
def _tokens_at(x_row, y_row, rows, offs_c, sxn, syn, m, HAS_Y: tl.constexpr):
    # token rows ``rows`` x columns ``offs_c`` of one sample, 0 where masked off; HAS_Y: the tokens are
    # x + y (a block's last residual add left to the caller), summed in fp32 and rounded to x's dtype
    # as the add would have stored them
    xt = tl.load(x_row + rows[:, None] * sxn + offs_c[None, :], mask=m, other=0.0)
    if HAS_Y:
        yt = tl.load(y_row + rows[:, None] * syn + offs_c[None, :], mask=m, other=0.0)
        xt = (xt.to(tl.float32) + yt.to(tl.float32)).to(xt.dtype)
    return xt


@triton.jit
def _copy_prefix(x_row0, y_row0, o_row0, sxn, syn, oxn, offs_p, pm, offs_c, cm, HAS_Y: tl.constexpr):
    # the prefix rows (never reduced) of one column tile, copied to the same rows of the output
    # (HAS_Y: the rows of x + y, see _tokens_at)
    m = pm[:, None] & cm[None, :]
    xp = _tokens_at(x_row0, y_row0, offs_p, offs_c, sxn, syn, m, HAS_Y)
    tl.store(o_row0 + offs_p[:, None] * oxn + offs_c[None, :], xp, mask=m)


@triton.jit
def _compose_source(src_row, map_row, out_row, N0, BS: tl.constexpr):
    # out[s] = map[src[s]] (-1 stays -1): the source map after one reduction step, whose old -> new
    # row map was written to map_row by this program (a CTA barrier must separate the two)
    for s0 in range(0, N0, BS):
        offs_s = s0 + tl.arange(0, BS)
        sm_ = offs_s < N0
        old = tl.load(src_row + offs_s, mask=sm_, other=-1)
        new = tl.load(map_row + tl.maximum(old, 0), mask=sm_ & (old >= 0), other=-1)
        tl.store(out_row + offs_s, tl.where(old >= 0, new, -1).to(tl.int64), mask=sm_)


def _column_groups(c: int, bc: int, bsz: int, programs_per_sm: int, device) -> int:
    """Programs per sample for kernels that split a sample's ``c`` columns (tiles of ``bc``): enough
    for about ``programs_per_sm`` programs per SM, each with an even share of the tiles."""
    tiles = triton.cdiv(c, bc)
    groups = min(tiles, max(1, triton.cdiv(programs_per_sm * _num_sms(device), bsz)))
    return triton.cdiv(tiles, triton.cdiv(tiles, groups))


def _exact_lowp(dtype, max_size) -> bool:
    """Whether integer token sizes up to ``max_size`` are exact in ``dtype`` (fp16: 2048, bf16: 256), so
    size-weighted sums may take tensor-core products in the token dtype."""
    return (dtype == torch.float16 and max_size <= 2048) or (dtype == torch.bfloat16 and max_size <= 256)


# ---------------------------------------------------------------------------------------------------
# 1. efficient attention: out = softmax_d(q) @ (softmax_N(k + bias)^T v)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _ea_tile(k_base, v_base, bias_base, n0, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask, m, l, acc,
             HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, ONES_L: tl.constexpr, BLOCK_N: tl.constexpr):
    # one BLOCK_N tile of pass 1: online softmax over N per context row (key feature), rescaled when
    # the row max moves; with ONES_L the row sums come from the tensor cores (p^T @ ones) instead of a
    # reduction across threads
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    kt = tl.load(k_base + offs_n[:, None] * skn + offs_r[None, :], mask=nmask[:, None] & rmask[None, :],
                 other=0.0).to(tl.float32)
    vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    if HAS_BIAS:
        bt = tl.load(bias_base + offs_n * sbn, mask=nmask, other=0.0).to(tl.float32)
        kt = kt + bt[:, None]
    kt = tl.where(nmask[:, None], kt, float("-inf"))
    m_new = tl.maximum(m, tl.max(kt, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(kt - m_safe[None, :])
    if IS_F32:
        pt = tl.trans(p)
        vd = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pt, vd, input_precision="ieee")
    else:
        pt = tl.trans(p.to(vt.dtype))
        acc = acc * alpha[:, None] + tl.dot(pt, vt)
    if ONES_L:
        ones = tl.full([BLOCK_N, 16], 1.0, pt.dtype)
        if IS_F32:
            l = l * alpha[:, None] + tl.dot(pt, ones, input_precision="ieee")
        else:
            l = l * alpha[:, None] + tl.dot(pt, ones)
    else:
        l = l * alpha + tl.sum(p, 0)
    return m_new, l, acc


@triton.jit
def _ea_kmax(k_base, bias_base, start, end, skn, sbn, offs_r, rmask, HAS_BIAS: tl.constexpr, DR: tl.constexpr,
             BLOCK_N: tl.constexpr):
    # the max over tokens start..end-1 of each context row's key (+ bias): a K-only loop with an elementwise
    # running max, reduced across threads once at the end (-inf where every key is -inf)
    mt = tl.full([BLOCK_N, DR], float("-inf"), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_r[None, :], mask=nmask[:, None] & rmask[None, :],
                     other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            bt = tl.load(bias_base + offs_n * sbn, mask=nmask, other=0.0).to(tl.float32)
            kt = kt + bt[:, None]
        mt = tl.maximum(mt, kt)
    return tl.max(mt, 0)


@triton.jit
def _ea_sub(k_base, v_base, bias_base, c0, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask, m, l, acc,
            HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr,
            SUB: tl.constexpr, ONES_L: tl.constexpr):
    # SUB tiles of pass 1 in two loops: the first reads K only and keeps an elementwise running max
    # (no reduction across threads inside the loop), the second re-reads K (from L2: SUB tiles per
    # program were just read) with V and adds exp(k - m) into the context with a fixed m. The max and
    # the row sums are reduced across threads once per SUB tiles instead of once per tile, and the
    # context is rescaled once per sub-chunk
    sub_end = tl.minimum(c0 + SUB * BLOCK_N, end)
    m_new = tl.maximum(m, _ea_kmax(k_base, bias_base, c0, sub_end, skn, sbn, offs_r, rmask, HAS_BIAS, DR, BLOCK_N))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    l, acc = _ea_fixed(k_base, v_base, bias_base, c0, sub_end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                       m_safe, l * alpha, acc * alpha[:, None], HAS_BIAS, IS_F32, ONES_L, DR, BLOCK_N)
    return m_new, l, acc


@triton.jit
def _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask, m0, l, acc,
              HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, ONES_L: tl.constexpr, DR: tl.constexpr,
              BLOCK_N: tl.constexpr):
    # pass 1 with one fixed shift per context row, m0 (the max of the chunk's first tile): the loop has
    # no reduction across threads and no rescaling. The row sums come from the tensor cores (ONES_L) or
    # an elementwise [BLOCK_N, DR] tile summed once at the end. exp(k - m0) may exceed the range of the
    # product's input type when a later key is far above m0 (fp16: by more than 11); the caller checks
    # the result for inf / NaN and then runs it again with the chunk's own max
    if ONES_L:
        lt = tl.zeros([DR, 16], tl.float32)
    else:
        lt = tl.zeros([BLOCK_N, DR], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_r[None, :], mask=nmask[:, None] & rmask[None, :],
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
        l = l + tl.max(lt, 1)  # every column holds the row sum
    else:
        l = l + tl.sum(lt, 0)
    return l, acc


@triton.jit
def _ea_context(k_ptr, v_ptr, bias_ptr, ctx_ptr, part_ptr, m_ptr, l_ptr,
                N, H, D, chunk, S,
                skb, skh, skn, svb, svh, svn, sbb, sbn,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr,
                DR: tl.constexpr, BLOCK_N: tl.constexpr, DUAL: tl.constexpr, ONES_L: tl.constexpr,
                SUB: tl.constexpr, FIXED: tl.constexpr):
    # program (bh, s, r): tokens of chunk s, context rows r*DR..r*DR+DR-1 (key features; each row's
    # softmax over N needs only its own K column, so rows split without extra K reads). DUAL: two
    # independent (max, sum, context) chains over alternate tiles, merged at the end, so a program
    # has two dependency chains in flight
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: batch strides of long inputs pass 2^31
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_r = tl.program_id(2) * DR + tl.arange(0, DR)
    rmask = offs_r < D
    m = tl.full([DR], float("-inf"), tl.float32)
    if ONES_L and SUB == 0 and not FIXED:
        l = tl.zeros([DR, 16], tl.float32)
    else:
        l = tl.zeros([DR], tl.float32)
    acc = tl.zeros([DR, DP], tl.float32)
    start = s * chunk
    end = tl.minimum(start + chunk, N)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    bias_base = bias_ptr + b * sbb
    if FIXED:  # one shift per row from the first tile (see _ea_fixed); the chunk's max if that overflowed
        m0 = _ea_kmax(k_base, bias_base, start, tl.minimum(start + BLOCK_N, end), skn, sbn, offs_r, rmask,
                      HAS_BIAS, DR, BLOCK_N)
        m0 = tl.where(m0 == float("-inf"), 0.0, m0)
        l, acc = _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                           m0, l, acc, HAS_BIAS, IS_F32, ONES_L, DR, BLOCK_N)
        bad = tl.sum(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32))
        bad += tl.sum(((l != l) | (l == float("inf"))).to(tl.int32))
        if bad > 0:  # redo with the chunk's own max (a K-only pass): every exponential is then <= 1
            m0 = _ea_kmax(k_base, bias_base, start, end, skn, sbn, offs_r, rmask, HAS_BIAS, DR, BLOCK_N)
            m0 = tl.where(m0 == float("-inf"), 0.0, m0)
            l, acc = _ea_fixed(k_base, v_base, bias_base, start, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                               m0, tl.zeros([DR], tl.float32), tl.zeros([DR, DP], tl.float32), HAS_BIAS, IS_F32,
                               ONES_L, DR, BLOCK_N)
        m = m0
    elif SUB > 0:  # two loops per SUB tiles (see _ea_sub); DUAL does not apply
        for c0 in range(start, end, SUB * BLOCK_N):
            m, l, acc = _ea_sub(k_base, v_base, bias_base, c0, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                                m, l, acc, HAS_BIAS, IS_F32, DR, BLOCK_N, SUB, ONES_L)
    elif DUAL:
        m2 = tl.full([DR], float("-inf"), tl.float32)
        l2 = tl.zeros_like(l)
        acc2 = tl.zeros([DR, DP], tl.float32)
        for n0 in range(start, end, 2 * BLOCK_N):
            m, l, acc = _ea_tile(k_base, v_base, bias_base, n0, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                                 m, l, acc, HAS_BIAS, IS_F32, ONES_L, BLOCK_N)
            m2, l2, acc2 = _ea_tile(k_base, v_base, bias_base, n0 + BLOCK_N, end, skn, svn, sbn, offs_r, rmask,
                                    offs_d, dmask, m2, l2, acc2, HAS_BIAS, IS_F32, ONES_L, BLOCK_N)
        mx = tl.maximum(m, m2)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        a1 = tl.exp(m - mx_safe)
        a2 = tl.exp(m2 - mx_safe)
        acc = acc * a1[:, None] + acc2 * a2[:, None]
        if ONES_L:
            l = l * a1[:, None] + l2 * a2[:, None]
        else:
            l = l * a1 + l2 * a2
        m = mx
    else:
        for n0 in range(start, end, BLOCK_N):
            m, l, acc = _ea_tile(k_base, v_base, bias_base, n0, end, skn, svn, sbn, offs_r, rmask, offs_d, dmask,
                                 m, l, acc, HAS_BIAS, IS_F32, ONES_L, BLOCK_N)
    if ONES_L and SUB == 0 and not FIXED:
        l = tl.max(l, 1)  # every column holds the row sum
    offs_2 = offs_r[:, None] * DP + offs_d[None, :]
    if SPLIT:
        tl.store(part_ptr + (bh * S + s) * DP * DP + offs_2, acc)
        tl.store(m_ptr + (bh * S + s) * DP + offs_r, m)
        tl.store(l_ptr + (bh * S + s) * DP + offs_r, l)
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
    b, h, n, d = q.shape
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("efficient_attention kernel: the head dim must be contiguous")
    dp = max(16, _p2(d))
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    bh = b * h
    bn1, w1 = _cfg(EA_CONFIG["pass1"], dp)
    bn2, w2 = _cfg(EA_CONFIG["pass2"], dp)
    dr = min(_cfg(EA_CONFIG["rows1"], dp), dp)
    st1, st2 = ({} if st is None else {"num_stages": st} for st in EA_CONFIG["stages"])
    if _cfg(EA_CONFIG["maxnreg1"], dp) is not None and not _interpreted(_ea_context):
        st1["maxnreg"] = _cfg(EA_CONFIG["maxnreg1"], dp)
    if dt == torch.float32:  # float32 products run on the FMA units: smaller tiles, or they spill
        bn1, bn2 = 32, 32
    if split is None:
        slots = _cfg(EA_CONFIG["programs_per_sm"], dp) * _num_sms(q.device)
        per = bh * (dp // dr)
        want = max(1, slots // per) if EA_CONFIG["split_fill"] else triton.cdiv(slots, per)
        split = max(1, min(want, n // EA_CONFIG["min_chunk"]))
    chunk = triton.cdiv(triton.cdiv(n, split), bn1) * bn1
    split = triton.cdiv(n, chunk)
    ctx = _alloc((bh, dp, dp), q.device, dt)
    if bias is not None:
        bias2 = bias.reshape(bias.shape[0], bias.shape[-1]).expand(b, n)
        sbb, sbn = bias2.stride()
    else:
        bias2, sbb, sbn = k, 0, 0
    if split > 1:
        part = _alloc((bh, split, dp, dp), q.device, torch.float32)
        mpart = _alloc((bh, split, dp), q.device, torch.float32)
        lpart = _alloc((bh, split, dp), q.device, torch.float32)
    else:
        part = mpart = lpart = ctx
    _ea_context[(bh, split, dp // dr)](k, v, bias2, ctx, part, mpart, lpart, n, h, d, chunk, split,
                                       k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                       sbb, sbn, HAS_BIAS=bias is not None, SPLIT=split > 1,
                                       IS_F32=dt == torch.float32, DP=dp, DR=dr, BLOCK_N=bn1,
                                       DUAL=bool(_cfg(EA_CONFIG["dual"], dp)),
                                       ONES_L=bool(_cfg(EA_CONFIG["ones_l"], dp)),
                                       SUB=int(_cfg(EA_CONFIG["sub"], dp)) if dt != torch.float32 else 0,
                                       FIXED=bool(_cfg(EA_CONFIG["fixed"], dp)),
                                       num_warps=w1, **st1)
    if split > 1:
        rb = min(EA_CONFIG["combine_rows"], dp)
        sc = max(1, min(_p2(split), EA_CONFIG["combine_tile"] // (rb * dp)))
        _ea_combine[(bh, dp // rb)](part, mpart, lpart, ctx, split, DP=dp, SP=_p2(split), RB=rb, SC=sc,
                                    num_warps=4)
    # written as [B, N, H, d] so the caller's transpose(1, 2).reshape(B, N, H * d) is free
    out = _alloc((b, n, h, d), q.device, q.dtype).transpose(1, 2)
    _ea_apply[(bh, triton.cdiv(n, bn2))](q, ctx, out, n, h, d, q.stride(0), q.stride(1), q.stride(2),
                                         out.stride(0), out.stride(1), out.stride(2),
                                         IS_F32=dt == torch.float32, DP=dp, BLOCK_N=bn2,
                                         num_warps=w2, **st2)
    return out


# ---------------------------------------------------------------------------------------------------
# 1b. softmax attention with a per-key bias (proportional attention, padding): out = softmax(q k^T / sqrt(d) + b) v
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
BA_CONFIG = {"short": (64, 32, 4), "wide": (128, 32, 8), "long": (128, 64, 8), "short_max": 320, "max_n": 1024,
             "stages": None}  # software-pipelining depth of the key loop (None: Triton's default)


@triton.jit
def _ba_fwd(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, N, H, D, qk_scale,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbn, sob, soh, son,
            HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    mmask = offs_m < N
    dmask = offs_d < D
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


def biased_attention(q, k, v, bias=None):
    b, h, n, d = q.shape
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("biased_attention kernel: the head dim must be contiguous")
    dp = max(16, _p2(d))
    is_f32 = q.dtype == torch.float32
    if bias is not None:
        bias2 = bias.reshape(bias.shape[0], bias.shape[-1]).expand(b, n)
        sbb, sbn = bias2.stride()
    else:
        bias2, sbb, sbn = k, 0, 0
    # the long-sequence tiles only for d <= 64 (at d = 128 they spill; 64x32 measured faster at N=257)
    bm, bn, warps = BA_CONFIG["short" if n <= BA_CONFIG["short_max"] or dp > 64 else "long"]
    if dp <= 64 and n <= BA_CONFIG["short_max"] and BA_CONFIG.get("wide") and triton.cdiv(n, bm) % 2 == 0:
        bm, bn, warps = BA_CONFIG["wide"]
    if is_f32:  # float32 products run on the FMA units: small tiles
        bm, bn, warps = 32, 32, 4
    # written as [B, N, H, d] so the caller's transpose(1, 2).reshape(B, N, H * d) is free
    out = _alloc((b, n, h, d), q.device, q.dtype).transpose(1, 2)
    _ba_fwd[(b * h, triton.cdiv(n, bm))](q, k, v, bias2, out, n, h, d, d ** -0.5,
                                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                         v.stride(0), v.stride(1), v.stride(2), sbb, sbn,
                                         out.stride(0), out.stride(1), out.stride(2),
                                         HAS_BIAS=bias is not None, IS_F32=is_f32, DP=dp, BLOCK_M=bm, BLOCK_N=bn,
                                         num_warps=warps, **({} if BA_CONFIG["stages"] is None
                                                             else {"num_stages": BA_CONFIG["stages"]}))
    return out


# ---------------------------------------------------------------------------------------------------
# 2. one query row per head: scores [B, N] = sum_h w_h softmax_N(q_h . k_h * scale + bias)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _qs_logits(q_ptr, k_ptr, bias_ptr, lg_ptr, pm_ptr, ps_ptr, N, H, D, NB, scale,
               sqb, sqh, skb, skh, skn, sbb, sbn,
               HAS_BIAS: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (b, n-block, h): one head's logits for one block of keys, with the block's max and
    # sum of exponentials (one program per head: at batch 1 a loop over heads was a serial chain)
    b = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    qr = tl.load(q_ptr + b * sqb + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32)
    kt = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :],
                 mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    lg = tl.sum(kt * qr[None, :], 1) * scale
    if HAS_BIAS:
        lg = lg + tl.load(bias_ptr + b * sbb + offs_n * sbn, mask=nmask, other=0.0).to(tl.float32)
    lg = tl.where(nmask, lg, float("-inf"))
    tl.store(lg_ptr + (b * H + h) * N + offs_n, lg, mask=nmask)
    mx = tl.max(lg, 0)
    ms = tl.where(mx == float("-inf"), 0.0, mx)
    tl.store(pm_ptr + (b * H + h) * NB + nb, mx)
    tl.store(ps_ptr + (b * H + h) * NB + nb, tl.sum(tl.exp(lg - ms), 0))


@triton.jit
def _qs_reduce(lg_ptr, pm_ptr, ps_ptr, w_ptr, out_ptr, N, H, NB, swb, swh, swn,
               HAS_W: tl.constexpr, NBP: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_b = tl.arange(0, NBP)
    bmask = offs_b < NB
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, H):
        pm = tl.load(pm_ptr + (b * H + h) * NB + offs_b, mask=bmask, other=float("-inf"))
        ps = tl.load(ps_ptr + (b * H + h) * NB + offs_b, mask=bmask, other=0.0)
        mx = tl.max(pm, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        pms = tl.where(pm == float("-inf"), 0.0, pm)
        tot = tl.sum(ps * tl.exp(pms - mx), 0)
        lg = tl.load(lg_ptr + (b * H + h) * N + offs_n, mask=nmask, other=float("-inf"))
        a = tl.exp(lg - mx) / tot
        if HAS_W:
            a = a * tl.load(w_ptr + b * swb + h * swh + offs_n * swn, mask=nmask, other=0.0).to(tl.float32)
        acc += a
    if not HAS_W:
        acc = acc / H
    tl.store(out_ptr + b * N + offs_n, acc, mask=nmask)


# query_scores: keys per program below ``long_n`` tokens and from there on. H100 sweep (gpu_profile.py
# --only qs, docs/gpu/profile_h100_run5_qs_blockn.json, graph replay): 256 keys per program gained 2-4%
# at 16k tokens and lost 3% at 197; a loop over 2, 4 or 12 heads per program was slower at every shape
QS_CONFIG = {"short": 128, "long": 256, "long_n": 4096}


def query_scores(q_row, k, scale, bias=None, head_weights=None, block_n: int | None = None):
    b, h, n, d = k.shape
    if k.stride(-1) != 1 or q_row.stride(-1) != 1:
        raise ValueError("query_scores kernel: the head dim must be contiguous")
    dp = _p2(d)
    block_n = block_n or QS_CONFIG["long" if n >= QS_CONFIG["long_n"] else "short"]
    nb = triton.cdiv(n, block_n)
    lg = _alloc((b, h, n), k.device, torch.float32)
    pm = _alloc((b, h, nb), k.device, torch.float32)
    ps = _alloc((b, h, nb), k.device, torch.float32)
    if bias is not None:
        bias2 = bias.reshape(bias.shape[0], bias.shape[-1]).expand(b, n)
        sbb, sbn = bias2.stride()
    else:
        bias2, sbb, sbn = k, 0, 0
    _qs_logits[(b, nb, h)](q_row, k, bias2, lg, pm, ps, n, h, d, nb, float(scale),
                           q_row.stride(0), q_row.stride(1), k.stride(0), k.stride(1), k.stride(2), sbb, sbn,
                           HAS_BIAS=bias is not None, DP=dp, BLOCK_N=block_n, num_warps=4)
    out = _alloc((b, n), k.device, torch.float32)
    if head_weights is not None:
        w = torch.broadcast_to(head_weights, (b, h, n))
        sw = w.stride()
    else:
        w, sw = lg, (0, 0, 0)
    _qs_reduce[(b, nb)](lg, pm, ps, w, out, n, h, nb, sw[0], sw[1], sw[2],
                        HAS_W=head_weights is not None, NBP=max(2, _p2(nb)), BLOCK_N=block_n, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------
# 3a. bipartite matching: best B partner of every A token without the Na x Nb matrix in memory
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bm_best(m_ptr, vb_ptr, best_ptr, idx_ptr, NA, NB, D, smb, smn, svb,
             HAS_VALID: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pa = tl.program_id(1)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_a = pa * BM + tl.arange(0, BM)
    amask = offs_a < NA
    base = m_ptr + b * smb
    a = tl.load(base + (2 * offs_a)[:, None] * smn + offs_d[None, :], mask=amask[:, None] & dmask[None, :], other=0.0)
    an = _unit_rows(a)  # normalised in the metric's dtype, like the reference
    best = tl.full([BM], float("-inf"), tl.float32)
    arg = tl.zeros([BM], tl.int32)
    for b0 in range(0, NB, BN):
        offs_b = b0 + tl.arange(0, BN)
        bmask = offs_b < NB
        bt = tl.load(base + (2 * offs_b + 1)[:, None] * smn + offs_d[None, :], mask=bmask[:, None] & dmask[None, :],
                     other=0.0)
        bn_ = _unit_rows(bt)
        if IS_F32:  # no tf32: the same partners as the float32 reference
            sim = tl.dot(an, tl.trans(bn_), input_precision="ieee")
        else:
            sim = tl.dot(an, tl.trans(bn_)).to(a.dtype).to(tl.float32)  # rounded like the reference's matmul
        ok = bmask
        if HAS_VALID:
            ok = ok & (tl.load(vb_ptr + b * svb + offs_b, mask=bmask, other=0) != 0)
        sim = tl.where(ok[None, :], sim, float("-inf"))
        tmax = tl.max(sim, 1)
        # first column reaching the tile max (ties: the lowest index, as torch.max on the reference)
        cols = tl.where(sim == tmax[:, None], offs_b[None, :], 2147483647)
        targ = tl.min(cols, 1)
        better = tmax > best
        arg = tl.where(better, targ, arg)
        best = tl.where(better, tmax, best)
    tl.store(best_ptr + b * NA + offs_a, best, mask=amask)
    tl.store(idx_ptr + b * NA + offs_a, arg.to(tl.int64), mask=amask)


def bipartite_best(metric, valid_b=None):
    """``metric [B, N, d]`` (non-prefix tokens, may be a strided view). Same as ``reference.bipartite_best``."""
    bsz, n, d = metric.shape
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    na, nbb = (n + 1) // 2, n // 2
    dp = max(16, _p2(d))
    best = _alloc((bsz, na), metric.device, torch.float32)
    idx = _alloc((bsz, na), metric.device, torch.long)
    bm = 64 if na > 32 else (32 if na > 16 else 16)
    bn = 64
    if metric.dtype == torch.float32:  # float32 products on the FMA units: smaller tiles, or they spill
        bm, bn = min(bm, 32), 32
    if valid_b is not None:
        vb = valid_b.to(torch.uint8)
        svb = vb.stride(0)
    else:
        vb, svb = best, 0
    _bm_best[(bsz, triton.cdiv(na, bm))](metric, vb, best, idx, na, nbb, d, metric.stride(0), metric.stride(1), svb,
                                         HAS_VALID=valid_b is not None,
                                         IS_F32=metric.dtype == torch.float32, DP=dp, BM=bm, BN=bn, num_warps=4)
    return best.to(metric.dtype), idx


# ---------------------------------------------------------------------------------------------------
# 3b. merged rows: one pass over the tokens that build the output (gather + size-weighted scatter-reduce)
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
    if sizes is not None:
        s, ssb = sizes, sizes.stride(0)
        if sizes.stride(1) != 1:
            s = sizes.contiguous()
            ssb = s.stride(0)
    else:
        s, ssb = x, 0
    _merge_rows[(bsz * n_out,)](x, s, prim32, start, cnt, mem, out, n_out, max(r, 1), c,
                                x.stride(0), x.stride(1), ssb, out.stride(0), out.stride(1),
                                HAS_SIZES=sizes is not None, HAS_MEMBERS=r > 0, PRIM_IN_SUM=include_prim,
                                BC=min(1024, _p2(c)), num_warps=4)
    return out


def gather_rows(x, rows):
    """``out[b, o] = x[b, rows[b, o]]`` in one pass (16-byte row copies)."""
    return merge_rows(x, None, rows)


# ---------------------------------------------------------------------------------------------------
# 3b. keep the k best-scored tokens in spatial order (cls / random pruning, ApET's selection)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _keep_step(x_ptr, sc_ptr, s_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr, idx_ptr, scr_ptr,
               P, N, K, C, N0, G,
               sxb, sxn, scb, ssb, srcb, oxb, oxn,
               WRITE_X: tl.constexpr, HAS_SIZES: tl.constexpr, HAS_SOURCE: tl.constexpr, NP: tl.constexpr,
               PP: tl.constexpr, BT: tl.constexpr, RT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    # program (b, g). Every program ranks sample b's scores (by score desc, index asc: counted
    # against tiles of the scores; NaN ranks like the reference's topk is not guaranteed) and keeps
    # rank < K; the kept tokens go out in spatial order. Program g writes the column tiles g, g + G, ...
    # of the prefix and kept rows; program 0 also writes the kept indices, the sizes and the source map.
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = tl.arange(0, NP)
    nm = offs < N
    sc = tl.load(sc_ptr + b * scb + offs, mask=nm, other=float("-inf")).to(tl.float32)
    rank = _rank_desc(sc, offs, sc_ptr + b * scb, N, BT)
    keep = nm & (rank < K)
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


def topk_sorted(scores, k: int):
    """Indices ``[B, k]`` of the k best scores per row in ascending order (ties: lowest index first)."""
    return keep_step(scores[..., None], scores, None, None, 0, k, write_x=False)[3]


KEEP_STEP_MAX_N = 1024  # non-prefix tokens one program ranks
KEEP_STEP_BC = 64  # output columns per tile


def keep_step_fits(n: int) -> bool:
    return n <= KEEP_STEP_MAX_N


def keep_step(x, scores, sizes, source, p: int, k: int, write_x: bool = True):
    """``ops.topk_sorted`` + ``ops.gather_tokens`` (no padding) in one launch:
    returns ``(new_x | None, new_sizes | None, new_source | None, keep_idx [B, k])``."""
    bsz, t, c = x.shape
    n = t - p
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if sizes is not None and sizes.stride(-1) != 1:
        sizes = sizes.contiguous()
    if source is not None and source.stride(-1) != 1:
        source = source.contiguous()
    np_, pp = max(16, _p2(n)), _p2(max(p, 1))
    groups = _column_groups(c, KEEP_STEP_BC, bsz, 2, x.device) if write_x else 1
    out = _alloc((bsz, p + k, c), x.device, x.dtype) if write_x else x
    osz = _alloc((bsz, p + k), x.device, sizes.dtype) if sizes is not None else scores
    n0 = source.shape[1] if source is not None else 0
    osrc = _alloc((bsz, n0), x.device, torch.long) if source is not None else scores
    idx = _alloc((bsz, k), x.device, torch.long)
    scr = torch.empty((bsz * groups, pp + np_), device=x.device, dtype=torch.int32)
    _keep_step[(bsz, groups)](x, scores, sizes if sizes is not None else scores,
                              source if source is not None else scores, out, osz, osrc, idx, scr,
                              p, n, k, c, n0, groups,
                              x.stride(0), x.stride(1), scores.stride(0),
                              sizes.stride(0) if sizes is not None else 0,
                              source.stride(0) if source is not None else 0, out.stride(0), out.stride(1),
                              WRITE_X=write_x, HAS_SIZES=sizes is not None, HAS_SOURCE=source is not None,
                              NP=np_, PP=pp, BT=16 if np_ >= 512 else 32, RT=64, BC=KEEP_STEP_BC, BS=256,
                              num_warps=8 if np_ >= 512 else 4)
    return (out if write_x else None, osz if sizes is not None else None, osrc if source is not None else None,
            idx)


# ---------------------------------------------------------------------------------------------------
# 4. ApET reconstruction error: e_i = ||x_i - S^T G^-1 S x_i||, G = S S^T + eps I (float32)
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
    bsz, n, c = x.shape
    k = basis.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = basis.float().contiguous()
    g = s @ s.transpose(-1, -2) + eps * torch.eye(k, device=x.device)
    w = torch.linalg.solve_ex(g, s)[0].contiguous()  # G^-1 S, [B, k, C]; SPD (ridge): no host-side error check
    e = _alloc((bsz, n), x.device, torch.float32)
    bn = 64
    _apet_err[(bsz, triton.cdiv(n, bn))](x, w, s, e, n, c, k, x.stride(0), x.stride(1),
                                         KP=max(16, _p2(k)), BN=bn, BC=64, num_warps=8)
    return e


# ---------------------------------------------------------------------------------------------------
# 3c. the whole bipartite merge step in ONE launch (one program per sample; small token counts)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _merge_match(m_ptr, s_ptr, bst_ptr, b, g, G, P, NA, NB, smb, smn, ssb, offs_a, offs_d, am, dm, sa,
                 PADDED: tl.constexpr, IS_F32: tl.constexpr, NAP: tl.constexpr, BT: tl.constexpr):
    # -- matching: cosine similarity in the metric dtype, best B partner (lowest index on ties),
    #    B in column tiles so no NA x NB matrix lives in registers
    row_a = P + 2 * offs_a
    ma = tl.load(m_ptr + b * smb + row_a[:, None] * smn + offs_d[None, :], mask=am[:, None] & dm[None, :], other=0.0)
    an = _unit_rows(ma)
    best = tl.full([NAP], float("-inf"), tl.float32)
    arg = tl.zeros([NAP], tl.int32)
    for j0 in range(0, NB, BT):
        offs_t = j0 + tl.arange(0, BT)
        tm = offs_t < NB
        mt = tl.load(m_ptr + b * smb + (P + 2 * offs_t + 1)[:, None] * smn + offs_d[None, :],
                     mask=tm[:, None] & dm[None, :], other=0.0)
        tn = _unit_rows(mt)
        if IS_F32:
            sim = tl.dot(an, tl.trans(tn), input_precision="ieee")
        else:
            sim = tl.dot(an, tl.trans(tn)).to(ma.dtype).to(tl.float32)
        okt = tm
        if PADDED:
            okt = okt & (tl.load(s_ptr + b * ssb + P + 2 * offs_t + 1, mask=tm, other=0.0) > 0)
        sim = tl.where(okt[None, :], sim, float("-inf"))
        tmax = tl.max(sim, 1)
        targ = tl.min(tl.where(sim == tmax[:, None], offs_t[None, :], 2147483647), 1)
        better = tmax > best
        arg = tl.where(better, targ, arg)
        best = tl.where(better, tmax, best)
    if PADDED:
        best = tl.where(sa <= 0, float("inf"), best)  # padding slots are merged first
    # -- the R best-matched A tokens are merged away: rank by (best desc, index asc), counted
    #    against tiles of the other A tokens read back from scratch
    best = tl.where(am, best, float("-inf"))
    bst_row = bst_ptr + (b * G + g) * NAP  # one scratch row per program
    tl.store(bst_row + offs_a, best)
    tl.debug_barrier()
    rank = _rank_desc(best, offs_a, bst_row, NA, BT)
    return arg, rank


@triton.jit
def _merge_step(x_ptr, y_ptr, m_ptr, s_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr, scr_ptr, bst_ptr, mt_ptr, ob_ptr,
                rows_ptr, P, NA, NB, R, C, D, N0, G,
                sxb, sxn, syb, syn, smb, smn, ssb, srcb, oxb, oxn,
                HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, PADDED: tl.constexpr, HAS_SOURCE: tl.constexpr,
                IS_F32: tl.constexpr, LOWP: tl.constexpr, NAP: tl.constexpr, NBP: tl.constexpr, DP: tl.constexpr,
                BC: tl.constexpr, BS: tl.constexpr, PP: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr,
                LOG_SIZES: tl.constexpr):
    # MODE 0, program (b, g): every program of sample b matches and ranks (cheap: the metric is small)
    # and writes the column tiles g, g + G, ... of the output rows; program g = 0 also writes the sizes
    # and the source map. G > 1 spreads one sample's row traffic over several SMs (bs 1: one program
    # alone spends most of its time waiting on the serial column loop).
    # Large batches run two launches instead: MODE 2 (one program per sample) matches, ranks, writes
    # the sizes and the source map, and leaves each A token's partner and the merged A tokens in rank
    # order in ``mt`` and each output row's source row in ``rows``; then _merge_gather writes the rows. (MODE 1, the same
    # without ``rows``, fed session 5's _merge_apply, which wrote the rows per column tile: 99-110 us
    # against 81-82 for the gather at bs 256 N=196, docs/gpu/profile_h100_run28_ms.json)
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
    row_a = P + 2 * offs_a  # token index of A token i in x
    row_b = P + 2 * offs_b + 1
    sa = _sizes_at(s_ptr + b * ssb, row_a, am, HAS_SIZES)
    sb = _sizes_at(s_ptr + b * ssb, row_b, bm, HAS_SIZES)
    arg, rank = _merge_match(m_ptr, s_ptr, bst_ptr, b, g, G, P, NA, NB, smb, smn, ssb, offs_a, offs_d, am, dm, sa,
                             PADDED, IS_F32, NAP, BT)
    is_src = (rank < R) & am
    if MODE == 2:  # each A token's partner and, in rank order, the A tokens merged away
        tl.store(mt_ptr + (2 * b) * NAP + offs_a, arg)
        tl.store(mt_ptr + (2 * b + 1) * NAP + tl.where(is_src, rank, 0), offs_a, mask=is_src)
    is_unm = am & (rank >= R)
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
        tl.store(rows_ptr + b * nrow + offs_p, offs_p, mask=pm)
        tl.debug_barrier()  # the B rows' entries above are written before the -1 below overwrites some
        tl.store(rows_ptr + b * nrow + P + n_unm + arg, tl.full([NAP], -1, tl.int32), mask=is_src)
    for c0 in range(g * BC, C if MODE == 0 else 0, G * BC):  # MODE 2: no rows (_merge_gather writes them)
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
        _copy_prefix(x_ptr + b * sxb, y_ptr + b * syb, ox_ptr + b * oxb, sxn, syn, oxn, offs_p, pm, offs_c, cm, HAS_Y)
    if g == 0:  # sizes and source map: written once per sample, by program 0
        # -- sizes
        nout = P + n_unm + NB
        tl.store(os_ptr + b * nout + out_a, sa, mask=is_unm)
        tl.store(os_ptr + b * nout + out_b, tot, mask=bm)
        sp = _sizes_at(s_ptr + b * ssb, offs_p, pm, HAS_SIZES)
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
            tl.store(scr_ptr + b * nt + offs_p, offs_p, mask=pm)
            tl.debug_barrier()  # the scratch map written above is read below by other threads of this program
            _compose_source(src_ptr + b * srcb, scr_ptr + b * nt, osrc_ptr + b * N0, N0, BS)


@triton.jit
def _merge_gather(x_ptr, y_ptr, s_ptr, mt_ptr, rows_ptr, ox_ptr, P, NA, R, C, NOUT, NG, sxb, sxn, syb, syn, ssb,
                  oxb, oxn, HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, LOWP: tl.constexpr, NAP: tl.constexpr,
                  RP: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, BCF: tl.constexpr):
    # programs (b, 0 .. NG-1): RB output rows each, whole rows copied from their source rows (``rows``
    # from _merge_step MODE 2) BC columns at a time: prefix, kept A and the B rows nothing merged into.
    # Programs (b, NG ..): column tile BCF of the B rows that receive merged tokens (row -1 in ``rows``).
    # For the R merged A tokens i (rank order) with partner j(i): row j = (s_j x_j + sum over A tokens
    # i' into j of s_i' x_i') / (s_j + sum s_i'), from W[i, i'] = s_i' where j(i') = j(i); A tokens with
    # the same partner write the same row with the same values.
    # HAS_Y: the tokens are x + y, the block's last residual add left to this kernel (rounded to the token
    # dtype before anything else, as the add would have stored it): x and y are read, x + y is never written
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    if t < NG:
        offs_o = t * RB + tl.arange(0, RB)
        om = offs_o < NOUT
        src = tl.load(rows_ptr + b * NOUT + offs_o, mask=om, other=-1)
        ok = om & (src >= 0)
        for c0 in range(0, C, BC):
            offs_c = c0 + tl.arange(0, BC)
            m = ok[:, None] & (offs_c < C)[None, :]
            xt = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, src, offs_c, sxn, syn, m, HAS_Y)
            tl.store(ox_ptr + b * oxb + offs_o[:, None] * oxn + offs_c[None, :], xt, mask=m)
    else:
        offs_c = (t - NG) * BCF + tl.arange(0, BCF)
        cm = offs_c < C
        offs_r = tl.arange(0, RP)
        rm = offs_r < R
        ia = tl.load(mt_ptr + (2 * b + 1) * NAP + offs_r, mask=rm, other=0)  # A token of rank offs_r
        arg = tl.load(mt_ptr + (2 * b) * NAP + ia, mask=rm, other=-1)  # its B partner
        row_s = P + 2 * ia
        row_b = P + 2 * arg + 1
        ss = _sizes_at(s_ptr + b * ssb, row_s, rm, HAS_SIZES)
        sb = _sizes_at(s_ptr + b * ssb, row_b, rm, HAS_SIZES)
        xs = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_s, offs_c, sxn, syn, rm[:, None] & cm[None, :], HAS_Y)
        w = tl.where((arg[:, None] == arg[None, :]) & rm[None, :], ss[None, :], 0.0)  # [RP, RP]
        if LOWP:  # sizes are exact in the token dtype: products exact, sums in fp32
            acc = tl.dot(w.to(xs.dtype), xs)
        else:
            acc = tl.dot(w, xs.to(tl.float32), input_precision="ieee")
        tot = sb + tl.sum(w, 1)
        xbf = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_b, offs_c, sxn, syn, rm[:, None] & cm[None, :],
                         HAS_Y).to(tl.float32)
        xb_new = tl.where((tot > 0)[:, None], (acc + sb[:, None] * xbf) / tl.maximum(tot, 1e-30)[:, None], xbf)
        out_b = P + (NA - R) + arg
        tl.store(ox_ptr + b * oxb + out_b[:, None] * oxn + offs_c[None, :], xb_new.to(ox_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])


MERGE_STEP_MAX_A = 128  # A tokens (half the non-prefix tokens) one program holds: N <= 256 tokens
MERGE_STEP_WARPS = 8
MERGE_STEP_BC = 32  # output columns per tile (64 spills)
MERGE_STEP_PROGRAMS_PER_SM = 1  # small batches: a sample's columns split over programs up to about this many per SM
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


def merge_step_fits(n: int) -> bool:
    return (n + 1) // 2 <= MERGE_STEP_MAX_A


def merge_step(x, metric, sizes, source, p: int, r: int, padded: bool, max_size: int | None = None,
               log_sizes: bool = False, residual=None):
    """``ops.bipartite_merge`` in one launch: returns ``(new_x, new_sizes, new_source)``, and with
    ``log_sizes`` also ``log(new_sizes)`` in ``x``'s dtype (the proportional-attention bias).
    ``residual``: the tokens are ``x + residual`` (a block's last residual add, left undone); the kernel
    that writes the rows (one launch, or the large-batch row gather) reads both and never stores the sum."""
    bsz, t, c = x.shape
    n = t - p
    na, nb = (n + 1) // 2, n // 2
    d = metric.shape[-1]
    split = MERGE_STEP_SPLIT is not None and bsz >= MERGE_STEP_SPLIT["min_batch"]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"merge_step: residual {tuple(residual.shape)} {residual.dtype} does not match "
                             f"the tokens {tuple(x.shape)} {x.dtype}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    nout = p + na - r + nb
    out = _alloc((bsz, nout, c), x.device, x.dtype)
    osz = _alloc((bsz, nout), x.device, torch.float32)
    if sizes is not None and sizes.stride(-1) != 1:
        sizes = sizes.contiguous()
    if source is not None:
        source = source if source.stride(-1) == 1 else source.contiguous()
        n0 = source.shape[1]
        osrc = _alloc((bsz, n0), x.device, torch.long)
        scr = torch.empty((bsz, t), device=x.device, dtype=torch.int32)
    else:
        n0, osrc, scr = 0, osz, osz
    # sizes never exceed the input token count; products in the token dtype are exact while sizes are
    # (without a bound from the caller or a source map, sizes are unbounded: fp32 products)
    if sizes is None:
        max_size = 1
    elif max_size is None:
        max_size = source.shape[1] if source is not None else float("inf")
    lowp = _exact_lowp(x.dtype, max_size)
    s_arg = sizes if sizes is not None else osz
    nap = max(16, _p2(na))
    groups = 1 if split else _column_groups(c, MERGE_STEP_BC, bsz, MERGE_STEP_PROGRAMS_PER_SM, x.device)
    bst = torch.empty((bsz * groups, nap), device=x.device, dtype=torch.float32)
    mt = torch.empty((bsz, 2, nap), device=x.device, dtype=torch.int32) if split else bst
    rows = torch.empty((bsz, nout), device=x.device, dtype=torch.int32) if split else mt
    ob = _alloc((bsz, nout), x.device, x.dtype) if log_sizes else osz

    y = residual if residual is not None else x

    def launch(mode, grid, g, bc, warps, **extra):
        _merge_step[grid](x, y, metric, s_arg, source if source is not None else osz, out, osz, osrc, scr, bst, mt, ob,
                          rows, p, na, nb, r, c, d, n0, g,
                          x.stride(0), x.stride(1), y.stride(0), y.stride(1), metric.stride(0), metric.stride(1),
                          sizes.stride(0) if sizes is not None else 0, source.stride(0) if source is not None else 0,
                          out.stride(0), out.stride(1),
                          HAS_SIZES=sizes is not None, HAS_Y=residual is not None and mode == 0,
                          PADDED=bool(padded), HAS_SOURCE=source is not None,
                          IS_F32=metric.dtype == torch.float32, LOWP=lowp, NAP=nap,
                          NBP=max(16, _p2(nb)), DP=max(16, _p2(d)), BC=bc, BS=256, PP=_p2(max(p, 1)),
                          BT=32, MODE=mode, LOG_SIZES=log_sizes, num_warps=warps, **extra)

    if split:
        cap = MERGE_STEP_SPLIT.get("mmaxnreg") if bsz > _num_sms(x.device) else None
        launch(2, (bsz, 1), 1, MERGE_STEP_BC, MERGE_STEP_SPLIT.get("mwarps", MERGE_STEP_WARPS),
               **({"maxnreg": cap} if cap and not _interpreted(_merge_step) else {}))
        rb, fbc = MERGE_STEP_SPLIT["rb"], MERGE_STEP_SPLIT["fbc"]
        if r > 32:
            fbc = MERGE_STEP_SPLIT.get("fbc_many", fbc)
        if not lowp:  # float32 products: smaller tiles, or they spill
            fbc = 32
        ng = triton.cdiv(nout, rb)
        _merge_gather[(bsz, ng + triton.cdiv(c, fbc))](
            x, y, s_arg, mt, rows, out, p, na, r, c, nout, ng, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            sizes.stride(0) if sizes is not None else 0, out.stride(0), out.stride(1),
            HAS_SIZES=sizes is not None, HAS_Y=residual is not None, LOWP=lowp, NAP=nap, RP=max(16, _p2(r)), RB=rb,
            BC=min(MERGE_STEP_SPLIT["gbc"], _p2(c)), BCF=fbc,
            num_warps=MERGE_STEP_SPLIT["gwarps"] if r <= 64 else 8)  # 4 warps spill a [128, 128] fix-up tile
    else:
        launch(0, (bsz, groups), groups, MERGE_STEP_BC, MERGE_STEP_WARPS)
    if log_sizes:
        return out, osz, (osrc if source is not None else None), ob
    return out, osz, (osrc if source is not None else None)


# ---------------------------------------------------------------------------------------------------
# 5. one ApET stage from the per-sample Gram matrix: x read once (Gram), everything else from G
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
def _gram(x_ptr, g_ptr, N, C, T, sxb, sxn, sxc, sgb, sgn,
          IS_F32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # one BM x BM tile (ti, tj), tj >= ti, of G = X X^T; the mirror tile is stored transposed
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
        xb = x_ptr + b * sxb
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
    g = _alloc((bsz, n, n), x.device, torch.float32)
    bm = min(64 if is32 else 128, max(16, _p2(n)))  # float32 products on the FMA units: smaller tiles
    bk = 16 if is32 else 32
    t = triton.cdiv(n, bm)
    _gram[(bsz, t * t)](x, g, n, c, t, x.stride(0), x.stride(1), x.stride(2), g.stride(0), g.stride(1),
                        IS_F32=is32, BM=bm, BK=bk, num_warps=8 if bm >= 128 else 4)
    return g, g.diagonal(dim1=1, dim2=2)


@triton.jit
def _apet_stage(g_ptr, v_ptr, basis_ptr, e_ptr, N, K, eps, pmin, sgb, sgn, svb,
                HAS_VALID: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    # one program per sample; G row-major (last stride 1)
    b = tl.program_id(0).to(tl.int64)
    gb = g_ptr + b * sgb
    offs = tl.arange(0, NP)
    nm = offs < N
    sq = tl.load(gb + offs * (sgn + 1), mask=nm, other=0.0)
    if HAS_VALID:
        ok = nm & (tl.load(v_ptr + b * svb + offs, mask=nm, other=0) != 0)
    else:
        ok = nm
    w = ok.to(tl.float32)
    # -- distance to the mean of the valid tokens: r_i = sum_{valid j} G_ij, over column tiles
    r = tl.zeros([NP], tl.float32)
    for j0 in range(0, N, BT):
        cj = j0 + tl.arange(0, BT)
        cm = cj < N
        if HAS_VALID:
            wj = (tl.load(v_ptr + b * svb + cj, mask=cm, other=0) != 0).to(tl.float32)
        else:
            wj = cm.to(tl.float32)
        tile = tl.load(gb + offs[:, None] * sgn + cj[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
        r += tl.sum(tile * wj[None, :], 1)
    nv = tl.maximum(tl.sum(w, 0), 1.0)
    s = tl.sum(r * w, 0)
    dist = sq - 2.0 * r / nv + s / (nv * nv)
    dist = tl.where(ok, dist, float("-inf"))
    # -- farthest-point sampling: one row of G per step
    offs_k = tl.arange(0, KP)
    km = offs_k < K
    chosen = tl.zeros([KP], tl.int32)
    taken = offs < 0
    for j in range(0, K):
        m = tl.max(dist, 0)
        c = tl.min(tl.where(dist == m, offs, NP), 0)  # first index of the max, as torch.argmax
        chosen = tl.where(offs_k == j, c, chosen)
        taken = taken | (offs == c)
        gc = tl.load(gb + c.to(tl.int64) * sgn + offs, mask=nm, other=0.0)
        sqc = tl.sum(tl.where(offs == c, sq, 0.0), 0)
        d = sq - 2.0 * gc + sqc
        dist = tl.where(j == 0, d, tl.minimum(dist, d))
        dist = tl.where(ok & (~taken), dist, float("-inf"))
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
        tl.store(e_ptr + b * N + ri, tl.sqrt(tl.maximum(e2, 0.0)), mask=rm)


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
    if g.stride(-1) != 1:
        g = g.contiguous()
    basis = _alloc((bsz, k), g.device, torch.long)
    err = _alloc((bsz, n), g.device, torch.float32)
    if valid is not None:
        v = valid.to(torch.uint8)
        if v.stride(-1) != 1:
            v = v.contiguous()
        svb = v.stride(0)
    else:
        v, svb = basis, 0
    np_ = max(16, _p2(n))
    _apet_stage[(bsz,)](g, v, basis, err, n, k, float(eps), max(float(eps), 1e-30), g.stride(0), g.stride(1), svb,
                        HAS_VALID=valid is not None, NP=np_, KP=max(16, _p2(k)),
                        BT=min(np_, max(4, 8192 // np_)), BR=min(np_, 64), num_warps=8 if np_ >= 256 else 4)
    return basis, err


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
        tmax = tl.max(cos, 1)
        targ = tl.min(tl.where(cos == tmax[:, None], sj[None, :], 2147483647), 1)
        better = tmax > best  # strict: an earlier tile keeps a tie
        arg = tl.where(better, targ, arg)
        best = tl.where(better, tmax, best)
        own = tl.maximum(own, tl.max(tl.where((kj[None, :] == ri[:, None]) & jm[None, :], sj[None, :], -1), 1))
    arg = tl.where(own >= 0, own, arg)
    tl.store(t_ptr + b * N + ri, arg.to(tl.int64), mask=rm)


def apet_assign(g, keep_idx):
    """Slot of the most cosine-similar kept token, ``[B, N]`` long, from ``g``; see ``reference.apet_assign``."""
    bsz, n, _ = g.shape
    kn = keep_idx.shape[1]
    if g.dtype != torch.float32:
        g = g.float()
    if g.stride(-1) != 1:
        g = g.contiguous()
    keep = keep_idx.contiguous()
    out = _alloc((bsz, n), g.device, torch.long)
    bm = min(64, max(16, _p2(n)))
    _apet_assign[(bsz, triton.cdiv(n, bm))](g, keep, out, n, kn, g.stride(0), g.stride(1),
                                            BM=bm, BK=min(64, max(16, _p2(kn))), num_warps=8 if bm >= 64 else 4)
    return out


# ---------------------------------------------------------------------------------------------------
# 5b. ApET's merge in one launch: every token averaged (size-weighted) into its kept slot
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
    n = t - p
    k = keep_idx.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if sizes is not None and sizes.stride(-1) != 1:
        sizes = sizes.contiguous()
    target, keep_idx = target.contiguous(), keep_idx.contiguous()
    if source is not None and source.stride(-1) != 1:
        source = source.contiguous()
    bound = 1 if sizes is None else (max_size if max_size is not None else float("inf"))
    lowp = _exact_lowp(x.dtype, bound)
    groups = _column_groups(c, APET_MERGE_BC, bsz, APET_MERGE_PROGRAMS_PER_SM, x.device)
    bk = min(APET_MERGE_BK, max(16, _p2(k)))  # slots per tile: every token tile is read once per slot tile
    out = _alloc((bsz, p + k, c), x.device, x.dtype)
    osz = _alloc((bsz, p + k), x.device, torch.float32)
    n0 = source.shape[1] if source is not None else 0
    osrc = _alloc((bsz, n0), x.device, torch.long) if source is not None else osz
    _apet_merge[(bsz, groups)](x, sizes if sizes is not None else osz, target, keep_idx,
                               source if source is not None else osz, out, osz, osrc,
                               p, n, k, c, n0, groups, x.stride(0), x.stride(1),
                               sizes.stride(0) if sizes is not None else 0,
                               source.stride(0) if source is not None else 0, out.stride(0), out.stride(1),
                               HAS_SIZES=sizes is not None, HAS_SOURCE=source is not None, LOWP=lowp,
                               PP=_p2(max(p, 1)), BK=bk, BI=64, BC=APET_MERGE_BC, BS=256,
                               num_warps=8 if bk >= 128 else 4)
    return out, osz, (osrc if source is not None else None)
