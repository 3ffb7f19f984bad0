"""Plots: one fixed colour per method in every plot, budget labels that do not overlap, and a figure
that says so when no run succeeded."""
import itertools

import pytest
from matplotlib.colors import to_hex
from PIL import Image

from tokenprune.plots import NO_RUNS, pareto_figure, pareto_plot, speed_figure, speed_plot

BUDGETS = (0.5, 0.25, 0.1, 0.05)


def _eval_rows(methods):
    rows = [{"config": "unreduced", "label": "unreduced", "method": None, "budget": None, "flop_ratio": 1.0,
             "retained": 1.0}]
    for m in methods:
        for b in BUDGETS:
            # cls and random share their stages, so their FLOP ratios coincide; retention nearly does
            fr = 0.4 + 0.6 * b if m in ("cls", "random") else 0.45 + 0.55 * b
            rows.append({"config": f"{m}@{b:g}", "label": m, "method": m, "budget": b, "flop_ratio": fr,
                         "retained": 0.99 - 0.02 * (1 - b) - (0.001 if m == "random" else 0.0)})
    return rows


def _bench_rows(methods):
    rows = []
    for m, b, bs in itertools.product(methods, BUDGETS, (1, 64)):
        fr = 0.4 + 0.6 * b if m in ("cls", "random") else 0.45 + 0.55 * b
        rows.append({"config": f"{m}@{b:g}", "label": m, "method": m, "budget": b, "batch_size": bs,
                     "flop_ratio": fr, "speedup": 0.95 / fr})
    return rows


def _colors(fig):
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label().split(" (bs")[0]
            if not label.startswith("_"):
                out.setdefault(label, set()).add(to_hex(line.get_color()))
    return out


def test_a_method_has_one_colour_in_every_plot():
    seen = {}
    figs = [pareto_figure(_eval_rows(["merge", "cls", "random", "pool"])),
            pareto_figure(_eval_rows(["random", "merge"])),
            pareto_figure(_eval_rows(["apet", "cls"])),
            speed_figure(_bench_rows(["cls", "random", "merge"])),
            speed_figure(_bench_rows(["merge", "apet"]))]
    for fig in figs:
        for label, colors in _colors(fig).items():
            assert len(colors) == 1, (label, colors)  # one colour within a figure (both batch sizes too)
            seen.setdefault(label, set()).update(colors)
    for label, colors in seen.items():
        assert len(colors) == 1, (label, colors)  # and the same one in every figure
    methods = {k: v for k, v in seen.items() if k not in ("FLOP bound", "unreduced")}
    assert len({next(iter(c)) for c in methods.values()}) == len(methods)  # different methods, different colours


@pytest.mark.parametrize("make", [lambda: pareto_figure(_eval_rows(["merge", "cls", "random", "pool", "apet"])),
                                  lambda: speed_figure(_bench_rows(["merge", "cls", "random", "pool"]))])
def test_budget_labels_do_not_overlap(make):
    fig = make()
    renderer = fig.canvas.get_renderer()
    labels = [t for ax in fig.axes for t in ax.texts if t.get_visible() and t.get_text()]
    assert labels
    assert {t.get_text() for t in labels} >= {f"{b:g}" for b in BUDGETS}  # every budget is written somewhere
    boxes = [t.get_window_extent(renderer) for t in labels]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (labels[i].get_text(), labels[j].get_text(), a, b)


def test_all_failed_runs_give_a_figure_that_says_so(tmp_path):
    failed = [dict(r, error="out of memory") for r in _bench_rows(["merge", "cls"])]
    for r in failed:
        del r["speedup"]
    fig = speed_figure(failed, title="t")
    assert any(NO_RUNS in t.get_text() for ax in fig.axes for t in ax.texts)
    fig = pareto_figure([{"config": "merge@0.5", "label": "merge", "method": "merge", "budget": 0.5,
                          "error": "not applicable"}])
    assert any(NO_RUNS in t.get_text() for ax in fig.axes for t in ax.texts)
    for plot in (speed_plot(failed, tmp_path / "s.png", title="all failed"), pareto_plot([], tmp_path / "p.png")):
        assert Image.open(plot).size[0] > 100
