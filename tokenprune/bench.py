"""Timing and memory measurement for ``tokenprune bench``.

GPU timing: ``warmup`` untimed calls, then ``repeats`` calls each bracketed
by CUDA events (the device is synchronised after each), reported as the
median. CPU timing: ``time.perf_counter`` around each call, median.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one call (after
resetting the peak; weights included, and the activation part beside it). On
Linux CPUs the peak resident set size of the process over one call (the
kernel's high-water mark, reset through ``/proc/self/clear_refs``), which is
coarse (allocator caching) -- ``None`` where that is not available.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def _quantile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


@torch.inference_mode()
def time_fn(fn: Callable[[], object], device: str | torch.device, warmup: int = 10, repeats: int = 30) -> Timing:
    """Median wall time of ``fn()`` (CUDA events on GPU)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), repeats)



@torch.inference_mode()
def pipelined_ms(fn: Callable[[], object], device: str | torch.device, calls: int = 50, repeats: int = 5) -> float:
    """Milliseconds per call of ``calls`` back-to-back ``fn()`` between two CUDA events (the lowest of ``repeats``
    loops): the device's time per call once the host runs ahead of it, so a call's host time hides behind the
    previous call's work wherever it is shorter. Against :func:`time_fn` (the device idle at each call's start) it
    says how much of a batch-1 latency is host time before the device starts. Wall time off CUDA."""
    cuda = torch.device(device).type == "cuda"
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) * 1e3 / calls)
    return best


@torch.inference_mode()
def host_time_ms(fn: Callable[[], object], device: str | torch.device, repeats: int = 30) -> float:
    """Median host (CPU) time to issue one ``fn()``, the device idle at the start of each call: what CUDA
    events cannot see, and what bounds a batch-1 eager forward."""
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def thread_cpu_us(fns: dict, calls: int, runs: int = 5) -> dict:
    """Host work alone: per function of ``fns`` (name -> ``fn()``), microseconds of this thread's CPU time per call
    (``time.thread_time``: on a shared machine the time other processes hold the core is not counted; on an idle
    one it is the wall time), the best of ``runs`` loops of ``calls`` calls. The functions are timed in the same
    rounds (one loop of each per round), so pieces compared by their difference drift together."""
    for fn in fns.values():
        for _ in range(max(calls // 20, 5)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.thread_time() - t0) / calls * 1e6)
    return best


class StepClock:
    """A ``generate()`` logits processor that records the time at each decoding step (``t``, seconds of
    ``perf_counter``, after a device sync on CUDA) and leaves the scores as they are: the decode rate is read
    from the median step, which a few slow steps (host hiccups) do not move."""

    def __init__(self, device: str | torch.device):
        self.cuda, self.t = torch.device(device).type == "cuda", []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores

    def median_step_s(self) -> float:
        """The median time between two recorded steps."""
        steps = sorted(b - a for a, b in zip(self.t, self.t[1:]))
        return steps[len(steps) // 2]


def device_busy_ms(fn: Callable[[], object], device: str | torch.device) -> float | None:
    """GPU time of the kernels (and copies) that one ``fn()`` runs, summed over the profiler's device events,
    after one untimed call. Against the call's wall time it says how much of it the device was busy: a call
    whose wall time is well above it is bound by the host. ``None`` off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3


def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@torch.inference_mode()
def peak_memory(fn: Callable[[], object], device: str | torch.device) -> tuple[float | None, float | None]:
    """``(peak MiB, peak MiB above what was allocated before the call)`` over one ``fn()``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return peak / 2**20, (peak - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    except OSError:
        return None, None
    before = _proc_kb("VmRSS")
    fn()
    peak = _proc_kb("VmHWM")
    if before is None or peak is None:
        return None, None
    return peak / 1024, max(0, peak - before) / 1024


def synthetic_forward(lm, batch_size: int, device, dtype) -> Callable[[], object]:
    """A closure running one forward of the model (its encoder for Hugging Face models) on random
    input of the right shape; the input is made once."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if lm.family == "timm":
        h, w = lm.img_size
        x = rand(batch_size, getattr(lm.model.patch_embed.proj, "in_channels", 3), h, w)
        return lambda: lm.model(x)
    cfg = lm.model.config
    enc = lm.encoder
    if lm.modality == "speech":  # Whisper: log-mel features of 30 s
        x = rand(batch_size, cfg.num_mel_bins, 2 * cfg.max_source_positions)
        return lambda: enc(input_features=x)
    if lm.modality == "audio" and hasattr(cfg, "conv_kernel"):  # Wav2Vec2 / HuBERT: [B, samples] of waveform
        from .adapters.hf_speech import NOMINAL_SAMPLES  # the length tokenprune.plan(model) counts (10 s)

        x = rand(batch_size, NOMINAL_SAMPLES)
        return lambda: enc(input_values=x)
    if lm.modality == "audio":  # AST: [B, frames, mel bins]
        x = rand(batch_size, cfg.max_length, cfg.num_mel_bins)
        return lambda: enc(input_values=x)
    vcfg = getattr(cfg, "vision_config", cfg)
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    if lm.modality == "video":
        x = rand(batch_size, cfg.num_frames, cfg.num_channels, size, size)
    else:
        x = rand(batch_size, getattr(vcfg, "num_channels", 3), size, size)
    return lambda: enc(pixel_values=x)


def prefer_sdpa(lm) -> str:
    """Put the model on its fastest attention path (fused SDPA) and say which it is."""
    if lm.family == "timm":
        n = 0
        for m in lm.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
                n += 1
        return "sdpa" if n else "model default"
    impl = getattr(lm.model.config, "_attn_implementation", None)
    return str(impl or "model default")
