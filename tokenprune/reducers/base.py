"""What every reducer implements. A reducer never imports a model library."""
from __future__ import annotations

from typing import ClassVar, Mapping

from ..plan import EncoderInfo, Plan, Stage, apply_overrides, keep_count, validate
from ..state import TokenState


class Reducer:
    """Base class. Subclasses are dataclasses whose fields are their options.

    - :meth:`schedule` turns the number of tokens that must leave the encoder
      into stages (after which block, how many remain);
    - :meth:`reduce` performs one stage on the token state;
    - :meth:`qk_blocks` names the blocks whose q/k the reducer needs
      (captured from the block's own attention, never recomputed);
    - :meth:`observe` sees every block's q/k (e.g. to sum scores over layers);
    - :meth:`attention_kernel` may replace SDPA on a block's attention path (MAELRE's switch).
    """

    name: ClassVar[str] = ""
    proportional: ClassVar[bool] = True  # add log(size) to attention logits when sizes exist
    uses_attention_kernel: ClassVar[bool] = False  # replaces SDPA in some blocks (attention_kernel)
    # its observe / reduce accept a state whose tokens are x + state.residual (a block's last residual add
    # left undone, see engine.run_blocks) and do the add themselves (TokenState.materialize at the least)
    fuses_residual: ClassVar[bool] = False

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

    def plan(self, info: EncoderInfo, budget: float, overrides: Mapping[int, int] | None = None) -> Plan:
        self.check(info)
        keep = keep_count(budget, info.num_tokens)
        stages = apply_overrides(self.schedule(info, keep), overrides, info, self.name)
        validate(stages, info)
        plan = Plan(self.name, budget, info, stages)
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
