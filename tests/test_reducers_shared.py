"""What the reducers share (schedules, the layering of the package) and errors at apply() time."""
import math
import re
from pathlib import Path

import pytest
import torch

import tokenprune
from tokenprune import registry
from tokenprune.plan import EncoderInfo
from tokenprune.reducers.base import default_layers, ratio_schedule

from conftest import tiny_vit

PACKAGE = Path(tokenprune.__file__).resolve().parent


# -- one schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,layers", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [1, 2, 3]), (12, [3, 6, 9]),
                                          (24, [6, 12, 18])])
def test_default_layers_are_the_quarter_points(depth, layers):
    assert default_layers(depth) == layers


@pytest.mark.parametrize("method,options", [("cls", {}), ("random", {}), ("apet", {"k": 2}),
                                            ("cls", {"layers": [1, 2]}), ("random", {"layers": [-1]})])
def test_pruning_reducers_share_the_ratio_schedule(method, options):
    info = EncoderInfo(depth=12, dim=48, num_heads=3, num_prefix=1, num_tokens=196, mlp_hidden=192, grid=(14, 14))
    keep = tokenprune.keep_count(0.25, 196)
    plan = registry.make(method, **options).plan(info, 0.25)
    expected = ratio_schedule(method, info, keep, options.get("layers"), before_first=method == "random")
    assert [(s.block, s.keep) for s in plan.stages] == [(s.block, s.keep) for s in expected]
    if "layers" not in options:
        assert [s.block for s in plan.stages] == [3, 6, 9]
        ratio = (keep / 196) ** (1 / 3)  # the same keep ratio at each stage
        assert [s.keep for s in plan.stages] == [math.floor(196 * ratio + 0.5), math.floor(196 * ratio ** 2 + 0.5), keep]


def test_threshold_caps_are_the_ratio_schedule_with_a_stage_per_threshold():
    info = EncoderInfo(depth=12, dim=48, num_heads=3, num_prefix=1, num_tokens=196, mlp_hidden=192)
    cap = registry.make("threshold").plan(info, 0.25)
    cls = registry.make("cls").plan(info, 0.25)
    assert [(s.block, s.keep) for s in cap.stages] == [(s.block, s.keep) for s in cls.stages]
    uncapped = registry.make("threshold").plan(info, 1.0)  # budget 1: every stage keeps all, still one each
    assert [(s.block, s.keep) for s in uncapped.stages] == [(3, 196), (6, 196), (9, 196)]


