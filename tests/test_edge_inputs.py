"""Inputs at the edges: an empty batch, tracing, beam search."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit

METHODS = [("merge", {}), ("cls", {}), ("random", {}), ("apet", {"k": 4}), ("pool", {}), ("maelre", {}),
           ("threshold", {}), (["cls", "merge"], {}), ("cls", {"threshold": 0.01})]


@pytest.mark.parametrize("method,kw", METHODS, ids=[f"{m}{kw}" for m, kw in METHODS])
def test_empty_batch_gives_an_empty_batch(method, kw):
    model = tiny_vit()
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        tokenprune.apply(model, budget=0.25, method=method, **kw)
        out = model(x)
        tokens, state = tokenprune.features(model, x)
        one, _ = tokenprune.features(model, torch.randn(1, 3, 32, 32))
    assert out.shape == want.shape == (0, 10)
    assert tokens.shape == (0, *one.shape[1:])  # the same token count a one-image batch leaves with


def test_jit_trace_is_refused_clearly():
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="merge")
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record a reduced model"):
        torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    tokenprune.remove(model)
    torch.jit.trace(model, torch.randn(1, 3, 32, 32))  # the unpatched model still traces


def test_whisper_beam_search_keeps_the_token_sizes():
    """Beam search expands the encoder output per beam; the size bias must reach every cross-attention call
    with the beams' batch (before, the bias rode on the encoder tensor and beam expansion dropped it)."""
    from test_adapters_matrix import make_whisper
    from tokenprune.adapters import hf_common

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    cross = {id(layer.encoder_attn) for layer in model.model.decoder.layers}
    seen = []
    real = hf_common._kernel

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        if id(module) in cross:
            ctx = kwargs.get("tokenprune")
            bias = getattr(ctx, "bias", None)
            seen.append(None if bias is None else (bias.shape[0], query.shape[0], bias.shape[-1], key.shape[-2]))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    tokenprune.apply(model, budget=0.5, method="merge")
    from transformers.modeling_utils import AttentionInterface

    # registered as hf_common registers it: item assignment on ALL_ATTENTION_FUNCTIONS would write that instance's
    # local mapping, which outlives the test and shadows every later registration (test_adapters_matrix's spy)
    AttentionInterface.register(hf_common.KERNEL_NAME, spy)
    try:
        with torch.no_grad():
            out = model.generate(input_features=x, num_beams=2, max_new_tokens=3, do_sample=False)
    finally:
        AttentionInterface.register(hf_common.KERNEL_NAME, real)
        tokenprune.remove(model)
    assert out.shape[0] == x.shape[0] and seen
    assert all(s is not None and s[0] == s[1] and s[2] == s[3] for s in seen), seen[:4]
    assert any(s[1] == 2 * x.shape[0] for s in seen)  # the beams' batch, with its own bias rows


# -- saving a patched model ---------------------------------------------------------------------------------
def _families():
    from test_adapters_matrix import make_hf_clip, make_open_clip, make_whisper

    def timm_():
        return tiny_vit(), torch.randn(2, 3, 32, 32), lambda m, x: m(x)

    def clip_():
        f = make_hf_clip()
        return f["model"], f["x"], lambda m, x: m(pixel_values=x).pooler_output

    def whisper_():
        f = make_whisper()
        return f["model"], f["x"], lambda m, x: m.model.encoder(x).last_hidden_state

    def open_clip_():  # its adapter class has its own __new__ (a timm trunk gets the timm adapter)
        f = make_open_clip()
        return f["model"], f["x"], lambda m, x: m.encode_image(x)

    return {"timm": timm_, "hf_clip": clip_, "whisper": whisper_, "open_clip": open_clip_}


