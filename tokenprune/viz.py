"""Pictures of what a reducer kept: overlays of the source map on images and spectrograms.

Everything here takes numpy arrays, PIL images or tensors and returns numpy
``uint8`` RGB images (or a matplotlib ``Figure`` from :func:`panel_figure`);
no UI library is needed.

The input is the token state's source map (``TokenState.source``): for every
original patch, the index of the token that now holds it, ``-1`` where the
patch was dropped. :func:`tokenprune.features` returns the final state of a forward::

    feats, state = tokenprune.features(model, x)
    img = tokenprune.viz.token_overlay(image, state.source[0], state.input_grid)

In the overlay, dropped patches are dimmed and desaturated, patches that were
merged into one token share a tint (one colour per token), and a thin line
separates patches held by different tokens. A patch kept on its own keeps its
original colours.
"""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

__all__ = ["as_rgb", "group_sizes", "token_stats", "token_overlay", "overlay_from_state", "input_grid",
           "log_spectrogram", "colorize", "spectrogram_overlay", "panel_figure", "token_colors"]


# -- inputs ----------------------------------------------------------------------------------
def as_rgb(image) -> np.ndarray:
    """``uint8 [H, W, 3]`` from a PIL image, a ``[H, W]`` / ``[H, W, 1|3|4]`` array (uint8, or
    float in [0, 1]) or a ``[3, H, W]`` tensor. Alpha is composited on white; gray is repeated."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        from PIL import Image

        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().float().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape [H, W], [H, W, 1|3|4] or [3, H, W], got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5
        arr = arr.astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        a = arr[..., 3:4].astype(np.float64) / 255.0
        arr = (arr[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _source_row(source, index: int = 0) -> np.ndarray:
    if hasattr(source, "detach"):
        source = source.detach().cpu().numpy()
    src = np.asarray(source)
    if src.ndim == 2:
        src = src[index]
    if src.ndim != 1:
        raise ValueError(f"source must be [N0] or [B, N0], got shape {src.shape}")
    return src.astype(np.int64)


def _grid_shape(grid, n: int) -> tuple[int, int]:
    if grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square; pass grid=(rows, cols)")
        return side, side
    grid = tuple(int(g) for g in grid)
    if len(grid) == 1:
        grid = (1, grid[0])
    if len(grid) != 2:
        raise ValueError(f"grid must have 1 or 2 dimensions, got {grid}")
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} holds {grid[0] * grid[1]} patches but the source map has {n}")
    return grid


# -- statistics ----------------------------------------------------------------------------------
def group_sizes(source, index: int = 0) -> dict[int, int]:
    """``{token index: number of original patches it holds}`` (dropped patches left out)."""
    src = _source_row(source, index)
    ids, counts = np.unique(src[src >= 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def token_stats(source, index: int = 0) -> dict:
    """Counts read off a source map: tokens holding patches, dropped patches, merged tokens."""
    src = _source_row(source, index)
    sizes = group_sizes(src)
    merged = [c for c in sizes.values() if c > 1]
    return {"patches": int(src.size), "tokens": len(sizes), "dropped": int((src < 0).sum()),
            "merged_tokens": len(merged), "patches_in_merged": int(sum(merged)),
            "largest_group": max(sizes.values(), default=0)}


# -- colours -----------------------------------------------------------------------------------------
def token_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` well-separated saturated colours (golden-ratio hues), ``uint8 [n, 3]``."""
    out = np.empty((max(n, 0), 3), dtype=np.uint8)
    for i in range(n):
        h = (0.13 + (i + seed) * 0.618033988749895) % 1.0
        s = 0.85 if i % 2 == 0 else 0.65
        v = 1.0 if i % 3 else 0.85
        out[i] = [int(c * 255 + 0.5) for c in colorsys.hsv_to_rgb(h, s, v)]
    return out