def test_no_module_imports_helpers_from_another_reducers_file():
    """Shared helpers live in reducers/base.py; a reducer's own file is imported by nothing but the
    package __init__ (which registers it) and code that uses that reducer's own names."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"from (?:\.|\.\.reducers\.|tokenprune\.reducers\.)cls import ([^\n]+)", text):
            offenders.append(f"{path.relative_to(PACKAGE)}: {m.group(0)}")
    assert offenders == []


# -- compositions ------------------------------------------------------------------------------------
def test_pipeline_stages_name_their_owner_and_reduce_dispatches_on_it():
    info = EncoderInfo(depth=8, dim=48, num_heads=3, num_prefix=1, num_tokens=64, mlp_hidden=192, grid=(8, 8))
    pipe = registry.make(["random", "cls"])
    plan = pipe.plan(info, 0.25)
    assert {s.owner for s in plan.stages if s.block < 4} == {0} and {s.owner for s in plan.stages if s.block >= 4} == {1}
    assert "[0.random; next blocks: sdpa]" in plan.summary() and "[1.cls; next blocks: sdpa]" in plan.summary()
    seen = []
    pipe.subs[1].reduce = lambda state, stage, qk: seen.append(stage) or state
    pipe.reduce("state", tokenprune.Stage(5, 10, op="a display name only", owner=1), None)
    assert [(s.block, s.keep, s.op) for s in seen] == [(1, 10, "cls")]  # block relative to the owner's range


# -- layering: no import cycles, no imports hidden in functions to break one --------------------------
LAYERED = ["__init__.py", "api.py", "patch.py", "registry.py", "plan.py", "adapters/__init__.py", "adapters/base.py",
           "adapters/llava.py", *[f"reducers/{p.name}" for p in (PACKAGE / "reducers").glob("*.py")]]


def _tokenprune_imports(path: Path, in_functions: bool) -> list[str]:
    import ast

    out = []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside == in_functions:
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if getattr(child, "level", 0) or any(n.startswith("tokenprune") for n in names):
                    out.append(ast.unparse(child))
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return out


@pytest.mark.parametrize("name", LAYERED)
def test_no_tokenprune_import_inside_a_function(name):
    assert _tokenprune_imports(PACKAGE / name, in_functions=True) == []


def test_registry_is_a_leaf_and_reducers_never_import_api_or_adapters():
    assert _tokenprune_imports(PACKAGE / "registry.py", in_functions=False) == []
    for path in (PACKAGE / "reducers").glob("*.py"):
        for line in _tokenprune_imports(path, in_functions=False):
            assert not re.search(r"\b(api|adapters|patch)\b", line), f"{path.name}: {line}"


MAX_MODULE_LINES = 600  # the house rule (DEVELOPING.md): a module that grows past it is split by what it does


def test_no_module_above_the_line_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 50  # the walk found the package
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


@pytest.mark.slow
def test_built_in_reducers_are_registered_whatever_is_imported_first():
    import subprocess
    import sys

    code = ("import tokenprune.registry as r, tokenprune.reducers.pool as p; "
            "print(','.join(r.methods())); print(r.get('pool') is p.Pool)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split()
    assert set(out[0].split(",")) >= {"apet", "cls", "maelre", "merge", "pipeline", "pool", "random", "threshold"}
    assert out[1] == "True"



# -- bad options: an error from tokenprune.apply, the model as it was ---------------------------------
BAD_OPTIONS = [  # (method, options, error, message) on tiny_vit: 4 blocks, an 8 x 8 grid, budget 0.25
    ("random", {"seed": "x"}, TypeError, "seed='x' must be an integer or None"),
    ("random", {"layers": [9]}, ValueError, "outside the encoder's blocks"),
    ("random", {"layers": 3}, TypeError, "layers=3 must be a list of integers or None"),
    ("merge", {"layers": [0]}, ValueError, r"cannot reduce 64 tokens to 16 in 1 steps \(after blocks \[0\]\) of at most 50%"),
    ("merge", {"start": 1.5}, TypeError, "start=1.5 must be an integer"),
    ("merge", {"prop_attn": "no"}, TypeError, "prop_attn='no' must be True or False"),
    ("cls", {"variant": "max"}, ValueError, "variant must be 'single' or 'sum'"),
    ("cls", {"substitute": "x"}, ValueError, "substitute must be"),
    ("cls", {"threshold": "high"}, TypeError, "threshold='high' must be a number or None"),
    ("cls", {"threshold": float("nan")}, ValueError, "threshold=nan is NaN; give a number"),
    ("cls", {"threshold": float("inf")}, ValueError, "threshold must be a finite score"),
    ("pitome", {"margin": float("nan")}, ValueError, "margin=nan is NaN"),
    ("cls", {"layers": []}, ValueError, "must name at least one block"),
    ("apet", {"k": 0}, ValueError, r"k \(basis tokens\) must be a positive integer"),
    ("apet", {"eps": 0.0}, ValueError, "eps .* must be > 0"),
    ("pool", {"size": (3,)}, TypeError, r"size=\(3,\) must be a list of 2 integers or None"),
    ("pool", {"size": (2.5, 3)}, TypeError, "must be a list of 2 integers"),
    ("pool", {"size": (9, 3)}, ValueError, r"between \(1, 1\) and the grid"),
    ("pool", {"block": 1.5}, TypeError, "block=1.5 must be an integer"),
    ("pool", {"block": 4}, ValueError, r"outside -1\.\.3"),
    ("maelre", {"switch_at": -1}, ValueError, "switch_at must be a token count"),
    ("maelre", {"switch_at": 1.5}, TypeError, "switch_at=1.5 must be an integer or None"),
    ("maelre", {"layers": [0]}, ValueError, "cannot reduce 64 tokens"),
    ("threshold", {"init": [0.1]}, ValueError, "init has 1 thresholds for 3 stages"),
    ("threshold", {"init": ["a", 1, 2]}, TypeError, "init=.* must be a list of numbers or None"),
    ("threshold", {"tau": 0}, ValueError, "tau must be > 0"),
    ("threshold", {"tau": "x"}, TypeError, "tau='x' must be a number"),
    ("threshold", {"init": [0.1, float("nan"), 0.2]}, ValueError, r"init=\[0.1, nan, 0.2\] is NaN"),
    ("threshold", {"init": [0.1, float("inf"), 0.2]}, ValueError, "init thresholds must be finite"),
    (["merge", "pool"], {}, ValueError, r"pool must be the first reducer in a composition.*method=\['pool', 'merge'\]"),
    (["cls", ("merge", {"start": "x"})], {}, TypeError, "method 'merge': option start='x'"),
]


@pytest.mark.parametrize("method,options,error,match", BAD_OPTIONS,
                         ids=[f"{m}-{'-'.join(o) or 'order'}" for m, o, _, _ in BAD_OPTIONS])
def test_bad_option_is_an_error_at_apply_and_leaves_the_model_as_it_was(method, options, error, match):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
    with pytest.raises(error, match=match):
        tokenprune.apply(model, budget=0.25, method=method, **options)
    assert tokenprune.get_patch(model) is None
    with torch.no_grad():
        assert torch.equal(model(x), plain)

    tokenprune.apply(model, budget=0.5, method="cls")
    earlier = tokenprune.get_patch(model)
    with torch.no_grad():
        patched = model(x)
    with pytest.raises(error, match=match):
        tokenprune.apply(model, budget=0.25, method=method, **options)
    assert tokenprune.get_patch(model) is earlier
    with torch.no_grad():
        assert torch.equal(model(x), patched)


def test_pool_first_in_a_composition_runs():
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method=["pool", "merge"])
    with torch.no_grad():
        tokens, state = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + tokenprune.plan(model).num_out == 17