@pytest.mark.parametrize("family", ["timm", "hf_clip", "whisper", "open_clip"])
def test_patched_model_pickles_and_stays_patched(family):
    """pickle (so torch.save and copy.deepcopy) keeps the patch: a patched open_clip model failed with
    "OpenClipViTAdapter.__new__() missing 1 required positional argument"."""
    import pickle

    model, x, run = _families()[family]()
    tokenprune.apply(model, budget=0.25, method="merge")
    with torch.no_grad():
        want = run(model, x)
        copy_ = pickle.loads(pickle.dumps(model))
        assert tokenprune.plan(copy_).method == "merge"
        torch.testing.assert_close(run(copy_, x), want, rtol=0, atol=0)
        tokenprune.remove(copy_)
        tokenprune.remove(model)
        torch.testing.assert_close(run(copy_, x), run(model, x), rtol=0, atol=0)


@pytest.mark.slow
def test_patched_hf_model_loads_in_a_fresh_process(tmp_path):
    """torch.save / torch.load of a patched HF model: a new process must get the attention function back
    (tolerance: the other process may sum with another number of CPU threads)."""
    import subprocess
    import sys
    from pathlib import Path

    model, x, run = _families()["hf_clip"]()
    tokenprune.apply(model, budget=0.25, method="cls")
    with torch.no_grad():
        want = run(model, x)
    torch.save({"model": model, "x": x, "want": want}, tmp_path / "m.pt")
    code = ("import torch; d = torch.load(r'%s', weights_only=False); m = d['model']\n"
            "with torch.no_grad(): out = m(pixel_values=d['x']).pooler_output\n"
            "import tokenprune; assert tokenprune.plan(m).method == 'cls'\n"
            "torch.testing.assert_close(out, d['want'], rtol=1e-5, atol=1e-5)\nprint('ok')" % (tmp_path / "m.pt"))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apet_under_autocast(dtype):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="apet", k=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_plan_with_a_bad_token_count_is_a_clear_error(n):
    model = tiny_vit()
    with pytest.raises(ValueError, match="num_tokens must be a positive"):
        tokenprune.plan(model, budget=0.5, method="merge", num_tokens=n)


def test_hf_attention_mask_tensor_is_a_clear_error():
    """A tensor attention_mask (not just True) gets the clear refusal, not 'Boolean value of Tensor is ambiguous'."""
    from test_adapters_matrix import make_ast

    fam = make_ast()
    model, x = fam["model"], fam["x"]
    tokenprune.apply(model, budget=0.5, method="merge")
    with pytest.raises(ValueError, match="attention_mask cannot be combined with token reduction"):
        model(input_values=x, attention_mask=torch.ones(x.shape[0], x.shape[1]))


# -- schedule= and budget -----------------------------------------------------------------------------------
def test_schedule_that_contradicts_the_budget_is_an_error():
    """budget 0.1 of 64 tokens keeps 6; a schedule ending at 60 used to win silently while the plan said 0.1."""
    model = tiny_vit()
    for call in (tokenprune.apply, tokenprune.plan):
        with pytest.raises(ValueError, match=r"ends at 60 non-prefix tokens but budget=0.1 keeps 6 of"):
            call(model, budget=0.1, method="merge", schedule={0: 60})
    assert not tokenprune.is_applied(model)


def test_schedule_without_a_budget_sets_it_and_the_plan_says_so():
    model = tiny_vit()
    tokenprune.apply(model, method="merge", schedule={0: 60, 2: 30})
    p = tokenprune.plan(model)
    assert p.num_out == 30 and p.budget == 30 / 64 and p.tokens_per_block() == [64, 60, 60, 30]
    with torch.no_grad():
        tokens, _ = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + 30
    # a consistent budget and schedule are accepted as before
    assert tokenprune.plan(model, budget=30 / 64, method="cls", schedule={1: 40, 2: 30}).num_out == 30


@pytest.mark.parametrize("schedule,match", [
    ({0: 6.7}, r"keep counts must be whole numbers \(int\), got 6.7 \(float\)"),
    ({0: 60.0}, r"keep counts must be whole numbers \(int\), got 60.0 \(float\)"),
    ({0: "60"}, r"keep counts must be whole numbers \(int\), got '60' \(str\)"),
    ({"0": 60}, r"blocks must be whole numbers \(int\), got '0' \(str\)"),
    ({0: True}, r"got True \(bool\)"),
    ([(0, 60)], r"schedule must be a dict \{block: keep\}"),
])
def test_schedule_of_floats_or_strings_is_refused(schedule, match):
    model = tiny_vit()
    with pytest.raises(TypeError, match=match):
        tokenprune.apply(model, method="merge", schedule=schedule)
    with pytest.raises(TypeError, match=match):
        tokenprune.plan(model, budget=0.25, method="merge", schedule=schedule)
    assert not tokenprune.is_applied(model)


