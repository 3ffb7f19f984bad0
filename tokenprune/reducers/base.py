"""What every reducer implements, and the helpers several reducers share. A reducer never imports a
model library.

Shared here (import them from this module, never from another reducer's file):

- where reducers act: :func:`default_layers` (after blocks depth/4, depth/2, 3 depth/4),
  :func:`check_layers` (a ``layers=`` option checked against the encoder), :func:`default_blocks`;
- :func:`ratio_schedule`: stages after those blocks with the same keep ratio at each (EViT-style),
  the schedule of ``cls``, ``random``, ``apet`` and ``threshold``;
- :func:`patch_scores`: the [CLS] attention of every patch (``cls``);
- :func:`patch_valid`: which non-prefix slots hold a real token;
- :func:`set_groups`: the tokens become groups of the old ones (sizes and source map follow).
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..ops import prefix_map, query_attention, received_attention, remap_source
from ..plan import EncoderInfo, Plan, Stage, apply_overrides, keep_count, spread_schedule, validate
from ..state import TokenState


class Reducer:
    """Base class. Subclasses are dataclasses whose fields are their options.

    - :meth:`schedule` turns the number of tokens that must leave the encoder
      into stages (after which block, how many remain);
    - :meth:`reduce` performs one stage on the token state;
    - :meth:`qk_blocks` names the blocks whose q/k the reducer needs
      (captured from the block's own attention, never recomputed);
    - :meth:`observe` sees every block's q/k (e.g. to sum scores over layers);
    - :meth:`attention_kernel` may replace SDPA on a block's attention path (MAELRE's switch);
    - :meth:`score_layers`, :meth:`score_tokens` and :meth:`select`: one reduction outside a block loop
      (a VLM's hand-off between its vision tower and its language model, ``tokenprune/vlm``).
    """

    name: ClassVar[str] = ""
    needs_input_grid: ClassVar[bool] = False  # works on the untouched patch grid (first in a composition)
    uses_attention_kernel: ClassVar[bool] = False  # replaces SDPA in some blocks (attention_kernel)
    # its observe / reduce accept a state whose tokens are x + state.residual (a block's last residual add
    # left undone, see engine.run_blocks) and do the add themselves (TokenState.materialize at the least)
    fuses_residual: ClassVar[bool] = False
    # matches on the keys' head mean (QK.metric()): a block's fused key-bias attention may compute it (engine.attend)
    wants_key_mean: ClassVar[bool] = False
    # scores by the attention each key receives: a block's attention may give each query's log-sum-exp (engine.attend)
    wants_lse: ClassVar[bool] = False
    observes: ClassVar[bool] = False  # overrides observe (set by __init_subclass__): the block loop skips the call if not
    # can reduce before the first block (stage block -1: no attention yet), as its ``layers=[-1]`` and
    # ``schedule={-1: keep}`` say
    before_first: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.observes = cls.observe is not Reducer.observe

    @property
    def proportional(self) -> bool:
        """Whether later blocks add ``log(size)`` to their attention logits when sizes exist: the
        reducer's ``prop_attn`` option where it has one, else True."""
        return getattr(self, "prop_attn", True)

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        raise NotImplementedError

    def reduce(self, state: TokenState, stage: Stage, qk) -> TokenState:
        raise NotImplementedError

    def qk_blocks(self, plan: Plan) -> set[int]:
        return set()

    def observe(self, state: TokenState, block: int, qk) -> None:
        return None

    def attention_kernel(self, path: str):
        """The kernel ``(q, k, v, bias) -> out`` that replaces SDPA in blocks on attention ``path``
        (``Stage.attention``), or ``None`` to keep SDPA."""
        return None

    def check(self, info: EncoderInfo) -> None:
        """Raise a clear error for options that make no sense on this encoder."""
        return None

    # -- one reduction after a whole encoder (VLMs: between the vision tower and the language model) --------
    # The caller runs the encoder, hands over the q/k of the layers named by ``score_layers``, and gets back
    # a state with ``keep`` non-prefix tokens. Reducers that need no attention only implement ``reduce``.
    def score_layers(self, depth: int, default: int) -> list[int]:
        """Encoder layers (0-based, of ``depth``) whose q/k :meth:`score_tokens` needs for a single reduction
        after the encoder; ``default`` is the layer the model's family suggests. Empty: no attention needed."""
        return []

    def score_tokens(self, state: TokenState, qk) -> torch.Tensor:
        """Importance ``[B, N]`` of the state's non-prefix tokens from one layer's q/k (summed by the caller
        over :meth:`score_layers`, and over groups of tokens that reach the next model as one)."""
        raise NotImplementedError(f"{self.name} scores no tokens from attention")

    def select(self, state: TokenState, keep: int, scores: torch.Tensor | None = None) -> TokenState:
        """Reduce the state's non-prefix tokens to ``keep`` in one step. ``scores`` ``[B, N]``: the summed
        :meth:`score_tokens` when :meth:`score_layers` named layers, else None."""
        return self.reduce(state, Stage(0, keep, self.name), None)

    def plan(self, info: EncoderInfo, budget: float, overrides: Mapping[int, int] | None = None) -> Plan:
        self.check(info)
        keep = keep_count(budget, info.num_tokens)
        stages = apply_overrides(self.schedule(info, keep), overrides, info, self.name, self.before_first)
        validate(stages, info)
        plan = Plan(self.name, budget, info, stages)
        if overrides and plan.num_out != keep:
            raise ValueError(
                f"schedule={dict(overrides)} ends at {plan.num_out} non-prefix tokens but budget={budget:g} keeps "
                f"{keep} of this input's {info.num_tokens}; a schedule must end at its budget's count: leave "
                f"budget out (the schedule's last count / {info.num_tokens} tokens is then the budget) or change one "
                f"of them (a schedule's counts hold for one input size)")
        if overrides is None and plan.num_out != keep:
            raise AssertionError(f"{self.name}: schedule ends at {plan.num_out} tokens, expected {keep}")
        return plan


def default_blocks(info: EncoderInfo, start: int | None = None, stop: int | None = None) -> list[int]:
    """Blocks after which a progressive reducer acts: every block but the last (reducing after the
    last block saves no compute)."""
    start = 0 if start is None else start
    stop = info.depth - 1 if stop is None else stop
    if not 0 <= start < info.depth:
        raise ValueError(f"start block {start} is outside the encoder's blocks 0..{info.depth - 1}")
    return list(range(start, max(start + 1, stop)))


def default_layers(depth: int) -> list[int]:
    """Blocks depth/4, depth/2 and 3 depth/4 (fewer on encoders of under 4 blocks)."""
    return sorted({min(depth - 1, depth * k // 4) for k in (1, 2, 3)})


def check_layers(layers, depth: int, what: str = "layers", before_first: bool = False) -> list[int]:
    """``layers`` as sorted distinct block indices; a clear error if empty or outside the encoder.
    ``before_first``: -1 (before the first block) is allowed too."""
    out = sorted({int(b) for b in layers})
    if not out:
        raise ValueError(f"{what} must name at least one block")
    lowest = -1 if before_first else 0
    bad = [b for b in out if not lowest <= b < depth]
    if bad:
        where = " (-1 = before the first block)" if before_first else ""
        raise ValueError(f"{what} {bad} are outside the encoder's blocks {lowest}..{depth - 1}{where}")
    return out


def stage_layers(layers, depth: int, what: str = "layers", before_first: bool = False) -> list[int]:
    """The checked ``layers`` option (:func:`check_layers`), or :func:`default_layers` if it is None."""
    return default_layers(depth) if layers is None else check_layers(layers, depth, what, before_first)


def ratio_schedule(op: str, info: EncoderInfo, keep: int, layers=None, *, before_first: bool = False,
                   every_layer: bool = False) -> list[Stage]:
    """Stages after ``layers`` (None: :func:`default_layers`) with the same keep ratio at each,
    ending at ``keep``. ``every_layer``: a stage after every layer, also one that removes nothing
    (per-stage thresholds need one each)."""
    layers = stage_layers(layers, info.depth, before_first=before_first)
    steps = spread_schedule(info.num_tokens, keep, layers, geometric=True, every_block=every_layer)
    return [Stage(b, k, op) for b, k in steps]


def set_groups(state: TokenState, patches: torch.Tensor | None, sizes: torch.Tensor, counts: torch.Tensor,
               group: torch.Tensor) -> TokenState:
    """The non-prefix tokens become groups of the old ones: ``group`` ``[B, N]`` is the group of each old
    non-prefix token, ``counts`` ``[B, M]`` the groups' total sizes, ``patches`` ``[B, M, C]`` the new
    tokens (None: ``state.x`` already holds all of them), ``sizes`` the old sizes (for the prefix). The
    source map sends every patch to its token's group."""
    x, p = state.x, state.num_prefix
    if patches is not None:
        state.x = torch.cat([x[:, :p], patches], 1) if p else patches
    state.sizes = torch.cat([sizes[:, :p], counts.to(sizes.dtype)], 1)
    if state.source is not None:
        state.source = remap_source(state.source, torch.cat([prefix_map(x.shape[0], p, x.device), group + p], 1))
    return state


def patch_valid(state: TokenState) -> torch.Tensor | None:
    """``[B, N]`` bool: which non-prefix slots hold a real token (None: all of them)."""
    valid = state.valid
    return None if valid is None else valid[:, state.num_prefix:]


def patch_scores(state: TokenState, qk, has_cls: bool, substitute: str) -> torch.Tensor:
    """Importance of every non-prefix token ``[B, N]`` from one block's q/k: the attention the [CLS]
    query pays to it, averaged over heads. Without a class token, ``substitute="received"``: the mean
    attention it receives over all queries; ``"mean_query"``: the attention of the mean query."""
    p = state.num_prefix
    valid = state.valid
    if has_cls:
        scores = query_attention(qk.q, qk.k, qk.scale, query=0, bias=qk.bias)
    elif substitute == "received":
        scores = received_attention(qk.q, qk.k, qk.scale, bias=qk.bias, valid=valid, lse=qk.lse)
    else:
        q = qk.q[:, :, p:]
        if valid is not None:
            w = valid[:, None, p:, None].to(q.dtype)
            qm = (q * w).sum(2) / w.sum(2).clamp_min(1)
        else:
            qm = q.mean(2)
        scores = query_attention(qk.q, qk.k, qk.scale, query=qm, bias=qk.bias)
    return scores[:, p:]
