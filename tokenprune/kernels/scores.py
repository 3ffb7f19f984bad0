"""Triton kernels of the one-query-row scores ([CLS] attention, a query vector): two launches, the
per-head logits with per-block max and sum, then the head mean or weighting. Reference:
``reference.query_scores``; NOTES.md section 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LaunchPlan, cached_plan, _alloc, _cdiv, _head_strides, _key_bias, _p2, _sig

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
    """``q_row [B, H, d]`` against ``k [B, H, N, d]`` -> ``[B, N]`` float32; see ``reference.query_scores``.
    ``block_n``: keys per program (None: from ``QS_CONFIG``). Everything but the tensors is worked out once per
    input signature (a :class:`_ScoresPlan`: batch 1 is bound by host time)."""
    key = (q_row.shape, q_row.stride(), q_row.dtype, k.shape, k.stride(), k.dtype, k.device, _sig(bias),
           _sig(head_weights), scale, block_n, *QS_CONFIG.values())
    plan = cached_plan(_PLANS, key, _ScoresPlan, q_row, k, scale, bias, head_weights, block_n)
    return plan(q_row, k, bias, head_weights)


_PLANS: dict = {}  # query_scores' input signature -> its _ScoresPlan


class _ScoresPlan:
    """One signature's scores: the two launches over ``(q_row, k, bias, logits, block maxima, block sums, head
    weights, out)``, absent ones stood for by another."""

    def __init__(self, q_row, k, scale, bias, head_weights, block_n):
        b, h, n, d = k.shape
        sq, sk = _head_strides("query_scores", q_row, k)
        self.dev = k.device
        block_n = block_n or QS_CONFIG["long" if n >= QS_CONFIG["long_n"] else "short"]
        nb = _cdiv(n, block_n)
        self.shapes = ((b, h, n), (b, h, nb), (b, n))
        bias2, sbb, sbn = _key_bias(bias, b, n, k)
        self.bias_as_is = bias2 is bias  # else reshaped per call (a layout _key_bias does not take as it is)
        sw = torch.broadcast_to(head_weights, (b, h, n)).stride() if head_weights is not None else (0, 0, 0)
        self.launches = (
            LaunchPlan(_qs_logits, (b, nb, h), range(6), (n, h, d, nb, float(scale), sq[0], sq[1], sk[0], sk[1], sk[2],
                                                          sbb, sbn),
                       dict(HAS_BIAS=bias is not None, DP=_p2(d), BLOCK_N=block_n, num_warps=4),
                       (0, 1, 2) if bias is not None else (0, 1)),
            LaunchPlan(_qs_reduce, (b, nb), (3, 4, 5, 6, 7), (n, h, nb, sw[0], sw[1], sw[2]),
                       dict(HAS_W=head_weights is not None, NBP=max(2, _p2(nb)), BLOCK_N=block_n, num_warps=4),
                       (6,) if head_weights is not None else ()))

    def __call__(self, q_row, k, bias, head_weights):
        dev, (slg, sp, so) = self.dev, self.shapes
        lg = _alloc(slg, dev, torch.float32)
        t = (q_row, k, k if bias is None else bias if self.bias_as_is else _key_bias(bias, so[0], so[1], k)[0], lg,
             _alloc(sp, dev, torch.float32), _alloc(sp, dev, torch.float32),
             lg if head_weights is None else torch.broadcast_to(head_weights, slg), _alloc(so, dev, torch.float32))
        for launch in self.launches:
            launch(t)
        return t[7]