@pytest.mark.parametrize("schedule", [{1: 40, 2: 0}, {1: -3}])
def test_schedule_keep_count_below_one_names_the_schedule_not_a_budget(schedule):
    """Without a budget the schedule's last count sets it: a 0 there was reported as 'budget ... got 0'."""
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"schedule keep counts must be at least 1 .* after block [12] in schedule="):
        tokenprune.apply(model, method="cls", schedule=schedule)
    assert not tokenprune.is_applied(model)


def test_budget_given_with_a_recipe_replaces_its_schedule(tmp_path):
    """`apply(model, recipe=..., budget=b)`: explicit arguments win, so the recipe's schedule (made for its own
    budget) no longer decides the count; with the recipe's budget the schedule holds."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmethod: merge\nbudget: 0.5\nschedule: {0: 48, 1: 32}\noptions: {prop_attn: false}\n")
    model = tiny_vit()
    tokenprune.apply(model, recipe=str(recipe))
    assert tokenprune.plan(model).tokens_per_block() == [64, 48, 32, 32]
    tokenprune.apply(model, recipe=str(recipe), budget=0.25)
    p = tokenprune.plan(model)
    assert p.num_out == 16 and p.budget == 0.25


def test_schedule_given_with_a_recipe_sets_the_budget(tmp_path):
    """`apply(model, recipe=..., schedule=s)` without a budget: the explicit schedule wins and sets the budget (its
    last count / N), as it does without a recipe; the recipe's budget, made for its own schedule, used to be kept
    and the schedule refused with "leave budget out" (which the user had done)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmethod: merge\nbudget: 0.5\nschedule: {0: 48, 1: 32}\noptions: {prop_attn: false}\n")
    model = tiny_vit()
    tokenprune.apply(model, recipe=str(recipe), schedule={1: 40, 2: 20})
    p = tokenprune.plan(model)
    assert p.tokens_per_block() == [64, 64, 40, 20] and p.num_out == 20 and p.budget == 20 / 64
    assert tokenprune.get_patch(model).reducer.prop_attn is False  # the recipe's options still hold
    with torch.no_grad():
        tokens, _ = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + 20


