"""The per-forward token state.

One :class:`TokenState` is created at the start of every encoder forward and
passed from block to block; nothing about a forward is kept on modules or in
globals. Tokens are ``[B, P + N, C]`` with the ``P`` prefix tokens first.

``sizes``  ``[B, P + N]`` float, how many original tokens each token stands for.
           ``None`` means "all ones" (nothing merged, nothing padded), which
           keeps attention on the unmasked flash path. A size of 0 marks a
           padding slot: samples of a batch that keep fewer tokens than others
           are padded, and ``log(0) = -inf`` in the attention bias masks those
           keys, so each sample computes what it would compute alone.
``source`` ``[B, N0]`` long: for every original non-prefix token, the index of
           the current token that holds it (prefix included in the index), or
           -1 where it was dropped. ``None`` when source tracking is off.
``residual`` ``[B, P + N, C]`` or ``None``: when set, the tokens are ``x + residual``. A block
           whose final residual add is left to the reducer that follows it (``engine.run_blocks``)
           hands over both halves; :meth:`TokenState.materialize` adds them.
``input_grid`` the grid of the encoder's input tokens (``grid`` may change, e.g. after ``pool``).

Positions inside attention (RoPE): :meth:`TokenState.positions` says, for every current token, which
input token's position it carries, derived from the source map, so every reducer serves these
families without knowing about positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class TokenState:
    x: torch.Tensor
    num_prefix: int
    num_input: int  # non-prefix tokens at the encoder input (N0)
    grid: tuple[int, ...] | None = None
    sizes: torch.Tensor | None = None
    source: torch.Tensor | None = None
    proportional: bool = True  # add log(size) to attention logits (ToMe's proportional attention)
    padded: bool = False  # some sizes are 0 (samples keep different counts)
    block: int = -1  # index of the last block that ran
    tokens_per_block: list[int] = field(default_factory=list)  # tokens entering each block (prefix incl.)
    scratch: dict = field(default_factory=dict)  # per-forward accumulators of reducers (e.g. summed scores)
    residual: torch.Tensor | None = None  # tokens = x + residual while set (a block's deferred last add)
    input_grid: tuple[int, ...] | None = None  # grid of the input tokens (``grid`` may be replaced by a reducer)

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix: int, grid=None, track_source: bool = True) -> "TokenState":
        b, n, _ = x.shape
        n0 = n - num_prefix
        source = None
        if track_source:
            source = torch.arange(num_prefix, n, device=x.device).expand(b, n0).contiguous()
        return cls(x=x, num_prefix=num_prefix, num_input=n0, grid=grid, source=source, input_grid=grid)

    def materialize(self) -> "TokenState":
        """Do the deferred residual add, if any: afterwards ``x`` holds the tokens."""
        if self.residual is not None:
            self.x, self.residual = self.x + self.residual, None
        return self

    def take_residual(self) -> torch.Tensor | None:
        """Hand the deferred residual to a caller that adds it itself (and clear it here)."""
        y, self.residual = self.residual, None
        return y

    # -- views -----------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Non-prefix tokens now (padding slots included)."""
        return self.x.shape[1] - self.num_prefix

    @property
    def valid(self) -> torch.Tensor | None:
        """``[B, P + N]`` bool, False for padding slots; ``None`` when there are none."""
        if self.sizes is None or not self.padded:  # merged sizes alone are no padding
            return None
        return self.sizes > 0

    def kept_per_sample(self) -> torch.Tensor:
        """Non-prefix tokens each sample really holds (padding excluded)."""
        b = self.x.shape[0]
        if self.sizes is None:
            return torch.full((b,), self.num_tokens, dtype=torch.long, device=self.x.device)
        return (self.sizes[:, self.num_prefix:] > 0).sum(1)

    def positions(self) -> torch.Tensor | None:
        """``[B, N]`` long: for every non-prefix token, the input token (``0 .. N0 - 1``) whose position it
        carries, for families that apply positions inside attention (RoPE); ``None`` while no block's reduction
        has changed the tokens (they are the input's, in order).

        A pruned token keeps its own position (an exact gather). A merged or pooled token takes the position of
        the input token it holds that is nearest to the size-weighted centroid of all the input tokens it holds
        (ties: the lowest index), so it is always a real grid position whose rotary table entry exists; the
        centroid is taken on ``input_grid`` coordinates (a sequence: the token index). Padding slots get 0
        (they are masked as keys). Needs the source map (``track_source=True``). One result per reduction.
        """
        if self.num_tokens == self.num_input:
            return None
        if self.source is None:
            raise ValueError("tokenprune: token positions follow the source map; apply with track_source=True")
        cached = self.scratch.get("_positions")
        if cached is not None and cached[0] is self.source:
            return cached[1]
        pos = self._carried_positions()
        self.scratch["_positions"] = (self.source, pos)
        return pos

    def _carried_positions(self) -> torch.Tensor:
        src, p, n, n0 = self.source, self.num_prefix, self.num_tokens, self.num_input
        b, dev = src.shape[0], src.device
        idx = torch.arange(n0, device=dev)
        grid = self.input_grid
        if grid is not None and math.prod(grid) == n0:
            coords = torch.stack(torch.unravel_index(idx, tuple(grid)), -1).to(torch.float64)  # [N0, D]
        else:
            coords = idx[:, None].to(torch.float64)
        held = src >= p  # input tokens held by a non-prefix token (not dropped)
        tok = (src - p).clamp(min=0)  # [B, N0]
        # centroid of each token's input tokens (every input token weighs one, i.e. size-weighted)
        w = held.to(torch.float64)
        d = coords.shape[1]
        total = torch.zeros(b, n, d, dtype=torch.float64, device=dev).scatter_add(
            1, tok[..., None].expand(b, n0, d), w[..., None] * coords)
        count = torch.zeros(b, n, dtype=torch.float64, device=dev).scatter_add(1, tok, w)
        centroid = total / count.clamp(min=1)[..., None]
        dist = (coords - centroid.gather(1, tok[..., None].expand(b, n0, d))).square().sum(-1)
        dist = dist.masked_fill(~held, float("inf"))
        best = torch.full((b, n), float("inf"), dtype=torch.float64, device=dev).scatter_reduce(
            1, tok, dist, "amin", include_self=True)
        cand = held & (dist <= best.gather(1, tok))
        pick = torch.where(cand, idx.expand(b, n0), torch.full_like(tok, n0))
        out = torch.full((b, n), n0, dtype=torch.long, device=dev).scatter_reduce(1, tok, pick, "amin", include_self=True)
        return out.masked_fill_(out >= n0, 0)

    def sizes_or_ones(self) -> torch.Tensor:
        if self.sizes is not None:
            return self.sizes
        return torch.ones(self.x.shape[:2], dtype=torch.float32, device=self.x.device)

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive key bias ``[B, 1, 1, P + N]`` for SDPA: ``log(size)``.

        This is proportional attention (ToMe) and, through ``log 0 = -inf``,
        the key mask of padding slots. ``None`` when every size is 1, so the
        block keeps SDPA's unmasked (flash) path.
        """
        if self.sizes is None:
            return None
        cached = self.scratch.get("_bias")
        if cached is not None and cached[0] is self.sizes and cached[1] == dtype:
            return cached[2]  # sizes change only at reduction stages: one bias per stage
        bias = self._make_bias(dtype)
        self.scratch["_bias"] = (self.sizes, dtype, bias)
        return bias

    def set_attn_bias(self, log_sizes: torch.Tensor, dtype: torch.dtype) -> None:
        """Cache ``log(sizes)`` ``[B, P + N]`` (already in ``dtype``), computed by a kernel alongside the
        sizes, as the bias :meth:`attn_bias` returns for these sizes (proportional attention only)."""
        if not self.proportional:
            raise ValueError("set_attn_bias: the bias is log(size) only with proportional attention")
        self.scratch["_bias"] = (self.sizes, dtype, key_bias_view(log_sizes))

    def _make_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.proportional:
            return key_bias_view(log_sizes(self.sizes, dtype))
        if self.padded:
            bias = torch.zeros_like(self.sizes).masked_fill_(self.sizes <= 0, float("-inf"))
        else:
            return None
        return key_bias_view(bias.to(dtype))


def log_sizes(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(sizes)`` in ``dtype``, the log taken in the finer of the two precisions (a float64 model's bias in
    float64: the sizes are float32)."""
    return sizes.to(torch.promote_types(sizes.dtype, dtype)).log().to(dtype)


def key_bias_view(v: torch.Tensor) -> torch.Tensor:
    """A per-key bias ``[B, N]`` as the ``[B, 1, 1, N]`` view attention takes (a view: half a None-index's host
    time). At batch 1 its leading strides are 0: CUDA SDPA's memory-efficient kernel wants every stride but the
    last to be a multiple of 8 and otherwise pads a copy of the bias first (two more ops and two launches in
    every block), and a token count rarely is one. Same values, same results."""
    b, n = v.shape
    if b == 1:
        return v.as_strided((1, 1, 1, n), (0, 0, 0, v.stride(1)))
    return v.view(b, 1, 1, n)
