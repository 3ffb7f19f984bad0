"""tokenprune.viz overlays and the demo's upload validation (no Gradio needed)."""
import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from tokenprune import viz
from tokenprune.commands.demo import inputs, models, render

from conftest import tiny_vit

GRAY = 128


def _gray(h=40, w=40):
    return np.full((h, w, 3), GRAY, dtype=np.uint8)


# -- overlays on hand-made source maps -------------------------------------------------------------
def test_overlay_dims_dropped_tints_merged_keeps_singletons():
    # 2 x 2 grid, prefix of 1: patches 0 and 1 merged into token 1, patch 2 alone in token 2, patch 3 dropped
    src = torch.tensor([[1, 1, 2, -1]])
    out = viz.token_overlay(_gray(), src, (2, 2), outline=False)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    top_left, top_right, bottom_left, bottom_right = out[5, 5], out[5, 35], out[35, 5], out[35, 35]
    assert (bottom_left == GRAY).all()  # kept alone: untouched
    assert bottom_right.max() < GRAY * 0.6  # dropped: dimmed
    assert (top_left == top_right).all() and not (top_left == GRAY).all()  # one group, one tint
    assert len(set(map(tuple, out.reshape(-1, 3)))) == 3


def test_overlay_outlines_only_between_different_tokens():
    src = np.array([1, 1, 2, -1])
    out = viz.token_overlay(_gray(), src, (2, 2), alpha=0.0, dim=1.0, outline=True, outline_color=(255, 0, 0),
                            line=1)
    red = (out == [255, 0, 0]).all(-1)
    assert not red[:20].any()  # the merged pair (top row) has no line between its two patches
    assert red[20].all()  # top row vs bottom row: different tokens
    assert red[21:, 20].all() and red.sum() == 40 + 19  # bottom: token 2 vs dropped


def test_group_sizes_and_stats():
    src = np.array([1, 1, 1, 2, -1, -1, 3, 3, 3])
    assert viz.group_sizes(src) == {1: 3, 2: 1, 3: 3}
    s = viz.token_stats(src)
    assert s == {"patches": 9, "tokens": 3, "dropped": 2, "merged_tokens": 2, "patches_in_merged": 6,
                 "largest_group": 3}


def test_overlay_rejects_bad_grid_and_shapes():
    with pytest.raises(ValueError, match="grid"):
        viz.token_overlay(_gray(), np.arange(6), (2, 2))
    with pytest.raises(ValueError, match="square"):
        viz.token_overlay(_gray(), np.arange(6))
    with pytest.raises(ValueError, match="image"):
        viz.as_rgb(np.zeros((2, 3, 4, 5)))


def test_as_rgb_converts_gray_alpha_float_and_chw():
    assert viz.as_rgb(np.zeros((5, 6), dtype=np.uint8)).shape == (5, 6, 3)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black -> white
    assert (viz.as_rgb(rgba) == 255).all()
    assert (viz.as_rgb(np.ones((3, 3, 3), dtype=np.float32)) == 255).all()
    chw = torch.zeros(3, 7, 9)
    assert viz.as_rgb(chw).shape == (7, 9, 3)
    assert (viz.as_rgb(Image.new("LA", (4, 4), (0, 0))) == 255).all()


# -- overlays from real reduced forwards ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["merge", "cls"])
def test_overlay_from_a_reduced_forward(method):
    m = tiny_vit(img_size=32, patch_size=4)  # 8 x 8 grid, 64 patches
    x = torch.rand(2, 3, 32, 32)
    with tokenprune.applied(m, budget=0.25, method=method), torch.no_grad():
        feats, state = tokenprune.features(m, x)
    k = tokenprune.keep_count(0.25, 64)
    for b in range(2):
        s = viz.token_stats(state.source, index=b)
        assert s["tokens"] == k
        if method == "cls":
            assert s["dropped"] == 64 - k and s["merged_tokens"] == 0
        else:
            assert s["dropped"] == 0 and s["patches_in_merged"] > 0
    img = viz.overlay_from_state(x[1], state, index=1)
    assert img.shape == (32, 32, 3)


def test_overlay_without_a_state_is_a_clear_error():
    m = tiny_vit(img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="tokenprune.apply"):
        tokenprune.features(m, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="tokenprune.apply"):
        viz.overlay_from_state(torch.rand(3, 32, 32), None)


# -- audio -------------------------------------------------------------------------------------------------
def test_log_spectrogram_peak_at_the_tone():
    sr = 16000
    t = np.arange(sr) / sr
    spec = viz.log_spectrogram(np.sin(2 * np.pi * 1000 * t), sr=sr, n_fft=400, hop=160)
    assert spec.shape == (201, 101)
    assert int(np.argmax(spec[:, 50])) == 25  # 1000 Hz / (16000 / 400) Hz per bin


