"""Pareto and speed plots (matplotlib, Agg backend: no display needed).

Every method has one colour in every plot (:func:`method_color`), budget labels are placed so
they do not overlap (one label where several points coincide), rows with an ``error`` are left
out, and a run with nothing to draw gives a figure that says so rather than empty axes. The
title is also stored in the PNG's ``Title`` text field.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

from .commands._common import BUDGET_MEANING

#: Fixed colours of the built-in methods (matplotlib's tab10); others get a stable colour from their name.
METHOD_COLORS = {
    "merge": "#1f77b4", "cls": "#ff7f0e", "random": "#7f7f7f", "pool": "#8c564b", "apet": "#2ca02c",
    "maelre": "#9467bd", "threshold": "#d62728", "pipeline": "#e377c2", "unreduced": "#000000",
}
_EXTRA = ["#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
          "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
NO_RUNS = "no successful runs"


def method_color(label: str) -> str:
    """The colour of a method (or recipe) line: the same in every plot and every run."""
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    return _EXTRA[zlib.crc32(label.encode()) % len(_EXTRA)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error")]


def _by_label(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in _ok(rows):
        if r.get("method") is not None:
            out.setdefault(r["label"], []).append(r)
    return out


def _nothing(ax, why: str = NO_RUNS) -> None:
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="#b3261e")
    ax.set_xticks([])
    ax.set_yticks([])


# offsets (points) tried in turn for a label beside its point: right-below first, then around it, then further
_OFFSETS = [(4, -10), (4, 3), (-12, -10), (-12, 3), (4, -19), (4, 12), (-12, -19), (-12, 12), (14, -4), (-22, -4),
            (4, -28), (4, 21), (-12, -28), (-12, 21), (24, -10), (24, 3), (-32, -10), (-32, 3)]


def place_labels(fig, ax, labels: Sequence[tuple[float, float, str, str]], fontsize: float = 7,
                 merge_px: float = 14, marker_px: float = 5) -> list:
    """Annotate ``(x, y, text, colour)`` points of ``ax`` without overlaps: labels with the same text
    within ``merge_px`` pixels of each other become one (grey if their colours differ); each label
    takes the first offset around its point where it covers no other label and no point marker
    (``marker_px`` around each point); a label with no free spot is left out. Call after the axes'
    limits and layout are final. Returns the annotations."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # final limits and transforms
    renderer = fig.canvas.get_renderer()
    merged: list[list] = []
    markers = []
    for x, y, text, color in labels:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - marker_px, py - marker_px, px + marker_px, py + marker_px))
        for m in merged:
            if m[2] == text and abs(m[3] - px) <= merge_px and abs(m[4] - py) <= merge_px:
                if m[5] != color:
                    m[5] = "#555555"
                break
        else:
            merged.append([x, y, text, px, py, color])
    placed, boxes = [], []
    for x, y, text, _, _, color in merged:
        ann = None
        for dx, dy in _OFFSETS:
            if ann is None:
                ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                                  color=color, annotation_clip=False, zorder=5)
            else:
                ann.set_position((dx, dy))
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in boxes) and not any(box.overlaps(m) for m in markers):
                boxes.append(box)
                placed.append(ann)
                break
        else:
            ann.remove()
    return placed


