"""The forward path: compiled, shared between threads, and patched atomically.

Per-forward data lives in one context object passed down explicitly (tokenprune.engine.Forward), so a
patched model compiles with fullgraph=True and gives each thread its own forward. These tests compile
with Dynamo's "eager" backend: tracing is what graph breaks come from (Inductor's CPU code generation
would add minutes and test nothing of ours; the GPU benchmark compiles with Inductor). Dynamo's tracing time
grows with the block count: the compiled ViTs and towers have 3 blocks (every method still reduces in two or
more of them; ``merge`` and ``pool`` keep unreduced blocks in the graph). The fullgraph cases are traced as one
function that calls each (``conftest.compile_cases``: a graph break in any case still raises, and then each case is
compiled alone so that its own test fails).
"""
import copy
import threading

import pytest
import torch

import tokenprune
from conftest import compile_cases, compiled_equals_eager, tiny_vit

STATIC = [("merge", {}), ("cls", {}), ("random", {}), ("apet", {"k": 4}), ("pool", {}), ("maelre", {}),
          (["cls", "merge"], {}), ("merge", {"placement": "attn"}), ("diverse", {}), ("pitome", {})]


@pytest.mark.xdist_group("fullgraph-forward_path")
def test_grouped_tests_keep_their_group_under_xdist(request):
    """conftest.py runs the suite in two pytest-xdist workers with ``--dist loadgroup``: the tests of one
    ``xdist_group`` run in one worker, so a module's compiled models are built once. The worker marks a grouped
    test's id with its group; pytest 9.2 with pytest-xdist 3.8 silently drops that mark (pytest-xdist issue 1386),
    and every group's models are then built in both workers (a fresh install took 2:25 instead of 1:55).
    pyproject.toml keeps pytest below 9.2 for that; this fails if grouping is lost again."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a loadgroup worker (one process, or -n N --dist other than loadgroup)")
    assert request.node.nodeid.endswith("@fullgraph-forward_path")


@pytest.mark.xdist_group("fullgraph-forward_path")
@pytest.mark.parametrize("method,kw", STATIC, ids=[str(m) for m, _ in STATIC])
def test_timm_compiles_fullgraph(method, kw, fullgraph, request):
    compiled_equals_eager(fullgraph, request)


def _timm(method, kw):
    model = tiny_vit(depth=3)
    tokenprune.apply(model, budget=0.25, method=method, **kw)
    return model, torch.randn(2, 3, 32, 32)


def _hf_clip():
    from test_adapters_matrix import make_hf_clip

    f = make_hf_clip(layers=3)
    return f["model"], f["x"], lambda m: (lambda x: m(pixel_values=x).pooler_output)


def _whisper_encoder():
    from test_adapters_matrix import make_whisper

    f = make_whisper(layers=3)
    return f["model"], f["x"], lambda m: (lambda x: m.model.encoder(x).last_hidden_state)


def _open_clip():
    from test_adapters_matrix import make_open_clip

    f = make_open_clip()
    return f["model"], f["x"], lambda m: m.encode_image


@pytest.mark.xdist_group("fullgraph-forward_path")
@pytest.mark.parametrize("family", [_hf_clip, _whisper_encoder, _open_clip], ids=["hf_clip", "whisper", "open_clip"])
@pytest.mark.parametrize("method", ["merge", "cls", "random", "maelre", ["cls", "merge"]], ids=str)
def test_hf_towers_compile_fullgraph(family, method, fullgraph, request):
    compiled_equals_eager(fullgraph, request)


def _hf_tower(family, method):
    model, x, fn = family()
    tokenprune.apply(model, budget=0.25, method=method)
    return fn(model), x


@pytest.fixture(scope="module")
def fullgraph(request):
    """The selected cases of the two tests above, compiled with fullgraph=True in one trace (conftest)."""
    return compile_cases(request, {"test_timm_compiles_fullgraph": _timm,
                                   "test_hf_towers_compile_fullgraph": _hf_tower})


def test_explain_reports_no_graph_break():
    model = tiny_vit(depth=3)
    tokenprune.apply(model, budget=0.25, method=["cls", "merge"])
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons


@pytest.mark.slow
def test_data_dependent_reducer_compiles_with_documented_breaks():
    """``cls`` with ``threshold=`` keeps a data-dependent count: it compiles (not fullgraph) and matches eager.
    Two blocks: both reduce, the second one from the first one's data-dependent count."""
    model = tiny_vit(depth=2)
    tokenprune.apply(model, budget=0.5, method="cls", threshold=0.01)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("method,kw", [("cls", {"threshold": 0.01}), ("threshold", {})], ids=["cls-threshold",
                                                                                                "threshold"])
