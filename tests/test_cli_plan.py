"""`tokenprune plan` takes the same model arguments as eval/bench (local folders, timm names with
--model-args) and plans for the input that will run (--input-size)."""
import json

import pytest
import torch

import tokenprune
from tokenprune.cli import main

from conftest import tiny_vit
from test_cli import TINY_ARGS, tiny  # noqa: F401  (tiny: fixture)


def _plan_json(capsys, *argv):
    assert main(["plan", "--json", *argv]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


def test_plan_of_a_local_folder_matches_the_model_it_holds(tiny, capsys):  # noqa: F811
    out, err = _plan_json(capsys, "--model", str(tiny["ckpt"]), "--method", "cls", "--budget", "0.25")
    want = tokenprune.plan(tiny_vit(num_classes=3), budget=0.25, method="cls").to_dict()
    assert out["tokens_per_block"] == want["tokens_per_block"] and out["num_in"] == want["num_in"]
    assert out["flop_ratio"] == pytest.approx(want["flop_ratio"])
    assert out["input_size"] == TINY_ARGS["img_size"]
    assert "loading tiny-vit" in err


@pytest.mark.parametrize("size", [64, 16])
def test_input_size_in_pixels_plans_that_image(tiny, capsys, size):  # noqa: F811
    out, err = _plan_json(capsys, "--model", str(tiny["ckpt"]), "--input-size", str(size), "--budget", "0.5")
    want = tokenprune.plan(tiny_vit(num_classes=3, img_size=size), budget=0.5, method="merge").to_dict()
    assert out["num_in"] == (size // TINY_ARGS["patch_size"]) ** 2 == want["num_in"]
    assert out["tokens_per_block"] == want["tokens_per_block"]
    assert out["flop_ratio"] == pytest.approx(want["flop_ratio"])
    assert out["input_size"] == size and f"{size}x{size} px" in out["input"]


@pytest.mark.parametrize("size", [64, 16])
def test_input_size_in_pixels_plans_that_grid(tiny, capsys, size):  # noqa: F811
    """pool needs the input's patch grid: --input-size plans on its grid, as a forward on that image runs; it used to
    pass the token count only and pool was refused ("cannot arrange in a grid") for any size but the model's."""
    out, _ = _plan_json(capsys, "--model", str(tiny["ckpt"]), "--input-size", str(size), "--method", "pool",
                        "--budget", "0.3")
    model = tiny_vit(num_classes=3, img_size=size)
    want = tokenprune.plan(model, budget=0.3, method="pool").to_dict()
    assert out["num_in"] == want["num_in"] and out["tokens_per_block"] == want["tokens_per_block"]
    assert out["num_out"] == want["num_out"]
    tokenprune.apply(model, budget=0.3, method="pool")
    with torch.no_grad():
        tokens, _ = tokenprune.features(model, torch.randn(1, 3, size, size))
    assert tokens.shape[1] == 1 + out["num_out"]


def test_dinov2_planned_at_the_quickstart_size(capsys):
    import timm  # not at module level: importing timm imports triton, which must happen after
    # test_kernels sets TRITON_INTERPRET at its collection

    out, _ = _plan_json(capsys, "--model", "vit_small_patch14_dinov2", "--input-size", "224")
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", img_size=224)
    want = tokenprune.plan(model, budget=0.25, method="merge").to_dict()
    assert out["num_in"] == 256 == want["num_in"] and out["tokens_per_block"] == want["tokens_per_block"]
    default, _ = _plan_json(capsys, "--model", "vit_small_patch14_dinov2")
    assert default["num_in"] == 37 * 37 and "518x518 px" in default["input"]  # timm's own size, and it says so


def test_model_args_are_taken_as_in_eval(capsys):
    out, _ = _plan_json(capsys, "--model", "vit_small_patch16_224", "--model-args", json.dumps(TINY_ARGS))
    want = tokenprune.plan(tiny_vit(), budget=0.25, method="merge").to_dict()
    assert out["tokens_per_block"] == want["tokens_per_block"]


def test_recipe_and_composition_planned_as_the_api_plans_them(tiny, capsys, tmp_path):  # noqa: F811
    """--recipe: a named recipe, and a YAML composition (method: pipeline), planned as tokenprune.plan(recipe=...)
    plans them on the model; --budget overrides the recipe's."""
    yaml = tmp_path / "cls-then-merge.yaml"
    yaml.write_text("name: cls-then-merge\nmethod: pipeline\nbudget: 0.3\n"
                    "options: {reducers: [cls, merge]}\n")
    model = tiny_vit(num_classes=3)
    for argv, recipe, budget in [(["--recipe", "default-vit", "--budget", "0.3"], "default-vit", 0.3),
                                 (["--recipe", str(yaml)], str(yaml), None)]:
        out, _ = _plan_json(capsys, "--model", str(tiny["ckpt"]), *argv)
        want = tokenprune.plan(model, budget=budget, recipe=recipe).to_dict()
        assert {k: out[k] for k in want} == want, argv
    assert {s["op"] for s in out["stages"]} == {"0.cls", "1.merge"} and out["num_out"] == round(0.3 * want["num_in"])


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "30"], "not a multiple of"),
    (["--method", "tome"], "unknown method 'tome'; did you mean 'merge'? known methods:"),
    (["--method", "mrege"], "unknown method 'mrege'; did you mean 'merge'? known methods:"),
    (["--model", "./no/such/folder"], "does not exist"),
    (["--recipe", "no-such-recipe"], "no-such-recipe"),
    (["--recipe", "merge-3-stages"], "outside the encoder's blocks 0..3 (from recipe 'merge-3-stages', made for"),
])
def test_plan_bad_arguments(tiny, capsys, argv, message):  # noqa: F811
    assert main(["plan", "--model", str(tiny["ckpt"]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokenprune plan: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)
