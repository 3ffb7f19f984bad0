"""Property tests (hypothesis): model families x reducers x budgets x batch sizes 0-3 x dtypes.

For every drawn combination, either ``apply`` refuses it with a ValueError/TypeError whose message is one
of the documented refusals (and the model stays unpatched), or the reduced model

- gives finite outputs and tokens, in fp32 and under bf16 autocast;
- leaves the documented number of tokens: ``P + plan.num_out``, with ``plan.num_out`` the budget's
  ``round(budget * N)`` for the exact-count methods; per-sample methods (``threshold``, ``cls`` with
  ``threshold=``) pad the batch, and each sample keeps at least 1 and at most that many;
- gives each sample of a batch what it gets alone (every method but ``random``, whose hash depends on
  the row; fp32), live tokens and sizes alike;
- answers an empty batch with an empty batch where the unpatched model does.

Invalid arguments (budgets out of (0, 1], non-numbers, unknown methods, pool after another reducer) are
ValueError/TypeError with a message that names the argument. Tiny models, built once per module; the
example count is bounded and derandomized, so the run is the same every time and takes seconds.
"""
from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import tokenprune
from conftest import tiny_vit
from tokenprune.plan import keep_count

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.generate, Phase.shrink])  # no example database, no patch files


# -- families: built once per module ------------------------------------------------------------------------
def _timm(**kw):
    m = tiny_vit(**kw)
    return dict(model=m, x=lambda b: torch.randn(b, 3, 32, 32), prefix=m.num_prefix_tokens, n=64,
                out=lambda model, x: model(x))


def _distilled():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                          embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()
    return dict(model=m, x=lambda b: torch.randn(b, 3, 32, 32), prefix=m.num_prefix_tokens, n=64,
                out=lambda model, x: torch.cat(model(x), 1) if isinstance(model(x), tuple) else model(x))


def _hf(make):
    f = make()
    shape = tuple(f["x"].shape[1:])
    return dict(model=f["model"], x=lambda b: torch.randn(b, *shape), prefix=f["prefix"], n=f["n"], out=f["out"])


def _hf_clip():
    from test_adapters_matrix import make_hf_clip

    return _hf(make_hf_clip)


def _whisper():
    from test_adapters_matrix import make_whisper

    f = _hf(make_whisper)
    prompt = torch.tensor([[1, 5, 7]])
    f["out"] = lambda model, x: model(input_features=x, decoder_input_ids=prompt.expand(x.shape[0], -1)).logits
    return f


BUILDERS = {
    "vit_cls": lambda: _timm(),
    "vit_no_cls": lambda: _timm(class_token=False, global_pool="avg"),
    "vit_registers": lambda: _timm(reg_tokens=4),
    "deit_distilled": _distilled,
    "hf_clip": _hf_clip,
    "whisper": _whisper,
}


@functools.cache
def family(name: str) -> dict:
    f = BUILDERS[name]()
    try:  # the contract for an empty batch is "what the unpatched model does"
        with torch.no_grad():
            f["out"](f["model"], f["x"](0))
        f["empty_ok"] = True
    except RuntimeError:  # e.g. transformers' Whisper attention cannot reshape 0 rows
        f["empty_ok"] = False
    return f



# -- reducers ---------------------------------------------------------------------------------------------
# (method, options, exact count, same per sample)
REDUCERS = [
    ("merge", {}, True, True),
    ("merge", {"prop_attn": False, "layers": [1, 2]}, True, True),
    ("cls", {}, True, True),
    ("cls", {"threshold": 0.02}, False, True),
    ("apet", {"k": 2}, True, True),
    ("random", {}, True, True),
    ("random", {"layers": [-1]}, True, True),
    ("pool", {}, False, True),
    ("maelre", {}, True, True),
    ("threshold", {"init": [0.01, 0.015, 0.02]}, False, True),
    (["cls", "merge"], {}, True, True),
    (["pool", "merge"], {}, False, True),
    (["merge", "cls"], {}, True, True),
]

# refusals a valid-looking combination may get, each documented where it is raised
REFUSALS = [
    r"rounds to 0; the smallest budget that keeps one token",  # plan.keep_count
    r"cannot reduce \d+ tokens to \d+ in \d+ steps .* give more reduction blocks",  # plan.spread_schedule (50% cap)
    r"threshold stages \(layers\)",  # threshold: more init values than blocks
]


def _live(tokens, state, i):
    """Sample i's tokens and sizes without its padding slots."""
    sizes = state.sizes[i] if state.sizes is not None else torch.ones(tokens.shape[1])
    keep = sizes > 0
    return tokens[i][keep], sizes[keep]


