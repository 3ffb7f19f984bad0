"""CUDA-graph capture of a (reduced) model forward.

At batch 1 a ViT forward is bound by kernel launches, and a reducer adds
launches between blocks. Every reducer with a fixed per-input-size plan
(all but per-sample thresholds) has static shapes, so the whole forward can
be captured once and replayed: launch overhead goes away for the reduced and
the unreduced model alike.
"""
from __future__ import annotations

import torch


def graphed(fn, *example_inputs, warmup: int = 3, debug: bool = False):
    """Capture ``fn(*example_inputs)`` in a CUDA graph; returns ``run(*inputs) -> output``.

    Inputs are copied into static buffers on each call, so they must have the
    example's shapes and dtypes. The returned output tensor is overwritten by
    the next call (clone it to keep it). Raises a clear error for forwards
    whose shapes depend on the data (e.g. ``cls`` with ``threshold``).
    ``run.graph`` is the ``torch.cuda.CUDAGraph``; with ``debug`` its capture
    keeps what ``run.graph.debug_dump(path)`` writes (the graph's nodes).
    """
    if not torch.cuda.is_available() or not all(x.is_cuda for x in example_inputs):
        raise ValueError("graphed() needs CUDA tensors")
    static = [x.clone() for x in example_inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if debug:
        graph.enable_debug_mode()
    try:
        with torch.cuda.graph(graph):
            out = fn(*static)
    except RuntimeError as e:
        raise RuntimeError("this forward cannot be captured in a CUDA graph (a reducer whose kept count "
                           f"depends on the data, such as a score threshold, needs a host sync): {e}") from e

    shapes = [tuple(x.shape) for x in static]

    def run(*inputs):
        if len(inputs) != len(static) or any(x.shape != buf.shape for buf, x in zip(static, inputs)):
            # copy_ would broadcast a smaller input into the buffer (a replay of repeated rows), silently
            raise ValueError(f"this CUDA graph was captured for inputs of shapes {shapes} ({len(static)} input(s)); "
                             f"got {len(inputs)}: {[tuple(getattr(x, 'shape', ())) for x in inputs]}; capture "
                             "another graph (graphed(fn, *example_inputs)) for each input shape")
        for buf, x in zip(static, inputs):
            buf.copy_(x)
        graph.replay()
        return out

    run.graph = graph
    return run