def test_spectrogram_overlay_time_tokens():
    spec = np.random.default_rng(0).normal(size=(80, 20)).astype(np.float32)
    # 15 tokens of 2 frames each: tokens 10..14 lie past the 20 frames (padding of a short clip)
    src = np.array([1, -1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    out = viz.spectrogram_overlay(spec, src, (15,), frames_per_token=2, height=160, outline=False, alpha=0.0,
                                  dim=0.0)
    assert out.shape == (160, 20, 3)
    assert (out[:, 2:4] == 0).all()  # token 1 dropped -> frames 2, 3 black with dim=0
    assert out[:, [0, 1, 4, 5]].any()
    plain = viz.colorize(spec)[::-1].repeat(2, axis=0)
    assert (out[:, 0:2] == plain[:, 0:2]).all()  # kept alone: untouched


def test_spectrogram_overlay_frequency_bands_low_at_bottom():
    spec = np.ones((8, 8), dtype=np.float32)
    src = np.array([1, 2, -1, -1])  # grid (2 bands, 2 times): the upper band (index 1) dropped
    out = viz.spectrogram_overlay(spec, src, (2, 2), height=8, outline=False, alpha=0.0, dim=0.0)
    assert (out[:4] == 0).all() and out[4:].any()  # top rows are the high band


def test_panel_figure():
    fig = viz.panel_figure([("a", _gray()), ("b", _gray())])
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "b"


# -- upload validation ---------------------------------------------------------------------------------------
def test_non_image_file_is_a_readable_error(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("not an image")
    with pytest.raises(inputs.InputError, match="not an image"):
        inputs.load_image(p)
    e = tmp_path / "empty.png"
    e.write_bytes(b"")
    with pytest.raises(inputs.InputError, match="empty"):
        inputs.load_image(e)
    with pytest.raises(inputs.InputError, match="upload"):
        inputs.load_image(None)


def test_truncated_image_is_a_readable_error(tmp_path):
    p = tmp_path / "cut.png"
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    p.write_bytes(buf.read_bytes()[:200])
    with pytest.raises(inputs.InputError, match="cut.png"):
        inputs.load_image(p)


def test_gray_alpha_and_16bit_images_become_rgb(tmp_path):
    Image.new("L", (20, 10), 77).save(tmp_path / "g.png")
    im, notes = inputs.load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (77, 77, 77) and "grayscale" in notes[0]
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    im, notes = inputs.load_image(tmp_path / "a.png")
    assert im.getpixel((3, 3)) == (255, 255, 255) and "white" in notes[0]
    Image.fromarray(np.full((6, 6), 4000, dtype=np.uint16)).save(tmp_path / "d.png")
    im, notes = inputs.load_image(tmp_path / "d.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_huge_images_are_downscaled_or_refused(tmp_path, monkeypatch):
    Image.new("RGB", (3000, 1500), (10, 20, 30)).save(tmp_path / "big.png")
    im, notes = inputs.load_image(tmp_path / "big.png")
    assert im.size == (inputs.MAX_SIDE, inputs.MAX_SIDE // 2) and any("downscaled" in n for n in notes)
    monkeypatch.setattr(inputs, "MAX_PIXELS", 1_000_000)
    with pytest.raises(inputs.InputError, match="megapixels|MP"):
        inputs.load_image(tmp_path / "big.png")
    monkeypatch.setattr(inputs, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(inputs.InputError, match="MB"):
        inputs.load_image(tmp_path / "big.png")


def test_square_crop_centres():
    im = Image.new("RGB", (30, 10))
    im.paste((255, 0, 0), (10, 0, 20, 10))
    sq = inputs.square_crop(im)
    assert sq.size == (10, 10) and sq.getpixel((5, 5)) == (255, 0, 0)


def test_audio_validation(tmp_path):
    import soundfile as sf

    (tmp_path / "x.wav").write_text("RIFF but not really")
    with pytest.raises(inputs.InputError, match="not an audio file"):
        inputs.load_audio(tmp_path / "x.wav")
    sf.write(tmp_path / "short.wav", np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(inputs.InputError, match="at least"):
        inputs.load_audio(tmp_path / "short.wav")
    sr = 44100
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    sf.write(tmp_path / "st.wav", np.stack([tone, tone], 1), sr)
    wave, notes = inputs.load_audio(tmp_path / "st.wav")
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert any("mono" in n for n in notes) and any("16000" in n for n in notes)
    spec = np.abs(np.fft.rfft(wave))
    assert abs(int(np.argmax(spec)) - 440) <= 1  # 1 s at 16 kHz: 1 Hz per bin; the tone survived
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31, dtype=np.float32), 16000)
    wave, notes = inputs.load_audio(tmp_path / "long.wav")
    assert wave.size == 16000 * 30 and any("30 s" in n for n in notes)


def test_demo_reads_and_resamples_audio_like_the_wer_evaluation(tmp_path):
    # one audio loader: the demo's waveform is the one tokenprune.speech gives eval and the scripts
    import soundfile as sf

    from tokenprune import speech

    sr = 22050
    t = np.arange(sr // 2) / sr
    clip = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 1700 * t)], 1).astype(np.float32)
    sf.write(tmp_path / "c.wav", clip, sr)
    wave, notes = inputs.load_audio(tmp_path / "c.wav")
    np.testing.assert_array_equal(wave, speech.load_audio(tmp_path / "c.wav", 16000))
    assert any("22050 Hz" in n for n in notes)


# -- the demo's comparison without the UI ----------------------------------------------------------------------
def test_compare_image_counts_and_panels():
    entry = models.load_image_model(models.TINY_LABEL)
    img = Image.open(next(iter(inputs.sample_images().values())))
    ref, results = models.compare_image(entry, img, 0.25, ["merge", "cls"], repeats=1, display=64)
    k = tokenprune.keep_count(0.25, 64)
    assert ref.kept == 64 and [r.kept for r in results] == [k, k]
    assert all(not r.error and r.overlay.shape == (64, 64, 3) for r in results)
    assert results[1].stats["dropped"] == 64 - k
    page = render.results_html(ref, results, 0.25)
    assert page.count('class="tp-card"') == 3 and f'data-kept="{k}"' in page
    assert not tokenprune.is_applied(entry.model)
    with pytest.raises(inputs.InputError, match="unknown method"):
        models.compare_image(entry, img, 0.25, ["nope"])
    with pytest.raises(ValueError, match="budget"):
        models.compare_image(entry, img, 1.5, ["merge"])


def test_bundled_samples_are_small_pngs():
    samples = inputs.sample_images()
    assert len(samples) >= 3
    for p in samples.values():
        assert p.stat().st_size < 50 * 1024
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB"


def test_spectrogram_overlay_merged_token_past_the_clip_and_strip():
    # token 13 holds time steps 12..14, all past the 20 frames drawn (a merge into padding): must not fail
    spec = np.zeros((4, 20), dtype=np.float32)
    src = np.array([1, 1, 2, 3, 4, -1, 5, 6, 7, 8, 9, 10, 13, 13, 13])
    out = viz.spectrogram_overlay(spec, src, (15,), frames_per_token=2, height=8, strip=3)
    assert out.shape == (8 + 2 + 3, 20, 3)
    bar = out[-1]
    assert (bar[10:12] == 0).all()  # dropped token 5 (frames 10, 11) is black in the strip
    assert (bar[0] == bar[3]).all() and not (bar[0] == 220).all()  # tokens 0, 1 merged: one colour
    assert (bar[4] == 220).all()  # kept alone: light gray


def test_input_grid_ignores_a_pooled_grid():
    from tokenprune.state import TokenState

    src = torch.arange(1, 17)[None]
    pooled = TokenState(x=torch.zeros(1, 5, 4), num_prefix=1, num_input=16, grid=(2, 2), source=src)
    assert viz.input_grid(pooled) is None  # (2, 2) is the grid after pooling, not the 16 input patches
    same = TokenState(x=torch.zeros(1, 17, 4), num_prefix=1, num_input=16, grid=(4, 4), source=src)
    assert viz.input_grid(same) == (4, 4)


@pytest.mark.parametrize("method", ["pool", ["pool", "merge"]])
def test_overlay_after_pooling_a_non_square_grid(method):
    m = tiny_vit(img_size=(32, 48), patch_size=4)  # 8 x 12 grid: no square to fall back on
    x = torch.rand(2, 3, 32, 48)
    with tokenprune.applied(m, budget=0.25, method=method), torch.no_grad():
        feats, state = tokenprune.features(m, x)
    assert state.grid != (8, 12)  # pooled
    assert viz.input_grid(state) == (8, 12)
    img = viz.overlay_from_state(x[1], state, index=1)
    assert img.shape == (32, 48, 3)


def test_usable_methods_leave_out_methods_that_need_options():
    entry = models.load_image_model(models.TINY_LABEL)
    usable = models.usable_methods(entry.model)
    assert {"merge", "cls"} <= set(usable)
    for m in set(tokenprune.methods()) - set(usable):
        with pytest.raises(Exception):
            tokenprune.plan(entry.model, budget=0.25, method=m)


@pytest.mark.slow
def test_compare_audio_on_the_jfk_clip(assets):
    ok, why = models.whisper_status()
    if not ok:
        pytest.skip(why)
    wave, _ = inputs.load_audio(assets / "speech-hifitts-6097" / "jfk.wav")
    wave = wave[: 16000 * 4]  # "And so, my fellow Americans": a short decode keeps the test fast
    ref, rows = models.compare_audio(wave, 0.5, ["merge"])
    assert "fellow americans" in ref["text"].lower()
    (row,) = rows
    assert not row["error"] and row["kept"] == 750 and row["total"] == 1500
    assert row["image"].shape[1] == ref["image"].shape[1]  # one column per 10 ms frame of the clip
    assert row["text"]


def test_missing_weights_fall_back_to_random_with_a_warning(tmp_path):
    assert models.model_choices(tmp_path)[0] == models.RANDOM_LABEL
    entry = models.load_image_model(models.REAL_LABEL, tmp_path)  # asked for the real model, weights absent
    assert entry.label == models.RANDOM_LABEL
    assert "RANDOM weights" in entry.warning and str(tmp_path) in entry.warning
    assert entry.img_size == 224 and len(entry.class_names) == 10
    with pytest.raises(inputs.InputError, match="unknown model"):
        models.load_image_model("resnet?", tmp_path)
