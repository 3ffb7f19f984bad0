"""The demo's result panels as HTML (one card per method), the numbers table and the page's CSS.
No Gradio."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from .models import Result


def _png_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CSS = """
.tp-results {display:flex; flex-wrap:wrap; gap:12px;}
.tp-card {border:1px solid #d0d4dc; border-radius:8px; padding:8px; width:240px; background:var(--block-background-fill);}
.tp-card img {width:100%; image-rendering:auto; border-radius:4px; display:block;}
.tp-card.tp-audio {width:100%;}
.tp-title {font-weight:700; font-size:1.05em; margin:4px 0;}
.tp-line {font-size:0.92em; margin:2px 0;}
.tp-ok {color:#0a7d28; font-weight:600;} .tp-bad {color:#b3261e; font-weight:600;}
.tp-error {color:#b3261e; white-space:pre-wrap;}
.tp-warning {background:#fff3cd; color:#6b4e00; border:2px solid #e0a800; border-radius:8px; padding:10px 14px;
             font-weight:600;}
.tp-msg-error {color:#b3261e; font-weight:600;}
.tp-legend span {display:inline-block; margin-right:12px; font-size:0.9em;}
"""


def results_html(ref: Result, results: list[Result], budget: float) -> str:
    def card(r: Result, reference: bool = False) -> str:
        m = html.escape(r.method)
        lines = [f'<div class="tp-card" data-method="{m}">']
        if r.overlay is not None:
            lines.append(f'<img alt="{m} overlay" src="{_png_uri(r.overlay)}">')
        lines.append(f'<div class="tp-title">{m}</div>')
        if r.error:
            lines.append(f'<div class="tp-error">failed: {html.escape(r.error)}</div></div>')
            return "\n".join(lines)
        pre = f" (+{r.prefix} prefix)" if r.prefix else ""
        lines.append(f'<div class="tp-line tp-kept" data-kept="{r.kept}" data-total="{r.total}">'
                     f'tokens out: <b>{r.kept}</b> / {r.total}{pre}</div>')
        if not reference:
            s = r.stats
            lines.append(f'<div class="tp-line">{s.get("dropped", 0)} patches dropped, '
                         f'{s.get("merged_tokens", 0)} merged tokens (largest holds {s.get("largest_group", 0)})</div>')
        speed = f" ({ref.ms / r.ms:.2f}x)" if not reference and r.ms > 0 else ""
        lines.append(f'<div class="tp-line tp-time">time: {r.ms:.1f} ms{speed}; FLOPs x{r.flop_ratio:.2f}</div>')
        lines.append(f'<div class="tp-line tp-pred">prediction: <b>{html.escape(r.label)}</b> ({r.prob:.1%})</div>')
        if not reference:
            cls, word = ("tp-ok", "same as unreduced") if r.agree else ("tp-bad", "differs from unreduced")
            lines.append(f'<div class="tp-line tp-agree {cls}" data-agree="{int(bool(r.agree))}">{word}</div>')
            lines.append(f'<div class="tp-line tp-cos">embedding cosine: {r.cosine:.4f}</div>')
        lines.append("</div>")
        return "\n".join(lines)

    legend = ('<div class="tp-legend"><span>dimmed: dropped patches</span><span>tinted: patches merged into one '
              'token (one colour per token)</span><span>white lines: token boundaries</span>'
              f'<span>budget {budget:g}</span></div>')
    return legend + '<div class="tp-results">' + "\n".join([card(ref, True)] + [card(r) for r in results]) + "</div>"


def results_table(ref: Result, results: list[Result]) -> list[list]:
    rows = [["unreduced", ref.kept, ref.total, round(ref.ms, 1), ref.label, round(ref.prob, 4), "", 1.0, 1.0]]
    for r in results:
        if r.error:
            rows.append([r.method, None, r.total, None, "", None, "error", None, None])
        else:
            rows.append([r.method, r.kept, r.total, round(r.ms, 1), r.label, round(r.prob, 4),
                         "yes" if r.agree else "no", round(r.cosine, 4), round(r.flop_ratio, 3)])
    return rows


TABLE_HEADERS = ["method", "tokens out", "tokens in", "time ms", "prediction", "prob", "agrees",
                 "embedding cosine", "FLOP ratio"]


def audio_html(ref: dict, rows: list[dict]) -> str:
    parts = ['<div class="tp-results">',
             f'<div class="tp-card tp-audio" data-method="unreduced"><img alt="spectrogram" src="{_png_uri(ref["image"])}">'
             f'<div class="tp-title">unreduced</div><div class="tp-line tp-text">{html.escape(ref["text"])}</div>'
             f'<div class="tp-line">transcription time: {ref["ms"]:.0f} ms</div></div>']
    for r in rows:
        m = html.escape(r["method"])
        parts.append(f'<div class="tp-card tp-audio" data-method="{m}">')
        if r.get("image") is not None:
            parts.append(f'<img alt="{m} kept regions" src="{_png_uri(r["image"])}">')
        parts.append(f'<div class="tp-title">{m}</div>')
        if r.get("error"):
            parts.append(f'<div class="tp-error">failed: {html.escape(r["error"])}</div>')
        else:
            if r.get("kept") is not None:
                parts.append(f'<div class="tp-line tp-kept" data-kept="{r["kept"]}">tokens out: <b>{r["kept"]}</b>'
                             f' / {r.get("total", "?")} (the encoder always sees 30 s; padding counts)</div>')
                if r.get("on_clip"):
                    held, span = r["on_clip"]
                    parts.append(f'<div class="tp-line">{held} tokens hold the {span} time steps of the clip</div>')
            parts.append(f'<div class="tp-line tp-text">{html.escape(r["text"])}</div>'
                         f'<div class="tp-line">transcription time: {r["ms"]:.0f} ms (encoder + greedy decoding)</div>')
        parts.append("</div>")
    return "\n".join(parts) + "</div>"


def warning_html(text: str) -> str:
    return f'<div class="tp-warning" id="tp-model-warning">&#9888; {html.escape(text)}</div>' if text else ""


def message_html(notes: list[str] | None = None, error: str | None = None) -> str:
    if error:
        return f'<div class="tp-msg-error">{html.escape(error)}</div>'
    return ("<div>" + "; ".join(html.escape(n) for n in notes) + "</div>") if notes else ""