def test_export_of_a_data_dependent_reducer_is_a_clear_refusal(method, kw, strict):
    """torch.export cannot record a kept count that depends on the data: say so, not a symbolic-shapes error
    from deep inside torch (with the whole graph printed)."""
    model = tiny_vit(depth=2)
    tokenprune.apply(model, budget=0.5, method=method, **kw)
    with pytest.raises(Exception, match=r"tokenprune: .*torch\.export .*depends on the data.*fixed"):
        torch.export.export(model, (torch.randn(2, 3, 32, 32),), strict=strict)


@pytest.mark.parametrize("method,kw", [("cls", {"threshold": 0.01}), ("threshold", {})], ids=["cls-threshold",
                                                                                                "threshold"])
def test_fullgraph_compile_of_a_data_dependent_reducer_is_a_clear_refusal(method, kw):
    """``torch.compile(fullgraph=True)`` of a data-dependent count raised Dynamo's "Could not guard on data-dependent
    expression" from a line of tokenprune (as if it were a bug there): say what it is and what to do instead."""
    model = tiny_vit(depth=2)
    tokenprune.apply(model, budget=0.5, method=method, **kw)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"tokenprune: torch\.compile\(fullgraph=True\) .*depends "
                                                         r"on the data.*without fullgraph=True"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 32, 32))
    torch._dynamo.reset()


def test_export_of_a_fixed_count_reducer_matches_eager():
    model = tiny_vit(depth=2)
    tokenprune.apply(model, budget=0.5, method="merge")
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_compiled_wrapper_is_the_model_to_every_entry_point():
    """``cm = torch.compile(model)``, then ``tokenprune.remove(cm)``: the model was left patched (the wrapper holds no
    patch) and ``cm`` went on returning reduced outputs; ``plan(cm)`` said "not patched", ``apply(cm)`` "no adapter".
    Every entry point acts on the module the wrapper runs."""
    model = tiny_vit(depth=2)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        tokenprune.apply(model, budget=0.25, method="merge")
        reduced = model(x)
        compiled = torch.compile(model, backend="eager")
        assert tokenprune.is_applied(compiled) and tokenprune.plan(compiled).num_out == 16
        torch.testing.assert_close(compiled(x), reduced)
        assert tokenprune.remove(compiled) is compiled
        assert not tokenprune.is_applied(model)
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=0)
        assert tokenprune.apply(compiled, budget=0.25, method="merge") is compiled and tokenprune.is_applied(model)
        torch.testing.assert_close(compiled(x), reduced)
        with tokenprune.applied(compiled, budget=0.5, method="cls"):
            assert tokenprune.plan(model).method == "cls"
            tokens, state = tokenprune.features(compiled, x)
            assert tokens.shape[1] == 1 + 32
        assert tokenprune.plan(model).method == "merge"
        tokenprune.remove(compiled)
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=0)



def test_data_parallel_wrapper_is_the_model_to_every_entry_point(monkeypatch):
    """``tokenprune.apply(torch.nn.DataParallel(model), ...)`` said "no adapter for DataParallel". Every entry point
    now acts on the module the wrapper runs, as for the torch.compile wrapper. Without GPUs DataParallel calls that
    module; on GPUs it copies it onto each device at every forward (``replicate``: the class and ``__dict__`` copied,
    the weights broadcast). That copy is made here on CPU, each replica with its own (scaled) weights: a replica's
    reduced forward must be the patched forward, computed with the replica's weights, not the original's."""
    import sys

    import torch.nn.parallel.replicate  # noqa: F401  (the module; the package exports the function of that name)
    rep_mod = sys.modules["torch.nn.parallel.replicate"]
    model = tiny_vit(depth=2)
    x = torch.randn(2, 3, 32, 32)
    dp = torch.nn.DataParallel(model)
    with torch.no_grad():
        ref = model(x)
        assert tokenprune.apply(dp, budget=0.25, method="merge") is dp and tokenprune.is_applied(model)
        reduced = model(x)
        assert not torch.allclose(reduced, ref)
        torch.testing.assert_close(dp(x), reduced, rtol=0, atol=0)
        assert tokenprune.is_applied(dp) and tokenprune.plan(dp).num_out == 16
        tokens, state = tokenprune.features(dp, x)
        assert tokens.shape[1] == 1 + 16 and state.sizes is not None

        scales = (1.5, 0.5)
        monkeypatch.setattr(rep_mod, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
            [t.detach() * s if t.is_floating_point() else t.clone() for t in tensors] for s in scales])
        for s, replica in zip(scales, rep_mod.replicate(model, [0, 1])):
            scaled = copy.deepcopy(model)
            for t in list(scaled.parameters()) + list(scaled.buffers()):
                t.mul_(s)
            torch.testing.assert_close(replica(x), scaled(x))
        monkeypatch.undo()

        assert tokenprune.remove(dp) is dp and not tokenprune.is_applied(model)
        torch.testing.assert_close(dp(x), ref, rtol=0, atol=0)
        with tokenprune.applied(dp, budget=0.5, method="cls"):
            assert tokenprune.plan(model).method == "cls"
        assert not tokenprune.is_applied(model)