def test_plan_takes_a_recipe_as_apply_does(tmp_path):
    """`tokenprune.plan(model, recipe=...)` plans what `apply(model, recipe=...)` installs, explicit arguments over
    the recipe's (it was refused: "method 'merge' has no option(s) recipe"); an unpatched model stays unpatched."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmethod: merge\nbudget: 0.5\nschedule: {0: 48, 1: 32}\noptions: {prop_attn: false}\n")
    model = tiny_vit()
    planned = tokenprune.plan(model, recipe=str(recipe))
    planned_b = tokenprune.plan(model, recipe=str(recipe), budget=0.25)
    assert not tokenprune.is_applied(model)
    tokenprune.apply(model, recipe=str(recipe))
    assert tokenprune.plan(model).tokens_per_block() == planned.tokens_per_block() == [64, 48, 32, 32]
    tokenprune.apply(model, recipe=str(recipe), budget=0.25)
    assert tokenprune.plan(model).tokens_per_block() == planned_b.tokens_per_block() and planned_b.num_out == 16
    with pytest.raises(ValueError, match="from recipe 'tome-vit-b'"):
        tokenprune.plan(model, recipe="tome-vit-b")  # made for 12 blocks: the error names the recipe
    tokenprune.remove(model)


@pytest.mark.parametrize("recipe, message", [("tome-vit-b", "schedule block 4 is outside"),
                                             ("merge-3-stages", r"layers \[5, 8\] are outside")])
def test_recipe_that_does_not_fit_the_model_says_which_recipe(recipe, message):
    """A shipped recipe made for a 12-block ViT-B on a 4-block model: the error names the recipe and the model it
    was made for, not only a schedule or layers the user never wrote."""
    model = tiny_vit()
    with pytest.raises(ValueError, match=message + f".*recipe '{recipe}'.*made for vit_base_patch16_224"):
        tokenprune.apply(model, recipe=recipe)
    assert not tokenprune.is_applied(model)


@pytest.mark.parametrize("family", ["hf_clip", "whisper"])
def test_patched_hf_model_can_be_planned_and_applied_again(family):
    """A patched HF model's attention config names tokenprune's kernel: plan(budget=...) and a second apply
    used to fail with 'uses attn_implementation=tokenprune_sdpa ... needs sdpa'."""
    model, x, run = _families()[family]()
    with torch.no_grad():
        want = run(model, x)
        tokenprune.apply(model, budget=0.5, method="merge")
        assert tokenprune.plan(model, budget=0.25, method="cls").method == "cls"
        tokenprune.apply(model, budget=0.25, method="cls")
        assert tokenprune.plan(model).method == "cls"
        alone = run(tokenprune.apply(_families()[family]()[0], budget=0.25, method="cls"), x)
        torch.testing.assert_close(run(model, x), alone, rtol=0, atol=0)
        tokenprune.remove(model)
        torch.testing.assert_close(run(model, x), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", [["merge", "cls"], ["merge", "random"]])
def test_pruning_after_merging_is_not_padded(method):
    """Merged sizes are not padding: a pruning step after a merge used to mark the batch padded (every later
    step then took the masked path, and SDPA a mask), though every sample keeps the same count."""
    model = tiny_vit()
    tokenprune.apply(model, budget=0.5, method=method)
    with torch.no_grad():
        tokens, state = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + 32 and not state.padded and bool((state.sizes > 0).all())


def test_apet_budget_one_on_an_input_of_fewer_tokens_than_its_basis():
    """A ViT taking any image size (dynamic_img_size): apet with its default basis (k=10) at budget 1.0 reduces
    nothing on a 1-patch or a 4-patch image (the unpatched output), and keeps working on the default size."""
    model = tiny_vit(patch_size=8, dynamic_img_size=True)  # 32 x 32: 16 patches
    with torch.no_grad():
        xs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)]
        want = [model(x) for x in xs]
        tokenprune.apply(model, budget=1.0, method="apet")
        for x, w in zip(xs, want):
            torch.testing.assert_close(model(x), w, rtol=1e-5, atol=1e-5)


def test_blocks_removed_after_apply_is_a_clear_error():
    """timm's ``prune_intermediate_layers`` (or popping layers off an HF encoder, as done for penultimate-layer
    features) after ``apply`` changes the depth the plan was made for: the forward, ``features`` and ``plan`` say so
    and how to fix it (it was ``zip() argument 2 is longer than argument 1`` after running the blocks; a SigLIP2
    batch mixing shapes silently skipped the missing blocks' stages). Applying again plans the model as it is now."""
    from test_adapters_matrix import make_hf_clip
    from test_siglip2 import _mixed, make_tower

    x = torch.randn(2, 3, 32, 32)
    timm_model = tiny_vit(depth=6)
    clip = make_hf_clip()
    siglip2 = make_tower()
    cases = [(timm_model, lambda m: m.prune_intermediate_layers(indices=[1]), lambda m: m(x), lambda m: (x,)),
             (clip["model"], lambda m: getattr(m, "vision_model", m).encoder.layers.__delitem__(-1),
              lambda m: m(pixel_values=clip["x"]), lambda m: (clip["x"],)),
             (siglip2, lambda m: getattr(m, "vision_model", m).encoder.layers.__delitem__(-1), lambda m: m(*_mixed()),
              lambda m: _mixed())]
    for model, cut, run, args in cases:
        tokenprune.apply(model, budget=0.25, method="merge")
        cut(model)
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="blocks.*apply.*again"):
                run(model)
            with pytest.raises(RuntimeError, match="blocks.*apply.*again"):
                tokenprune.features(model, *args(model))
        with pytest.raises(RuntimeError, match="blocks.*apply.*again"):
            tokenprune.plan(model)
        tokenprune.apply(model, budget=0.25, method="merge")  # planned on the model as it is now
        with torch.no_grad():
            run(model)
        tokenprune.remove(model)


