"""The block loop for a batch whose samples have different patch grids (NaFlex: SigLIP2 and timm NaFlexVit batches
that mix image shapes).

Every sample must get what it gets alone: its own input count ``N0_b``, its own grid, its own plan (``K_b =
keep_count(budget, N0_b)``, ``pool``'s pooled grid, the per-block schedule). So the samples are grouped by grid, and
each group is an ordinary :class:`~tokenprune.state.TokenState` with the :class:`~tokenprune.engine.Program`
planned for its grid: the reducer reduces a group exactly as it reduces a batch of that shape alone and knows
nothing of the others. The blocks run once on the whole batch: the groups' tokens are stacked, every row padded to
the longest with slots of size 0, which the attention bias masks (``log 0 = -inf``, the padding the engine already
uses for per-sample counts), so a row's real tokens compute what they compute alone.

The rows are sorted by group once, so after a block every group's tokens (and the q/k its reducer reads) are views
of the block's output; only a reduction stage rebuilds the padded batch. The output is in the input's row order.

Not available here (clear errors): stages inside a block (``placement='attn'``), a replacement attention kernel
that would switch at different blocks for different groups (MAELRE), positions inside attention (RoPE). The
deferred residual add is not used. Grouping reads the grids on the host, so such a forward is not captured whole
by ``torch.compile(fullgraph=True)`` or a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from .engine import QK, Forward, check_depth, check_hooks, run_blocks
from .state import TokenState


def grids_read_on_host(what: str) -> None:
    """Called where ``what`` (a NaFlex batch's per-image grids) is read on the host: under ``torch.compile`` that is
    a graph break, and with ``fullgraph=True`` this says so instead of a data-dependent guard error."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=f"tokenprune: torch.compile(fullgraph=True) cannot trace a reduced forward on "
                                  f"{what}: the patch grids are read on the host (one sync). Compile it without "
                                  "fullgraph=True (one graph break here), or give an image batch (one grid, known "
                                  "from its shape) where the model takes one")


class _Group:
    __slots__ = ("grid", "start", "end", "state", "prog")

    def __init__(self, grid, start, end, state, prog):
        self.grid, self.start, self.end, self.state, self.prog = grid, start, end, state, prog


def grid_groups(grids: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """``[(grid, rows)]``: the batch's distinct grids in order of first appearance and the rows that have each."""
    out: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grids):
        out.setdefault(tuple(int(v) for v in g), []).append(i)
    return list(out.items())


def run_mixed(fwd: Forward, blocks: Iterable[torch.nn.Module], x: torch.Tensor, grids: Sequence[tuple[int, ...]],
              block_fn: Callable) -> torch.Tensor:
    """Run ``blocks`` on a batch of samples with their own grids; the final state of the batch is ``fwd.state``.

    ``x`` ``[B, P + L, C]``: row ``b`` holds the ``P`` prefix tokens, then the ``prod(grids[b])`` patches of its grid
    (row-major), then padding up to ``L``. With one grid in the batch this is :func:`~tokenprune.engine.run_blocks`
    on the real tokens (the padding never enters). Otherwise returns ``[B, P + K_max, C]``: each row's tokens, then
    padding slots (zeros); ``fwd.state.sizes`` is 0 on them (``kept_per_sample()`` counts each row's tokens) and
    ``fwd.state.source`` maps row ``b``'s ``N0_b`` input patches (-1 beyond them). ``grid`` / ``input_grid`` of that
    state are ``None`` (each row has its own).
    """
    patch = fwd.patch
    reducer, p = patch.reducer, patch.num_prefix
    groups_rows = grid_groups(grids)
    if len(groups_rows) == 1:
        grid = groups_rows[0][0]
        return run_blocks(fwd, blocks, x[:, : p + math.prod(grid)], block_fn, grid)
    order = [i for _, rows in groups_rows for i in rows]
    perm = torch.tensor(order, device=x.device)
    x = x.index_select(0, perm)
    groups, start = [], 0
    for grid, rows in groups_rows:
        n = math.prod(grid)
        state = TokenState.start(x[start:start + len(rows), : p + n], p, grid, track_source=patch.track_source)
        state.proportional = reducer.proportional
        groups.append(_Group(grid, start, start + len(rows), state, patch.program_for(n, grid)))
        start += len(rows)
    check_depth(len(blocks), len(groups[0].prog.stages))
    check_hooks(patch, blocks)  # as run_blocks: a hook the forward would skip is refused
    _check_programs(groups)
    for g in groups:
        for stage in g.prog.before:
            g.state = reducer.reduce(g.state, stage, None)
    whole = _stack(groups, x, p, reducer.proportional)
    xs = whole.x
    for i, blk in enumerate(blocks):
        whole.tokens_per_block.append(xs.shape[1])
        fwd.state = whole
        fwd.bias = whole.attn_bias(xs.dtype)
        fwd.kernel, fwd.want_qk = groups[0].prog.kernel[i], any(g.prog.want_qk[i] for g in groups)
        fwd.slot, fwd.qk, fwd.residual, fwd.mid, fwd.mid_fuse = False, None, None, (), False
        xs = block_fn(blk, xs, fwd)
        qk, fwd.qk = fwd.qk, None
        changed = False
        for g in groups:
            state = g.state
            width = state.x.shape[1]
            state.tokens_per_block.append(width)
            gqk = _rows_qk(qk, g, width) if qk is not None and g.prog.want_qk[i] else None
            state.x = xs[g.start:g.end, :width]
            state.block = i
            reducer.observe(state, i, gqk)
            for stage in g.prog.stages[i]:
                state = reducer.reduce(state, stage, gqk)
                changed = True
            g.state = state.materialize()
        if changed:
            whole = _stack(groups, xs, p, reducer.proportional, whole.tokens_per_block)
            xs = whole.x
    fwd.bias, fwd.kernel, fwd.want_qk, fwd.slot, fwd.mid = None, None, False, False, ()
    whole = _stack(groups, xs, p, reducer.proportional, whole.tokens_per_block, final=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(order), device=perm.device)
    for name in ("x", "sizes", "source"):
        value = getattr(whole, name)
        if value is not None:
            setattr(whole, name, value.index_select(0, inverse))
    fwd.state = whole
    return whole.x


