"""Pareto and speed plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_label(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("method") is not None:
            out.setdefault(r["label"], []).append(r)
    return out


def pareto_plot(rows: Sequence[dict], path: str | Path, *, y: str = "retained", x: str = "flop_ratio",
                title: str = "", ylabel: str = "accuracy retained (%)",
                xlabel: str = "encoder FLOPs / unreduced", ymax: float | None = None,
                ymin: float | None = None) -> Path:
    """One line per method through its budgets: ``y`` (x100 when it is a fraction) against ``x``;
    the unreduced model is a star. Budgets are written beside the points. Values above ``ymax``
    or below ``ymin`` (in plotted units) are drawn at that edge as triangles, labelled with their value."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    pct = y in ("retained", "top1", "agreement", "wer")
    scale = 100.0 if pct else 1.0
    ref = [r for r in rows if r.get("method") is None and r.get(y) is not None and r.get(x) is not None]
    for label, rs in _by_label(rows).items():
        rs = sorted((r for r in rs if r.get(x) is not None and r.get(y) is not None), key=lambda r: r[x])
        if not rs:
            continue
        xs, ys = [r[x] for r in rs], [r[y] * scale for r in rs]
        edge = [ymax if ymax is not None and v > ymax else ymin if ymin is not None and v < ymin else None
                for v in ys]
        ys = [v if e is None else e for v, e in zip(ys, edge)]
        style = "--" if label in ("random", "pool") else "-"
        line, = ax.plot(xs, ys, style, marker="o", label=label)
        for xx, e, r in zip(xs, edge, rs):
            if e is not None:
                ax.plot([xx], [e], "^" if e == ymax else "v", color=line.get_color(), markersize=9)
                ax.annotate(f"{r[y] * scale:.0f}", (xx, e), textcoords="offset points", xytext=(4, 2),
                            fontsize=7, color=line.get_color())
        if ref:  # a faint segment joins each curve to the unreduced model
            rx, ry = ref[0][x], ref[0][y] * scale
            i = min(range(len(xs)), key=lambda j: abs(xs[j] - rx))
            ax.plot([xs[i], rx], [ys[i], ry], style, color=line.get_color(), alpha=0.35)
        for r, xx, yy in zip(rs, xs, ys):
            ax.annotate(f"{r['budget']:g}", (xx, yy), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=line.get_color())
    if ref:
        ax.plot([ref[0].get(x, 1.0)], [ref[0][y] * scale], "k*", markersize=12, label="unreduced")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def speed_plot(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Left: measured speed-up over the unreduced model against budget, one line per method
    (solid: largest batch, dashed: batch 1). Right: measured speed-up against the FLOP bound
    ``1 / flop_ratio`` (the diagonal is a perfect implementation)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    sizes = sorted({r["batch_size"] for r in rows if r.get("batch_size")})
    big, small = (sizes[-1], sizes[0]) if sizes else (None, None)
    colors = {}
    hi = 1.0
    for label, rs in _by_label(rows).items():
        for bs, style in ((big, "-"), (small, "--")):
            if bs is None or (bs == small and small == big and style == "--"):
                continue
            pts = sorted((r for r in rs if r["batch_size"] == bs and r.get("speedup")), key=lambda r: r["budget"])
            if not pts:
                continue
            kw = {"color": colors[label]} if label in colors else {}
            line, = a1.plot([r["budget"] for r in pts], [r["speedup"] for r in pts], style, marker="o",
                            label=f"{label} (bs {bs})", **kw)
            colors[label] = line.get_color()
            bound = [1.0 / r["flop_ratio"] for r in pts]
            a2.plot(bound, [r["speedup"] for r in pts], style, marker="o", color=colors[label],
                    label=f"{label} (bs {bs})")
            hi = max(hi, *bound, *[r["speedup"] for r in pts])
    a1.axhline(1.0, color="k", lw=0.8)
    a1.set_xlabel("budget (fraction of patch tokens leaving the encoder)")
    a1.set_ylabel("speed-up over unreduced (x)")
    a1.invert_xaxis()
    a2.plot([1, hi], [1, hi], "k:", lw=1, label="FLOP bound")
    a2.set_xlabel("FLOP bound: unreduced / reduced encoder FLOPs")
    a2.set_ylabel("measured speed-up (x)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)