@settings(max_examples=40, **SETTINGS)
@given(fam=st.sampled_from(sorted(BUILDERS)), reducer=st.sampled_from(REDUCERS),
       budget=st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1]), st.floats(0.01, 1.0)),
       batch=st.integers(0, 3))
def test_reduced_forward(fam, reducer, budget, batch):
    """Each example runs fp32 and bf16 autocast on the same input (dtype is not drawn: both, always)."""
    method, options, exact, per_sample = reducer
    f = family(fam)
    model, P, N = f["model"], f["prefix"], f["n"]
    tokenprune.remove(model)
    try:
        tokenprune.apply(model, budget=budget, method=method, **options)
    except (ValueError, TypeError) as e:
        assert any(re.search(p, str(e)) for p in REFUSALS), f"unexpected refusal: {type(e).__name__}: {e}"
        assert not tokenprune.is_applied(model)
        event("refused")
        return
    try:
        plan = tokenprune.plan(model)
        K = keep_count(budget, N)
        if exact:
            assert plan.num_out == K, (plan.summary(), K)
        else:
            assert 1 <= plan.num_out <= N
        torch.manual_seed(batch)
        x = f["x"](batch)
        if batch == 0 and not f["empty_ok"]:
            with torch.no_grad(), pytest.raises(RuntimeError):
                f["out"](model, x)
            event("empty batch: the unpatched model fails too")
            return
        for dtype in ("fp32", "bf16"):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                out = f["out"](model, x)
                tokens, state = tokenprune.features(model, x)
            assert out.shape[0] == batch and tokens.shape[0] == batch
            assert torch.isfinite(out).all() and torch.isfinite(tokens).all(), dtype
            padded = bool(state.padded)
            if not padded and exact:
                assert tokens.shape[1] == P + plan.num_out, (dtype, tokens.shape, P, plan.summary())
            elif not padded:  # per-sample counts that came out equal (always at batch 1): no padding, at most the cap
                assert P + min(1, batch) <= tokens.shape[1] <= P + plan.num_out, (dtype, tokens.shape, P, plan.summary())
            else:  # per-sample counts: the batch is as wide as its largest count
                assert not exact, "a fixed-count method padded the batch"
                live = (state.sizes[:, P:] > 0).sum(1)
                if batch:
                    assert tokens.shape[1] == P + int(live.max()), (dtype, tokens.shape, live)
                    assert bool((live >= 1).all()) and bool((live <= K).all()), (live, K)
            event(f"forward: padded={padded}")
            if per_sample and dtype == "fp32" and batch >= 2:
                event("compared with each sample alone")
                for i in range(batch):
                    with torch.no_grad():
                        one, one_state = tokenprune.features(model, x[i:i + 1])
                    got, got_sizes = _live(tokens, state, i)
                    want, want_sizes = _live(one, one_state, 0)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(got_sizes, want_sizes, rtol=0, atol=0)
    finally:
        tokenprune.remove(model)


# -- invalid arguments: clear errors, nothing patched --------------------------------------------------------
BAD_BUDGETS = [0, 0.0, -0.25, 1.5, math.nan, math.inf, "0.5", True, [0.5], 1 + 0j]


@settings(max_examples=30, **SETTINGS)
@given(fam=st.sampled_from(sorted(BUILDERS)),
       case=st.one_of(
           st.tuples(st.just("budget"), st.sampled_from(BAD_BUDGETS), st.sampled_from(["merge", "cls", "pool"])),
           st.tuples(st.just("method"), st.just(0.5), st.sampled_from(["tome", "", "Merge", ["merge", "nope"]])),
           st.tuples(st.just("order"), st.sampled_from([0.5, 0.25]),
                     st.sampled_from([["merge", "pool"], ["cls", "pool"], ["apet", "pool"]])),
           st.tuples(st.just("schedule"), st.just(None), st.sampled_from([{0: 6.5}, {0: "6"}, {"1": 6}, [(0, 6)]])),
       ))
def test_invalid_arguments_are_clear_errors(fam, case):
    kind, value, method = case
    model = family(fam)["model"]
    tokenprune.remove(model)
    kwargs = dict(budget=value, method=method)
    if kind == "schedule":
        kwargs = dict(method="merge", schedule=method)
    with pytest.raises((ValueError, TypeError)) as err:
        tokenprune.apply(model, **kwargs)
    message = str(err.value)
    assert len(message) > 25, message
    named = {"budget": "budget", "method": "method", "order": "pool must be the first reducer",
             "schedule": "schedule"}[kind]
    assert named in (message if kind == "order" else message.lower()), message
    assert not tokenprune.is_applied(model)