def pareto_figure(rows: Sequence[dict], *, y: str = "retained", x: str = "flop_ratio", title: str = "",
                  ylabel: str = "accuracy retained (%)", xlabel: str = "encoder FLOPs / unreduced",
                  ymax: float | None = None, ymin: float | None = None):
    """The figure of :func:`pareto_plot` (not saved)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    pct = y in ("retained", "top1", "agreement", "wer")
    scale = 100.0 if pct else 1.0
    ok = _ok(rows)
    ref = [r for r in ok if r.get("method") is None and r.get(y) is not None and r.get(x) is not None]
    labels = []
    drawn = False
    for label, rs in sorted(_by_label(rows).items()):
        rs = sorted((r for r in rs if r.get(x) is not None and r.get(y) is not None), key=lambda r: r[x])
        if not rs:
            continue
        drawn = True
        color = method_color(label)
        xs, ys = [r[x] for r in rs], [r[y] * scale for r in rs]
        edge = [ymax if ymax is not None and v > ymax else ymin if ymin is not None and v < ymin else None
                for v in ys]
        ys = [v if e is None else e for v, e in zip(ys, edge)]
        style = "--" if label in ("random", "pool") else "-"
        ax.plot(xs, ys, style, marker="o", label=label, color=color)
        for xx, e, r in zip(xs, edge, rs):
            if e is not None:  # clipped: a triangle at the edge, labelled with its real value
                ax.plot([xx], [e], "^" if e == ymax else "v", color=color, markersize=9)
                labels.append((xx, e, f"{r[y] * scale:.0f}", color))
        if ref:  # a faint segment joins each curve to the unreduced model
            rx, ry = ref[0][x], ref[0][y] * scale
            i = min(range(len(xs)), key=lambda j: abs(xs[j] - rx))
            ax.plot([xs[i], rx], [ys[i], ry], style, color=color, alpha=0.35)
        labels += [(xx, yy, f"{r['budget']:g}", color) for r, xx, yy in zip(rs, xs, ys)]
    if ref:
        drawn = True
        ax.plot([ref[0].get(x, 1.0)], [ref[0][y] * scale], "*", color=METHOD_COLORS["unreduced"], markersize=12,
                label="unreduced")
    ax.set_title(title, fontsize=9)
    if not drawn:
        _nothing(ax)
        fig.tight_layout()
        return fig
    ax.set_xlabel(f"{xlabel}\nlabels: budget = {BUDGET_MEANING}", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    place_labels(fig, ax, labels)
    return fig


def pareto_plot(rows: Sequence[dict], path: str | Path, **kwargs) -> Path:
    """One line per method through its budgets: ``y`` (x100 for a ratio, in %) against ``x``;
    the unreduced model is a star. Budgets are written beside the points. Values above ``ymax``
    or below ``ymin`` (in plotted units) are drawn at that edge as triangles, labelled with their value.
    Keywords: those of :func:`pareto_figure`."""
    return _save(pareto_figure(rows, **kwargs), path, kwargs.get("title", ""))


def _save(fig, path, title: str = "") -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Title": title} if title else None)
    plt.close(fig)
    return path


def speed_figure(rows: Sequence[dict], *, title: str = ""):
    """The figure of :func:`speed_plot` (not saved)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    ok = _ok(rows)
    sizes = sorted({r["batch_size"] for r in ok if r.get("batch_size")})
    big, small = (sizes[-1], sizes[0]) if sizes else (None, None)
    hi = 1.0
    right = []
    for label, rs in sorted(_by_label(ok).items()):
        color = method_color(label)
        for bs, style in ((big, "-"), (small, "--")):
            if bs is None or (bs == small and small == big and style == "--"):
                continue
            pts = sorted((r for r in rs if r["batch_size"] == bs and r.get("speedup")), key=lambda r: r["budget"])
            if not pts:
                continue
            a1.plot([r["budget"] for r in pts], [r["speedup"] for r in pts], style, marker="o", color=color,
                    label=f"{label} (bs {bs})")
            bound = [1.0 / r["flop_ratio"] for r in pts]
            a2.plot(bound, [r["speedup"] for r in pts], style, marker="o", color=color, label=f"{label} (bs {bs})")
            right += [(b, r["speedup"], f"{r['budget']:g}", color) for b, r in zip(bound, pts)]
            hi = max(hi, *bound, *[r["speedup"] for r in pts])
    fig.suptitle(title, fontsize=9)
    if not right:
        for a in (a1, a2):
            _nothing(a, NO_RUNS if not ok else "no reduced configuration was timed")
        fig.tight_layout()
        return fig
    a1.axhline(1.0, color="k", lw=0.8)
    a1.set_xlabel(f"budget = {BUDGET_MEANING}", fontsize=8)
    a1.set_ylabel("speed-up over unreduced (x)")
    a1.invert_xaxis()
    a2.plot([1, hi], [1, hi], "k:", lw=1, label="FLOP bound")
    a2.set_xlabel("FLOP bound: unreduced / reduced encoder FLOPs (labels: budget)", fontsize=8)
    a2.set_ylabel("measured speed-up (x)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    place_labels(fig, a2, right)
    return fig


def speed_plot(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Left: measured speed-up over the unreduced model against budget, one line per method
    (solid: largest batch, dashed: batch 1). Right: measured speed-up against the FLOP bound
    ``1 / flop_ratio`` (the diagonal is a perfect implementation), budgets labelled."""
    return _save(speed_figure(rows, title=title), path, title)
