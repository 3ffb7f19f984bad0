import gc
import importlib.util
import os
import threading
from pathlib import Path

import pytest

WORKERS = 2  # pytest-xdist worker processes: CI's machine has two cores
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1" in a worker, None elsewhere


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite in WORKERS pytest-xdist processes unless told otherwise (on a machine without an NVIDIA GPU).

    Set here rather than as ``-n 2`` in ``addopts`` so that ``python3 -m pytest -q tests -p no:xdist`` (or a
    checkout without pytest-xdist) still runs, in one process; ``-n 0`` does the same, ``-n N`` picks N workers.
    Only the initial conftest gets this hook, which is the case for ``pytest tests`` and ``pytest tests/test_x.py``."""
    opt = config.option
    gpu = os.path.exists("/dev/nvidiactl")  # the GPU tests stay in one process (torch is not imported here)
    if (config.pluginmanager.hasplugin("xdist") and getattr(opt, "numprocesses", 0) is None and not opt.tx
            and not opt.usepdb and not opt.collectonly and not gpu and XDIST_WORKER is None):
        opt.numprocesses = WORKERS
    if getattr(opt, "numprocesses", None) and XDIST_WORKER is None:
        if opt.dist == "no":  # also for an explicit -n N
            opt.dist = "loadgroup"  # tests marked xdist_group share a worker (the browser tests share one page)
        # the workers and the processes the tests start inherit this: one OpenMP/BLAS thread per process, so
        # that the workers do not fight over the cores (a test that wants more threads sets them itself)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if getattr(config, "workerinput", {}).get("tokenprune_loadgroup"):
        # a worker parses the original command line again, where the lines above did not run: tell it here, so
        # that it names its tests by group as xdist's loadgroup scheduler expects
        opt.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, on the controller, before starting a worker: pass on the distribution mode chosen above."""
    node.workerinput["tokenprune_loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_configure(config):
    """Set up torch in each process that runs tests. The xdist controller runs none: it skips this and never
    imports torch (seconds sooner to start the workers)."""
    if getattr(config.option, "numprocesses", None) and XDIST_WORKER is None:
        return
    # Dynamo's tracing and Triton's interpreter allocate millions of short-lived containers: with Python's default
    # thresholds (700, 10, 10) the cyclic collector takes about 8% of the suite's CPU, half of that with these
    gc.set_threshold(20_000, 50, 50)
    import torch

    if not torch.cuda.is_available():
        # Triton reads this when a kernel is decorated: every test module then gets the interpreted kernels,
        # whichever of them imports tokenprune.kernels first (CPU tensors never reach a kernel otherwise)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # Inductor (read when torch._inductor is first imported, which `import torch` does not do) compiles in
        # this process instead of starting a pool of compile workers that each import torch again: same
        # generated code, seconds less CPU for the CPU test that compiles with it
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # an xdist worker uses one intra-op thread, so that the two workers fill two cores; one process on its own
    # (``-n 0`` or ``-p no:xdist``) uses up to two
    torch.set_num_threads(1 if XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))
    if importlib.util.find_spec("triton") is not None:
        share_language_patch()
        memoize_numpy_dtypes()
        skip_dead_overflow_checks()


