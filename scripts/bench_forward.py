"""Speed of reduced encoders where users run them: batch 1 and a large batch, eager and torch.compile.

Every figure is a ratio against the unreduced model measured in the same process, in the same mode, on
its fastest path (SDPA; compiled the same way when the comparison is compiled). Models have the real
shapes and random weights (fp16, CUDA). Each compiled variant is checked against the same variant in
eager mode (relative error of the output). Timing: ``tokenprune.bench.time_fn`` (CUDA events around
each call, median); ``host_ms`` is the CPU time to issue one eager forward (no sync inside).

    python scripts/bench_forward.py --parts eager --out OUT        # one part per device call
    python scripts/bench_forward.py --smoke --parts eager,compiled --out /tmp/x   # CPU dry run, tiny shapes

Parts: ``eager`` (bs 1 eager, all reducers; host time; ``--profile``: profiler tables), ``compiled`` (bs 1,
``mode="reduce-overhead"``; ``compiled_b`` / ``compiled_l``: ViT-B / ViT-L only), ``long`` (SigLIP-so400m/14@384 tower
and a Whisper-large-v3 encoder, bs 1, eager and reduce-overhead; ``long_siglip`` / ``long_whisper``: one of them,
reduce-overhead; ``long_eager``: both, eager only; ``long_cls``: cls alone; ``long_sched`` / ``long_sched_siglip``:
cls and merge with earlier stages than depth/4, /2, 3/4, and those schedules at no cost; ``kernels_long_sched``: the
kernels of Whisper's earliest ones in the CUDA graph; ``block_curve``: one Whisper-large layer's and one SigLIP
block's GPU time at every fourth token count; ``long_sched_keep``: cls @1,5,9 (SigLIP @2,6,9) with its selection
ranked by counting and sorted; ``long_sched_lse``: Whisper's cls @1,5,9 with the scored layers' log-sum-exp from
cuDNN's attention and without; ``long_sched_ba``: Whisper's merge @1,5,9 with its key bias in the fused kernel and in
SDPA's mask; ``long_recipes_large``: cls and merge with those early stages, and merge, at bs 16 (Whisper) / 32
(SigLIP), eager and compiled default), ``large`` (ViT-B bs 256, eager and compiled default; ``large_gemm``: the same
with the GEMM stem in every row, the unreduced one included), ``others`` (ViT-B pitome and diverse at bs 1 eager /
reduce-overhead, there also pitome in three stages and diverse in one, and bs 256 eager / compiled; threshold at bs 1
eager; ``threshold``: threshold and cls alone), ``apet_once`` (ViT-B / ViT-L bs 1 reduce-overhead: apet in one stage
at the FLOPs of its default three, beside them and random), ``compile_kernels`` (compile time with every cache off and
the distinct kernels Inductor generates: ViT-B bs 1, or a 12-block toy on the CPU). Where the time goes: ``kernels_b``
(the GPU kernels of a compiled bs-1 ViT-B forward per reducer: count, GPU time, top-40 tables, a forward's kernels in
order; ``kernels_b_merge``: merge and maelre alone, and merge with the keys' mean as an op; ``kernels_long``: the same
for Whisper and SigLIP with cls, merge-3-stages and merge, ``kernels_siglip`` its SigLIP half;
``kernels_siglip_large``: SigLIP bs 32 merge, compiled default and eager; ``kernels_b_graph``: ViT-B merge,
merge-3-stages, cls and merge with the mean op inside ``reduce-overhead``'s CUDA graph, with the idle time between
kernels; ``kernels_large`` / ``kernels_large_gemm``: ViT-B bs 256 compiled), ``pyprof`` (cProfile; ``pyprof_whisper``:
eager Whisper-large; ``graph_profile``: ViT-B bs 1 under ``reduce-overhead``, unreduced / budget 1.0 / merge, and a
timeline of each call with cls and merge-3-stages: host time to the graph's launch, the launch, the device's start,
and each one's latency with the cyclic collector frozen and off; ``graph_nodes``: each variant's CUDA graph, its
nodes by type and its launch's host time), ``whisper_eager`` (eager
Whisper-large bs 1: merge, cls, merge-3-stages, budget 1.0; merge with each long step in one launch against four),
``whisper_cut`` (eager Whisper-large cut to every-block merge's token counts with no step, beside merge),
``whisper_step`` (GPU: a Whisper-large merge step's host, graph and kernel times, in one launch and four, SDPA with
and without the key bias, one linear at changing token counts), ``dryhost`` (CPU only, no GPU needed: microseconds of
host time per piece of one batch-1 reduction step, the CUDA path's Python with every Triton launch a no-op;
``--profile`` adds the merge and apet steps' cProfiles), ``dryhost_whisper`` (the same for a Whisper-large merge step,
in one launch and in four, and the blocks around it: the block loop at the real token counts, the ``tokenprune_sdpa``
routing and the HF layer), ``dynamo_host`` (CPU or GPU: the host time of a compiled ViT-B bs-1 call before any work,
Dynamo's frame and guards, per variant; ``compiled_b`` has each call's host time too). Tuning sweeps for a new GPU:
``gram_tiles`` (the Gram kernel's tiles at bs 1 and 256), ``merge_b1`` (the bs-1 merge step at ViT-B's sizes: launch
settings, its extra outputs; ``merge_b1_forward``: ViT-B bs-1 reduce-overhead merge with the step's side program and
the key mean from the attention's launch, each on and off), ``ba_tiles`` (the key-bias attention's tiles and pipeline
depth at bs 256 and 1, against cuDNN's flash). One-off experiments that settled a choice were removed once recorded
(the history file names them and the commit that last had them).

    OMP_NUM_THREADS=1 python scripts/bench_forward.py --parts dryhost,dryhost_whisper --out /tmp/dh
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenprune, not an installed one

import tokenprune  # noqa: E402
from tokenprune.bench import host_time_ms, pipelined_ms, thread_cpu_us, time_fn  # noqa: E402

BS1 = [("merge", {}), ("cls", {}), ("random", {}), ("apet", {}), ("pool", {}), ("maelre", {}),
       ("merge-3-stages", {"method": "merge", "layers": "thirds"}),
       ("patched, budget 1.0", {"method": "merge", "budget": 1.0})]  # the patch's own cost: no reduction
M3, PATCHED = BS1[-2], BS1[-1]
# the same schedules with no reduction cost (cut_blocks): how far from the best its schedule allows each reducer is
CUTS = [("cut: cls", {"method": "cls", "cut": True}),
        ("cut: merge-3-stages", {"method": "merge", "layers": "thirds", "cut": True})]


def timm_model(name, smoke, **kw):
    import timm

    if smoke:
        kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, **kw)
    with torch.device(DEV):
        return timm.create_model(name, pretrained=False, **kw).to(DTYPE).eval()


def whisper_encoder(smoke):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if smoke:
        cfg = WhisperConfig(d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=128,
                            num_mel_bins=16, max_source_positions=64)
    else:  # whisper-large-v3's encoder
        cfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                            num_mel_bins=128, max_source_positions=1500)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEV):
        return WhisperEncoder(cfg).to(DTYPE).eval(), cfg


def model_and_input(case, bs, smoke):
    g = torch.Generator(device="cpu").manual_seed(0)
    if case in ("vit_b", "vit_l", "siglip"):
        name = {"vit_b": "vit_base_patch16_224", "vit_l": "vit_large_patch16_224",
                "siglip": "vit_so400m_patch14_siglip_384"}[case]
        m = timm_model(name, smoke)
        side = 32 if smoke else m.patch_embed.img_size[0]
        return m, torch.randn(bs, 3, side, side, generator=g).to(DEV, DTYPE)
    m, cfg = whisper_encoder(smoke)
    return m, torch.randn(bs, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g).to(DEV, DTYPE)


def forward_fn(case, m):
    if case == "whisper_large":
        return lambda x: m(x).last_hidden_state
    return m


class _Cut(torch.nn.Module):
    """A block whose output keeps its first ``n`` token rows (a view: no kernel)."""

    def __init__(self, block, n):
        super().__init__()
        self.block, self.n = block, n

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0][:, :self.n],) + tuple(out[1:])
        return out[:, :self.n]


def cut_blocks(m, plan):
    """The reduction at no cost: the unpatched model whose token rows are cut to ``plan``'s counts after its stage
    blocks (``x[:, :prefix + keep]``). What a reducer with this schedule could reach at best. A stage inside a block
    (``mid``, ToMe's placement) is cut after that block: its MLP runs on the larger count, so this bound is a little
    low there. Bench-only: the stage blocks are wrapped (a module of another class, so a compiled copy of the
    unreduced model is not reused for it, as it was with forward hooks on a timm Sequential)."""
    info = tokenprune.adapters.for_model(m).info()
    blocks = m.blocks if hasattr(m, "blocks") else m.layers
    for st in plan.stages:
        blocks[st.block] = _Cut(blocks[st.block], info.num_prefix + st.keep)


def chosen(variants):
    """``variants`` less those that ``--variants`` leaves out (the names offered are kept for ``main``'s check)."""
    OFFERED.update(v[0] for v in variants)
    return [v for v in variants if ONLY is None or v[0] in ONLY]


def at(layers) -> str:
    """A schedule's part of a variant's name: ``at([1, 5, 9])`` is ``"@1,5,9"``."""
    return "@" + ",".join(map(str, layers))


def apply_variant(m, variant, budget):
    name, kw = variant[:2]
    kw = dict(kw)
    method = kw.pop("method", name)
    budget = kw.pop("budget", budget)
    if kw.pop("cut", False):  # the schedule of `method` with no reduction cost (cut_blocks)
        import copy
        probe = copy.deepcopy(m)
        plan = apply_variant(probe, (method, kw), budget)
        del probe
        cut_blocks(m, plan)
        return plan
    if kw.get("layers") == "thirds":
        from tokenprune.adapters import for_model  # (not imported by `import tokenprune` itself)
        depth = for_model(m).info().depth
        kw["layers"] = [depth // 4 - 1 + depth // 4 * i for i in range(3)] if depth >= 8 else [0, 1, 2]
    if method == "apet" and SMOKE:
        kw["k"] = 4
    tokenprune.apply(m, budget=budget, method=method, **kw)
    return tokenprune.plan(m)


def timed(fn, x, repeats):
    t = time_fn(lambda: fn(x), DEV, warmup=10, repeats=repeats)
    return t.median_ms, t.p10_ms, t.p90_ms


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


ROWS: list[dict] = []


def record(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


@contextlib.contextmanager
def settings(module, consts: dict):
    """A module's launch settings (``{name: value}``) changed inside the block and restored after it (sweeps)."""
    old = {n: getattr(module, n) for n in consts}
    for n, v in consts.items():
        setattr(module, n, v)
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(module, n, v)


@contextlib.contextmanager
def switched(switches):
    """``settings`` for each ``(module, consts)`` of a variant's switches."""
    with contextlib.ExitStack() as stack:
        for module, consts in switches:
            stack.enter_context(settings(module, consts))
        yield


def run_case(case, bs, modes, variants, budget, repeats, smoke, host=False, profile=None, rounds=None, tag=None,
             profiled_variants=("unreduced", "merge"), stem="conv"):
    """Each variant on its own copy of the model (compiled once); all variants timed in ``rounds``
    interleaved rounds, keeping each one's lowest median (the hosts' speed drifts during a run). Default rounds: 15 at
    batch 1 (a round takes milliseconds; run 27's two rounds of ViT-L differed by up to 8%, and in runs 87 / 89 the
    lowest of five moved by up to 25 us of host time between variants and processes), 2 above.
    A variant is ``(name, apply options)`` or ``(name, apply options, switches)``: ``switches``, pairs
    ``(module, {name: value})``, are set (``settings``) around its compile and around each of its timed loops, so a
    switch on and off are two variants timed in the same rounds.
    ``stem="gemm"``: every variant, the unreduced one included, runs its patch convolution as one GEMM
    (``tokenprune.fast_patch_embed``: the unreduced model's fastest stem). ``host``: each row also has ``host_ms``,
    the host time of one call with the GPU idle at its start (``host_time_ms``; compiled: the call's frame, guards
    and graph launch, which a bs-1 latency includes before the GPU starts), and ``pipelined_ms``, the time per call
    of back-to-back calls (``bench.pipelined_ms``: the host runs ahead, so it is the GPU's time where the host is
    faster): a variant's ``ms`` above its ``pipelined_ms`` is host time before the GPU starts."""
    import copy

    m, x = model_and_input(case, bs, smoke)
    if stem == "gemm":
        tokenprune.fast_patch_embed(m)
    for mode in modes:
        entries = []
        for variant in [("unreduced", None)] + chosen(variants):
            mv, plan = m, None
            if variant[1] is not None:
                mv = copy.deepcopy(m)
                try:
                    plan = apply_variant(mv, variant, budget)
                except Exception as e:  # noqa: BLE001 -- a variant that does not apply is reported, not fatal
                    record(case=case, bs=bs, mode=mode, variant=variant[0], error=f"{type(e).__name__}: {e}")
                    continue
            fn = forward_fn(case, mv)
            t0 = time.perf_counter()
            switches = variant[2] if len(variant) > 2 else ()
            try:
                with torch.inference_mode(), switched(switches):
                    ref = fn(x).clone()
                    run, err = fn, None
                    if mode != "eager":
                        run = torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True)
                        err = rel_err(run(x).clone(), ref)
                    run(x)
            except Exception as e:  # noqa: BLE001 -- reported in the table, the other variants still run
                record(case=case, bs=bs, mode=mode, variant=variant[0], error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            # progress in the log: a part cut off by its time limit still says how far it got (run 15 lost two
            # parts whose compiles ran past 170 s on a fresh machine, with nothing printed)
            print(f"# {case} bs {bs} {mode} {variant[0]}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
            entries.append(dict(variant=variant[0], run=run, fn=fn, plan=plan, err=err, ms=[], switches=switches))
        for _ in range(rounds or (15 if bs == 1 else 2)):
            for e in entries:
                with torch.inference_mode(), switched(e["switches"]):
                    e["ms"].append(timed(e["run"], x, repeats))
        base = None
        for e in entries:
            ms, p10, p90 = min(e["ms"])
            plan = e["plan"]
            row = dict(case=case, bs=bs, mode=mode, variant=e["variant"] + (f" ({tag})" if tag else ""),
                       budget=None if plan is None else budget,
                       ms=round(ms, 4), p10=round(p10, 4), p90=round(p90, 4),
                       rounds_ms=[round(t[0], 4) for t in e["ms"]],
                       flop_bound=None if plan is None else round(1 / plan.flop_ratio, 3),
                       tokens_out=None if plan is None else plan.num_out, rel_err_vs_eager=e["err"])
            base = ms if base is None else base
            row["speedup"] = round(base / ms, 3)
            if host:  # compiled too: a bs-1 latency includes the call's host time before the GPU starts
                with switched(e["switches"]):
                    row["host_ms"] = round(host_time_ms(lambda: e["run"](x), DEV), 4)
                    row["pipelined_ms"] = round(pipelined_ms(lambda: e["run"](x), DEV), 4)
                row["stages"] = 0 if plan is None else len(plan.stages)
            record(**row)
            if profile is not None and mode == "eager" and e["variant"] in profiled_variants:
                prof_table(e["fn"], x, profile / f"profile_{case}_bs{bs}_{e['variant']}.txt")
        del entries
        torch._dynamo.reset()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    del m


def profiled(fn, x, calls=5):
    """The torch profiler over ``calls`` calls of ``fn(x)`` (CPU, and CUDA on a GPU), after 3 untimed ones."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        with profile(activities=acts) as p:
            for _ in range(calls):
                fn(x)
            if DEV == "cuda":
                torch.cuda.synchronize()
    return p


def prof_table(fn, x, path):
    avg = profiled(fn, x).key_averages()
    text = avg.table(sort_by="self_cpu_time_total", row_limit=40)
    if DEV == "cuda":  # and where the GPU time goes (the Triton kernels have no CPU time of their own)
        text += "\n" + avg.table(sort_by="self_cuda_time_total", row_limit=25)
    path.write_text(text)


def compile_kernels(smoke: bool):
    """How long ``torch.compile`` takes with every cache off (a fresh machine's first compile) and how many distinct
    kernels Inductor generates, for ViT-B bs 1 unreduced, ``merge`` and merge-3-stages. After each reduction the
    blocks see a new token count, so the generated kernels are per block rather than shared. On the CPU (or
    ``--smoke``): a 12-block toy ViT (embed 96, 64 px, patch 16)."""
    import copy
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if smoke or DEV == "cpu":
        m = timm_model("vit_base_patch16_224", False, num_classes=0, depth=12, embed_dim=96, num_heads=2, img_size=64)
        x = torch.randn(1, 3, 64, 64).to(DEV, DTYPE)
    else:
        m, x = model_and_input("vit_b", 1, smoke)
    for name, kw in [("unreduced", None)] + chosen([("merge", {}), M3]):
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), 0.25)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with torch.inference_mode(), settings(inductor_config, {"force_disable_caches": True}):
            _, codes = run_and_get_code(torch.compile(mv, fullgraph=True), x)
        src = "\n".join(codes)
        defined = set(re.findall(r"^(\w+) = async_compile\.", src, re.M))
        record(case="vit_b", bs=1, mode="default", variant=name, part="compile_kernels",
               compile_s=round(time.perf_counter() - t0, 1), distinct_kernels=len(defined))


def kernel_census(out: Path, smoke: bool, case: str = "vit_b", variants=None, budget: float = 0.25, bs: int = 1,
                  stem: str = "conv", mode: str | None = None):
    """GPU kernels of one forward (batch ``bs``, default 1) compiled with ``torch.compile`` (default mode, no CUDA
    graphs: the kernels a ``reduce-overhead`` graph replays), per variant: how many, their summed GPU time, the table
    of the top 40 (``kernels_<case>_<variant>.txt``) and the last forward's kernels in launch order
    (``..._order.txt``: each kernel's GPU microseconds and the idle microseconds before it). Shows what each
    reduction adds against blocks that cost the same at any token count at batch 1. ``stem="gemm"``: as in
    ``run_case``. ``mode="reduce-overhead"``: the same of the CUDA graph's replays (files ``..._graph...``), where
    the gaps between kernels are the graph's own, and the row adds the forward's span, first kernel start to last
    kernel end. ``mode="eager"``: the model not compiled (files ``..._eager...``)."""
    import copy

    from torch._dynamo.utils import counters
    from torch.autograd import DeviceType

    m, x = model_and_input(case, bs, smoke)
    if stem == "gemm":
        tokenprune.fast_patch_embed(m)
    kind = DeviceType.CUDA if DEV == "cuda" else DeviceType.CPU
    for name, kw in [("unreduced", None)] + chosen(variants if variants is not None else BS1[:6] + [M3]):
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), budget)
        counters.clear()
        run = forward_fn(case, mv)
        if mode != "eager":
            run = torch.compile(run, mode=mode, fullgraph=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            run(x)
        print(f"# {case} bs {bs} {mode or 'default'} {name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
        p = profiled(run, x)
        # Inductor's own count of what it left out of CUDA graphs (skips; partitions where a node is not graphable)
        graph_counts = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "partition" in k}
        evs = [e for e in p.events() if e.device_type == kind and (DEV == "cuda" or e.name.startswith("aten::"))]
        # the kernels of the last profiled forward in launch order, with their GPU times and the idle time before
        # each: what each step adds and what it replaces (the top-40 table sums them by name)
        evs.sort(key=lambda e: e.time_range.start)
        last = evs[-len(evs) // 5:] if evs else []
        ends = [last[0].time_range.start] + [e.time_range.end for e in last[:-1]] if last else []
        gaps = [max(e.time_range.start - end, 0.0) for e, end in zip(last, ends)]
        span = last[-1].time_range.end - last[0].time_range.start if last else 0.0
        record(case=case, bs=bs, mode=mode or "default", variant=name, part="kernels",
               kernels_per_forward=len(evs) / 5,
               kernel_ms_per_forward=round(sum(e.device_time if DEV == "cuda" else e.cpu_time for e in evs)
                                           / 5 / 1e3, 4),
               span_ms=round(span / 1e3, 4), gap_ms=round(sum(gaps) / 1e3, 4), inductor_graph_counts=graph_counts)
        sort = "self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total"
        tag = ("" if bs == 1 else f"_bs{bs}") + ("" if stem == "conv" else f"_{stem}") + {
            None: "", "eager": "_eager", "reduce-overhead": "_graph"}[mode]
        base = f"kernels_{case}{tag}_{name.replace(' ', '_').replace(',', '')}"
        (out / f"{base}.txt").write_text(p.key_averages().table(sort_by=sort, row_limit=40))
        (out / f"{base}_order.txt").write_text("    gap us   time us  kernel\n" + "".join(
            f"{g:10.3f}{(e.device_time if DEV == 'cuda' else e.cpu_time):10.3f}  {e.name[:160]}\n"
            for e, g in zip(last, gaps)))
        del mv, run
        torch._dynamo.reset()


def cprofile_calls(fn, calls: int, warmup: int, sync_each: bool = False, top: int = 40):
    """``fn()`` ``warmup`` times, then ``calls`` times under cProfile (``sync_each``: a CUDA synchronize after each,
    a latency's host part; else one after the loop): the profiled loop's own wall time per call in ms (context only)
    and the ``top`` functions by their own time, as text."""
    import cProfile
    import io
    import pstats

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
        if sync_each:
            sync()
    prof.disable()
    sync()
    wall = (time.perf_counter() - t0) / calls * 1e3
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return wall, buf.getvalue()


def call_timeline(fn, calls: int = 50) -> dict:
    """One synchronized ``fn()`` after another under the torch profiler: per call, in microseconds (medians), the host
    time from the call's start to its CUDA-graph launch (``host_to_launch``), that launch's own host time
    (``launch_api``), from the launch's start to the graph's first kernel (``launch_to_kernel``), the first to the
    last kernel (``gpu_span``) and the last kernel's end to the call's return (``kernel_to_return``), with the graph
    launches and kernels per call, and the last call's first three device events by name (the input's copy into the
    graph may start after the launch: then ``launch_to_kernel`` is the copy's). Host and device times are the
    profiler's, on one clock. Off CUDA only ``call_us``."""
    import statistics

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = DEV == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(5):
        fn()
    with profile(activities=acts) as p:
        for _ in range(calls):
            with record_function("bench_call"):
                fn()
                if cuda:
                    torch.cuda.synchronize()
    evs = p.events()
    start = lambda e: e.time_range.start  # noqa: E731
    spans = sorted((e for e in evs if e.name == "bench_call"), key=start)
    launches = sorted((e for e in evs if e.name.startswith("cudaGraphLaunch")), key=start)
    kernels = sorted((e for e in evs if e.device_type == DeviceType.CUDA), key=start)
    rows = []
    for c in spans:
        t0, t1 = c.time_range.start, c.time_range.end
        lc = [e for e in launches if t0 <= start(e) < t1]
        kc = [e for e in kernels if t0 <= start(e) < t1]
        row = {"call_us": t1 - t0}
        if lc and kc:
            gk = [e for e in kc if start(e) >= start(lc[0])]  # the graph's (the input's copy comes before it)
            row.update(host_to_launch=start(lc[0]) - t0, launch_api=lc[0].time_range.end - start(lc[0]),
                       launch_to_kernel=start(gk[0]) - start(lc[0]) if gk else float("nan"),
                       gpu_span=gk[-1].time_range.end - start(gk[0]) if gk else float("nan"),
                       kernel_to_return=t1 - kc[-1].time_range.end, launches=len(lc), kernels=len(kc))
        rows.append(row)
    keys = dict.fromkeys(k for r in rows for k in r)  # a call without a graph launch (a re-recording) has call_us only
    out = {k: round(statistics.median(r[k] for r in rows if k in r), 1) for k in keys}
    if spans and kernels:  # the last call's first device events, by name: the input's copy, then the graph's
        t0, t1 = spans[-1].time_range.start, spans[-1].time_range.end
        out["first_device_events"] = [e.name[:60] for e in kernels if t0 <= start(e) < t1][:3]
    return out


def gc_latency(fn, calls: int) -> dict:
    """Latency (``time_fn``'s median, ms) of ``fn()`` as it runs, then with every object alive moved out of the
    cyclic collector's reach (``gc.freeze()``), then with the collector off; and the collections per generation the
    first pass ran. Why: in run 90's cProfile every host function of the merge variant took 1.5-3x its time in the
    unreduced one (even the input's copy, the same work in both): a collector pass walking the objects that
    compiling the patched model left would land in whichever function is running."""
    import gc

    before = [g["collections"] for g in gc.get_stats()]
    row = {"latency_ms": time_fn(fn, DEV, warmup=10, repeats=calls).median_ms}
    row["gc_collections"] = [g["collections"] - b for g, b in zip(gc.get_stats(), before)]
    row["gc_tracked"] = len(gc.get_objects())
    gc.collect()
    gc.freeze()
    try:
        row["latency_ms_gc_frozen"] = time_fn(fn, DEV, warmup=10, repeats=calls).median_ms
        gc.disable()
        row["latency_ms_gc_off"] = time_fn(fn, DEV, warmup=10, repeats=calls).median_ms
    finally:
        gc.enable()
        gc.unfreeze()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def graph_profile(out: Path, smoke: bool, calls: int = 300):
    """cProfile of ``calls`` bs-1 ViT-B calls under ``torch.compile(mode="reduce-overhead")``, each followed by a
    synchronize (a latency's host part): where the patched variants' later graph start goes, past Dynamo's guards
    (``dynamo_host``) -- the AOT wrapper, CUDA-graph trees' replay -- per function, unreduced / budget 1.0 / merge;
    then each of those, cls and merge-3-stages as a timeline (``call_timeline``): host time before the graph's launch,
    the launch, the device's start after it; and each one's latency with the cyclic collector as it is, frozen and off
    (``gc_latency``)."""
    import copy

    m, x = model_and_input("vit_b", 1, smoke)
    for name, kw in [("unreduced", None), PATCHED, ("merge", {}), ("cls", {}), M3]:
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), 0.25)
        run = torch.compile(mv, mode="reduce-overhead", fullgraph=True)
        with torch.inference_mode():
            if name in ("unreduced", PATCHED[0], "merge"):
                wall, text = cprofile_calls(lambda: run(x), calls, warmup=20, sync_each=True)
                tag = name.replace(", ", "_").replace(" ", "_")
                (out / f"graph_profile_vit_b_{tag}.txt").write_text(f"wall per call (profiled) {wall:.3f} ms\n" + text)
                print("vit_b", name, f"{wall:.3f} ms per profiled reduce-overhead call")
            for _ in range(2):  # twice: the spread between two passes in one process
                record(case="vit_b", bs=1, mode="reduce-overhead", variant=name, part="graph_timeline",
                       **call_timeline(lambda: run(x), 10 if smoke else 100))
            record(case="vit_b", bs=1, mode="reduce-overhead", variant=name, part="graph_gc",
                   **gc_latency(lambda: run(x), 10 if smoke else 300))
        run = mv = None  # the compiled model and its CUDA graphs go before the next variant's
        torch._dynamo.reset()


def graph_nodes(out: Path, smoke: bool, calls: int = 200):
    """ViT-B bs 1: each variant's forward as one CUDA graph with the driver's debug dump of its nodes
    (``graph_nodes_<variant>.dot``), node types counted, and the graph's launch timed alone: ``replay_host_us``
    (the host time of ``replay()``, the device idle at its start) and ``replay_us`` (events around it). First 11
    merge steps alone (at 197 tokens, whose tiles opt into 57-123 KB of shared memory, and at 65, under 48 KB) and 11
    key-bias attentions alone against 11 and 120 PyTorch kernels, then each variant
    captured from its eager call (unreduced, budget 1.0, merge, cls, merge-3-stages), then the graphs
    ``reduce-overhead``'s CUDA-graph trees capture (unreduced, merge). Why: run 90's timeline had merge's graph
    launch at 113 us of host time against 37 unreduced, its first kernel only after the launch returned. CUDA
    only."""
    import collections
    import copy

    from tokenprune import kernels
    from tokenprune.cuda import graphed

    if DEV != "cuda":
        print("graph_nodes: CUDA graphs need CUDA; skipped")
        return

    def report(g, name, source):
        path = out / f"graph_nodes_{source}_{name.replace(', ', '_').replace(' ', '_')}.dot"
        g.debug_dump(str(path))
        text = path.read_text()
        types = collections.Counter(re.findall(r'label="[{\s\d]*(?:\\n)?\s*([A-Z_]{4,})', text))
        record(case="vit_b", bs=1, mode=source, variant=name, part="graph_nodes", nodes=dict(types),
               replay_host_us=round(1e3 * host_time_ms(g.replay, DEV, calls), 1),
               replay_us=round(1e3 * time_fn(g.replay, DEV, warmup=10, repeats=calls).median_ms, 1))

    def capture(fn, name):  # fn's launches as one graph, with the driver's record of its nodes
        try:
            run = graphed(fn, debug=True)
        except RuntimeError as e:  # something in fn cannot be captured: say so, go on with the next graph
            record(case="vit_b", bs=1, mode="eager", variant=name, part="graph_capture", error=str(e))
            return
        report(run.graph, name, "eager")

    # alone: 11 ViT-B-sized merge steps (our Triton launches) against 11 and 120 PyTorch kernels on the same tokens
    x0 = torch.randn(1, 197, 768, device=DEV, dtype=DTYPE)

    def merges(n=197, r=13):  # the metric: a 64-wide view of the tokens as one head's keys [B, 1, T, 64]
        def fn():
            y, s = x0[:, :n], None
            for _ in range(11):
                y, s, _ = kernels.merge_step(y, y[:, None, :, :64], s, None, 1, r, False, n)
        return fn

    def plain(n):
        def fn():
            y = x0
            for _ in range(n):
                y = y * 1.0001
        return fn

    q0 = torch.randn(1, 12, 197, 64, device=DEV, dtype=DTYPE)
    b0 = torch.zeros(1, 1, 1, 197, device=DEV, dtype=DTYPE)

    def attentions():  # merge's attention: the key-bias kernel writing the keys' mean (as compiled calls run it;
        with settings(kernels, {"BA_MIN_BATCH_EAGER": 1}):  # an eager bs-1 call would take SDPA with the mask)
            for _ in range(11):
                kernels.biased_attention(q0, q0, q0, b0, key_mean=True)

    with torch.inference_mode():
        capture(merges(), "11 merge steps alone")
        # at 65 tokens the one-launch step's tiles take under 48 KB of shared memory (at 197: 57-123 KB, opted into)
        capture(merges(65, 2), "11 merge steps alone, 65 tokens")
        capture(attentions, "11 key-bias attentions alone")
        capture(plain(11), "11 PyTorch kernels alone")
        capture(plain(120), "120 PyTorch kernels alone")
    m, x = model_and_input("vit_b", 1, smoke)
    variants = [("unreduced", None), PATCHED, ("merge", {}), ("cls", {}), M3]
    for name, kw in variants:
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), 0.25)
        with torch.inference_mode():
            capture(lambda: mv(x), name)
        mv = None
    made = []
    base = torch.cuda.CUDAGraph

    class DebugGraph(base):  # what CUDA-graph trees create, with the debug mode on before their capture
        def __new__(cls, *args, **kwargs):
            g = base.__new__(cls, *args, **kwargs)
            g.enable_debug_mode()
            made.append(g)
            return g

    for name, kw in variants[0:1] + variants[2:3]:
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), 0.25)
        made.clear()
        torch.cuda.CUDAGraph = DebugGraph
        try:
            run = torch.compile(mv, mode="reduce-overhead", fullgraph=True)
            with torch.inference_mode():
                for _ in range(5):
                    run(x)
        finally:
            torch.cuda.CUDAGraph = base
        torch.cuda.synchronize()
        print("vit_b", name, f"reduce-overhead: {len(made)} graph(s) made")
        for i, g in enumerate(made):
            try:
                report(g, name if i == 0 else f"{name}_{i}", "reduce-overhead")
            except RuntimeError as e:  # a graph made but never captured (a warm-up run's)
                print("  graph", i, "not dumped:", str(e)[:120])
        run = mv = g = None
        made.clear()
        torch._dynamo.reset()


def python_profile(out: Path, smoke: bool, cases=None):
    """cProfile of 20 eager bs-1 forwards per variant: where the host time goes, by function."""
    cases = cases or (("vit_b", [("unreduced", None), ("random", {}), ("merge", {})], 0.25),
                      ("vit_l", [("unreduced", None), ("merge", {})], 0.25))
    for case, variants, budget in cases:
        m, x = model_and_input(case, 1, smoke)
        for name, kw in variants:
            tokenprune.remove(m)
            if kw is not None:
                apply_variant(m, (name, kw), budget)
            with torch.inference_mode():
                wall, text = cprofile_calls(lambda: m(x), 20, warmup=10, top=35)
            text = f"wall per forward (profiled) {wall:.3f} ms\n" + text
            (out / f"pyprof_{case}_{name}_{budget}.txt").write_text(text)
            print(case, name, f"{wall:.3f} ms per profiled forward")
        tokenprune.remove(m)


# -- dryhost: the host time of each per-step piece, on CPU ------------------------------------------------------
class _DryKernel:
    """What the cached launcher keeps per key: ``run`` (the driver launch) does nothing."""
    function = packed_metadata = None

    def run(self, *a):
        pass


class _DryJit:
    """Stands for a ``@triton.jit`` kernel on a cache miss of the launcher: no compile, a ``_DryKernel``."""

    def __getitem__(self, grid):
        def first_launch(*args, **kwargs):
            return _DryKernel()
        return first_launch


def _dry_kernels(stack):
    """Make the CUDA path of every op run on CPU tensors, everything but the driver launch itself: ``use_triton``
    is the real function with its ``is_cuda`` test read as ``is_cpu`` (same cost), and every cached launcher
    (``_triton_common._Launcher``: argument list, key, cache lookup) is the real one, its Triton path on a miss
    a stub (``_DryJit``) whose kernel's launch does nothing."""
    import types
    from unittest import mock

    from tokenprune import kernels
    from tokenprune.kernels import _triton_common as tc
    from tokenprune.kernels import apet as apet_mod

    def on_cpu(co):  # the code object with ``is_cuda`` read as ``is_cpu``, nested code (a generator) included
        consts = tuple(on_cpu(k) if isinstance(k, types.CodeType) else k for k in co.co_consts)
        return co.replace(co_names=tuple("is_cpu" if n == "is_cuda" else n for n in co.co_names), co_consts=consts)

    ut = kernels.use_triton
    dry_ut = types.FunctionType(on_cpu(ut.__code__), ut.__globals__, ut.__name__)
    stack.enter_context(mock.patch.object(kernels, "use_triton", dry_ut))
    stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
    stack.enter_context(mock.patch.object(tc, "_stream", lambda dev: 0))
    stack.enter_context(mock.patch.dict(tc._LAUNCHERS, clear=True))
    init = tc._Launcher.__init__

    def dry_init(self, fn):
        init(self, fn)
        self.fn, self.interpreted = _DryJit(), False

    stack.enter_context(mock.patch.object(tc._Launcher, "__init__", dry_init))
    # apet's integer outputs (its basis) are indexed by the next op: zeros, where no kernel writes them (the launcher
    # passes tensors as addresses, so the dry kernel cannot fix them up)
    alloc = apet_mod._alloc
    stack.enter_context(mock.patch.object(apet_mod, "_alloc", lambda shape, dev, dtype: alloc(shape, dev, dtype) if
                                          dtype.is_floating_point else torch.zeros(*shape, device=dev, dtype=dtype)))
    # the key mean op (kernels._mean_first, long inputs): its dispatch, not a CPU's pass over every key
    mean = kernels.reference.key_mean
    stack.enter_context(mock.patch.object(kernels.reference, "key_mean", lambda k: mean(k[:, :, :1]).expand(
        k.shape[0], *k.shape[2:])))


def _us(fn, n, runs=5):
    """``tokenprune.bench.thread_cpu_us`` of one function: microseconds of host CPU time per call, best of ``runs``."""
    return thread_cpu_us({0: fn}, n, runs)[0]



def dynamo_host(smoke: bool, repeats: int):
    """Host microseconds of one call of the compiled ViT-B at batch 1 before any of its work: Dynamo's frame, its
    guards and the lifted parameters, with a backend that returns the first call's outputs (no kernels, no CUDA
    graph). A bs-1 latency (``time_fn``: events around one call on an idle GPU) includes it, so a patch whose
    guards cost more would show here and not in any kernel census. Compiled and timed as ``run_case`` does: every
    variant compiled in one Dynamo cache (the patched models share their forward's code, so a later variant's call
    first tries the earlier variants' guards), then interleaved rounds, the lowest median of each. ``no_guards_us``: the
    same calls under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, each variant behind a function of its
    own code object (one cache entry each, so no guard runs): the difference is what the guards cost."""
    import copy

    def replay_first(gm, example_inputs):
        first = []

        def call(*args):
            if not first:
                first.append(gm.forward(*args))
            return first[0]
        return call

    def own_code(module, i):  # a function of its own code object calling the module: its own Dynamo cache
        ns = {"module": module}
        exec(f"def call_{i}(x):\n    return module(x)\n", ns)
        return ns[f"call_{i}"]

    m, x = model_and_input("vit_b", 1, smoke)
    torch._dynamo.reset()
    runs, own = [], []
    for i, (name, kw) in enumerate([("unreduced", None)] + chosen(BS1)):
        mv = copy.deepcopy(m)
        if kw is not None:
            apply_variant(mv, (name, kw), 0.25)
        runs.append((name, torch.compile(forward_fn("vit_b", mv), backend=replay_first, fullgraph=True)))
        own.append((name, torch.compile(own_code(forward_fn("vit_b", mv), i), backend=replay_first, fullgraph=True)))
    best = {name: float("inf") for name, _ in runs}
    bare = dict(best)
    with torch.inference_mode():
        for name, run in own:
            run(x)
        for _ in range(5):
            for name, run in runs:
                best[name] = min(best[name], time_fn(lambda: run(x), "cpu", warmup=5, repeats=repeats).median_ms)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                for name, run in own:
                    bare[name] = min(bare[name], time_fn(lambda: run(x), "cpu", warmup=5, repeats=repeats).median_ms)
    for name in best:
        record(case="vit_b", bs=1, variant=name, part="dynamo_host", host_us_per_call=round(best[name] * 1e3, 1),
               no_guards_us=round(bare[name] * 1e3, 1))
    del runs, own
    torch._dynamo.reset()


def dry_host(out: Path, smoke: bool, profile: bool, repeats: int = 50):
    """CPU only: microseconds of host time per piece of one eager batch-1 reduction step on ViT-L/16 shapes
    (fp16, 197 tokens, 16 heads of 64), the CUDA path's Python with every Triton launch a no-op (``_dry_kernels``).
    Aten ops inside a step (apet's glue) run for real on CPU, compute included. Reducer steps
    build a fresh ``TokenState`` per call; that construction is timed alone and subtracted. Each piece runs alone
    in a loop (warm caches): a whole step costs more than the sum of its parts, and in a forward, between blocks,
    more again (an H200 host took ~125 us for a merge step this counted as ~78 us + one launch)."""
    from types import SimpleNamespace

    import tokenprune.reducers  # noqa: F401 -- registers the reducers
    from tokenprune import kernels, ops
    from tokenprune.engine import QK
    from tokenprune.plan import Stage
    from tokenprune.reducers.pitome import protected_merge
    from tokenprune.registry import make
    from tokenprune.state import TokenState

    torch.set_num_threads(1)
    n_it = 200 if smoke else 60 * repeats  # calls per timed loop
    b, t, c, h, d, dt = 1, 197, 1024, 16, 64, torch.float16
    g = torch.Generator().manual_seed(0)
    rows = {}

    def put(name, us, note=""):
        rows[name] = round(us, 2)
        record(case="dryhost", piece=name, us=round(us, 2), **({"note": note} if note else {}))

    x = torch.randn(b, t, c, generator=g).to(dt)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dt) for _ in range(3))
    # the state after a first merge step (sizes, source), as every later step sees it (PyTorch path)
    st0 = ops.bipartite_merge(TokenState.start(x, 1), k.float().mean(1), 7)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())  # as the timed forwards (host_ms) run
        _dry_kernels(stack)
        t1 = st0.x.shape[1]
        x1 = torch.randn(b, t1, c, generator=g).to(dt)
        q1, k1, v1 = (torch.randn(b, h, t1, d, generator=g).to(dt) for _ in range(3))
        bias1 = st0.sizes.log().to(dt)[:, None, None, :]
        res1 = torch.randn(b, t1, c, generator=g).to(dt)

        fwd_scratch = {}  # the scratch of one forward's state: a step's kernels keep their buffers there for the next

        def merged_state():
            return TokenState(x=x1, num_prefix=1, num_input=t - 1, sizes=st0.sizes, source=st0.source, residual=res1,
                              scratch=fwd_scratch)

        def start_state():
            return TokenState(x=x, num_prefix=1, num_input=t - 1, source=st0.source)

        put("TokenState construction (subtracted below)", _us(merged_state, n_it))
        base = _us(merged_state, n_it)
        # merge hands the block's keys to its kernels, which average them over heads (no key mean); the key mean
        # (pitome's metric) of one head: the aten op's dispatch, not its CPU compute (on a GPU it is one launch)
        qk1 = QK(q1, k1, d ** -0.5, bias1)
        qk1_one = QK(q1, k1[:, :1].contiguous(), d ** -0.5, bias1)
        qk0 = QK(q, k, d ** -0.5, None)
        merge = make("merge")
        cls = make("cls")
        cls._has_cls = True
        rnd = make("random")
        apet = make("apet")
        r = 7
        m1 = qk1.k
        # merge: the reducer's step, then its parts
        s_merge = Stage(0, t1 - 1 - r, "merge")
        put("merge step (Merge.reduce: bipartite_merge on the keys)",
            _us(lambda: merge.reduce(merged_state(), s_merge, qk1), n_it) - base)
        put("  (not in merge's step: key mean qk.key_mean(), one head: the dispatch)", _us(qk1_one.key_mean, n_it))
        put("  ops.bipartite_merge (kernels: one launch)", _us(lambda: ops.bipartite_merge(merged_state(), m1, r), n_it)
            - base)
        put("  kernels.merge_step (the keys [1, 16, 190, 64]; no scratch dict: fresh scratch buffers)",
            _us(lambda: kernels.merge_step(x1, m1, st0.sizes, st0.source, 1, r, False, t, True, res1), n_it))
        st = merged_state()
        ls = torch.zeros(b, t1, dtype=dt)
        put("  TokenState.set_attn_bias", _us(lambda: st.set_attn_bias(ls, dt), n_it))
        put("  torch.empty (one [1, 190, 1024] fp16)", _us(lambda: torch.empty((1, 190, 1024), dtype=dt), n_it))
        # cls: one query row's scores (two launches), then keep the best (one launch)
        s_keep = Stage(0, 123, "cls")
        put("cls step (ClsPrune.reduce: query_scores + keep_step)",
            _us(lambda: cls.reduce(start_state(), s_keep, qk0), n_it) - base)
        put("  kernels.query_scores", _us(lambda: kernels.query_scores(q[:, :, 0], k, d ** -0.5), n_it))
        sc = torch.rand(b, t - 1, generator=g)
        put("  kernels.keep_step", _us(lambda: kernels.keep_step(x, sc, None, st0.source, 1, 123), n_it))
        put("random step (RandomDrop.reduce: cached scores + keep_step)",
            _us(lambda: rnd.reduce(start_state(), s_keep, None), n_it) - base)
        pit = make("pitome")
        pit._depth = 24  # (what plan() sets)
        s_pit = Stage(4, t1 - 1 - r, "pitome", mid=True)
        put("pitome step (PiToMe.reduce: pitome_order + merge_step, both on the keys)",
            _us(lambda: pit.reduce(merged_state(), s_pit, qk1), n_it) - base)
        put("  (the step as it was: the key mean first, one head: the dispatch)",
            _us(lambda: protected_merge(merged_state(), qk1_one.key_mean(), r, 0.5), n_it) - base)
        put("  kernels.pitome_order (the keys [1, 16, 190, 64])",
            _us(lambda: kernels.pitome_order(m1, st0.sizes, 1, 2 * r, 0.5, False), n_it))
        thr = make("threshold")
        thr.check(SimpleNamespace(has_cls=True, depth=24))  # (what apply's plan does: the stage blocks, theta)
        o = torch.randn(b, t, h, d, generator=g).to(dt).transpose(1, 2)  # the heads' outputs as the adapter records
        qk_o = QK(q, k, d ** -0.5, None, o)
        s_thr = Stage(thr._layers[0], 123, "threshold")
        put("threshold step (Threshold.reduce: scores with head weights, keep_above: one host read, keep_step)",
            _us(lambda: thr.reduce(start_state(), s_thr, qk_o), n_it) - base)
        put("  kernels.query_scores with head_values (the head weights in its second launch)",
            _us(lambda: kernels.query_scores(q[:, :, 0], k, d ** -0.5, None, None, o), n_it))
        put("  ops.keep_above (batch 1: count, selection and gather in one launch, one host read)",
            _us(lambda: ops.keep_above(start_state(), sc, 0.004, 123), n_it) - base)
        s_apet = Stage(0, 123, "apet")
        put("apet step (Apet.reduce: kernels.apet_step, four launches)",
            _us(lambda: apet.reduce(start_state(), s_apet, None), n_it // 3) - base)
        put("  kernels.apet_step (gram, stage + selection, assign, merge)",
            _us(lambda: kernels.apet_step(x, None, st0.source, 1, apet.k, 123, apet.eps, False, t), n_it))
        # every block after the first merge: the key bias, and attention with it. CUDA SDPA's memory-efficient kernel
        # pads a copy of a bias whose strides but the last are not multiples of 8 (two ops, two launches per block)
        bias_st = st0.attn_bias(dt).stride()
        aligned = bias_st[-1] == 1 and all(z % 8 == 0 for z in bias_st[:-1])
        record(case="dryhost", piece="per block: key bias needs no pad copy in CUDA SDPA", aligned=aligned,
               strides=list(bias_st))
        rows[f"per block: key bias strides {tuple(bias_st)}: CUDA SDPA pads a copy"] = "no" if aligned else "yes"
        put("per block: state.attn_bias (cached)", _us(lambda: st0.attn_bias(dt), n_it))
        put("per block: kernels.biased_attention_applies", _us(lambda: kernels.biased_attention_applies(
            bias1, t1, d), n_it))
        qs, ks, vs = (z[:, :, :8].float() for z in (q1, k1, v1))  # (fp16 SDPA on a CPU: a slow path)
        bs = bias1[..., :8].float()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        put("per block: SDPA, no mask (8 tokens fp32: CPU kernel)", _us(lambda: sdpa(qs, ks, vs), n_it))
        put("per block: SDPA with the key bias (8 tokens fp32: CPU kernel)", _us(lambda: sdpa(qs, ks, vs, attn_mask=bs),
                                                                               n_it))
        put("per block: kernels.biased_attention (bs 1: SDPA + bias, as above)",
            _us(lambda: kernels.biased_attention(qs, ks, vs, bs), n_it))
        ba = kernels._impl().attention.biased_attention
        put("bs >= 32 only: the key-bias Triton kernel's launcher", _us(lambda: ba(q1, k1, v1, bias1), n_it))
        if profile:
            import cProfile
            import io
            import pstats

            for name, step in (("merge", lambda: merge.reduce(merged_state(), s_merge, qk1)),
                               ("apet", lambda: apet.reduce(start_state(), s_apet, None))):
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(n_it):
                    step()
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
                (out / f"dryhost_{name}_cprofile.txt").write_text(buf.getvalue())
    print(f"\n{'dry host time per piece (CPU, us)':72} {'us':>8}")
    for name, us in rows.items():
        print(f"{name:72} {us:>8}")


def dry_whisper(out: Path, smoke: bool, repeats: int = 50):
    """CPU only: host microseconds of the pieces of one eager batch-1 ``merge`` step of the Whisper-large-v3 encoder
    (1500 tokens, 20 heads of 64, fp16, budget 0.5: 31 steps of about 25 tokens; ``kernels.merge_step`` in one
    launch and in four) and of the blocks around it, the CUDA path's Python with every Triton launch a no-op
    (``_dry_kernels``). The HF layer itself runs on CPU at a tiny width (16 tokens, d 80, 20 heads, fp16): there its
    aten ops compute, so only its differences (the ``tokenprune_sdpa`` routing, the key bias, recording q/k) are host
    time. ``block loop``: ``run_blocks`` over the 32 planned blocks at the real token counts, each block a stub that
    only hands the reducer keys of the right shape, so the loop's bookkeeping and the 31 reducer calls."""
    import copy
    import inspect

    from transformers import WhisperConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    import tokenprune.reducers  # noqa: F401 -- registers the reducers
    from tokenprune import kernels, ops
    from tokenprune.adapters import hf_common
    from tokenprune.adapters import whisper as whisper_adapter
    from tokenprune.engine import QK, Forward, run_blocks
    from tokenprune.kernels import merge as kmerge
    from tokenprune.patch import get_patch
    from tokenprune.plan import Stage
    from tokenprune.registry import make
    from tokenprune.state import TokenState

    torch.set_num_threads(1)
    n_it = 100 if smoke else 40 * repeats
    b, t, c, h, d, dt, r = 1, 1500, 1280, 20, 64, torch.float16, 25
    g = torch.Generator().manual_seed(0)
    rows = {}

    def put(name, us):
        rows[name] = round(us, 2)
        record(case="dryhost_whisper", piece=name, us=round(us, 2))

    def large(layers, budget, device="meta"):  # the Whisper-large encoder (meta: no weights), patched
        cfg = WhisperConfig(d_model=c, encoder_layers=layers, encoder_attention_heads=h, encoder_ffn_dim=4 * c,
                            num_mel_bins=128, max_source_positions=t)
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            m = WhisperEncoder(cfg).to(dt).eval()
        tokenprune.apply(m, budget=budget, method="merge")
        return get_patch(m)

    x = torch.randn(b, t, c, generator=g).to(dt)
    k = torch.randn(b, h, t, d, generator=g).to(dt)
    st0 = ops.bipartite_merge(TokenState.start(x, 0), k.float().mean(1), r)  # after a first step (PyTorch path)
    t1 = st0.x.shape[1]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        _dry_kernels(stack)
        x1 = torch.randn(b, t1, c, generator=g).to(dt)
        k1 = torch.randn(b, h, t1, d, generator=g).to(dt)  # HF's keys: [B, H, N, d] contiguous

        fwd_scratch = {}  # one forward's state's scratch (a step's kernels keep their buffers there for the next)

        def merged_state():
            return TokenState(x=x1, num_prefix=0, num_input=t, grid=(1, t), sizes=st0.sizes, source=st0.source,
                              scratch=fwd_scratch)

        base = _us(merged_state, n_it)
        qk1 = QK(k1, k1, 1.0, None)
        merge = make("merge")
        step = Stage(1, t1 - r, "merge")
        put("merge step (Merge.reduce, 1475 tokens, r 25)", _us(lambda: merge.reduce(merged_state(), step, qk1), n_it)
            - base)
        put("  ops.bipartite_merge", _us(lambda: ops.bipartite_merge(merged_state(), k1, r), n_it) - base)
        kw = {"scratch": {}} if "scratch" in inspect.signature(kernels.merge_step).parameters else {}  # (older code)
        for tag, one in (("one launch", True), ("four launches", False)):
            with settings(kmerge, {"MERGE_LONG_ONE_LAUNCH": one}):
                put(f"  kernels.merge_step ({tag}; a forward's scratch dict)", _us(lambda: kernels.merge_step(
                    x1, k1, st0.sizes, st0.source, 0, r, False, t, True, **kw), n_it))
        if hasattr(kmerge, "_large_match"):  # the matching as a call of its own (before the launch plans held it)
            put("    the matching alone (_large_match)", _us(lambda: kmerge._large_match(k1, st0.sizes, None, 0, False),
                                                          n_it))
        put("    torch.empty (one [1, 1475] fp32; the step allocates its outputs and scratch)",
            _us(lambda: torch.empty(1, t1, dtype=torch.float32), n_it))
        st = merged_state()
        put("  TokenState.set_attn_bias", _us(lambda: st.set_attn_bias(st0.sizes, dt), n_it))

        # the block loop at the real token counts: stub blocks that only record keys of the right shape
        keys = {}

        def stub(blk, x, fwd):
            if fwd.want_qk:
                n = x.shape[1]
                if n not in keys:
                    keys[n] = torch.randn(b, h, n, d, generator=g).to(dt)
                fwd.qk = QK(keys[n], keys[n], 1.0, fwd.bias)
            return x

        loops = {}
        for budget in (1.0, 0.5):
            patch = large(32, budget)
            blocks = [None] * 32
            steps = len(patch.plan_for(t, (1, t)).stages)
            loops[budget] = _us(lambda: run_blocks(Forward(patch), blocks, x, stub, (1, t)), max(n_it // 40, 5))
            put(f"block loop, 32 stub blocks, budget {budget} ({steps} steps), per forward", loops[budget])
        put("  per step: (budget 0.5 - budget 1.0) / 31", (loops[0.5] - loops[1.0]) / 31)

        # per block: the key bias, the tokenprune_sdpa routing and the HF layer (tiny width, fp32: its aten ops
        # compute on the CPU; each patched variant against the unpatched one timed in the same rounds)
        put("per block: state.attn_bias (cached)", _us(lambda: st0.attn_bias(dt), n_it))
        cfg = WhisperConfig(d_model=h, encoder_layers=2, encoder_attention_heads=h, encoder_ffn_dim=h, num_mel_bins=8,
                            max_source_positions=4)
        cfg._attn_implementation = "sdpa"
        m = WhisperEncoder(cfg).eval()
        plain = copy.deepcopy(m)
        tokenprune.apply(m, budget=0.5, method="merge")
        fwd = Forward(get_patch(m))
        layer, attn, layer0 = m.layers[1], m.layers[1].self_attn, plain.layers[1]
        xs = torch.randn(1, 4, h, generator=g)
        q, kk, v = (torch.randn(1, h, 4, 1, generator=g) for _ in range(3))
        bias = TokenState(x=xs, num_prefix=0, num_input=4, sizes=torch.full((1, 4), 2.0)).attn_bias(torch.float32)
        kern = hf_common._kernel
        for what, fb, want in (("no bias", None, False), ("key bias", bias, False),
                               ("key bias, q/k recorded (the block before a step)", bias, True)):
            fwd.bias, fwd.want_qk = fb, want
            # (the block loop drops the recorded q/k after each block; kept here, they would hold their buffers)
            us = thread_cpu_us({"layer": lambda: (layer(xs, None, tokenprune=fwd), setattr(fwd, "qk", None)),
                             "written": lambda: (whisper_adapter._layer(layer, xs, fwd), setattr(fwd, "qk", None)),
                             "plain": lambda: layer0(xs, fb),
                             "route": lambda: kern(attn, q, kk, v, None, dropout=0.0, scaling=1.0, tokenprune=fwd),
                             "sdpa": lambda: sdpa_attention_forward(attn, q, kk, v, fb, dropout=0.0, scaling=1.0)},
                            n_it)
            if fb is None:
                put("per block: HF WhisperEncoderLayer, unpatched (4 tokens, d 20, fp32: CPU kernels)", us["plain"])
                put("per block: transformers' sdpa_attention_forward, no mask (the same q/k/v)", us["sdpa"])
            put(f"per block: patched layer, {what}: + us over the unpatched one given the same mask",
                us["layer"] - us["plain"])
            put(f"per block: patched layer written out (eager inference), {what}: + us over the unpatched one",
                us["written"] - us["plain"])
            put(f"per block:   tokenprune_sdpa, {what}: + us over sdpa_attention_forward given the same mask",
                us["route"] - us["sdpa"])
        fwd.bias, fwd.want_qk = None, False
    print(f"\n{'dry host time per piece, Whisper-large merge (CPU, us)':88} {'us':>8}")
    for name, us in rows.items():
        print(f"{name:88} {us:>8}")


def stack_sampler(every: float, depth: int = 30, top: int = 4) -> None:
    """A daemon thread that samples the main thread's stack once a second (``sys._current_frames``, under the GIL:
    faulthandler's timed dump reads frames without it and crashed Python 3.12 in the middle of a compile, run 76) and
    every ``every`` seconds prints, for that period, the functions found in the most samples (inclusive: the
    sampled stack holds them anywhere) and the ``top`` most frequent stacks (their innermost ``depth`` frames)."""
    import collections
    import threading
    import traceback

    main = threading.main_thread().ident

    def run():
        seen, funcs, t0 = collections.Counter(), collections.Counter(), time.time()
        while True:
            time.sleep(1.0)
            frame = sys._current_frames().get(main)
            if frame is not None:
                stack = [f"{fs.filename.split('site-packages/')[-1]}:{fs.lineno} {fs.name}"
                         for fs in traceback.extract_stack(frame)]
                # let the frames go now: held through the sleep, they keep their locals alive, and tensors that a
                # CUDA graph's warm-up made and dropped then sit in its pool untracked (run 81: torch refused the
                # next recording, "3 tensor(s) in the cudagraph pool not tracked as outputs")
                frame = None
                seen[tuple(stack[-depth:])] += 1
                funcs.update({f.split(":")[0] + " " + f.split(" ")[-1] for f in stack})
            if time.time() - t0 >= every:
                n = sum(seen.values())
                print(f"--- stack samples, {n} in {time.time() - t0:.0f} s; functions in the most samples:\n    "
                      + "\n    ".join(f"{k} {f}" for f, k in funcs.most_common(40)), file=sys.stderr)
                for stack, k in seen.most_common(top):
                    print(f"  {k} samples:\n    " + "\n    ".join(stack), file=sys.stderr, flush=True)
                seen, funcs, t0 = collections.Counter(), collections.Counter(), time.time()

    threading.Thread(target=run, daemon=True, name="stack_sampler").start()


def sweep_row(row, step, ref, repeats):
    """One launch-constant variant of a step in a sweep (``ba_tiles``, ``gram_tiles``): its outputs (a tuple) against
    ``ref`` (the default's; None: these are the default's), its graph-replay time and each kernel's GPU time
    (profiler), recorded; returns ``ref``."""
    from tokenprune.cuda import graphed

    try:
        with torch.inference_mode():
            o = step()
            ref = ref if ref is not None else o
            row["same"] = all(torch.equal(a, b) for a, b in zip(o, ref) if isinstance(a, torch.Tensor))
            row["max_err"] = max((float((a.float() - b.float()).abs().max()) for a, b in zip(o, ref)
                                  if isinstance(a, torch.Tensor) and a.shape == b.shape and a.numel()), default=0.0)
            if DEV == "cuda":
                row["step_graph_us"] = round(time_fn(graphed(step), DEV, 10, repeats).median_ms * 1e3, 1)
                for e in profiled(lambda _: step(), None, calls=20).key_averages():
                    if e.key.startswith("_") and e.count:
                        row[f"{e.key}_us"] = round(e.self_device_time_total / e.count, 1)
    except Exception as e:  # noqa: BLE001 -- a config that does not build: say so, go on
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return ref


def gram_tiles(smoke: bool, repeats: int):
    """GPU: ``kernels.gram`` (ApET's and diverse's Gram matrix, fp16, 768 channels) with its default tiles (by batch)
    against fixed 128-row and 64-row tiles at ViT-B's stage token counts, batch 1 and 256: kernel time and whether G
    is bit-equal to the default's."""
    from tokenprune import kernels
    from tokenprune.kernels import apet as ka

    saved = ka._gram_config
    g = torch.Generator(device="cpu").manual_seed(0)
    c = 32 if smoke else 768
    for bs in (1, 4 if smoke else 256):
        for n in ([40] if smoke else [196, 123, 78]):
            x = torch.randn(bs, n, c, generator=g).to(DEV, DTYPE)
            ref = None
            for name, kw in (("default", None), ("bm128_bk32_w8", dict(BM=128, BK=32, num_warps=8)),
                             ("bm64_bk32_w4", dict(BM=64, BK=32, num_warps=4)),
                             ("bm64_bk64_w4", dict(BM=64, BK=64, num_warps=4))):
                # (a fixed tile whatever the batch: run 42 timed these three before the default took 64-row tiles
                # for small batches)
                cfg = {} if kw is None else {"_gram_config": lambda *a, kw=kw: dict(saved(*a), **kw)}
                row = dict(case="gram_tiles", bs=bs, tokens=n, variant=name)
                with settings(ka, cfg):
                    ref = sweep_row(row, lambda: kernels.gram(x), ref, repeats)


def merge_b1(smoke: bool, repeats: int):
    """GPU: the bs-1 one-launch merge step (``kernels.merge_step``, MODE 0) at ViT-B's widths (768 columns, the key
    mean given, sizes, log sizes, the residual left to it), as a compiled merge forward calls it, at 197 and 113
    tokens: the default against its launch settings (warps, column tile, programs per SM) and without the source
    map or the log sizes (what their writing costs: one more program writes them, ``MERGE_STEP_SIDE_PROGRAM``), and
    with program 0 writing them after its columns instead (the side program off)."""
    from tokenprune import kernels
    from tokenprune.kernels import merge as km

    g = torch.Generator(device="cpu").manual_seed(0)
    c = 32 if smoke else 768
    for n, r in ((41, 6),) if smoke else ((197, 14), (113, 13)):
        x, y = (torch.randn(1, n, c, generator=g).to(DEV, DTYPE) for _ in range(2))
        metric = torch.randn(1, n, 64, generator=g).to(DEV, DTYPE)
        sizes = torch.randint(1, 4, (1, n), generator=g).float().to(DEV)
        source = torch.randint(0, n, (1, 196), generator=g).to(DEV)
        ref = None
        for name, consts, src, logs in (
                ("default", {}, source, True), ("no source map", {}, None, True), ("no log sizes", {}, source, False),
                ("neither", {}, None, False), ("4 warps", {"MERGE_STEP_WARPS": 4}, source, True),
                ("16 columns", {"MERGE_STEP_BC": 16}, source, True),
                ("2 programs per SM", {"MERGE_STEP_PROGRAMS_PER_SM": 2}, source, True),
                ("B tile 64", {"MERGE_STEP_BT": 64}, source, True),
                ("no side program", {"MERGE_STEP_SIDE_PROGRAM": False}, source, True)):
            row = dict(case="merge_b1", bs=1, tokens=n, r=r, variant=name)
            with settings(km, consts):
                ref = sweep_row(row, lambda src=src, logs=logs: kernels.merge_step(
                    x, metric, sizes, src, 1, r, False, 196, logs, y, None, {})[:2], ref, repeats)


def ba_tiles(smoke: bool, repeats: int, long: bool = False):
    """GPU: ``kernels.biased_attention`` (merge's proportional attention, ``_ba_fwd``; fp16) at token counts of a
    merged forward: ViT-B (12 heads of 64) at batch 256 and 1, or with ``long`` the long inputs at batch 1
    (Whisper-large after merging at layers 1, 5, 9: 20 heads of 64, 1191 / 945 / 750 tokens; SigLIP-so400m after 2,
    6, 9: 16 heads of 72, 459 / 289 / 182). Its default tile against fixed tiles and pipeline depths
    (``num_stages``), and SDPA without the bias (cuDNN's flash: what the unreduced blocks run) and with it as a
    mask; with ``long`` also the bias folded into one more head dimension (q gets 1 / scale, k the log size, v a
    zero: SDPA without a mask on 8 more head dims, padded, exact up to the bias's rounding), with the padding copies
    timed and without them.
    Graph-replay time per call; ``same``: the output equals the default tile's bit for bit; ``max_err``: its
    largest difference from it. The kernel runs at every shape (eager batch 1 and inputs past ``max_n`` included,
    where a forward would take SDPA with the mask), and a default row whose profile shows no ``_ba_fwd`` is an error."""
    from tokenprune import kernels
    from tokenprune.kernels import attention as ka

    saved = ka._ba_config
    g = torch.Generator(device="cpu").manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    large = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for st in (2, 3, 4)]
    # batch 1: 12-24 programs, each a chain over the key tiles; smaller query tiles, fewer (larger) key tiles
    small = [(bm, bn, 4, st) for bm in (16, 32, 64) for bn in (32, 64, 128) for st in (2, 3)]
    if smoke:
        shapes = [(4, 2, 16, 40)]
    elif long:  # (batch, heads, head dim, tokens); at batch 1 here the grid has 240-380 programs: wider tiles too
        small = small + [(bm, bn, 8, st) for bm in (64, 128) for bn in (64, 128) for st in (2, 3)]
        shapes = [(1, 20, 64, n) for n in (1191, 945, 750)] + [(1, 16, 72, n) for n in (459, 289, 182)]
    else:
        shapes = [(bs, 12, 64, n) for bs in (1, 256) for n in (197, 119)]
    # the kernel itself at every shape: eager calls under BA_MIN_BATCH_EAGER and inputs over max_n tokens would
    # take SDPA with the mask instead (run 47's bs-1 rows all did: every "tile" there was SDPA's 16.8 us)
    with settings(kernels, {"BA_MIN_BATCH_EAGER": 1}), settings(ka, {"BA_CONFIG": {**ka.BA_CONFIG, "max_n": 2048}}):
        for bs, h, d, n in shapes:
            tiles = large if bs > 1 else small
            q, k, v = (torch.randn(bs, h, n, d, generator=g).to(DEV, DTYPE) for _ in range(3))
            bias = (torch.rand(bs, 1, 1, n, generator=g) * 2).to(DEV, DTYPE)  # log sizes 0 .. 2
            base = dict(case="ba_tiles", bs=bs, heads=h, head_dim=d, tokens=n)
            sweep_row(dict(base, variant="sdpa, no bias"), lambda: (sdpa(q, k, v),), None, repeats)
            sweep_row(dict(base, variant="sdpa, bias as mask"), lambda: (sdpa(q, k, v, attn_mask=bias),), None,
                      repeats)
            ref = sweep_row(dict(base, variant="default " + str(saved(bs, n, d, False))),
                            lambda: (kernels.biased_attention(q, k, v, bias),), None, repeats)
            if DEV == "cuda" and "_ba_fwd_us" not in ROWS[-1]:  # the profiler saw no key-bias kernel: say so
                print(f"ba_tiles: no _ba_fwd ran at {base}: its rows time something else", flush=True)
                ROWS[-1]["error"] = "no _ba_fwd kernel ran"
            if long or smoke:
                scale, extra = d ** -0.5, 8
                pad = torch.zeros(bs, h, n, extra - 1, device=q.device, dtype=q.dtype)

                def folded():  # [q, 1/scale, 0..] . [k, log s, 0..] * scale = q.k * scale + log s
                    qa = torch.cat([q, torch.full_like(q[..., :1], 1 / scale), pad], -1)
                    kb = torch.cat([k, bias.transpose(-1, -2).expand(bs, h, n, 1), pad], -1)
                    vb = torch.cat([v, pad, pad[..., :1]], -1)
                    return qa, kb, vb

                qa, kb, vb = folded()
                sweep_row(dict(base, variant="sdpa, bias folded into the head dim, with the copies"),
                          lambda: (sdpa(*folded(), scale=scale)[..., :d],), ref, repeats)
                sweep_row(dict(base, variant="sdpa, bias folded into the head dim, copies made before"),
                          lambda: (sdpa(qa, kb, vb, scale=scale)[..., :d],), ref, repeats)
            for bm, bn, w, st in tiles:
                tile = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                with settings(ka, {"_ba_config": lambda *a, c=tile: c}):
                    sweep_row(dict(base, variant=f"bm{bm} bn{bn} w{w} s{st}"),
                              lambda: (kernels.biased_attention(q, k, v, bias),), ref, repeats)


def received_lse(smoke: bool, repeats: int):
    """GPU: cls's scores without a class token (the attention each key receives) at Whisper-large's bs-1 stage sizes
    (20 heads of 64; 1500 / 1191 / 945 tokens): the block's attention as SDPA runs it and as cuDNN's op asked for its
    log-sum-exp too, the two-pass ``received_scores`` and its column pass alone on that log-sum-exp. The pair
    (attention with lse + columns) against (SDPA + both passes) is what a scored block would save."""
    from tokenprune import kernels

    g = torch.Generator(device="cpu").manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for n in ([40] if smoke else [1500, 1191, 945]):
        h, d = (2, 16) if smoke else (20, 64)
        q, k, v = (torch.randn(1, h, n, d, generator=g).to(DEV, DTYPE) for _ in range(3))
        scale = d ** -0.5
        base = dict(case="received_lse", bs=1, heads=h, head_dim=d, tokens=n)
        sweep_row(dict(base, variant="sdpa"), lambda: (sdpa(q, k, v),), None, repeats)
        lse = None
        if DEV == "cuda":  # what a scored block runs where kernels.attention_lse_applies
            def with_lse():
                return kernels.attention_with_lse(q, k, v, scale)

            sweep_row(dict(base, variant="cuDNN attention with its lse"), with_lse, None, repeats)
            lse = with_lse()[1]
        ref = sweep_row(dict(base, variant="received_scores, two passes"),
                        lambda: (kernels.received_scores(q, k, scale),), None, repeats)
        if lse is not None:
            sweep_row(dict(base, variant="received_scores on the attention's lse"),
                      lambda: (kernels.received_scores(q, k, scale, None, None, lse),), ref, repeats)


def whisper_step(out: Path, smoke: bool, repeats: int):
    """GPU: one batch-1 merge step of the Whisper-large encoder (1475 tokens, keys [1, 20, N, 64], fp16, r 25: the
    long-input path, in one launch and in four) and the per-block ops around it. The step: GPU time under CUDA-graph
    replay, each kernel's GPU time (profiler), host time per eager call (the forward's scratch dict reused, as in a
    forward). Per block: SDPA with and without the log-size key bias at that token count (host and GPU time), and the
    host time of one linear (1280 -> 5120) when the token count changes every call (a merged forward's 31 counts)
    against a fixed one."""
    from tokenprune import kernels, ops
    from tokenprune.cuda import graphed
    from tokenprune.state import TokenState, key_bias_view

    b, t, c, h, d, r = 1, (64 if smoke else 1500), (32 if smoke else 1280), (4 if smoke else 20), 16 if smoke else 64, 8 if smoke else 25
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, t, c, generator=g).to(DEV, DTYPE)
    k = torch.randn(b, h, t, d, generator=g).to(DEV, DTYPE)
    with torch.inference_mode():
        st = ops.bipartite_merge(TokenState.start(x, 0), k.float().mean(1), r)  # the state after one step
        n = st.x.shape[1]
        x1 = torch.randn(b, n, c, generator=g).to(DEV, DTYPE)
        q1, k1, v1 = (torch.randn(b, h, n, d, generator=g).to(DEV, DTYPE) for _ in range(3))
        bias = key_bias_view(st.sizes.log().to(DTYPE))
        scratch = {}
        on_gpu = DEV == "cuda" and kernels.use_triton(x1) and kernels.merge_step_fits(n, r)
        step = (lambda: kernels.merge_step(x1, k1, st.sizes, st.source, 0, r, False, t, True, scratch=scratch)) \
            if on_gpu else (lambda: ops.bipartite_merge(TokenState(x=x1, num_prefix=0, num_input=t, sizes=st.sizes,
                                                                   source=st.source), k1, r))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        row = dict(case="whisper_step", bs=b, tokens=n, r=r, kernels=on_gpu,
                   sdpa_host_us=round(host_time_ms(lambda: sdpa(q1, k1, v1), DEV, repeats) * 1e3, 1),
                   sdpa_bias_host_us=round(host_time_ms(lambda: sdpa(q1, k1, v1, attn_mask=bias), DEV, repeats) * 1e3, 1))
        # the key mean as one op before the kernels (the default above KEY_MEAN_IN_KERNEL_MAX_TOKENS), and the
        # kernels reading the keys per head
        default_max = kernels.KEY_MEAN_IN_KERNEL_MAX_TOKENS
        for tag, max_tokens in (("mean_op", default_max), ("per_head", 1 << 30)):
            kernels.KEY_MEAN_IN_KERNEL_MAX_TOKENS = max_tokens
            row[f"step_host_us_{tag}"] = round(host_time_ms(step, DEV, repeats) * 1e3, 1)
            if DEV == "cuda":
                row[f"step_graph_us_{tag}"] = round(time_fn(graphed(step), DEV, 10, repeats).median_ms * 1e3, 1)
                p = profiled(lambda _: step(), None, calls=20)
                (out / f"whisper_step_kernels_{tag}.txt").write_text(
                    p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
        kernels.KEY_MEAN_IN_KERNEL_MAX_TOKENS = default_max
        from tokenprune.kernels import merge as kmerge

        # the four launches one after the other instead of _merge_long's one (rounds interleaved: the host drifts)
        for i in range(3):
            for tag, one in (("four_launches", False), ("one_launch", True)):
                with settings(kmerge, {"MERGE_LONG_ONE_LAUNCH": one}):
                    row.setdefault(f"step_host_us_{tag}", []).append(round(host_time_ms(step, DEV, repeats) * 1e3, 1))
                    if DEV == "cuda" and i == 0:
                        row[f"step_graph_us_{tag}"] = round(time_fn(graphed(step), DEV, 10, repeats).median_ms * 1e3,
                                                            1)
        if on_gpu:  # _bm_best's B-token splits; _merge_rank's tiles (A tokens, compare tile, warps)
            defaults = kmerge.MERGE_BEST_SPLIT, kmerge.MERGE_RANK_TILES
            for split, tiles in ((1, defaults[1]), (2, defaults[1]), (4, defaults[1]), (8, defaults[1]),
                                 (defaults[0], (16, 64, 4)), (defaults[0], (32, 32, 4)), (defaults[0], (64, 64, 4)),
                                 (defaults[0], (32, 128, 4)), (defaults[0], (64, 64, 8))):
                kmerge.MERGE_BEST_SPLIT, kmerge.MERGE_RANK_TILES = split, tiles
                row[f"step_graph_us_split{split}_rank_" + "_".join(map(str, tiles))] = round(
                    time_fn(graphed(step), DEV, 10, repeats).median_ms * 1e3, 1)
            kmerge.MERGE_BEST_SPLIT, kmerge.MERGE_RANK_TILES = defaults
        if DEV == "cuda":
            row["sdpa_graph_us"] = round(time_fn(graphed(lambda: sdpa(q1, k1, v1)), DEV, 10, repeats).median_ms * 1e3, 1)
            row["sdpa_bias_graph_us"] = round(time_fn(graphed(lambda: sdpa(q1, k1, v1, attn_mask=bias)), DEV, 10,
                                                      repeats).median_ms * 1e3, 1)
        # one linear over a forward's token counts: the same count 31 times, or the 31 counts of a merge @0.5
        w = torch.randn(4 * c, c, generator=g).to(DEV, DTYPE)
        counts = [t - i * ((t // 2) // 31) for i in range(31)]
        xs = {m: torch.randn(b, m, c, generator=g).to(DEV, DTYPE) for m in counts}
        fixed = host_time_ms(lambda: [torch.nn.functional.linear(xs[t], w) for _ in counts], DEV, repeats)
        varied = host_time_ms(lambda: [torch.nn.functional.linear(xs[m], w) for m in counts], DEV, repeats)
        row.update(linear_host_us_fixed_count=round(fixed * 1e3 / 31, 2), linear_host_us_varied_counts=round(
            varied * 1e3 / 31, 2))
    record(**row)


def block_curve(smoke: bool, repeats: int, step: int):
    """GPU time of one encoder block (CUDA-graph replay, eager ops, SDPA) at every ``step``-th token count from the
    full input down to a sixth of it: the long inputs' Whisper-large layer and SigLIP block at bs 1. The curve says
    what a token removed before a block saves there (run 59: mostly fixed time, a line of 68 us + 0.105 us a token
    for Whisper-large), so a schedule's zero-cost time is about the sum of its blocks' points plus the rest of the
    model (checked against the ``cut: ...`` rows)."""
    from tokenprune.adapters import for_model
    from tokenprune.cuda import graphed

    for case in ("whisper_large", "siglip"):
        m, x = model_and_input(case, 1, smoke)
        block = m.layers[0] if case == "whisper_large" else m.blocks[0]
        info = for_model(m).info()
        n_all, width = info.num_prefix + info.num_tokens, info.dim

        def run(h, block=block, case=case):
            out = block(h, None) if case == "whisper_large" else block(h)
            return out[0] if isinstance(out, tuple) else out

        g = torch.Generator(device="cpu").manual_seed(0)
        with torch.inference_mode():
            for n in range(n_all, max(n_all // 6, 8), -step):
                h = torch.randn(1, n, width, generator=g).to(DEV, DTYPE)
                fn = graphed(run, h) if DEV == "cuda" else run  # each count's graph freed at the next
                t = time_fn(lambda fn=fn, h=h: fn(h), DEV, warmup=10, repeats=repeats)
                record(case="block_curve", model=case, tokens=n, us=round(t.median_ms * 1e3, 2))
        del m


def main():
    global DEV, DTYPE, SMOKE, ONLY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="eager", help="comma-separated: eager, compiled, long, large, ... (the module docstring lists them)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few repeats (checks the script)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="eager and others parts: write profiler tables too")
    ap.add_argument("--stall-dump", type=float, metavar="S",
                    help="sample the main thread's Python stack every second and, every S seconds, print the most "
                         "frequent stacks since the last print to stderr (where a compile that runs past its step's "
                         "time limit spends its time)")
    ap.add_argument("--variants", help="comma-separated variant names (e.g. merge,cls; a comma followed by a space "
                    "is part of a name): the parts built on run_case and kernel_census run only these beside the "
                    "unreduced model (a device call's time goes further)")
    args = ap.parse_args()
    if args.stall_dump:
        stack_sampler(args.stall_dump)
    SMOKE = args.smoke
    # names are split at commas not followed by a space: "merge,patched, budget 1.0" is two names
    ONLY = set(re.split(r",(?! )", args.variants)) if args.variants else None
    DEV = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    DTYPE = torch.float32 if DEV == "cpu" else torch.float16
    reps = 3 if args.smoke else args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    parts = args.parts.split(",")
    t0 = time.time()
    if "dynamo_host" in parts:  # host time of a compiled call's frame and guards, per variant (CPU or GPU)
        dynamo_host(args.smoke, reps)
    if "dryhost" in parts:  # CPU only: host time per piece of a reduction step, Triton launches as no-ops
        dry_host(args.out, args.smoke, args.profile, args.repeats)
    if "dryhost_whisper" in parts:  # the same for a Whisper-large merge step and the blocks around it
        dry_whisper(args.out, args.smoke, args.repeats)
    if "whisper_step" in parts:  # GPU: a Whisper-large merge step (host, graph, kernels) and SDPA / linear per block
        whisper_step(args.out, args.smoke, args.repeats)
    if "eager" in parts:
        prof = args.out if args.profile else None
        run_case("vit_b", 1, ["eager"], BS1, 0.25, reps, args.smoke, host=True, profile=prof)
        run_case("vit_l", 1, ["eager"], BS1[:4] + [M3, PATCHED], 0.25, reps, args.smoke, host=True, profile=prof)
    if "whisper_eager" in parts:
        prof = args.out if args.profile else None
        run_case("whisper_large", 1, ["eager"], [("merge", {}), ("cls", {}), M3, PATCHED], 0.5, reps, args.smoke,
                 host=True, profile=prof, profiled_variants=("unreduced", "merge", "merge-3-stages"))
        from tokenprune.kernels import merge as kmerge

        one = not kmerge.MERGE_LONG_ONE_LAUNCH  # each merge step in one launch and in four: the other one
        with settings(kmerge, {"MERGE_LONG_ONE_LAUNCH": one}):
            run_case("whisper_large", 1, ["eager"], [("merge", {})], 0.5, reps, args.smoke, host=True,
                     tag="one launch" if one else "four launches")
    if "whisper_cut" in parts:  # eager: every-block merge's token counts with no step (transformers' own layers)
        run_case("whisper_large", 1, ["eager"], [("cut: merge", {"method": "merge", "cut": True}), CUTS[1], ("merge", {}),
                                                 PATCHED], 0.5, reps, args.smoke, host=True)
    if "pyprof" in parts:
        python_profile(args.out, args.smoke)
    if "graph_profile" in parts:  # cProfile of reduce-overhead ViT-B bs-1 calls: the host time past Dynamo
        graph_profile(args.out, args.smoke, 20 if args.smoke else 300)
    if "graph_nodes" in parts:  # each bs-1 ViT-B variant's CUDA graph: its nodes, its launch's host time
        graph_nodes(args.out, args.smoke)
    if "pyprof_whisper" in parts:  # the same for the Whisper-large encoder: unreduced, patched at 1.0, merge at 0.5
        python_profile(args.out, args.smoke, [("whisper_large", [("unreduced", None), ("merge", {})], 1.0),
                                              ("whisper_large", [("merge", {})], 0.5)])
    if "compile_kernels" in parts:  # compile time with every cache off, and distinct generated kernels
        compile_kernels(args.smoke)
    if "kernels_b" in parts:  # the GPU kernels of a compiled bs-1 ViT-B forward, per reducer
        kernel_census(args.out, args.smoke)
    # kernels_b for the every-block merge (its order files: what a step adds; the key mean from the attention's launch,
    # the default at bs 1) beside others, then with the mean op; kernels_b_graph: inside reduce-overhead's CUDA
    # graph, where the idle time between kernels is the graph's own
    for part, mode, others in (("kernels_b_merge", None, [("maelre", {})]),
                               ("kernels_b_graph", "reduce-overhead", [M3, ("cls", {})])):
        if part in parts:
            kernel_census(args.out, args.smoke, "vit_b", [("merge", {})] + others, mode=mode)
            mean_op = [("merge, key mean op", {"method": "merge"})]
            if chosen(mean_op):  # its own unreduced model too (kernel_census compiles one per call)
                with settings(tokenprune.kernels, {"KEY_MEAN_IN_ATTENTION_MAX_BATCH": 0}):
                    kernel_census(args.out, args.smoke, "vit_b", mean_op, mode=mode)
    if "kernels_siglip_large" in parts:  # run 67: the patched SigLIP at bs 32 ran 11% slower compiled than eager
        for mode in (None, "eager"):
            kernel_census(args.out, args.smoke, "siglip", [("merge", {})], 0.25, bs=4 if args.smoke else 32, mode=mode)
    if "kernels_long" in parts:  # the same for the long inputs: where cls / merge lose against their FLOP bound
        kernel_census(args.out, args.smoke, "whisper_large", [("cls", {}), M3, ("merge", {})], 0.5)
    if "kernels_long" in parts or "kernels_siglip" in parts:  # kernels_siglip: SigLIP alone (head dim 72)
        kernel_census(args.out, args.smoke, "siglip", [("cls", {}), M3, ("merge", {})], 0.25)
    if "kernels_large" in parts:  # compiled default at bs 256: where cls / merge lose against their FLOP bound
        kernel_census(args.out, args.smoke, "vit_b", [("cls", {}), ("merge", {})], 0.25, bs=8 if args.smoke else 256)
    if "kernels_large_gemm" in parts:  # the same with the GEMM stem (large_gemm's rows), merge-3-stages beside them
        kernel_census(args.out, args.smoke, "vit_b", [("cls", {}), ("merge", {}), M3], 0.25,
                      bs=8 if args.smoke else 256, stem="gemm")
    if "compiled" in parts or "compiled_b" in parts:
        run_case("vit_b", 1, ["reduce-overhead"], BS1, 0.25, reps, args.smoke, host=True)
    if "compiled" in parts or "compiled_l" in parts:
        run_case("vit_l", 1, ["reduce-overhead"], [("cls", {}), ("random", {}), ("apet", {}), M3], 0.25,
                 reps, args.smoke)
    if "long" in parts:
        run_case("siglip", 1, ["eager", "reduce-overhead"], [("merge", {}), ("cls", {}), M3], 0.25, reps,
                 args.smoke, host=True)
        run_case("whisper_large", 1, ["eager", "reduce-overhead"], [("merge", {}), ("cls", {}), M3], 0.5,
                 reps, args.smoke, host=True)
    if "long_eager" in parts:  # the eager half of long
        run_case("siglip", 1, ["eager"], [("merge", {}), ("cls", {}), M3], 0.25, reps, args.smoke, host=True)
        run_case("whisper_large", 1, ["eager"], [("merge", {}), ("cls", {}), M3], 0.5, reps, args.smoke, host=True)
    if "long_siglip" in parts:  # the SigLIP half of long, reduce-overhead only
        run_case("siglip", 1, ["reduce-overhead"], [("merge", {}), ("cls", {}), M3] + CUTS, 0.25, reps, args.smoke)
    if "long_whisper" in parts:  # the Whisper half of long, reduce-overhead only
        run_case("whisper_large", 1, ["reduce-overhead"], [("merge", {}), ("cls", {}), M3] + CUTS, 0.5, reps,
                 args.smoke)
    if "block_curve" in parts:  # one long-input block's GPU time over its token counts (bs 1, graph replay)
        block_curve(args.smoke, reps, 8 if args.smoke else 4)
    # long_sched / long_sched_siglip: cls and merge with earlier stages than depth/4, /2, 3/4 (and those schedules at
    # no cost, cut); kernels_long_sched: the kernels of the earliest ones inside reduce-overhead's CUDA graph
    for part, case, budget, sets in (("long_sched", "whisper_large", 0.5, ([3, 7, 11], [1, 5, 9])),
                                     ("long_sched_siglip", "siglip", 0.25, ([2, 6, 9], [1, 4, 8]))):
        census = "kernels_long_sched" in parts and case == "whisper_large"
        if part not in parts and not census:
            continue
        sched = [(f"{pre}{meth} {at(lay)}", {"method": meth, "layers": lay, **kw})
                 for lay in ([[0, 1, 2]] if args.smoke else sets)
                 for pre, meth, kw in (("cut: ", "cls", {"cut": True}), ("", "cls", {}), ("", "merge", {}))]
        if part in parts:
            run_case(case, 1, ["reduce-overhead"], [("cls", {}), CUTS[0]] + sched, budget, reps, args.smoke)
        if census:
            kernel_census(args.out, args.smoke, case, sched[-2:], budget, mode="reduce-overhead")
    if "long_sched_ba" in parts:  # Whisper merge @1,5,9 compiled: the merged tokens' key bias in the fused kernel
        from tokenprune import kernels as tk  # (transformers' layers via tokenprune_sdpa) or in SDPA as its mask

        lay = [0, 1, 2] if args.smoke else [1, 5, 9]
        run_case("whisper_large", 1, ["reduce-overhead"], [
            (f"merge {at(lay)}, key bias {name}", {"method": "merge", "layers": lay},
             ((tk, {"BA_MIN_BATCH_COMPILED": floor}),)) for name, floor in (("kernel", 1), ("sdpa", 2))],
            0.5, reps, args.smoke)
    if "long_sched_lse" in parts:  # Whisper cls @1,5,9 compiled: the scored layers' lse from cuDNN's attention, or not
        from tokenprune import kernels as tk

        lay = [0, 1, 2] if args.smoke else [1, 5, 9]
        run_case("whisper_large", 1, ["reduce-overhead"], [
            (f"cls {at(lay)}, {name}", {"method": "cls", "layers": lay},
             ((tk, {"LSE_FROM_ATTENTION_MIN_TOKENS": floor}),)) for name, floor in (("lse from the attention", 1),
                                                                                    ("two passes", None))],
            0.5, reps, args.smoke)
    if "long_recipes_large" in parts:  # the batch-1 recipes' early stages at a large batch, eager and compiled
        for case, bs, budget, lay in (("whisper_large", 16, 0.5, [1, 5, 9]), ("siglip", 32, 0.25, [2, 6, 9])):
            lay = [0, 1, 2] if args.smoke else lay
            run_case(case, 2 if args.smoke else bs, ["eager", "default"], [
                (f"{meth} {at(lay)}", {"method": meth, "layers": lay}) for meth in ("cls", "merge")]
                + [("merge", {})], budget, reps, args.smoke)
    if "long_sched_keep" in parts:  # Whisper cls @1,5,9 (and SigLIP's): ranked by counting (_keep_rank) or sorted
        from tokenprune.kernels import keep as kk  # in every program of _keep_step (KEEP_RANK_MIN_N out of reach)

        for case, budget, lay in (("whisper_large", 0.5, [1, 5, 9]), ("siglip", 0.25, [2, 6, 9])):
            lay = [0, 1, 2] if args.smoke else lay
            run_case(case, 1, ["reduce-overhead"], [
                (f"cls {at(lay)}, {name}", {"method": "cls", "layers": lay},
                 ((kk, {"KEEP_RANK_MIN_N": floor}),)) for name, floor in (("ranked", 512), ("sorted", 1 << 30))],
                budget, reps, args.smoke)
    if "long_cls" in parts:  # the long inputs' cls alone (its scores without a class token: received attention)
        run_case("siglip", 1, ["eager", "reduce-overhead"], [("cls", {})], 0.25, reps, args.smoke, host=True)
        run_case("whisper_large", 1, ["eager", "reduce-overhead"], [("cls", {})], 0.5, reps, args.smoke, host=True)
    if "merge_b1" in parts:  # the bs-1 one-launch merge step at ViT-B's sizes: its launch settings, its extra outputs
        merge_b1(args.smoke, reps)
    if "merge_b1_forward" in parts:  # ViT-B bs-1 reduce-overhead merge: the step's sizes and source map from a
        # program of their own (side) or from program 0; the key mean from the attention's launch (km) or a mean op
        from tokenprune.kernels import merge as km
        run_case("vit_b", 1, ["reduce-overhead"], [
            (f"merge, side {'on' if side else 'off'}, km {'on' if mean else 'off'}", {"method": "merge"},
             ((km, {"MERGE_STEP_SIDE_PROGRAM": side}),
              (tokenprune.kernels, {"KEY_MEAN_IN_ATTENTION_MAX_BATCH": 8 if mean else 0})))
            for side, mean in ((False, False), (False, True), (True, False), (True, True))], 0.25, reps, args.smoke)
    if "ba_tiles" in parts:  # the key-bias attention's tiles and pipeline depth, bs 256 and 1, against cuDNN's flash
        ba_tiles(args.smoke, reps)
    if "received_lse" in parts:  # cls's received-attention scores on the block attention's log-sum-exp (Whisper bs 1)
        received_lse(args.smoke, reps)
    if "ba_tiles_long" in parts:  # the same at the long inputs' bs-1 shapes, and the bias folded into the head dim
        ba_tiles(args.smoke, reps, long=True)
    if "gram_tiles" in parts:  # the Gram kernel's tiles at batch 1 and 256 (ApET, diverse)
        gram_tiles(args.smoke, args.repeats)
    if "threshold" in parts:  # threshold alone at bs 1 eager (host time per stage), cls beside it
        run_case("vit_b", 1, ["eager"], [("threshold", {}), ("cls", {})], 0.25, reps, args.smoke, host=True)
    if "apet_once" in parts:  # apet in one stage at the FLOPs of its three (ViT-B after block 5, ViT-L after 10)
        for case, j in (("vit_b", 5), ("vit_l", 10)):
            j = 2 if args.smoke else j  # the smoke models have 6 blocks
            run_case(case, 1, ["reduce-overhead"], [("random", {}), ("apet", {}),
                                                    (f"apet, once after {j}", {"method": "apet", "layers": [j]})],
                     0.25, reps, args.smoke, host=True)
    if "others" in parts:  # the reducers outside BS1 (pitome, diverse; threshold's plan depends on the input)
        others = [("pitome", {}), ("diverse", {})]
        run_case("vit_b", 1, ["eager"], others + [("threshold", {}), ("cls", {})], 0.25, reps, args.smoke, host=True,
                 profile=args.out if args.profile else None,
                 profiled_variants=("unreduced", "pitome", "diverse", "threshold", "cls"))
        j = 2 if args.smoke else 5  # the smoke models have 6 blocks
        fewer = [("pitome, 3 stages", {"method": "pitome", "layers": "thirds"}),  # at bs 1: fewer serial steps
                 (f"diverse, once after {j}", {"method": "diverse", "layers": [j]})]
        run_case("vit_b", 1, ["reduce-overhead"], others + fewer, 0.25, reps, args.smoke, host=True)
        bs = 8 if args.smoke else 256
        run_case("vit_b", bs, ["eager", "default"], others, 0.25, min(reps, 30), args.smoke)
    if "large" in parts:
        bs = 8 if args.smoke else 256
        run_case("vit_b", bs, ["eager"], [("merge", {}), ("cls", {})], 0.27, min(reps, 30), args.smoke)
        run_case("vit_b", bs, ["eager", "default"], [("merge", {}), ("cls", {}), M3], 0.25, min(reps, 30),
                 args.smoke)
    if "large_gemm" in parts:  # the same with the GEMM stem in every variant (cuDNN's 3-channel stem: ~2 ms at bs 256)
        bs = 8 if args.smoke else 256
        run_case("vit_b", bs, ["eager", "default"], [("merge", {}), ("cls", {}), M3], 0.25, min(reps, 30),
                 args.smoke, tag="gemm stem", stem="gemm")
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                parts=parts, seconds=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d"))
    (args.out / f"bench_forward_{'_'.join(parts)}.json").write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    print(f"\n{'case':14} {'bs':>4} {'mode':16} {'variant':16} {'ms':>9} {'speedup':>8} {'bound':>6} {'host':>7} err")
    for r in ROWS:
        if r["case"].startswith("dryhost") or r["case"] in ("whisper_step", "gram_tiles", "ba_tiles", "merge_b1",
                                                              "received_lse", "block_curve"):
            continue
        kind = r.get("part") if r.get("part") in _SUMMARY else next((k for k in ("same_tokens", "error") if k in r),
                                                                       "ms")
        tail = _SUMMARY[kind]
        mode = "compiled call" if r.get("part") == "dynamo_host" else r["mode"]
        print(f"{r['case']:14} {r['bs']:>4} {mode:16} {r['variant']:16} " + tail(r))
    print(meta)
    if ONLY is not None and ONLY - OFFERED:  # a misspelt name would leave a part with its unreduced row alone
        sys.exit(f"--variants: no part run offered {sorted(ONLY - OFFERED)}; the parts offered {sorted(OFFERED)}")


# the summary line of a row after its case, batch, mode and variant: by its part, else by what it holds
_SUMMARY = {
    "dynamo_host": lambda r: (f"{r['host_us_per_call']:.1f} us of host time before any work (frame, guards); "
                              f"{r['no_guards_us']:.1f} us without guards"),
    "compile_kernels": lambda r: (f"compiled in {r['compile_s']} s (caches off), {r['distinct_kernels']} distinct "
                                  "generated kernels"),
    "kernels": lambda r: (f"{r['kernels_per_forward']:6.0f} kernels, {r['kernel_ms_per_forward']:.3f} ms of kernel "
                          f"time per forward, span {r['span_ms']:.3f} ms, idle {r['gap_ms']:.3f} ms"),
    "graph_nodes": lambda r: (f"graph launch {r['replay_host_us']} us host, {r['replay_us']} us to its end; nodes "
                              f"{r['nodes']}"),
    "graph_timeline": lambda r: "timeline (us): " + ", ".join(
        f"{k} {v}" for k, v in r.items() if k not in ("case", "bs", "mode", "variant", "part")),
    "graph_gc": lambda r: (f"latency {r['latency_ms']} ms, gc frozen {r['latency_ms_gc_frozen']}, gc off "
                           f"{r['latency_ms_gc_off']}; collections {r['gc_collections']}, {r['gc_tracked']} tracked"),
    "same_tokens": lambda r: f"rel err {r['rel_err_vs_eager']:.2e}, same tokens kept: {r['same_tokens']}",
    "error": lambda r: f"ERROR {r['error'][:80]}",
    "ms": lambda r: (f"{r['ms']:9.3f} {r['speedup']:8.3f} {r['flop_bound'] or '':>6} {r.get('host_ms', ''):>7} "
                     f"{r['rel_err_vs_eager'] or ''}"),
}

DEV, DTYPE, SMOKE, ONLY = "cpu", torch.float32, False, None
OFFERED: set = set()  # every variant name the parts run offered to --variants

if __name__ == "__main__":
    main()
