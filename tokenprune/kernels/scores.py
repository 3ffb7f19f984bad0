"""Triton kernels of attention scores without the N x N matrix in memory: the one-query-row scores ([CLS]
attention, a query vector; two launches, the per-head logits with per-block max and sum, then the head mean or
weighting) and the attention each key receives over all queries (two flash-style passes: each query's log-sum-exp,
then each key's column sum). References: ``reference.query_scores`` / ``received_scores``; NOTES.md sections 2, 2b.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (LaunchPlan, cached_plan, _alloc, _cdiv, _head_strides, _in_vectors, _key_bias,
                             _last_contiguous, _p2, _sig)

# ---------------------------------------------------------------------------------------------------
# one query row per head: scores [B, N] = sum_h w_h softmax_N(q_h . k_h * scale + bias)
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
def _qs_reduce(lg_ptr, pm_ptr, ps_ptr, w_ptr, out_ptr, o_ptr, N, NB, swb, swh, swn, sob, soh, son, D,
               H: tl.constexpr, HAS_W: tl.constexpr, HAS_O: tl.constexpr, DVP: tl.constexpr, NBP: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # H a compile-time constant: the head loop unrolls and its loads are in flight together; D: o's head dim
    b = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_b = tl.arange(0, NBP)
    bmask = offs_b < NB
    offs_v = tl.arange(0, DVP)
    acc = tl.zeros([BLOCK_N], tl.float32)
    wsum = tl.zeros([BLOCK_N], tl.float32)  # HAS_O: sum_h |o_h| per token
    for h in tl.static_range(H):
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
        if HAS_O:  # head importance |o_h| of each token, from the head's attention output row
            o = tl.load(o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_v[None, :],
                        mask=nmask[:, None] & (offs_v < D)[None, :], other=0.0).to(tl.float32)
            nrm = tl.sqrt_rn(tl.sum(o * o, 1))
            a = a * nrm
            wsum += nrm
        acc += a
    if HAS_O:
        acc = acc / tl.maximum(wsum, 1e-12)
    elif not HAS_W:
        acc = acc / H
    tl.store(out_ptr + b * N + offs_n, acc, mask=nmask)


# query_scores: keys per program below ``long_n`` tokens and from there on. H100 sweep (gpu_profile.py
# --only qs, docs/gpu/profile_h100_run5_qs_blockn.json, graph replay): 256 keys per program gained 2-4%
# at 16k tokens and lost 3% at 197; a loop over 2, 4 or 12 heads per program was slower at every shape
QS_CONFIG = {"short": 128, "long": 256, "long_n": 4096}


def query_scores(q_row, k, scale, bias=None, head_weights=None, head_values=None, block_n: int | None = None):
    """``q_row [B, H, d]`` against ``k [B, H, N, d]`` -> ``[B, N]`` float32; see ``reference.query_scores``
    (``head_values [B, H, N, dv]``: read by the second launch, each token's head norms computed there).
    ``block_n``: keys per program (None: from ``QS_CONFIG``). Everything but the tensors is worked out once per
    input signature (a :class:`_ScoresPlan`: batch 1 is bound by host time)."""
    head_values = _last_contiguous(head_values)
    key = (q_row.shape, q_row.stride(), q_row.dtype, k.shape, k.stride(), k.dtype, k.device, _sig(bias),
           _sig(head_weights), _sig(head_values), scale, block_n, *QS_CONFIG.values())
    plan = cached_plan(_PLANS, key, _ScoresPlan, q_row, k, scale, bias, head_weights, head_values, block_n)
    return plan(q_row, k, bias, head_weights, head_values)


_PLANS: dict = {}  # query_scores' input signature -> its _ScoresPlan


class _ScoresPlan:
    """One signature's scores: the two launches over ``(q_row, k, bias, logits, block maxima, block sums, head
    weights, out, head values)``, absent ones stood for by another."""

    def __init__(self, q_row, k, scale, bias, head_weights, head_values, block_n):
        b, h, n, d = k.shape
        sq, sk = _head_strides("query_scores", q_row, k)
        self.dev = k.device
        block_n = block_n or QS_CONFIG["long" if n >= QS_CONFIG["long_n"] else "short"]
        nb = _cdiv(n, block_n)
        self.shapes = ((b, h, n), (b, h, nb), (b, n))
        bias2, sbb, sbn = _key_bias(bias, b, n, k)
        self.bias_as_is = bias2 is bias  # else reshaped per call (a layout _key_bias does not take as it is)
        sw = torch.broadcast_to(head_weights, (b, h, n)).stride() if head_weights is not None else (0, 0, 0)
        if head_values is not None and (head_values.dim() != 4 or tuple(head_values.shape[:3]) != (b, h, n)):
            raise ValueError(f"query_scores: head_values must be [B, H, N, dv] = [{b}, {h}, {n}, dv], got "
                             f"{tuple(head_values.shape)}")
        so_, dv = (head_values.stride()[:3], head_values.shape[3]) if head_values is not None else ((0, 0, 0), 1)
        self.launches = (
            LaunchPlan(_qs_logits, (b, nb, h), range(6), (n, h, d, nb, float(scale), sq[0], sq[1], sk[0], sk[1], sk[2],
                                                          sbb, sbn),
                       dict(HAS_BIAS=bias is not None, DP=_p2(d), BLOCK_N=block_n, num_warps=4),
                       (0, 1, 2) if bias is not None else (0, 1)),
            LaunchPlan(_qs_reduce, (b, nb), (3, 4, 5, 6, 7, 8), (n, nb, *sw, *so_, dv),
                       dict(H=h, HAS_W=head_weights is not None, HAS_O=head_values is not None,
                            DVP=max(16, _p2(dv)), NBP=max(2, _p2(nb)), BLOCK_N=block_n, num_warps=4),
                       (6,) * (head_weights is not None) + (8,) * (head_values is not None)))

    def __call__(self, q_row, k, bias, head_weights, head_values):
        dev, (slg, sp, so) = self.dev, self.shapes
        lg = _alloc(slg, dev, torch.float32)
        t = (q_row, k, k if bias is None else bias if self.bias_as_is else _key_bias(bias, so[0], so[1], k)[0], lg,
             _alloc(sp, dev, torch.float32), _alloc(sp, dev, torch.float32),
             lg if head_weights is None else torch.broadcast_to(head_weights, slg), _alloc(so, dev, torch.float32),
             lg if head_values is None else head_values)
        for launch in self.launches:
            launch(t)
        return t[7]


# ---------------------------------------------------------------------------------------------------
# attention received: scores [B, N] = mean_h mean_{valid q} softmax_N(q_h . k_h * scale + bias)[q, :]
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _rs_rows(ptr, b, h, offs, offs_d, N, D, sb, sh, sn):
    # rows ``offs`` of head h of one sample's q or k, [len(offs), DP] in their dtype; 0 past N and D
    return tl.load(ptr + b * sb + h * sh + offs[:, None] * sn + offs_d[None, :],
                   mask=(offs < N)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _rs_logits(qt, kt, bias_ptr, b, offs_n, N, scale, sbb, sbn, HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr):
    # the logits of the query rows qt against the key rows kt (keys offs_n), float32 [BM, BN]; -inf past N
    if IS_F32:
        s = tl.dot(qt, tl.trans(kt), input_precision="ieee")
    else:  # fp16 / bf16 products are exact in the float32 accumulator
        s = tl.dot(qt, tl.trans(kt))
    s = s * scale
    if HAS_BIAS:
        s = s + tl.load(bias_ptr + b * sbb + offs_n * sbn, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return tl.where((offs_n < N)[None, :], s, float("-inf"))


@triton.jit
def _rs_lse(q_ptr, k_ptr, bias_ptr, lse_ptr, N, H, D, scale, sqb, sqh, sqn, skb, skh, skn, sbb, sbn,
            HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            VEC: tl.constexpr = 1):
    # program (b h, query block): each query's log-sum-exp over all keys (online max and sum); +inf for a
    # query whose keys are all masked, so that it adds nothing below. D and the q / k strides come divided by VEC
    D, sqb, sqh, sqn, skb, skh, skn = D * VEC, sqb * VEC, sqh * VEC, sqn * VEC, skb * VEC, skh * VEC, skn * VEC
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    qt = _rs_rows(q_ptr, b, h, offs_m, offs_d, N, D, sqb, sqh, sqn)
    mx = tl.full([BM], float("-inf"), tl.float32)
    tot = tl.zeros([BM], tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        kt = _rs_rows(k_ptr, b, h, offs_n, offs_d, N, D, skb, skh, skn)
        s = _rs_logits(qt, kt, bias_ptr, b, offs_n, N, scale, sbb, sbn, HAS_BIAS, IS_F32)
        new = tl.maximum(mx, tl.max(s, 1))
        shift = tl.where(new == float("-inf"), 0.0, new)
        tot = tot * tl.exp(mx - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
        mx = new
    lse = tl.where(tot > 0, mx + tl.log(tot), float("inf"))  # tot > 0: some key unmasked, mx finite
    tl.store(lse_ptr + bh * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _rs_cols(q_ptr, k_ptr, bias_ptr, lse_ptr, valid_ptr, out_ptr, N, H, D, scale, sqb, sqh, sqn, skb, skh, skn, sbb,
             sbn, svb, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, IS_F32: tl.constexpr, DP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, VEC: tl.constexpr = 1):
    # program (b h, key block): each key's attention summed over the valid queries, over their count (D and the
    # q / k strides divided by VEC, as in _rs_lse)
    D, sqb, sqh, sqn, skb, skh, skn = D * VEC, sqb * VEC, sqh * VEC, sqn * VEC, skb * VEC, skh * VEC, skn * VEC
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    kt = _rs_rows(k_ptr, b, h, offs_n, offs_d, N, D, skb, skh, skn)
    acc = tl.zeros([BN], tl.float32)
    cnt = tl.zeros([BM], tl.float32)
    for m0 in range(0, N, BM):
        offs_m = m0 + tl.arange(0, BM)
        mm = offs_m < N
        if HAS_VALID:
            mm = mm & (tl.load(valid_ptr + b * svb + offs_m, mask=mm, other=0) != 0)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=mm, other=float("inf"))  # left-out queries add exp(-inf)
        qt = _rs_rows(q_ptr, b, h, offs_m, offs_d, N, D, sqb, sqh, sqn)
        s = _rs_logits(qt, kt, bias_ptr, b, offs_n, N, scale, sbb, sbn, HAS_BIAS, IS_F32)
        acc += tl.sum(tl.exp(s - lse[:, None]), 0)
        cnt += mm.to(tl.float32)
    tl.store(out_ptr + bh * N + offs_n, acc / tl.maximum(tl.sum(cnt, 0), 1.0), mask=offs_n < N)


RS_TILES = (64, 64, 4)  # received_scores: queries per tile, keys per tile, warps


def received_scores(q, k, scale, bias=None, valid=None, lse=None):
    """``q, k [B, H, N, d]`` -> ``[B, N]`` float32; see ``reference.received_scores`` (``bias`` a key bias
    ``[B or 1, 1, 1, N]``, ``valid`` ``[B, N]`` bool for the queries). ``lse``: each query's log-sum-exp of its
    scores (``[B, H, N]``, or ``[B, H, N, 1]`` as cuDNN's attention returns it; natural log, the scale and bias
    applied), where the block's attention computed it: then only the column pass runs. Plans cached per input
    signature."""
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    if lse is not None:
        lse = lse.reshape(q.shape[:3]).float().contiguous()
    key = (q.shape, q.stride(), q.dtype, k.shape, k.stride(), k.dtype, k.device, _sig(bias), _sig(valid), scale,
           RS_TILES, lse is None)
    plan = cached_plan(_RS_PLANS, key, _ReceivedPlan, q, k, scale, bias, valid, lse is not None)
    return plan(q, k, bias, valid, lse)


_RS_PLANS: dict = {}


class _ReceivedPlan:
    """The two launches over ``(q, k, bias, lse, valid, per-head scores)``, absent ones stood for by another, or the
    second alone on a given ``lse``; the head mean is one op after them."""

    def __init__(self, q, k, scale, bias, valid, given_lse: bool = False):
        b, h, n, d = k.shape
        sq, sk = _head_strides("received_scores", q, k)
        bm, bn, warps = RS_TILES
        self.dev, self.shape = k.device, (b, h, n)
        bias2, sbb, sbn = _key_bias(bias, b, n, k)
        self.bias_as_is = bias2 is bias
        vec, (dv, *st) = _in_vectors(k.dtype, d, *sq[:3], *sk[:3])
        common = (n, h, dv, float(scale), *st, sbb, sbn)
        flags = dict(HAS_BIAS=bias is not None, IS_F32=k.dtype == torch.float32, DP=max(16, _p2(d)), BM=bm, BN=bn,
                     VEC=vec, num_warps=warps)
        inputs = (0, 1, 2) if bias is not None else (0, 1)
        svb = valid.stride(0) if valid is not None else 0
        cols_in = inputs + ((3,) if given_lse else ()) + ((4,) if valid is not None else ())  # a given lse: an input
        cols = LaunchPlan(_rs_cols, (b * h, _cdiv(n, bn)), range(6), common + (svb,),
                          dict(flags, HAS_VALID=valid is not None), cols_in)
        self.launches = (cols,) if given_lse else (
            LaunchPlan(_rs_lse, (b * h, _cdiv(n, bm)), range(4), common, flags, inputs), cols)

    def __call__(self, q, k, bias, valid, lse=None):
        b, h, n = self.shape
        lse = _alloc(self.shape, self.dev, torch.float32) if lse is None else lse
        out = _alloc(self.shape, self.dev, torch.float32)
        bias = k if bias is None else bias if self.bias_as_is else _key_bias(bias, b, n, k)[0]
        t = (q, k, bias, lse, lse if valid is None else valid.view(torch.uint8), out)
        for launch in self.launches:
            launch(t)
        return out.mean(1)
