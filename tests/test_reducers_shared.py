"""What the reducers share (schedules, the layering of the package) and errors at apply() time."""
import math
import re
from pathlib import Path

import pytest

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