def test_distributed_data_parallel_is_patched_before_wrapping(tmp_path):
    """DistributedDataParallel registers the model's parameters when it wraps it (and a reducer with learned
    parameters, ``threshold``, adds some): ``apply`` on the wrapper is refused, saying to apply to the model before
    wrapping; a model patched before wrapping runs reduced through DDP, and the other entry points take the wrapper.
    One process (gloo, world size 1) on CPU."""
    import torch.distributed as dist

    model = tiny_vit(depth=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_vit(depth=2))
        with pytest.raises(TypeError, match=r"before wrapping it in DistributedDataParallel.*model\.module"):
            tokenprune.apply(ddp, budget=0.25, method="merge")
        assert not tokenprune.is_applied(ddp.module)
        tokenprune.apply(model, budget=0.25, method="merge")
        with torch.no_grad():
            reduced = model(x)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert tokenprune.is_applied(ddp) and tokenprune.plan(ddp).num_out == 16
        with torch.no_grad():
            torch.testing.assert_close(ddp(x), reduced, rtol=0, atol=0)
        assert tokenprune.remove(ddp) is ddp and not tokenprune.is_applied(model)
        with torch.no_grad():
            torch.testing.assert_close(ddp(x), ref, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()

# -- threads ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("cls", {}), ("merge", {}), ("maelre", {}), ("threshold", {}),
                                       ("cls", {"variant": "sum"})], ids=["cls", "merge", "maelre", "threshold",
                                                                          "cls-sum"])
def test_two_threads_share_one_patched_model(method, kw):
    torch.set_num_threads(1)
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method=method, **kw)
    gen = torch.Generator().manual_seed(0)
    inputs = {1: torch.randn(1, 3, 32, 32, generator=gen), 3: torch.randn(3, 3, 32, 32, generator=gen)}
    with torch.no_grad():
        want = {b: model(x) for b, x in inputs.items()}
    bad, errors = [], []

    def work(b):
        try:
            with torch.no_grad():
                for i in range(200):
                    out = model(inputs[b])
                    if not torch.equal(out, want[b]):
                        bad.append((b, i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(b,)) for b in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not bad, (errors[:3], bad[:5])


# -- apply is all or nothing -----------------------------------------------------------------------------------
def test_failed_apply_keeps_the_earlier_patch():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="threshold", init=[0.01, 0.02, 0.03])
    with torch.no_grad():
        model.tokenprune_params.theta.add_(0.001)  # a learned value that a re-apply must not lose
        before = model(x)
    theta = model.tokenprune_params.theta.detach().clone()
    for bad in [dict(budget=0.0, method="cls"), dict(budget=0.5, method="cls", variant="nope"),
                dict(budget=0.5, method="nope"), dict(budget=0.5, method="merge", nope=1)]:
        with pytest.raises((ValueError, TypeError)):
            tokenprune.apply(model, **bad)
        assert tokenprune.plan(model).method == "threshold"
        assert torch.equal(model.tokenprune_params.theta, theta)
        with torch.no_grad():
            assert torch.equal(model(x), before)


def test_applied_restores_the_earlier_patch_and_honours_a_recipe():
    model = tiny_vit()
    tokenprune.apply(model, budget=0.5, method="cls")
    with tokenprune.applied(model, recipe="maelre-long-audio") as m:
        plan = tokenprune.plan(m)
        assert plan.method == "maelre" and plan.budget == 0.25  # the recipe's, not applied()'s old defaults
    assert tokenprune.plan(model).method == "cls" and tokenprune.plan(model).budget == 0.5
    with pytest.raises(RuntimeError):
        with tokenprune.applied(model, budget=0.25, method="merge"):
            raise RuntimeError("boom")
    assert tokenprune.plan(model).method == "cls"


