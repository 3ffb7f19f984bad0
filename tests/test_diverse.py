"""`diverse`: greedy max-min diversity selection (DivPrune), optionally conditioned on a text embedding."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit
from tokenprune.kernels.reference import cosine_distance, gram, max_min_select


def _naive_greedy(d, k, valid=None):
    """The greedy max-min rule written out with Python loops over one sample's distance matrix."""
    n = len(d)
    ok = [True] * n if valid is None else list(valid)
    cand = [i for i in range(n) if ok[i]]

    def nearest_other(i):
        others = [d[i][j] for j in cand if j != i]
        return min(others) if others else 1.0

    first = max(cand, key=lambda i: (nearest_other(i), -i))
    chosen = [first]
    while len(chosen) < min(k, len(cand)):
        rest = [i for i in cand if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
    return sorted(chosen)


def test_max_min_select_matches_the_greedy_rule_written_out():
    torch.manual_seed(0)
    f = torch.randn(3, 12, 5)
    g = gram(f)[0]
    d = cosine_distance(g)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[2, [1, 4, 7, 8, 9, 10, 11]] = False  # 5 real tokens, fewer than k
    for k in (1, 4, 7):
        got = max_min_select(g, k, valid)
        for b in range(3):
            want = _naive_greedy(d[b].tolist(), k, valid[b].tolist())
            assert got[b].nonzero().flatten().tolist() == want, (k, b)


def test_one_token_per_cluster():
    """Three tight clusters of different sizes: keeping 3 keeps one of each (top-scoring methods would not)."""
    torch.manual_seed(1)
    centres = torch.eye(3, 8) * 5
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 2)
    f = centres[labels] + 0.05 * torch.randn(15, 8)
    chosen = max_min_select(gram(f[None])[0], 3)[0]
    assert sorted(labels[chosen].tolist()) == [0, 1, 2]


def test_reducer_keeps_budget_and_is_per_sample():
    """(Compiled with fullgraph=True against eager: test_forward_path.py's test_timm_compiles_fullgraph.)"""
    torch.set_num_threads(1)
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="diverse")
    with torch.no_grad():
        toks, state = tokenprune.features(model, x)
        assert toks.shape == (3, 17, 48)
        for i in range(3):
            one, st = tokenprune.features(model, x[i:i + 1])
            torch.testing.assert_close(one, toks[i:i + 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(st.source, state.source[i:i + 1])


def test_text_conditioning_prefers_relevant_tokens():
    torch.manual_seed(2)
    f = torch.randn(2, 20, 16)
    text = f[torch.arange(2), torch.tensor([3, 11])] + 0.01 * torch.randn(2, 16)
    from tokenprune.reducers.diverse import text_relevance

    w = (1e-3 + text_relevance(f, text)) ** 40
    chosen = max_min_select(gram(f)[0], 1, weight=w)
    assert chosen[0].nonzero().flatten().tolist() == [3] and chosen[1].nonzero().flatten().tolist() == [11]
    plain = max_min_select(gram(f)[0], 1)
    assert not torch.equal(plain, chosen)
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="diverse", text=torch.randn(48), text_weight=2.0)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 48)


def test_bad_options_are_refused_at_apply():
    model = tiny_vit()
    with pytest.raises(ValueError, match="text has 7 features but the tokens have 48"):
        tokenprune.apply(model, budget=0.5, method="diverse", text=torch.randn(7))
    with pytest.raises(TypeError, match="text must be a real torch.Tensor"):
        tokenprune.apply(model, budget=0.5, method="diverse", text=[1.0, 2.0])
    with pytest.raises(ValueError, match="text_weight must be >= 0"):
        tokenprune.apply(model, budget=0.5, method="diverse", text_weight=-1.0)
    assert not tokenprune.api.is_applied(model)


def test_compiled_selection_is_one_op():
    """Under torch.compile the greedy loop is one opaque op (``tokenprune::max_min_select``), not ``k`` unrolled
    steps: its schema, fake and AOT dispatch check out, and a compiled reduced ViT equals eager."""
    _max_min_select_op = torch.ops.tokenprune.max_min_select

    torch.manual_seed(3)
    f = torch.randn(2, 10, 6)
    valid = torch.rand(2, 10) > 0.2
    args = (gram(f)[0], 4, valid, torch.rand(2, 10))
    res = torch.library.opcheck(_max_min_select_op, args,
                                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(res.values()) == {"SUCCESS"}, res
    assert torch.equal(_max_min_select_op(*args), max_min_select(*args))
    model = tiny_vit(depth=3)
    tokenprune.apply(model, budget=0.25, method="diverse")
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(model)(x)
        ref = model(x)
    assert report.graph_break_count == 0
    ops = [str(n.target) for g in report.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count("tokenprune.max_min_select") == 3 and len(ops) < 200, len(ops)  # 3 stages
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), ref, rtol=0, atol=0)