@pytest.mark.parametrize("where", ["block", "attn.qkv", "mlp.fc1", "norm1", "pre"])
def test_hooks_the_written_out_blocks_would_skip_are_a_clear_error(where):
    """timm / open_clip blocks run written out (no nn.Module.__call__), so a hook on a block or its submodules would
    silently never run: the forward refuses it, and runs again once the hook is removed. Hooks outside the blocks
    still run."""
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    ref = model(x)  # a clean scan first: the next registration must trigger a new one
    calls = []
    mod = model.blocks[1] if where in ("block", "pre") else model.blocks[1].get_submodule(where)
    if where == "pre":
        h = mod.register_forward_pre_hook(lambda *a: calls.append(1))
    else:
        h = mod.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(RuntimeError, match="hook is registered on block 1"):
        model(x)
    h.remove()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    outside = model.patch_embed.register_forward_hook(lambda *a: calls.append(2))
    model(x)
    outside.remove()
    assert calls == [2]
    tokenprune.remove(model)
    h = model.blocks[1].register_forward_hook(lambda *a: calls.append(3))
    model(x)  # the unpatched model runs its hooks as always
    assert calls == [2, 3]


def test_hooks_on_written_out_blocks_are_refused_when_compiled_too():
    """Compiling a patched timm model traced its written-out blocks without a word about a hook set on them (the
    scan was skipped while tracing): the scan now runs once at trace time, and compiling refuses the hook as eager
    calls do (fullgraph=True: Dynamo's error carries the message). Without hooks the graph stays whole."""
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    try:
        h = model.blocks[2].register_forward_hook(lambda *a: None)
        for fullgraph in (False, True):
            torch._dynamo.reset()
            with torch.no_grad(), pytest.raises(Exception, match="hook is registered on block 2"):
                torch.compile(model, backend="eager", fullgraph=fullgraph)(x)
        h.remove()
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
    finally:
        torch._dynamo.reset()
        tokenprune.remove(model)


def test_a_copied_patched_model_compiles_and_refuses_hooks_on_its_own_blocks():
    """The trace-time scan finds a patch through an int token (torch 2.11's Dynamo passes only constants to it; the
    patch itself failed with "UserDefinedObjectVariable(Patch) is not a constant"). A deep copy (as pickling) gets a
    token of its own: it compiles, and a hook on the copy's block is refused, one on the original's block is not."""
    import copy

    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    twin = copy.deepcopy(model)
    assert twin._tokenprune_patch.scan_token != model._tokenprune_patch.scan_token
    try:
        h = model.blocks[1].register_forward_hook(lambda *a: None)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(twin, backend="eager", fullgraph=True)(x)
            torch.testing.assert_close(compiled, twin(x), rtol=1e-5, atol=1e-5)
        h.remove()
        h = twin.blocks[3].register_forward_hook(lambda *a: None)
        torch._dynamo.reset()
        with torch.no_grad(), pytest.raises(Exception, match="hook is registered on block 3"):
            torch.compile(twin, backend="eager", fullgraph=True)(x)
        h.remove()
    finally:
        torch._dynamo.reset()


