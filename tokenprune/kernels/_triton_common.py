"""What the Triton kernel modules share: buffer allocation, sizes, launch settings, and the small
``@triton.jit`` helpers several kernels inline (ranking, token rows and sizes, the source map, the running
argmax over column tiles).

The kernels themselves live by op family: ``attention.py`` (linear and key-bias attention), ``scores.py``
(one query row), ``merge.py`` (ToMe: matching, merged rows, the merge step, row gather), ``keep.py``
(keep the k best) and ``apet.py`` (ApET: errors, Gram matrix, stage, assignment, merge). Each launcher has
the signature and outputs of its PyTorch reference in ``reference.py``; NOTES.md counts their bytes and FLOPs.
These modules import ``triton`` at import time: the package imports them lazily (``kernels._impl``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False  # fill every buffer a kernel writes with NaN / -7 first (correctness checks: all written?)


def _alloc(shape, device, dtype):
    """An output buffer (NaN / -7 filled with ``POISON``: the tests then see any element a kernel left unwritten)."""
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


def _key_bias(bias, b: int, n: int, dummy):
    """The ``[B, 1, 1, N]`` key bias as ``(tensor, batch stride, token stride)`` for a kernel, broadcast over
    the batch if given for one sample; without a bias ``dummy`` (any tensor, never read) and zero strides."""
    if bias is None:
        return dummy, 0, 0
    bias2 = bias.reshape(bias.shape[0], bias.shape[-1]).expand(b, n)
    return (bias2, *bias2.stride())


def _require_contiguous_head_dim(name: str, *tensors) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} kernel: the head dim must be contiguous")


@triton.jit
def _argmax_update(vals, cols, best, arg):
    # running argmax over column tiles: the max of each row of ``vals`` [rows, cols] and its first column
    # (ties: the lowest index, as torch.max / argmax), kept where it beats ``best`` strictly (an earlier
    # tile keeps a tie)
    tmax = tl.max(vals, 1)
    targ = tl.min(tl.where(vals == tmax[:, None], cols[None, :], 2147483647), 1)
    better = tmax > best
    return tl.where(better, tmax, best), tl.where(better, targ, arg)
