"""The frozen-consumer evaluation: the readout, the after-the-encoder configurations, the eval command."""
import json

import torch

import tokenprune
from conftest import tiny_vit
from tokenprune import consumer
from tokenprune.cli import main

from test_cli import _eval_args, tiny  # noqa: F401  (tiny: fixture)


def test_readout_masks_padding_and_reads_any_count():
    torch.manual_seed(0)
    ro = consumer.Readout(48, 5, heads=3).eval()
    t = torch.randn(2, 10, 48)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    with torch.no_grad():
        both = ro(t, valid)
        alone = ro(t[1:, :6])
        assert ro(t[:, :3]).shape == (2, 5)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[:1], ro(t[:1]).detach(), rtol=1e-5, atol=1e-5)


def test_readout_learns_a_token_task_and_comes_back_frozen():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (300,))
    tokens = torch.randn(300, 12, 24)
    tokens[torch.arange(300), 5, labels] += 6.0  # the class is in ONE token: the readout must attend to it
    ro = consumer.train_readout(tokens, labels, 3, epochs=30, batch_size=50, lr=3e-3)
    assert not any(p.requires_grad for p in ro.parameters()) and not ro.training
    pred = consumer.consume(ro, tokens).argmax(1)
    assert (pred == labels).float().mean() > 0.9


def test_after_encoder_configs_reduce_once_after_the_last_block():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    for method in consumer.AFTER_ENCODER:
        options, schedule = consumer.after_encoder(method, 0.1, 4, 64)
        if method == "apet":
            options = {**options, "k": 2}
        tokenprune.apply(model, budget=0.1, method=method, schedule=schedule, **options)
        plan = tokenprune.plan(model)
        assert [s.block for s in plan.stages] == [3], method
        with torch.no_grad():
            toks, valid = consumer.output_tokens(model, x)
        assert toks.shape[1] == plan.num_out and valid is None, method
        if method != "pool":
            assert toks.shape[1] == 6
        tokenprune.remove(model)


def test_merge_removes_more_than_half_in_one_stage_by_repeated_rounds():
    model = tiny_vit()
    tokenprune.apply(model, budget=4 / 64, method="merge", schedule={3: 4})
    with torch.no_grad():
        toks, state = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert toks.shape == (2, 5, 48) and torch.equal(state.sizes.sum(1), torch.full((2,), 65.0))
    assert set(state.source.unique().tolist()) == {1, 2, 3, 4}


def test_eval_consumer_task_end_to_end(tiny, tmp_path):  # noqa: F811
    args = _eval_args(tiny, tmp_path, methods="merge,diverse", budgets="0.25") + [
        "--task", "consumer", "--train-data", str(tiny["data"]), "--train-limit", "0", "--readout-epochs", "1"]
    assert main(args) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "eval_consumer.json").read_text())["rows"]}
    assert set(rows) == {"unreduced", "merge@0.25", "diverse@0.25", "random@0.25", "pool@0.25"}
    assert rows["unreduced"]["agreement"] == 1.0 and 0 <= rows["merge@0.25"]["top1"] <= 1
    assert main(args + ["--after-encoder", "--methods", "cls,maelre"]) == 0
    res = json.loads((tmp_path / "eval_consumer_after_encoder.json").read_text())
    assert {r["config"] for r in res["rows"]} == {"unreduced", "cls@0.25", "random@0.25", "pool@0.25"}
    assert all(r["flop_ratio"] == 1.0 for r in res["rows"] if r["method"] != "pool")
    assert any("maelre has no after-the-encoder form" in n for n in res["notes"])
