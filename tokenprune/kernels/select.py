"""Triton kernel of DivPrune's greedy max-min diversity selection (``reducers/diverse.py``): the whole greedy loop in
one program per sample, on the features' Gram matrix. Reference: ``reference.max_min_select``.

The loop is ``k`` dependent steps (argmax over the candidates, then one row of the distance matrix), so in PyTorch it
is ``k`` x 5 small launches (10 when run 32 timed it): at ViT-B budget 0.25 about 2,500 per forward then, which made
``diverse`` 7x slower than the unreduced model at batch 1 (run 32, H100: 32.4 against 4.6 ms eager, 5.57 against
0.75 ms under CUDA graphs) and 1.5x slower at batch 256. Here the chosen set's largest cosine to every token stays in
registers; a step reduces once (the pick and its ``1 / |f|``) and reads one row of ``G`` (``N`` floats, L2-resident;
run 38: 0.39 us a step; run 33, on a distance matrix, 0.33; run 37, the pick's norm worked out from ``G_pp`` after
the reduction, 0.42).
The cosines come from ``G = F F^T`` as the reference writes them, ``(G_ij r_i) r_j`` with ``r_i = 1 / max(sqrt(G_ii),
1e-12)`` (IEEE square root and division), so no normalised copy of the features and no ``N x N`` distance matrix is
made. The selection is the reference's bit for bit: those multiplies, ``1 - s`` (no fused multiply-add: the launch
turns FMA contraction off), max, argmax (lowest index on ties) and one float32 multiply by the weight are exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _alloc, _p2, _rows_contiguous, fast

MAX_N = 4096  # one program holds a sample's N-vectors in registers


@triton.jit
def _inv_norm(sq):
    # 1 / max(|f|, 1e-12) from |f|^2: F.normalize's eps, IEEE square root and division (the reference's bits)
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-12))


@triton.jit
def _best(a, ia, ra, b, ib, rb):
    # the larger score, the lower index on ties (torch.argmax's choice), with the token's 1 / |f| carried along
    first = (a > b) | ((a == b) & (ia < ib))
    return tl.where(first, a, b), tl.where(first, ia, ib), tl.where(first, ra, rb)


@triton.jit
def _max_min(g_ptr, v_ptr, w_ptr, o_ptr, N, K, sgb, sgn, svb, swb,
             HAS_VALID: tl.constexpr, HAS_W: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BN)
    inb = i < N
    gb = g_ptr + b * sgb
    ok = inb
    if HAS_VALID:
        ok = inb & (tl.load(v_ptr + b * svb + i, mask=inb, other=0) != 0)
    ri = _inv_norm(tl.load(gb + i * (sgn + 1), mask=inb, other=1.0))
    # the first pick's key: each token's largest cosine to another valid token (none: distance 1)
    top = tl.full([BN], float("-inf"), tl.float32)
    for j0 in range(0, N, BJ):
        j = j0 + tl.arange(0, BJ)
        jok = j < N
        if HAS_VALID:
            jok = jok & (tl.load(v_ptr + b * svb + j, mask=jok, other=0) != 0)
        rj = _inv_norm(tl.load(gb + j * (sgn + 1), mask=jok, other=1.0))
        t = tl.load(gb + i[:, None] * sgn + j[None, :], mask=inb[:, None] & jok[None, :], other=0.0)
        sim = (t * ri[:, None]) * rj[None, :]
        sim = tl.where((i[:, None] == j[None, :]) | ~jok[None, :], float("-inf"), sim)
        top = tl.maximum(top, tl.max(sim, axis=1))
    near = tl.where(top == float("-inf"), 1.0, 1.0 - top)  # the distance to the nearest (chosen) token
    if HAS_W:
        w = tl.load(w_ptr + b * swb + i, mask=inb, other=1.0)
    taken = ~ok  # chosen or padding: never a candidate
    for step in range(0, K):
        score = near
        if HAS_W:
            score = near * w
        # one reduction gives the pick and its 1 / |f| (a row with no candidate left picks index 0, already chosen or
        # padding); the row of G is then the only load the step waits for
        _, pick, rp = tl.reduce((tl.where(taken, float("-inf"), score), i, ri), 0, _best)
        taken = taken | (i == pick)
        row = tl.load(gb + pick * sgn + i, mask=inb, other=0.0)  # the new pick's row of G
        sim = (row * rp) * ri
        top = tl.where(step == 0, sim, tl.maximum(top, sim))  # the largest cosine to the chosen set
        near = 1.0 - top
    tl.store(o_ptr + b * N + i, (taken & ok).to(tl.int8), mask=inb)


def max_min_select_fits(n: int) -> bool:
    return 1 <= n <= MAX_N


def max_min_select(gram, k: int, valid=None, weight=None):
    """``[B, N]`` bool: ``k`` tokens per sample by greedy max-min cosine diversity from the Gram matrix ``gram``
    ``[B, N, N]``; see ``reference.max_min_select``."""
    bsz, n, _ = gram.shape
    if not max_min_select_fits(n):
        raise ValueError(f"max_min_select kernel: N={n} does not fit (N <= {MAX_N})")
    if bsz == 0:  # an empty batch: no program to launch
        return torch.zeros(0, n, dtype=torch.bool, device=gram.device)
    if gram.dtype != torch.float32:
        gram = gram.float()
    gram, sg = _rows_contiguous(gram)
    out = _alloc((bsz, n), gram.device, torch.int8)
    v, svb = out, 0
    if valid is not None:
        v, sv = _rows_contiguous(valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8))
        svb = sv[0]
    w, swb = out, 0
    if weight is not None:
        w, sw = _rows_contiguous(weight.float())
        swb = sw[0]
    fast(_max_min)[(bsz,)](gram, v, w, out, n, int(k), sg[0], sg[1], svb, swb, HAS_VALID=valid is not None,
                           HAS_W=weight is not None, enable_fp_fusion=False, **_config(n))
    return out.view(torch.bool)


def _config(n: int) -> dict:
    """The launch constants of ``_max_min`` for ``n`` tokens: the N-vectors' block, the column tile of the first
    pick's pass over ``G``, the warps."""
    bn = max(16, _p2(n))
    return dict(BN=bn, BJ=max(1, 4096 // bn), num_warps=4 if bn <= 1024 else 8)
