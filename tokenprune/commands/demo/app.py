"""The demo's Gradio page: layout and event handlers. Inputs, models and rendering live in
:mod:`.inputs`, :mod:`.models` and :mod:`.render`; this is the only module that imports Gradio."""
from __future__ import annotations

import html
import os
from pathlib import Path

import gradio as gr
import numpy as np

from ... import viz
from .._common import BUDGET_HELP
from .inputs import AUDIO_RATE, MAX_UPLOAD_BYTES, InputError, load_audio, load_image, sample_audio, sample_images, square_crop
from .models import (TINY_LABEL, ImageModel, compare_audio, compare_image, load_image_model, model_choices,
                     usable_methods, whisper_status)
from .render import CSS, TABLE_HEADERS, audio_html, message_html, results_html, results_table, warning_html

TINY_ENV = "TOKENPRUNE_DEMO_TINY"  # "1": start on the tiny random ViT (fast; for tests)
DEFAULT_METHODS = ("merge", "cls")
BUDGET_LABEL = BUDGET_HELP[0].upper() + BUDGET_HELP[1:]  # one wording: the CLI's


def build_app(model_dir: Path | str | None = None, default_model: str | None = None, repeats: int = 3):
    """The Gradio ``Blocks`` app (not launched)."""
    choices = model_choices(model_dir)
    if default_model is None:
        default_model = TINY_LABEL if os.environ.get(TINY_ENV) == "1" else choices[0]
    cache: dict[str, ImageModel] = {}

    def get_model(label: str) -> ImageModel:
        if label not in cache:
            cache[label] = load_image_model(label, model_dir)
        return cache[label]

    first = get_model(default_model)
    samples = sample_images()
    methods = usable_methods(first.model)
    default_methods = [m for m in DEFAULT_METHODS if m in methods] or methods[:2]

    def prepare(im):
        return np.asarray(square_crop(im))

    def on_upload(upload):
        # the file box is emptied after each upload so the next file can be dropped straight in
        if upload is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            im, notes = load_image(upload)
        except InputError as e:
            return None, message_html(error=str(e)), None, None
        except Exception as e:  # any other decoder failure: still a message, not a traceback
            return None, message_html(error=f"could not read {Path(str(upload)).name!r} as an image ({e})."), None, None
        notes.insert(0, f"loaded {Path(str(upload)).name} ({im.size[0]} x {im.size[1]}); centre-cropped to a square")
        return prepare(im), message_html(notes), None, None

    def on_sample(name):
        if not name or name not in samples:
            return gr.update(), gr.update()
        im, notes = load_image(samples[name])
        return prepare(im), message_html([f"sample '{name}' ({im.size[0]} x {im.size[1]})"] + notes)

    def on_model(label):
        try:
            entry = get_model(label)
        except Exception as e:
            return message_html(error=f"could not load {label}: {e}")
        return warning_html(entry.warning)

    def on_run(image, label, budget, chosen):
        try:
            if image is None:
                raise InputError("No image: upload one or pick a sample first.")
            entry = get_model(label)
            ref, results = compare_image(entry, image, float(budget), list(chosen or []), repeats=repeats)
        except (InputError, ValueError, TypeError) as e:
            return message_html(error=str(e)), "", None
        except Exception as e:  # never a traceback in the page
            return message_html(error=f"unexpected error: {type(e).__name__}: {e}"), "", None
        done = sum(not r.error for r in results)
        status = (f'<div id="tp-done" data-methods="{done}">{done} of {len(results)} methods ran on '
                  f"{html.escape(entry.label)} at budget {float(budget):g}; times are the best of {repeats} "
                  "CPU forwards of one image (the unreduced model timed before and after the methods).</div>")
        return status, results_html(ref, results, float(budget)), results_table(ref, results)

    audio_ok, audio_why = whisper_status()
    jfk = sample_audio()

    def on_audio(upload, use_sample, budget, chosen):
        try:
            src = jfk if (use_sample and upload is None) else upload
            if src is None:
                raise InputError("No clip: upload an audio file" + (" or tick the JFK sample." if jfk else "."))
            wave, notes = load_audio(src)
            if not audio_ok:
                spec = viz.log_spectrogram(wave)
                img = viz.colorize(spec)[::-1]
                ref = {"method": "input", "image": img, "text": "(no transcript: " + audio_why + ")", "ms": 0.0}
                return (message_html(notes + [f"Not available yet: {audio_why} Showing the clip's spectrogram only."]),
                        audio_html(ref, []))
            ref, rows = compare_audio(wave, float(budget), list(chosen or []))
        except (InputError, ValueError, TypeError) as e:
            return message_html(error=str(e)), ""
        except Exception as e:
            return message_html(error=f"unexpected error: {type(e).__name__}: {e}"), ""
        done = sum(not r.get("error") for r in rows)
        info = (f'<div id="tp-audio-done" data-methods="{done}">{done} of {len(rows)} methods ran on Whisper '
                f"tiny.en at budget {float(budget):g}; {wave.size / AUDIO_RATE:.1f} s clip.</div>")
        return info + message_html(notes), audio_html(ref, rows)

    with gr.Blocks(title="tokenprune demo", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown("# tokenprune: which tokens does each method keep?\n"
                    f"Pick an input, a budget and methods ({BUDGET_HELP}); "
                    "each panel shows the tokens that method kept on the image, with its time and its agreement "
                    "with the unreduced model.")
        with gr.Tab("Image"):
            warning = gr.HTML(warning_html(first.warning), elem_id="tp-warning-box")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Upload an image", file_count="single", type="filepath",
                                     elem_id="tp-upload")
                    sample = gr.Dropdown(choices=list(samples), value=next(iter(samples), None), label="...or pick a bundled sample",
                                         elem_id="tp-sample")
                    first_img = prepare(load_image(next(iter(samples.values())))[0]) if samples else None
                    preview = gr.Image(value=first_img, label="Model input", type="numpy", interactive=False,
                                       elem_id="tp-preview", height=240)
                    input_msg = gr.HTML(message_html([f"sample '{next(iter(samples))}'"]) if samples else "",
                                        elem_id="tp-input-msg")
                with gr.Column(scale=1):
                    model_dd = gr.Dropdown(choices=choices, value=default_model, label="Model", elem_id="tp-model")
                    budget = gr.Slider(0.05, 1.0, value=0.25, step=0.05,
                                       label=BUDGET_LABEL, elem_id="tp-budget")
                    chosen = gr.CheckboxGroup(choices=methods, value=default_methods, label="Methods",
                                              elem_id="tp-methods")
                    run = gr.Button("Compare", variant="primary", elem_id="tp-run")
            status = gr.HTML("", elem_id="tp-status")
            panels = gr.HTML("", elem_id="tp-panels")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Numbers", interactive=False, elem_id="tp-table")
        with gr.Tab("Audio"):
            note = ("" if audio_ok else
                    f'<div class="tp-warning" id="tp-audio-unavailable">Not available yet: {html.escape(audio_why)} '
                    "The tab shows the clip's spectrogram; the per-method comparison and transcripts appear "
                    "once tokenprune can reduce Whisper.</div>")
            gr.HTML(note)
            with gr.Row():
                with gr.Column():
                    audio_up = gr.File(label="Upload a clip (WAV, FLAC, OGG, MP3; up to 30 s used)",
                                       elem_id="tp-audio-upload")
                    use_jfk = gr.Checkbox(value=jfk is not None, interactive=jfk is not None,
                                          label="use the JFK sample" + ("" if jfk else " (not found locally)"))
                with gr.Column():
                    audio_budget = gr.Slider(0.05, 1.0, value=0.5, step=0.05,
                                             label=BUDGET_LABEL)
                    audio_methods = gr.CheckboxGroup(choices=methods, value=default_methods[:1], label="Methods")
                    audio_run = gr.Button("Transcribe and compare", variant="primary", elem_id="tp-audio-run")
            audio_msg = gr.HTML("", elem_id="tp-audio-msg")
            audio_panels = gr.HTML("", elem_id="tp-audio-panels")

        upload.upload(on_upload, [upload], [preview, input_msg, upload, sample])
        sample.change(on_sample, [sample], [preview, input_msg])
        model_dd.change(on_model, [model_dd], [warning])
        run.click(on_run, [preview, model_dd, budget, chosen], [status, panels, table])
        audio_run.click(on_audio, [audio_up, use_jfk, audio_budget, audio_methods], [audio_msg, audio_panels])
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    return app.launch(server_name=host, server_port=port, css=CSS, max_file_size=MAX_UPLOAD_BYTES,
                      footer_links=[], quiet=True, **kwargs)