def test_hooks_on_a_patched_model_loaded_in_another_process_are_refused(monkeypatch):
    """The hook scan is cached on the count of hook handles torch has made in this process
    (``RemovableHandle.next_id``). A patched model saved after a clean forward, with a hook set on a block since,
    carried that count with it; loaded in a fresh process whose own count happened to equal it (0 for a script that
    registers no hook before its forward), the forward skipped the scan and ran without the hook, without a word.
    The fresh process's count is set here; a real one: torch.save in one script, torch.load and call in another."""
    import pickle

    from torch.utils.hooks import RemovableHandle

    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    with torch.no_grad():
        model(x)  # a clean scan
    stamp = tokenprune.get_patch(model).hooks_clean_at
    model.blocks[1].register_forward_pre_hook(print)  # picklable
    data = pickle.dumps(model)
    monkeypatch.setattr(RemovableHandle, "next_id", stamp)  # the other process's count of hook handles
    loaded = pickle.loads(data)
    with torch.no_grad(), pytest.raises(RuntimeError, match="hook is registered on block 1"):
        loaded(x)


def test_global_backward_hooks_are_refused_as_global_forward_hooks_are():
    """torch's global module backward hooks (register_module_full_backward_hook / _pre_hook) run for every module
    called through nn.Module.__call__; the written-out blocks skip them (a quarter of the calls on this model), so
    they are refused like the global forward hooks, instead of silently firing for the other modules only."""
    from torch.nn.modules.module import register_module_full_backward_hook, register_module_full_backward_pre_hook

    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    try:
        ref = model(x)
        for register in (register_module_full_backward_hook, register_module_full_backward_pre_hook):
            h = register(lambda *a: None)
            try:
                with pytest.raises(RuntimeError, match="global module .*hooks"):
                    model(x)
            finally:
                h.remove()
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    finally:
        tokenprune.remove(model)


def test_hooks_on_the_module_holding_the_written_out_blocks_are_refused():
    """timm's ``model.blocks`` (``self.blocks(x)``) and open_clip's ``visual.transformer`` are called by the unpatched
    forward, so a hook there (a common way to read the last block's tokens) runs; the patched forward loops over the
    blocks itself and the hook silently did not run. Refused like hooks on the blocks."""
    from test_adapters_matrix import make_open_clip

    oc = make_open_clip()
    cases = [(tiny_vit(), torch.randn(1, 3, 32, 32), lambda m: m.blocks, lambda m, x: m(x)),
             (oc["model"], oc["x"], lambda m: m.visual.transformer, lambda m, x: m.encode_image(x))]
    for model, x, holder, run in cases:
        calls = []
        h = holder(model).register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            run(model, x)
        assert calls == [1]  # the unpatched model runs it
        tokenprune.apply(model, budget=0.5, method="merge")
        try:
            with torch.no_grad(), pytest.raises(RuntimeError, match="hook is registered on the module holding"):
                run(model, x)
            h.remove()
            with torch.no_grad():
                run(model, x)
        finally:
            tokenprune.remove(model)


def test_blocks_compiled_in_place_are_refused_on_written_out_blocks():
    """Regional compilation (``block.compile()`` on each block) of a patched timm model silently ran the blocks
    uncompiled (they run written out, without nn.Module.__call__): a clear error names the block and what to do;
    compiling the whole patched model works."""
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokenprune.apply(model, budget=0.5, method="merge")
    try:
        with torch.no_grad():
            ref = model(x)
            model.blocks[1].compile(backend="eager")
            with pytest.raises(RuntimeError, match="block 1 was compiled in place"):
                model(x)
            model.blocks[1]._compiled_call_impl = None  # (nn.Module keeps no public way to undo compile())
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(model, backend="eager")(x), ref, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
        tokenprune.remove(model)


def test_torch_flop_counter_runs_on_a_patched_model():
    """torch.utils.flop_counter.FlopCounterMode tracks modules with global module hooks (ModuleTracker); those only
    attribute work to modules, so a patched model (written-out blocks) runs under it instead of refusing it as a
    user's global hook, and counts fewer FLOPs than unpatched, near the plan's ratio. A user's global hook is still
    refused."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    full = counter.get_total_flops()
    tokenprune.apply(model, budget=0.5, method="cls")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        ratio = counter.get_total_flops() / full
        assert abs(ratio - tokenprune.plan(model).flop_ratio) < 0.05, ratio
        h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            with torch.no_grad(), pytest.raises(RuntimeError, match="global module hooks"):
                model(x)
        finally:
            h.remove()
    finally:
        tokenprune.remove(model)