def _check_programs(groups) -> None:
    paths = {tuple(g.prog.plan.attention_per_block()) for g in groups}
    if len(paths) > 1:
        raise ValueError("tokenprune: in this batch the images of different shapes would switch attention kernels at "
                         "different blocks (maelre's switch_at); run each shape in its own batch, or give switch_at= "
                         "so that every shape switches at the same block")
    if any(any(m) for g in groups for m in g.prog.mid):
        raise ValueError("tokenprune: reductions inside a block (placement='attn') are not available for a batch that "
                         "mixes image shapes; use placement='block', or run each shape in its own batch")


def _rows_qk(qk: QK, g: _Group, width: int) -> QK:
    """The block's q/k (and per-head output) for one group: its rows and its tokens (views), with the key bias the
    group's own tokens give, as the block would have recorded it on that group alone."""
    rows = slice(g.start, g.end)

    def cut(t):
        return None if t is None else t[rows, :, :width]

    dtype = qk.q.dtype if qk.q is not None else g.state.x.dtype
    return QK(cut(qk.q), cut(qk.k), qk.scale, g.state.attn_bias(dtype), cut(qk.out))


def _stack(groups, like: torch.Tensor, p: int, proportional: bool, tokens_per_block=None,
           final: bool = False) -> TokenState:
    """The groups' tokens as one padded batch (rows in group order), sizes 0 on the padding slots. ``final``: with
    the source map over the longest input (-1 beyond a row's own patches)."""
    b, c = like.shape[0], like.shape[-1]
    widths = [g.state.x.shape[1] for g in groups]
    width = max(widths)
    x = like.new_zeros(b, width, c)
    uniform = len(set(widths)) == 1 and all(g.state.sizes is None for g in groups)
    sizes = None if uniform else torch.zeros(b, width, dtype=torch.float32, device=like.device)
    for g, w in zip(groups, widths):
        x[g.start:g.end, :w] = g.state.x
        if sizes is not None:
            sizes[g.start:g.end, :w] = g.state.sizes_or_ones()
    n0 = max(g.state.num_input for g in groups)
    source = None
    if final and all(g.state.source is not None for g in groups):
        source = torch.full((b, n0), -1, dtype=torch.long, device=like.device)
        for g in groups:
            source[g.start:g.end, : g.state.num_input] = g.state.source
    state = TokenState(x=x, num_prefix=p, num_input=n0, sizes=sizes, source=source, proportional=proportional,
                       padded=sizes is not None, block=groups[0].state.block)
    if tokens_per_block is not None:
        state.tokens_per_block = tokens_per_block
    return state
