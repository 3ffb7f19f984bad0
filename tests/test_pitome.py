"""`pitome`: energy-protected merging (PiToMe)."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit
from tokenprune.reducers.pitome import energy, protected_merge
from tokenprune.state import TokenState


def _tokens():
    """One prefix token; patches 0-3 nearly the same direction, patches 4-7 orthogonal to everything."""
    e = torch.eye(8)
    patches = torch.stack([e[0], e[0] + 0.01 * e[1], e[0] + 0.02 * e[2], e[0] + 0.03 * e[3], e[4], e[5], e[6], e[7]])
    return torch.cat([torch.full((1, 8), 9.0), patches])[None]


def test_energy_ranks_redundant_tokens_first():
    e = energy(_tokens()[:, 1:], margin=0.9)[0]
    assert e[:4].min() > e[4:].max()


@pytest.mark.parametrize("candidates", [2.0, 4.0])
def test_redundant_tokens_merge_and_isolated_ones_are_kept_exactly(candidates):
    x = _tokens()
    state = protected_merge(TokenState.start(x.clone(), 1), x, 2, 0.9, candidates)
    assert state.x.shape == (1, 7, 8) and torch.equal(state.x[0, 0], x[0, 0])  # prefix untouched
    assert state.sizes.sum().item() == 9 and state.sizes[0, 0] == 1
    for j in range(4, 8):  # the isolated tokens survive bit-exactly, in spatial order, with size 1
        row = (state.x[0] == x[0, 1 + j]).all(-1).nonzero().flatten().tolist()
        assert len(row) == 1 and state.sizes[0, row[0]] == 1
    big = state.sizes[0] > 1
    assert big.any() and (state.x[0, big][:, 0] > 0.99).all()  # merged tokens are the redundant direction
    # every original patch maps to the token that holds it
    for j in range(8):
        t = state.source[0, j]
        assert t >= 1 and (state.sizes[0, t] > 1 if j < 4 and not torch.equal(state.x[0, t], x[0, 1 + j]) else True)


def test_reducer_is_per_sample_with_exact_count():
    """(Compiled with fullgraph=True against eager: test_forward_path.py's test_timm_compiles_fullgraph.)"""
    torch.set_num_threads(1)
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="pitome")
    plan = tokenprune.plan(model)
    assert all(s.mid for s in plan.stages) and plan.num_out == 16
    with torch.no_grad():
        toks, state = tokenprune.features(model, x)
        assert toks.shape == (3, 17, 48) and torch.equal(state.sizes.sum(1), torch.full((3,), 65.0))
        for i in range(3):
            torch.testing.assert_close(tokenprune.features(model, x[i:i + 1])[0], toks[i:i + 1], rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    model = tiny_vit()
    for kw, msg in [({"candidates": 1.5}, "candidates must be >= 2"), ({"margin": 2.0}, "margin is a cosine"),
                    ({"placement": "x"}, "placement must be")]:
        with pytest.raises(ValueError, match=msg):
            tokenprune.apply(model, budget=0.5, method="pitome", **kw)
