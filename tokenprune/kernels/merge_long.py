"""Triton kernels of the long inputs' merge step (``merge.merge_step`` above ``MERGE_STEP_MAX_A`` A tokens): from the
matching (``match._bm_best``) and the ranking (``match._merge_rank``), the plan (``_merge_plan``: sizes, source map,
which rows go where) and the row gather (``_merge_gather``, also the large-batch form's second launch); and those
four phases in one launch at batch 1 (``_merge_long``). Reference: ``reference.merge_step``; NOTES.md section 3.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import _at, _compose_source, _sizes_at, _tokens_at
from .match import _bm_tile, _rank_tile


@triton.jit
def _merge_plan(rk_ptr, s_ptr, src_ptr, os_ptr, osrc_ptr, scr_ptr, mt_ptr, ob_ptr, rows_ptr, perm_ptr,
                P, NA, NB, R, N0, ssb, srcb, sprm,
                HAS_SIZES: tl.constexpr, HAS_SOURCE: tl.constexpr, LOG_SIZES: tl.constexpr,
                NAP: tl.constexpr, BA: tl.constexpr, BS: tl.constexpr, PP: tl.constexpr,
                PERM: tl.constexpr = False):
    # _merge_step MODE 2 for any token count, one program per sample: from the ranks and partners _merge_rank wrote
    # (rk [B, NA]; each A token's partner in ``mt``, where MODE 2 leaves it), the sizes (and their log), the source
    # map, ``mt`` and the row map ``rows`` that _merge_gather reads; A tokens in tiles of BA.
    # PERM: as in _merge_step (the matching ran on the metric in that order), the prefix BS places at a time
    _plan_sample(tl.program_id(0).to(tl.int64), rk_ptr, s_ptr, src_ptr, os_ptr, osrc_ptr, scr_ptr, mt_ptr, ob_ptr,
                 rows_ptr, perm_ptr, P, NA, NB, R, N0, ssb, srcb, sprm, HAS_SIZES, HAS_SOURCE, LOG_SIZES, NAP, BA, BS,
                 PP, PERM)


@triton.jit
def _plan_sample(b, rk_ptr, s_ptr, src_ptr, os_ptr, osrc_ptr, scr_ptr, mt_ptr, ob_ptr, rows_ptr, perm_ptr, P, NA, NB,
                 R, N0, ssb, srcb, sprm, HAS_SIZES: tl.constexpr, HAS_SOURCE: tl.constexpr, LOG_SIZES: tl.constexpr,
                 NAP: tl.constexpr, BA: tl.constexpr, BS: tl.constexpr, PP: tl.constexpr, PERM: tl.constexpr):
    # _merge_plan's program b (also one phase of _merge_long)
    prm = perm_ptr + b * sprm
    n_unm = NA - R
    nout = P + n_unm + NB
    nt = P + NA + NB
    # prefix and B rows: their sizes (the B ones before any merge), source rows and new indices
    if PERM:
        for p0 in range(0, P, BS):
            o_p = p0 + tl.arange(0, BS)
            m_p = o_p < P
            r_p = _at(prm, o_p, m_p, PERM)
            tl.store(os_ptr + b * nout + o_p, _sizes_at(s_ptr + b * ssb, r_p, m_p, HAS_SIZES), mask=m_p)
            tl.store(rows_ptr + b * nout + o_p, r_p, mask=m_p)
            if HAS_SOURCE:
                tl.store(scr_ptr + b * nt + r_p, o_p, mask=m_p)
    else:
        offs_p = tl.arange(0, PP)
        pm = offs_p < P
        tl.store(os_ptr + b * nout + offs_p, _sizes_at(s_ptr + b * ssb, offs_p, pm, HAS_SIZES), mask=pm)
        tl.store(rows_ptr + b * nout + offs_p, offs_p, mask=pm)
        if HAS_SOURCE:
            tl.store(scr_ptr + b * nt + offs_p, offs_p, mask=pm)
    for j0 in range(0, NB, BA):
        offs_b = j0 + tl.arange(0, BA)
        bm = offs_b < NB
        row_b = _at(prm, P + 2 * offs_b + 1, bm, PERM)
        out_b = P + n_unm + offs_b
        tl.store(os_ptr + b * nout + out_b, _sizes_at(s_ptr + b * ssb, row_b, bm, HAS_SIZES), mask=bm)
        tl.store(rows_ptr + b * nout + out_b, row_b, mask=bm)
        if HAS_SOURCE:
            tl.store(scr_ptr + b * nt + row_b, out_b, mask=bm)
    tl.debug_barrier()  # the B rows' entries are written before some are overwritten below
    kept = 0
    for a0 in range(0, NA, BA):
        offs_a = a0 + tl.arange(0, BA)
        am = offs_a < NA
        # (".cg" loads: from L2, as _best_of) the R best-matched A tokens are merged away
        rank = tl.load(rk_ptr + b * NA + offs_a, mask=am, other=0, cache_modifier=".cg")
        arg = tl.load(mt_ptr + (2 * b) * NAP + offs_a, mask=am, other=0, cache_modifier=".cg")
        is_src = (rank < R) & am
        is_unm = am & (rank >= R)
        unm = is_unm.to(tl.int32)
        out_a = P + kept + tl.cumsum(unm, 0) - unm  # spatial order among kept A tokens
        kept += tl.sum(unm, 0)
        row_a = _at(prm, P + 2 * offs_a, am, PERM)
        sa = _sizes_at(s_ptr + b * ssb, row_a, am, HAS_SIZES)
        tl.store(mt_ptr + (2 * b + 1) * NAP + tl.where(is_src, rank, 0), offs_a, mask=is_src)
        tl.store(rows_ptr + b * nout + out_a, row_a, mask=is_unm)
        tl.store(os_ptr + b * nout + out_a, sa, mask=is_unm)
        tl.atomic_add(os_ptr + b * nout + P + n_unm + arg, sa, mask=is_src)  # integer sizes: exact in any order
        tl.store(rows_ptr + b * nout + P + n_unm + arg, tl.full([BA], -1, tl.int32), mask=is_src)
        if HAS_SOURCE:
            tl.store(scr_ptr + b * nt + row_a, tl.where(is_src, P + n_unm + arg, out_a), mask=am)
    tl.debug_barrier()  # sizes and the scratch map are complete before they are read below
    if LOG_SIZES:  # the next blocks' attention bias, log(size) in the token dtype (log 0 = -inf)
        for o0 in range(0, nout, BS):
            offs_o = o0 + tl.arange(0, BS)
            om = offs_o < nout
            sz = tl.load(os_ptr + b * nout + offs_o, mask=om, other=1.0)
            tl.store(ob_ptr + b * nout + offs_o, tl.log(sz).to(ob_ptr.dtype.element_ty), mask=om)
    if HAS_SOURCE:
        _compose_source(src_ptr + b * srcb, scr_ptr + b * nt, osrc_ptr + b * N0, N0, BS)


@triton.jit
def _fixup_tile(x_ptr, y_ptr, s_ptr, perm_ptr, b, P, sxb, sxn, syb, syn, ssb, sprm, arg, ik, argk, km, offs_c, cm,
                HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, LOWP: tl.constexpr, PERM: tl.constexpr):
    # _merge_gather's fix-up over a tile of merged A tokens i' (``ik``, their partners ``argk``, ``km`` the valid
    # ones): sum over them of W[i, i'] x_i' (columns offs_c) for the merged A tokens i whose partners are ``arg``,
    # with W[i, i'] = s_i' where j(i') = j(i); and the sum of W's rows
    row_s = _at(perm_ptr + b * sprm, P + 2 * ik, km, PERM)
    ss = _sizes_at(s_ptr + b * ssb, row_s, km, HAS_SIZES)
    xs = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_s, offs_c, sxn, syn, km[:, None] & cm[None, :], HAS_Y)
    w = tl.where((arg[:, None] == argk[None, :]) & km[None, :], ss[None, :], 0.0)  # [RP, RP]
    if LOWP:  # sizes are exact in the token dtype: products exact, sums in fp32
        part = tl.dot(w.to(xs.dtype), xs)
    else:
        part = tl.dot(w, xs.to(tl.float32), input_precision="ieee")
    return part, tl.sum(w, 1)


@triton.jit
def _merge_gather(x_ptr, y_ptr, s_ptr, mt_ptr, rows_ptr, ox_ptr, perm_ptr, P, NA, R, C, NOUT, NG, NCF, sxb, sxn,
                  syb, syn, ssb, oxb, oxn, sprm, HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, LOWP: tl.constexpr,
                  NAP: tl.constexpr, RP: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, BCF: tl.constexpr,
                  PERM: tl.constexpr = False, ONE: tl.constexpr = True):
    # programs (b, 0 .. NG-1): RB output rows each, whole rows copied from their source rows (``rows``
    # from _merge_step MODE 2) BC columns at a time: prefix, kept A and the B rows nothing merged into.
    # Programs (b, NG ..): RP merged A tokens (a tile of the rank order) x column tile BCF (NCF tiles) of the
    # B rows that receive merged tokens (row -1 in ``rows``). For the R merged A tokens i (rank order) with
    # partner j(i): row j = (s_j x_j + sum over A tokens i' into j of s_i' x_i') / (s_j + sum s_i'), from
    # W[i, i'] = s_i' where j(i') = j(i), summed over the i' in tiles of RP; A tokens with the same partner
    # write the same row with the same values (the same tiles in the same order).
    # HAS_Y: the tokens are x + y, the block's last residual add left to this kernel (rounded to the token
    # dtype before anything else, as the add would have stored it): x and y are read, x + y is never written.
    # PERM: the merged A tokens and their partners are places of the order ``perm`` (their rows read from it)
    _gather_tile(tl.program_id(0).to(tl.int64), tl.program_id(1), x_ptr, y_ptr, s_ptr, mt_ptr, rows_ptr, ox_ptr,
                 perm_ptr, P, NA, R, C, NOUT, NG, NCF, sxb, sxn, syb, syn, ssb, oxb, oxn, sprm, HAS_SIZES, HAS_Y, LOWP,
                 NAP, RP, RB, BC, BCF, PERM, ONE)


@triton.jit
def _gather_tile(b, t, x_ptr, y_ptr, s_ptr, mt_ptr, rows_ptr, ox_ptr, perm_ptr, P, NA, R, C, NOUT, NG, NCF, sxb, sxn,
                 syb, syn, ssb, oxb, oxn, sprm, HAS_SIZES: tl.constexpr, HAS_Y: tl.constexpr, LOWP: tl.constexpr,
                 NAP: tl.constexpr, RP: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, BCF: tl.constexpr,
                 PERM: tl.constexpr, ONE: tl.constexpr):
    # _merge_gather's program (b, t) (also one phase of _merge_long)
    if t < NG:
        offs_o = t * RB + tl.arange(0, RB)
        om = offs_o < NOUT
        src = tl.load(rows_ptr + b * NOUT + offs_o, mask=om, other=-1, cache_modifier=".cg")
        ok = om & (src >= 0)
        for c0 in range(0, C, BC):
            offs_c = c0 + tl.arange(0, BC)
            m = ok[:, None] & (offs_c < C)[None, :]
            xt = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, src, offs_c, sxn, syn, m, HAS_Y)
            tl.store(ox_ptr + b * oxb + offs_o[:, None] * oxn + offs_c[None, :], xt, mask=m)
    else:
        f = t - NG
        offs_c = (f % NCF) * BCF + tl.arange(0, BCF)
        cm = offs_c < C
        offs_r = (f // NCF) * RP + tl.arange(0, RP)
        rm = offs_r < R
        ia = tl.load(mt_ptr + (2 * b + 1) * NAP + offs_r, mask=rm, other=0, cache_modifier=".cg")  # rank offs_r's
        arg = tl.load(mt_ptr + (2 * b) * NAP + ia, mask=rm, other=-1, cache_modifier=".cg")  # A token, its partner
        row_b = _at(perm_ptr + b * sprm, P + 2 * arg + 1, rm, PERM)
        sb = _sizes_at(s_ptr + b * ssb, row_b, rm, HAS_SIZES)
        if ONE:  # up to 128 merged tokens: all of them in one [RP, RP] tile, the row tile itself
            acc, ws = _fixup_tile(x_ptr, y_ptr, s_ptr, perm_ptr, b, P, sxb, sxn, syb, syn, ssb, sprm, arg, ia, arg, rm,
                                  offs_c, cm, HAS_SIZES, HAS_Y, LOWP, PERM)
            tot = sb + ws
        else:  # in tiles of RP (a loop-carried accumulator: the one-tile form's [128, 128] tiles would spill in it)
            acc = tl.zeros([RP, BCF], tl.float32)
            tot = sb
            for k0 in tl.range(0, R, RP, num_stages=1):
                offs_k = k0 + tl.arange(0, RP)
                km = offs_k < R
                ik = tl.load(mt_ptr + (2 * b + 1) * NAP + offs_k, mask=km, other=0, cache_modifier=".cg")
                argk = tl.load(mt_ptr + (2 * b) * NAP + ik, mask=km, other=-1, cache_modifier=".cg")
                part, ws = _fixup_tile(x_ptr, y_ptr, s_ptr, perm_ptr, b, P, sxb, sxn, syb, syn, ssb, sprm, arg, ik,
                                       argk, km, offs_c, cm, HAS_SIZES, HAS_Y, LOWP, PERM)
                acc += part
                tot += ws
        xbf = _tokens_at(x_ptr + b * sxb, y_ptr + b * syb, row_b, offs_c, sxn, syn, rm[:, None] & cm[None, :],
                         HAS_Y).to(tl.float32)
        xb_new = tl.where((tot > 0)[:, None], (acc + sb[:, None] * xbf) / tl.maximum(tot, 1e-30)[:, None], xbf)
        out_b = P + (NA - R) + arg
        tl.store(ox_ptr + b * oxb + out_b[:, None] * oxn + offs_c[None, :], xb_new.to(ox_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])


@triton.jit
def _wait_count(ptr, target):
    # spin until the counter at ``ptr`` reaches ``target`` (acquire: what the counting programs wrote is visible)
    n = tl.atomic_add(ptr, 0, sem="acquire")
    while n < target:
        n = tl.atomic_add(ptr, 0, sem="acquire")


@triton.jit
def _count_done(ptr):
    # this program's writes are done (every thread's: the barrier), then the counter at ``ptr`` goes up (release)
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release")


@triton.jit
def _merge_long(x_ptr, y_ptr, s_ptr, src_ptr, ox_ptr, os_ptr, osrc_ptr, scr_ptr, bst_ptr, mt_ptr, ob_ptr, rows_ptr,
                perm_ptr, ip_ptr, rk_ptr, m_ptr, vb_ptr, ctr_ptr,
                P, NA, NB, R, C, D, N0, NOUT, smb, smn, smh, svb, svn, VOFF, NBS, sps, ssb, srcb, sprm, sxb, sxn, syb,
                syn, oxb, oxn, NG, NCF, T1, T2, T4,
                H: tl.constexpr, HAS_VALID: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, VEC: tl.constexpr, S: tl.constexpr, HAS_SIZES: tl.constexpr, PADDED: tl.constexpr,
                PERM: tl.constexpr, NAP: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, HAS_SOURCE: tl.constexpr,
                LOG_SIZES: tl.constexpr, BA: tl.constexpr, BS: tl.constexpr, PP: tl.constexpr, HAS_Y: tl.constexpr,
                LOWP: tl.constexpr, RP: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, BCF: tl.constexpr,
                ONE: tl.constexpr):
    # The long input's merge step of one sample in one launch of T1 + T2 + 1 + T4 programs: the four launches'
    # programs (_bm_best's T1, _merge_rank's T2, _merge_plan's one, _merge_gather's T4), each phase waiting for the
    # one before it. A program takes a ticket (an atomic count) when it starts and does the work of that place in
    # the phase order, so a program only ever waits for programs that hold lower tickets: those have started, and
    # run to the end whether or not the GPU can hold every program at once (no deadlock, no grid barrier). Under the
    # interpreter the programs run one after the other in ticket order, and every wait is already met.
    # ctr [5]: the ticket, the programs finished, and the three phases' done counts; the last program to finish sets
    # all five back to 0 for the next launch (they start at 0: the caller's zeroed buffer).
    t = tl.atomic_add(ctr_ptr, 1)
    b = (t * 0).to(tl.int64)  # one sample
    if t < T1:  # the matching: A tile t // S against the B tokens of split t % S
        _bm_tile(b, t // S, t % S, m_ptr, vb_ptr, bst_ptr, ip_ptr, NA, NB, D, P, smb, smn, smh, svb, svn, VOFF, NA,
                 NBS, sps, H, HAS_VALID, IS_F32, DP, BM, BN, VEC)
        _count_done(ctr_ptr + 2)
    elif t < T1 + T2:  # the ranking of A tile t - T1
        _wait_count(ctr_ptr + 2, T1)
        _rank_tile(b, t - T1, bst_ptr, ip_ptr, s_ptr, perm_ptr, rk_ptr, mt_ptr, P, NA, sps, ssb, sprm, S, HAS_SIZES,
                   PADDED, PERM, NAP, BR, BT)
        _count_done(ctr_ptr + 3)
    elif t == T1 + T2:  # the plan
        _wait_count(ctr_ptr + 3, T2)
        _plan_sample(b, rk_ptr, s_ptr, src_ptr, os_ptr, osrc_ptr, scr_ptr, mt_ptr, ob_ptr, rows_ptr, perm_ptr, P, NA,
                     NB, R, N0, ssb, srcb, sprm, HAS_SIZES, HAS_SOURCE, LOG_SIZES, NAP, BA, BS, PP, PERM)
        _count_done(ctr_ptr + 4)
    else:  # the rows: program t - T1 - T2 - 1 of _merge_gather
        _wait_count(ctr_ptr + 4, 1)
        _gather_tile(b, t - T1 - T2 - 1, x_ptr, y_ptr, s_ptr, mt_ptr, rows_ptr, ox_ptr, perm_ptr, P, NA, R, C, NOUT,
                     NG, NCF, sxb, sxn, syb, syn, ssb, oxb, oxn, sprm, HAS_SIZES, HAS_Y, LOWP, NAP, RP, RB, BC, BCF,
                     PERM, ONE)
    if tl.atomic_add(ctr_ptr + 1, 1) == T1 + T2 + T4:  # the last program to finish: nothing reads the counts now
        offs = tl.arange(0, 8)
        tl.store(ctr_ptr + offs, tl.zeros([8], tl.int32), mask=offs < 5)
