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
"""
from __future__ import annotations

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

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix: int, grid=None, track_source: bool = True) -> "TokenState":
        b, n, _ = x.shape
        n0 = n - num_prefix
        source = None
        if track_source:
            source = torch.arange(num_prefix, n, device=x.device).expand(b, n0).contiguous()
        return cls(x=x, num_prefix=num_prefix, num_input=n0, grid=grid, source=source)

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
        self.scratch["_bias"] = (self.sizes, dtype, log_sizes[:, None, None, :])

    def _make_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.proportional:
            bias = self.sizes.log()
        elif self.padded:
            bias = torch.zeros_like(self.sizes).masked_fill_(self.sizes <= 0, float("-inf"))
        else:
            return None
        return bias.to(dtype)[:, None, None, :]