def test_nested_apply_is_a_clear_error_and_changes_nothing():
    from test_adapters_matrix import make_hf_clip

    model = make_hf_clip()["model"]
    tokenprune.apply(model, budget=0.5, method="merge")
    wrapper = torch.nn.Sequential(model)
    with pytest.raises(ValueError, match="already patched"):
        tokenprune.apply(wrapper[0].vision_model if hasattr(wrapper[0], "vision_model") else wrapper, 0.25)
    assert tokenprune.plan(model).budget == 0.5


def test_refused_apply_on_a_part_of_a_patched_model_leaves_the_patch_working():
    """``apply(model.model.encoder)`` on a patched Whisper was refused only when installing, and the cleanup of that
    refusal swapped the encoder's class back: the enclosing model still said it was patched, but ran unreduced (and
    other families raised AttributeError at the next forward). It is refused before anything changes."""
    from test_adapters_matrix import make_whisper

    f = make_whisper(layers=2)
    model, x = f["model"], f["x"]
    tokenprune.apply(model, budget=0.5, method="merge")
    with torch.no_grad():
        reduced = model.model.encoder(x).last_hidden_state
    classes = {name: type(m) for name, m in model.named_modules()}
    for part in (model.model.encoder, model.model):
        with pytest.raises(ValueError, match=r"part of a model patched by tokenprune.*tokenprune\.remove"):
            tokenprune.apply(part, budget=0.25, method="cls")
        assert {name: type(m) for name, m in model.named_modules()} == classes
        with torch.no_grad():
            torch.testing.assert_close(model.model.encoder(x).last_hidden_state, reduced, rtol=0, atol=0)
    tokenprune.remove(model)
    assert not any(type(m).__name__.startswith("TokenPruned") for m in model.modules())


def _hook_forward_like_accelerate(module):
    """What ``accelerate.hooks.add_hook_to_module`` does to a module (``from_pretrained(device_map=...)`` over several
    devices or with offloading, ``cpu_offload``): ``forward`` becomes an instance attribute that calls the forward the
    module had then, kept as ``_old_forward``."""
    import functools

    module._old_forward = module.forward
    module.forward = functools.update_wrapper(functools.partial(lambda m, *a, **k: m._old_forward(*a, **k), module),
                                              module._old_forward)


@pytest.mark.parametrize("method", ["merge", "threshold"])
def test_a_forward_replaced_on_the_instance_is_refused_at_apply(method):
    """tokenprune patches classes: a forward set on the instance (accelerate's hooks) shadows the patched one, and the
    model ran unreduced while plan() reported the reduction (HF towers, every VLM). apply() says so, and the model is
    left as it was (no patch, classes, no learned parameters)."""
    from test_adapters_matrix import make_hf_clip

    f = make_hf_clip(layers=2)
    model, x = f["model"], f["x"]
    with torch.no_grad():
        ref = model(x).last_hidden_state
    _hook_forward_like_accelerate(model)
    classes = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"forward .*replaced on the instance.*accelerate.*bypass"):
        tokenprune.apply(model, budget=0.25, method=method)
    assert not tokenprune.is_applied(model) and list(model.state_dict()) == keys
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref, rtol=0, atol=0)


# -- weights edited in place are seen by the next forward ------------------------------------------------------
@pytest.mark.parametrize("method", ["merge", "maelre"])
def test_in_place_weight_edit_through_data_shows_in_next_forward(method):
    """EMA updates write through ``.data`` (no version bump): nothing derived from the weights may be cached."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method=method)
    with torch.no_grad():
        model(x)
    for blk in model.blocks:
        w = blk.attn.qkv.weight
        w.data[w.shape[0] // 3: 2 * w.shape[0] // 3].mul_(1.5)  # the keys: ToMe's matching metric
    fresh = copy.deepcopy(model)
    tokenprune.remove(fresh)
    tokenprune.apply(fresh, budget=0.25, method=method)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("second", [dict(budget=0.5, method="merge"), dict(budget=0.25, method="cls"),
                                    dict(budget=0.25, method="merge", layers=[1, 2])], ids=str)
def test_compiled_wrapper_follows_a_new_patch(second):
    """A model compiled once, then patched again (another budget, method or schedule): the same compiled wrapper
    runs the new patch, equal to eager, and never the program traced for the old one."""
    model = tiny_vit(depth=4)  # merge's default schedule reduces after blocks 0, 1, 2
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="merge")
    run = torch.compile(model, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            first = run(x)
            torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-6)
            tokenprune.remove(model)
            tokenprune.apply(model, **second)
            out, ref = run(x), model(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, first)  # the new patch changes the output: the check above can fail
    finally:
        torch._dynamo.reset()