def share_language_patch():
    """Triton's interpreter, in a kernel launch, patches ``triton.language`` once for the kernel and again, and never
    undoes it, at EVERY call of a jitted helper (``tl.sum``, ``tl.max``, our own ``@triton.jit`` functions): each
    time it walks all the module's members (``inspect.getmembers``), a quarter of the interpreted kernels' CPU time.
    The second patch finds what the first one set (a helper that needs another language module, ``tl.core``, still
    gets it, once per launch). Here a helper call inside a launch skips the patch when the launch's patch covers its
    language modules: the same functions run, the kernels compute the same. Other interpreters: left as they are."""
    from triton.runtime import interpreter as ti

    patch = getattr(ti, "_patch_lang", None)
    if patch is None or getattr(patch, "shared", False) or not hasattr(ti, "GridExecutor"):
        return
    done = threading.local()  # the language modules patched in the launch running in this thread (None: none)
    langs = {}  # function -> the ids of the triton.language modules its globals use (as _patch_lang picks them)

    class Kept:
        def restore(self):
            pass

    def uses(fn):
        if fn not in langs:
            langs[fn] = {id(v) for v in fn.__globals__.values() if isinstance(v, type(ti)) and v in (ti.tl, ti.tl.core)}
        return langs[fn]

    def shared(fn):
        patched = getattr(done, "langs", None)
        if patched is not None:  # a helper called inside a launch
            if uses(fn) <= patched:
                return Kept()
            patched |= uses(fn)
            return patch(fn)
        scope = patch(fn)  # a launch: GridExecutor restores this scope when its programs have run
        restore = getattr(scope, "restore", None)
        if restore is None:
            return scope
        done.langs = set(uses(fn))

        def finish():
            done.langs = None
            restore()
        scope.restore = finish
        return scope

    shared.shared = True
    ti._patch_lang = shared


def memoize_numpy_dtypes():
    """Triton's interpreter maps a Triton dtype to a numpy one (``_get_np_dtype``) for nearly every operation, each
    time building its table of 19 numpy dtypes: a tenth of the interpreted kernels' CPU time. The answer depends only
    on the scalar dtype (a block's is its element's: a pointer's is the same for all), so it is computed once per
    scalar dtype (its class and name) by the interpreter's own function."""
    from triton.runtime import interpreter as ti

    get = getattr(ti, "_get_np_dtype", None)
    if get is None or getattr(get, "memo", None) is not None:
        return
    memo = {}

    def np_dtype(tt):
        if isinstance(tt, ti.tl.block_type):
            tt = tt.element_ty
        name = getattr(tt, "name", None)
        if isinstance(tt, ti.tl.pointer_type) or not isinstance(name, str):
            return get(tt)
        key = (type(tt), name)
        if key not in memo:
            memo[key] = get(tt)
        return memo[key]

    np_dtype.memo = memo
    ti._get_np_dtype = np_dtype


