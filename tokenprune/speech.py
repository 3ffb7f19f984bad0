"""Speech helpers for measuring what token reduction does to Whisper: transcription and WER.

``transcribe`` decodes greedily or with beam search (``model.generate`` with its
own generation config; a reduced model is used exactly like an unreduced one).
``normalize_text`` lowercases and strips punctuation (numbers stay as they
are: "ten" vs "10" counts as an error). ``wer`` is word error rate over the
whole set (total edits / total reference words), via ``jiwer`` when it is
installed, otherwise an own word-level edit distance with the same result.
"""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

import torch

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014\u2026]")


def normalize_text(s: str) -> str:
    """Lowercase, strip punctuation (apostrophes included), collapse whitespace."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = _PUNCT.sub(" ", s.replace("'", "").replace("\u2019", ""))
    return " ".join(s.split())


def _edits(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Sequence[str], hyps: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate in [0, inf): total word edits / total reference words."""
    if len(refs) != len(hyps):
        raise ValueError(f"wer: {len(refs)} references but {len(hyps)} hypotheses; give one hypothesis per reference")
    if not refs:
        raise ValueError("wer: no references given")
    if normalize:
        refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    words = sum(len(r.split()) for r in refs)
    if words == 0:
        raise ValueError("wer: the references contain no words")
    if all(r.strip() for r in refs):
        try:
            import jiwer

            return float(jiwer.wer(list(refs), list(hyps)))
        except ImportError:
            pass
    return sum(_edits(r.split(), h.split()) for r, h in zip(refs, hyps)) / words


def read_audio(path):
    """``(samples [frames, channels] float32, sampling rate)`` of an audio file (read with soundfile)."""
    import soundfile as sf

    return sf.read(str(path), dtype="float32", always_2d=True)


def resample(audio, sr: int, target: int):
    """A mono float32 waveform at ``sr`` Hz resampled to ``target`` Hz: torchaudio's resampler when it
    is installed, else linear interpolation. The one resampler of the package (eval, scripts, demo)."""
    import numpy as np

    if sr == target:
        return audio
    try:
        import torchaudio.functional as AF

        return AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), sr, target).numpy()
    except ImportError:  # linear interpolation fallback
        n = int(round(len(audio) * target / sr))
        return np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype("float32")


def load_audio(path, sampling_rate: int = 16000):
    """Mono float32 waveform at ``sampling_rate``: :func:`read_audio`, channels averaged, :func:`resample`."""
    audio, sr = read_audio(path)
    return resample(audio.mean(1), sr, sampling_rate)


def transcribe_audio(model, processor, audio, max_new_tokens: int = 128, num_beams: int = 1) -> list[str]:
    """Transcripts (greedy, or beam search with ``num_beams`` > 1) of waveforms at the processor's sampling
    rate, one string per waveform."""
    sr = processor.feature_extractor.sampling_rate
    param = next(model.parameters())
    feats = processor(list(audio), sampling_rate=sr, return_tensors="pt").input_features
    ids = model.generate(feats.to(device=param.device, dtype=param.dtype), max_new_tokens=max_new_tokens,
                         num_beams=num_beams)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def transcribe(model, processor, wav_paths, batch_size: int = 8, max_new_tokens: int = 128,
               num_beams: int = 1) -> list[str]:
    """Transcripts of ``wav_paths`` (one string per file, in order): greedy, or beam search with ``num_beams`` > 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    sr = processor.feature_extractor.sampling_rate
    out: list[str] = []
    paths = list(wav_paths)
    for s in range(0, len(paths), batch_size):
        audio = [load_audio(p, sr) for p in paths[s:s + batch_size]]
        out.extend(transcribe_audio(model, processor, audio, max_new_tokens, num_beams))
    return out