def _label_overlay(rgb: np.ndarray, labels: np.ndarray, sizes: dict[int, int], *, dim: float, alpha: float,
                   outline: bool, outline_color, line: int) -> np.ndarray:
    """Shade an RGB image by a per-pixel token label map (-1 dropped)."""
    out = rgb.astype(np.float32)
    dropped = labels < 0
    if dropped.any():
        gray = out[dropped].mean(-1, keepdims=True)
        out[dropped] = (0.35 * out[dropped] + 0.65 * gray) * dim
    multi = sorted(t for t, c in sizes.items() if c > 1)
    if multi and alpha > 0:
        lut_idx = np.full(max(int(labels.max()) if labels.size else 0, multi[-1]) + 1, -1, dtype=np.int64)
        lut_idx[multi] = np.arange(len(multi))
        colors = token_colors(len(multi)).astype(np.float32)
        safe = np.where(labels >= 0, labels, 0)
        which = np.where(labels >= 0, lut_idx[safe], -1)
        m = which >= 0
        out[m] = (1.0 - alpha) * out[m] + alpha * colors[which[m]]
    if outline:
        edge = np.zeros(labels.shape, dtype=bool)
        dx = labels[:, 1:] != labels[:, :-1]
        dy = labels[1:, :] != labels[:-1, :]
        edge[:, 1:] |= dx
        edge[1:, :] |= dy
        for _ in range(max(line, 1) - 1):  # thicken towards the top-left neighbour
            edge[:, :-1] |= edge[:, 1:].copy()
            edge[:-1, :] |= edge[1:, :].copy()
        out[edge] = np.asarray(outline_color, dtype=np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _pixel_index(length: int, parts: int) -> np.ndarray:
    """For each of ``length`` pixels, which of ``parts`` equal cells it falls in."""
    return np.minimum((np.arange(length) * parts) // max(length, 1), parts - 1)


# -- images --------------------------------------------------------------------------------------------
def token_overlay(image, source, grid=None, *, index: int = 0, dim: float = 0.4, alpha: float = 0.35,
                  outline: bool = True, outline_color=(255, 255, 255), line: int | None = None) -> np.ndarray:
    """Overlay a source map on the image the model saw; returns ``uint8 [H, W, 3]``.

    Args:
        image: the (resized) model input as PIL / array / tensor; patches are
            laid on it as an even ``grid`` of cells.
        source: ``[N0]`` or ``[B, N0]`` (then row ``index``): token holding
            each original patch, ``-1`` for dropped patches.
        grid: ``(rows, cols)`` of the patches (``TokenState.grid``); ``None``
            for a square grid.
        dim: brightness kept by dropped patches (they are also desaturated).
        alpha: strength of the per-token tint of merged groups (0: none).
        outline: draw lines between patches held by different tokens.
        line: line width in pixels (default: 1, 2 for images over 400 px).
    """
    rgb = as_rgb(image)
    src = _source_row(source, index)
    gh, gw = _grid_shape(grid, src.size)
    h, w = rgb.shape[:2]
    cells = src.reshape(gh, gw)
    labels = cells[_pixel_index(h, gh)][:, _pixel_index(w, gw)]
    if line is None:
        line = 2 if max(h, w) > 400 else 1
    return _label_overlay(rgb, labels, group_sizes(src), dim=dim, alpha=alpha, outline=outline,
                          outline_color=outline_color, line=line)


def overlay_from_state(image, state, index: int = 0, **kwargs) -> np.ndarray:
    """:func:`token_overlay` from the final state of a reduced forward (``tokenprune.features(model, x)[1]``)."""
    if state is None:
        raise ValueError("no token state: get it with feats, state = tokenprune.features(model, x) on a model "
                         "patched with tokenprune.apply(...)")
    if state.source is None:
        raise ValueError("this forward ran without source tracking; apply with track_source=True")
    return token_overlay(image, state.source, input_grid(state), index=index, **kwargs)


def input_grid(state):
    """The patch grid of the encoder's *input* (what the source map indexes): ``state.input_grid``.
    Reducers that pool tokens on a grid update ``state.grid`` to the pooled grid, so that is used only
    when it still holds the input's patches; ``None`` (a square grid is assumed) when neither does."""
    n0 = state.source.shape[-1] if state.source is not None else state.num_input
    for grid in (getattr(state, "input_grid", None), state.grid):
        if grid is not None and int(np.prod(grid)) == n0:
            return tuple(grid)
    return None


# -- audio -----------------------------------------------------------------------------------------------
def log_spectrogram(wave, sr: int = 16000, n_fft: int = 400, hop: int = 160, top_db: float = 80.0) -> np.ndarray:
    """Log-magnitude STFT ``[n_fft // 2 + 1, frames]`` in dB (row 0 = 0 Hz), Hann window,
    clipped ``top_db`` below the peak. ``hop=160`` at 16 kHz is Whisper's 10 ms frame."""
    x = np.asarray(wave.detach().cpu().numpy() if hasattr(wave, "detach") else wave, dtype=np.float64)
    if x.ndim == 2:  # [samples, channels] or [channels, samples]
        x = x.mean(axis=1 if x.shape[0] > x.shape[1] else 0)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a mono waveform [samples], got shape {x.shape}")
    pad = n_fft // 2
    x = np.pad(x, (pad, pad), mode="reflect" if x.size > pad else "constant")
    frames = 1 + max(0, (x.size - n_fft) // hop)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    win = np.hanning(n_fft + 1)[:-1]
    mag = np.abs(np.fft.rfft(x[idx] * win, axis=1)).T
    db = 20.0 * np.log10(np.maximum(mag, 1e-10))
    return np.maximum(db, db.max() - top_db).astype(np.float32)


def colorize(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """Map a 2-D array to ``uint8 [H, W, 3]`` with a matplotlib colormap (min-max scaled)."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgba = matplotlib.colormaps[cmap](v)
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def spectrogram_overlay(spec, source, grid, *, frames_per_token: float | None = None, index: int = 0,
                        height: int | None = None, cmap: str = "magma", dim: float = 0.3, alpha: float = 0.5,
                        outline: bool | None = None, outline_color=(255, 255, 255), strip: int = 0) -> np.ndarray:
    """Which time(-frequency) regions of a spectrogram an audio encoder kept; ``uint8 [H, W, 3]``.

    Args:
        spec: ``[F, T]`` (row 0 = lowest frequency, column = frame), e.g. the
            log-mel features fed to the encoder or :func:`log_spectrogram`.
        source: ``[N0]`` or ``[B, N0]`` source map of the encoder's tokens.
        grid: ``(T_tokens,)`` for encoders whose tokens are time steps
            (Whisper: 1500 tokens for 3000 frames), or ``(F_tokens,
            T_tokens)`` for patch encoders over (frequency, time) (row 0 =
            lowest frequency band).
        frames_per_token: spectrogram columns covered by one token along
            time; default ``T / T_tokens``. Tokens that fall beyond the last
            column (padding past the end of a short clip) are not drawn.
        height: output height in pixels (rows are repeated; default: at least
            160 px).
        outline: lines between tokens; default only when a token is at least
            6 columns wide (narrower tokens would turn into stripes).
        strip: height of a bar under a time-token spectrogram with one cell
            per column: black = dropped, light gray = kept alone, a colour per
            merged token (the colours of the tint above). 0: no bar.

    Low frequencies are drawn at the bottom.
    """
    spec = np.asarray(spec.detach().cpu().numpy() if hasattr(spec, "detach") else spec, dtype=np.float32)
    if spec.ndim != 2:
        raise ValueError(f"spec must be [frequency, time], got shape {spec.shape}")
    src = _source_row(source, index)
    grid = tuple(int(g) for g in grid) if grid is not None else (src.size,)
    if len(grid) == 1:
        grid = (1, grid[0])
    fgrid, tgrid = _grid_shape(grid, src.size)
    f_bins, t_frames = spec.shape
    fpt = float(frames_per_token) if frames_per_token else t_frames / tgrid
    if fpt <= 0:
        raise ValueError(f"frames_per_token must be positive, got {frames_per_token}")
    tok_of_col = np.floor(np.arange(t_frames) / fpt).astype(np.int64)
    beyond = tok_of_col >= tgrid  # spectrogram frames no token covers
    tok_of_col = np.minimum(tok_of_col, tgrid - 1)
    rows_out = height or max(160, f_bins)
    rep = max(1, int(np.ceil(rows_out / f_bins)))
    rgb = colorize(spec)[::-1]  # low frequencies at the bottom
    rgb = np.repeat(rgb, rep, axis=0)[-rows_out:] if rep > 1 else rgb
    h = rgb.shape[0]
    band_of_row = _pixel_index(h, fgrid)[::-1]  # bottom rows -> band 0
    cells = src.reshape(fgrid, tgrid)
    labels = cells[band_of_row][:, tok_of_col]
    if beyond.any():
        labels[:, beyond] = -1
    if outline is None:
        outline = fpt >= 6 and h / fgrid >= 6
    sizes = group_sizes(src)
    out = _label_overlay(rgb, labels, sizes, dim=dim, alpha=alpha, outline=outline,
                         outline_color=outline_color, line=1)
    if strip > 0 and fgrid == 1:
        bar = np.full((strip, t_frames, 3), 220, dtype=np.uint8)
        lab = labels[0]
        bar[:, lab < 0] = 0
        multi = sorted(t for t, c in sizes.items() if c > 1)
        colors = token_colors(len(multi))
        pos = {t: i for i, t in enumerate(multi)}
        for col in np.nonzero(lab >= 0)[0]:
            i = pos.get(int(lab[col]))
            if i is not None:
                bar[:, col] = colors[i]
        out = np.concatenate([out, np.full((2, t_frames, 3), 255, dtype=np.uint8), bar], 0)
    return out


# -- figures ----------------------------------------------------------------------------------------------
def panel_figure(panels: Sequence[tuple[str, np.ndarray]], ncols: int | None = None, size: float = 3.0):
    """Side-by-side panels ``[(title, rgb image)]`` as a matplotlib ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure

    n = len(panels)
    if n == 0:
        raise ValueError("no panels to draw")
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(size * ncols, size * nrows + 0.4 * nrows))
    for i, (title, img) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(as_rgb(img))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