def skip_dead_overflow_checks():
    """Triton's interpreter options have ``sanitize_overflow`` on and ``debug`` off: for every integer ``+``, ``-``
    and ``*`` a kernel runs, the interpreter redoes the operation in int64, compares it with the type's bounds and
    hands the result to ``device_assert``, which returns at once without ``debug`` (the check's result is never
    read): a fifth of the interpreted kernels' CPU. With ``debug`` off the check is skipped: the kernels compute the
    same, and no assertion that could fire is lost. With ``debug`` on (the assertions live), nothing changes."""
    import dataclasses

    from triton.runtime import interpreter as ti

    builder = getattr(ti, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if (dataclasses.is_dataclass(options) and getattr(options, "sanitize_overflow", False)
            and getattr(options, "debug", True) is False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


ASSETS = Path(os.environ.get("TOKENPRUNE_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (seconds each: real weights, fresh Python processes) run first, the rest in file order:
    the two xdist workers then both end on short tests, within a fraction of a second of each other."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each part


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """After the last test: one collection (pytest would run five at exit, each walking every object the imports
    made), then freeze what is left, so that the exit of a test process takes under a second instead of four."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models: fastest, and fair on a shared machine); restored after.
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets():
    if not ASSETS.exists():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def real_vit_s14(assets):
    """The shipped ViT-S/14 CIFAR-10 classifier (timm layout, ``load_timm(None, folder)``), 4 CIFAR-10 test images
    at 224 px, their labels and the model's unreduced logits on them (one thread), loaded once per process for the
    tests of the real weights (test_core.py, test_real_weights_hf.py: xdist group ``real-vit-s14``, one worker).
    Read-only: a test that patches the model works on a copy or removes its patch (``tokenprune.applied``)."""
    import types

    import torch

    from tokenprune.data import load_image_folder, to_tensor
    from tokenprune.models import load_timm

    folder, data = assets / "vit-s14-cifar10", assets / "cifar10" / "cifar10_jpeg_test.tar.gz"
    if not (folder / "model.safetensors").exists() or not data.exists():
        pytest.skip("vit-s14-cifar10 weights or CIFAR-10 test images not in the shared assets")
    model = load_timm(None, folder).float().eval()
    images, labels, _ = load_image_folder(data, limit=4)  # ~0.15 s per image and forward on one core
    x = to_tensor(images, 224)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(model=model, x=x, labels=torch.tensor(labels), ref=ref)


def tiny_vit(**kw):
    """A small timm ViT for fast CPU tests (random weights, fixed seed)."""
    import timm
    import torch

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()


def compile_cases(request, builders):
    """Dynamo's fullgraph cases of one test module, traced together. ``builders``: test function name ->
    ``build(**its parametrize arguments) -> (fn, x)``. Each test of this module named there and selected in this
    session is one case; returns ``{nodeid: (fn(x) eager, fn(x) compiled)}``, or the exception its case raised.

    The cases are compiled with ``fullgraph=True`` (Dynamo's "eager" backend: tracing is where graph breaks come
    from) as ONE function that calls each: every case is still traced whole and any graph break raises, for about
    30% less tracing time than one compile per case. If that trace fails, each case is compiled alone, so that the
    test whose case breaks fails with its own error. The tests carry ``pytest.mark.xdist_group``: one worker builds
    and traces a module's cases, once (the fixture that calls this is module-scoped)."""
    import torch

    cases, results = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' one_thread fixture (this module-scoped fixture runs before it)
    for item in request.session.items:
        if item.module is request.module and item.originalname in builders:
            try:
                fn, x = builders[item.originalname](**item.callspec.params)
                with torch.no_grad():
                    cases[item.nodeid] = (fn, x, fn(x))
            except Exception as e:  # noqa: BLE001 - raised by the test of this case
                results[item.nodeid] = e
    names = list(cases)

    def every(*xs):
        return [cases[name][0](x) for name, x in zip(names, xs)]

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            outs = torch.compile(every, fullgraph=True, backend="eager")(*[cases[name][1] for name in names])
        results.update({name: (cases[name][2], out) for name, out in zip(names, outs)})
    except Exception:  # noqa: BLE001 - find the case(s) that break
        for name in names:
            fn, x, ref = cases[name]
            torch._dynamo.reset()
            try:
                with torch.no_grad():
                    results[name] = (ref, torch.compile(fn, fullgraph=True, backend="eager")(x))
            except Exception as e:  # noqa: BLE001 - raised by the test of this case
                results[name] = e
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    return results


def compiled_equals_eager(results, request, rtol=1e-5, atol=1e-5):
    """The check of one test of ``compile_cases``: its case compiled whole and gave the eager output."""
    import torch

    got = results[request.node.nodeid]
    if isinstance(got, Exception):
        raise got
    ref, out = got
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


def cache_of(out):
    """The KV cache an HF output carries: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.17)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def cache_kw(out) -> dict:
    """The keyword that passes ``out``'s cache back to a model or ``generate`` under the same transformers."""
    return {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}


class SDPASpy:
    """Counts calls of ``F.scaled_dot_product_attention``; the ``eager_attention_forward`` of each module named in
    ``eager_modules`` (None, one name or several) raises if it is ever entered (the fused path must stay fused)."""

    def __init__(self, monkeypatch, eager_modules=None):
        import torch

        self.calls = 0
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        def boom(*a, **k):
            raise AssertionError("eager attention was called")

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        names = [eager_modules] if isinstance(eager_modules, str) else list(eager_modules or ())
        for name in names:
            monkeypatch.setattr(importlib.import_module(name), "eager_attention_forward", boom)
