"""`tokenprune eval` / `bench` end to end on a tiny model and a tiny dataset (CPU), recipes,
bad arguments, and a two-process torchrun evaluation that must match one process."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from tokenprune.cli import main
from tokenprune.recipes import list_recipes, load_recipe

from conftest import tiny_vit

TINY_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A local timm-layout checkpoint (config.json + model.safetensors) and a 3-class ImageFolder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny")
    ckpt = root / "tiny-vit"
    ckpt.mkdir()
    model = tiny_vit(num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(
        {"architecture": "vit_small_patch16_224", "num_classes": 3, "model_args": TINY_ARGS}))
    rng = np.random.default_rng(0)
    data = root / "data"
    for c in range(3):
        d = data / f"class{c}"
        d.mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[..., c] = 255 - 40 * c  # a colour cue per class
            Image.fromarray(img).save(d / f"{i}.png")
    return {"ckpt": ckpt, "data": data, "root": root, "model": model}


def _eval_args(tiny, out, *extra, methods="merge,cls", budgets="0.5,0.25"):
    return ["eval", "--model", str(tiny["ckpt"]), "--data", str(tiny["data"]), "--methods", methods,
            "--budgets", budgets, "--batch-size", "4", "--limit", "0", "--out", str(out), "--no-progress",
            "--threads", "1", *extra]


def test_eval_end_to_end_writes_json_csv_png(tiny, tmp_path):
    assert main(_eval_args(tiny, tmp_path)) == 0
    res = json.loads((tmp_path / "eval_top1.json").read_text())
    assert (tmp_path / "eval_top1.csv").exists()
    assert not list(tmp_path.glob("*.partial.*"))  # partial results (saved per configuration) are cleaned up
    png = (tmp_path / "eval_top1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = {r["config"]: r for r in res["rows"]}
    # unreduced + methods x budgets + the random and pooling baselines, always
    assert set(rows) == {"unreduced"} | {f"{m}@{b}" for m in ("merge", "cls", "random", "pool")
                                         for b in ("0.5", "0.25")}
    assert res["task"] == "top1" and res["num_samples"] == 18
    ref = rows["unreduced"]
    assert ref["flop_ratio"] == 1.0 and ref["agreement"] == 1.0
    assert ref["tokens_out"] == 64 and rows["merge@0.5"]["tokens_out"] == 32  # as bench counts them (prefix not)
    # the loaded checkpoint is the saved model: same predictions as running it directly
    x = tokenprune.data.to_tensor(tokenprune.data.load_image_folder(tiny["data"])[0], 32)
    labels = torch.tensor(tokenprune.data.load_image_folder(tiny["data"])[1])
    with torch.no_grad():
        acc = (tiny["model"](x).argmax(1) == labels).float().mean().item()
    assert ref["top1"] == pytest.approx(acc)
    for name, r in rows.items():
        if name != "unreduced":
            assert 0 < r["flop_ratio"] < 1, name
            assert 0 <= r["agreement"] <= 1
    assert rows["merge@0.25"]["flop_ratio"] < rows["merge@0.5"]["flop_ratio"]


def test_eval_knn_on_feature_extractor(tiny, tmp_path):
    args = _eval_args(tiny, tmp_path, "--num-classes", "0", "--train-data", str(tiny["data"]), "--k", "3")
    assert main(args) == 0
    res = json.loads((tmp_path / "eval_knn.json").read_text())
    assert res["task"] == "knn"
    ref = res["rows"][0]
    assert ref["config"] == "unreduced" and ref["retained"] == 1.0
    # the bank is the test set itself: each image's nearest neighbour is itself (similarity 1,
    # weight e^(1/0.07) dominates), so kNN-3 is exact
    assert ref["top1"] == 1.0
    assert (tmp_path / "eval_knn.png").exists()


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_knn_features_of_a_size_weighted_pool(global_pool):
    """kNN features (pre-logits) of a reduced timm model whose pooling weights tokens by size: the same as the
    model's own forward (num_classes=0: the pre-logits), not a refusal of forward_head without sizes."""
    from tokenprune.evaluate import LoadedModel, image_forward

    model = tiny_vit(num_classes=0, class_token=False, global_pool=global_pool)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    lm = LoadedModel(model=model, name="tiny", family="timm", img_size=(32, 32))
    tokenprune.apply(model, budget=0.5, method="merge")
    with torch.no_grad():
        feats = image_forward(lm, images, 3, "cpu", torch.float32, features=True)(0)
        x = tokenprune.data.to_tensor(images, 32)
        torch.testing.assert_close(feats, model(x))


def test_knn_predict_weighted_vote():
    from tokenprune.evaluate import knn_predict

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    pred = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1)
    assert pred.tolist() == [0, 1]


def test_bench_end_to_end_on_cpu(tmp_path):
    args = ["bench", "--model", "vit_small_patch16_224", "--model-args", json.dumps({**TINY_ARGS, "num_classes": 3}),
            "--methods", "merge,random", "--budgets", "0.5", "--batch-sizes", "1,2", "--warmup", "0",
            "--repeats", "2", "--out", str(tmp_path), "--no-progress", "--threads", "1",
            "--recipe", "default-vit"]
    assert main(args) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bench.csv").exists()
    rows = res["rows"]
    assert {(r["config"], r["batch_size"]) for r in rows} == {
        (c, b) for c in ("unreduced", "merge@0.5", "random@0.5", "recipe:default-vit@0.5") for b in (1, 2)}
    for r in rows:
        assert r["median_ms"] > 0 and r["samples_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["median_ms"])
        ref = next(u for u in rows if u["config"] == "unreduced" and u["batch_size"] == r["batch_size"])
        assert r["overhead_pct"] == pytest.approx(100 * (r["median_ms"] / (ref["median_ms"] * r["flop_ratio"]) - 1))
        if r["config"] == "unreduced":
            assert r["speedup"] == 1.0 and r["flop_bound"] == 1.0 and r["overhead_pct"] == 0.0
        else:
            assert r["flop_bound"] > 1.0 and r["speedup"] > 0
    for bs in (1, 2):  # the unreduced model timed again at the end: how far the device's speed moved
        d = res["unreduced_drift"][str(bs)]
        ref = next(u for u in rows if u["config"] == "unreduced" and u["batch_size"] == bs)
        assert d["start_ms"] == ref["median_ms"] and d["end_ms"] > 0
        assert d["drift_pct"] == pytest.approx(100 * (d["end_ms"] / d["start_ms"] - 1))
    plan = tokenprune.plan(tiny_vit(num_classes=3), budget=0.5, method="merge")
    merge = next(r for r in rows if r["config"] == "merge@0.5")
    assert merge["flop_ratio"] == pytest.approx(plan.flop_ratio) and merge["tokens_out"] == 32


def test_bench_fast_patch_embed_runs_every_configuration_on_the_gemm_stem(tmp_path, monkeypatch):
    from tokenprune import stem

    calls = []
    real = stem._ConvAsGemm.forward
    monkeypatch.setattr(stem._ConvAsGemm, "forward", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    args = ["bench", "--model", "vit_small_patch16_224", "--model-args", json.dumps({**TINY_ARGS, "num_classes": 3}),
            "--methods", "cls", "--budgets", "0.5", "--batch-sizes", "2", "--warmup", "0", "--repeats", "2",
            "--out", str(tmp_path), "--no-progress", "--threads", "1", "--fast-patch-embed"]
    assert main(args) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["patch_embed"].startswith("matrix product")
    assert {r["config"] for r in res["rows"]} == {"unreduced", "cls@0.5"}
    # unreduced and cls@0.5: repeats + the memory call each, and the drift re-timing of the unreduced model
    assert len(calls) >= 2 * 3 and set(calls) == {2}


def test_eval_plots_against_bench_speedups(tiny, tmp_path):
    bench = {"rows": [{"config": c, "batch_size": bs, "speedup": s} for c, bs, s in
                      [("unreduced", 8, 1.0), ("merge@0.5", 8, 1.5), ("random@0.5", 8, 1.3),
                       ("merge@0.5", 1, 0.9)]]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    args = _eval_args(tiny, tmp_path, "--speedups", str(tmp_path / "bench.json"), methods="merge", budgets="0.5")
    assert main(args) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "eval_top1.json").read_text())["rows"]}
    assert rows["merge@0.5"]["speedup"] == 1.5 and rows["random@0.5"]["speedup"] == 1.3  # largest batch
    assert "speedup" not in rows["pool@0.5"]
    assert (tmp_path / "eval_top1_speedup.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no_such_model_xyz"], "unknown model"),
    (["bench", "--model", "no_such_model_xyz"], "unknown model"),
    (["eval", "--methods", "merge,bogus"], "unknown method 'bogus'"),
    (["bench", "--methods", "bogus"], "unknown method 'bogus'"),
    (["eval", "--budgets", "1.5"], "budget must be in (0, 1]"),
    (["bench", "--budgets", "0"], "budget must be in (0, 1]"),
    (["eval", "--budgets", "half"], "not a float"),
    (["eval", "--data", "/no/such/dir"], "does not exist"),
    (["eval", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["bench", "--batch-sizes", "0"], "--batch-sizes"),
    (["bench", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs --device cuda"),
    # an empty list (e.g. an unset shell variable) compared only the unreduced model, with exit code 0
    (["bench", "--budgets", ""], "--budgets gives no budget"),
    (["eval", "--budgets", " , "], "--budgets gives no budget"),
    (["bench", "--methods", ""], "--methods gives no method"),
    (["eval", "--methods", ","], "--methods gives no method"),
    # a method that cannot run with its default options: every configuration used to be skipped, exit code 0
    (["bench", "--methods", "pipeline"], "method 'pipeline' cannot run with its default options"),
    (["eval", "--methods", "merge,pipeline"], "method 'pipeline' cannot run with its default options"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv, message, capsys, tiny):
    # model/data defaults point at the tiny checkpoint so only the bad argument can fail
    extra = []
    if "--model" not in argv:
        extra += ["--model", str(tiny["ckpt"])]
    if argv[0] == "eval" and "--data" not in argv:
        extra += ["--data", str(tiny["data"])]
    code = main(argv + extra + ["--out", str(tiny["root"] / "bad"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert message in err and err.startswith(f"tokenprune {argv[0]}: error:")


def test_recipes_load_and_apply(tmp_path):
    assert {"tome-vit-b", "fastervlm-90", "asvit-deit-s", "maelre-long-audio", "default-vit"} <= set(list_recipes())
    for name in list_recipes():  # every shipped recipe loads, even if its method is not registered
        r = load_recipe(name)
        assert r.method and 0 < r.budget <= 1
    tome = load_recipe("tome-vit-b")
    assert [196 - k for k in tome.schedule.values()] == [13 * (i + 1) for i in range(11)]

    model = tiny_vit()
    tokenprune.apply(model, recipe="default-vit")
    p = tokenprune.plan(model)
    assert (p.method, p.budget) == ("merge", 0.5)
    tokenprune.apply(model, recipe="default-vit", budget=0.25, method="cls")  # explicit arguments win
    p = tokenprune.plan(model)
    assert (p.method, p.budget, p.num_out) == ("cls", 0.25, 16)
    tokenprune.remove(model)

    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\nmethod: not_a_method_yet\nbudget: 0.3\noptions: {}\n")
    assert load_recipe(str(custom)).method == "not_a_method_yet"
    with pytest.raises(ValueError, match="needs method 'not_a_method_yet'.*known methods"):
        tokenprune.apply(model, recipe=str(custom))
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known recipes: .*tome-vit-b"):
        tokenprune.apply(model, recipe="nope")
    with pytest.raises(ValueError, match="recipe file '.*missing.yaml' not found .*tome-vit-b"):  # not 'unknown'
        tokenprune.apply(model, recipe=str(tmp_path / "missing.yaml"))
    assert not tokenprune.is_applied(model)


@pytest.mark.parametrize("text,message", [
    ("method: merge\nbudget: abc\n", r"budget.*number in \(0, 1\].*'abc'"),
    ("method: merge\nbudget: null\n", r"budget.*number in \(0, 1\].*None"),
    ("method: merge\nbudget: true\n", r"budget.*number in \(0, 1\].*True"),  # not float(True) == 1.0
    ("method: merge\nbudget: 2\n", r"budget must be in \(0, 1\]"),
    ("method: cls\nbudget: 0.5\nschedule: [1, 2]\n", r"schedule must be a dict"),
    ("method: cls\nbudget: 0.5\nschedule: {a: 3}\n", r"schedule blocks must be whole numbers.*'a'"),
    ("method: cls\nbudget: 0.5\nschedule: {1: 2.7}\n", r"keep counts must be whole numbers.*2\.7"),  # not int(2.7)
    ("method: merge\nbudget: 0.5\noptions: [1]\n", r"options must be a mapping"),
    ("method: merge\nbudget: 0.5\noptions: abc\n", r"options must be a mapping"),
    ("method: null\nbudget: 0.5\n", r"method must be.*name"),
    ("method: [cls, merge]\nbudget: 0.5\n", r"method must be.*pipeline"),
    ("method: [merge\n", r"not valid YAML"),
])
def test_recipe_with_a_bad_field_is_a_clear_error(tmp_path, text, message):
    """Every field is checked when the recipe loads, and the error names the file: nothing converted silently
    (``budget: true`` was budget 1.0, a keep count 2.7 was 2), no bare float() / dict() / YAML parser errors."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, TypeError), match=message) as err:
        load_recipe(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name, depth, family",
                         [("whisper-large-bs1", 32, "whisper"), ("siglip-so400m-bs1", 27, "vit"),
                          ("apet-1-stage", 12, "vit"), ("pitome-3-stages", 12, "vit"), ("diverse-1-stage", 12, "vit")])
def test_batch1_recipes_put_their_stages_where_they_say(name, depth, family):
    """The batch-1 recipes (fewer or earlier stages) on an encoder of their model's depth (tiny width): the recipe's
    method with stages after the blocks it names, ending at its budget; on a shallower encoder, a clear error naming
    the blocks."""
    r = load_recipe(name)
    if family == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        def make(layers):
            cfg = WhisperConfig(d_model=16, encoder_layers=layers, encoder_attention_heads=2, encoder_ffn_dim=32,
                                num_mel_bins=8, max_source_positions=40)
            return WhisperEncoder(cfg).eval(), torch.randn(1, 8, 80)
    else:
        def make(layers):
            return tiny_vit(depth=layers, embed_dim=16, num_heads=2), torch.randn(1, 3, 32, 32)
    model, x = make(depth)
    tokenprune.apply(model, recipe=name)
    plan = tokenprune.plan(model)
    n = plan.info.num_tokens
    assert (plan.method, plan.budget) == (r.method, r.budget)
    assert [s.block for s in plan.stages] == r.options["layers"]
    assert plan.stages[-1].keep == round(r.budget * n) == plan.num_out
    with torch.inference_mode():
        out = model(x)
    hidden = out.last_hidden_state if family == "whisper" else out
    assert torch.isfinite(hidden).all()
    shallow, _ = make(r.options["layers"][-1])  # its last stage block does not exist there
    with pytest.raises(ValueError, match=rf"layers \[{r.options['layers'][-1]}\] are outside the encoder"):
        tokenprune.apply(shallow, recipe=name)


def _torchrun(args, timeout):
    """Two torchrun ranks (``torch.distributed.run --standalone``) of ``args``, one thread each, with faulthandler on
    (a rank that dies of a signal prints its Python threads' stacks), as ``subprocess.run`` would return them. On a
    timeout torchrun is sent SIGTERM, which it passes on to the ranks (killing it outright leaves them waiting in a
    collective, each in its own session)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tiny, tmp_path):
    """Batches are dealt round-robin to 2 gloo ranks and gathered: the metrics must equal one process's
    (random drop included, whose choice depends on the batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = _eval_args(tiny, one, methods="merge", budgets="0.25")
    assert main(args) == 0
    eval_two = ["-m", "tokenprune.cli"] + _eval_args(tiny, two, methods="merge", budgets="0.25")
    proc = _torchrun(eval_two, 300)
    if proc.returncode != 0 and "(SIGABRT)" in proc.stderr:
        # a rank aborted inside torch's C++ (no Python exception to blame on tokenprune): run once more, and say so.
        # CI once saw rank 1 abort so ("terminate called without an active exception"); none of 98 runs here did
        wrote = (two / "eval_top1.json").exists()
        warnings.warn(f"torchrun rank aborted (results {'written' if wrote else 'not written'}); retried once. "
                      f"stderr tail:\n{proc.stderr[-2000:]}")
        shutil.rmtree(two, ignore_errors=True)
        proc = _torchrun(eval_two, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "eval_top1.json").read_text())
    b = json.loads((two / "eval_top1.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    keys = ("config", "top1", "agreement", "retained", "flop_ratio", "tokens_out")
    assert [{k: r[k] for k in keys} for r in a["rows"]] == [{k: r[k] for k in keys} for r in b["rows"]]


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_torchrun_job_with_its_error(tmp_path):
    """One rank raises while the other waits in a collective: the failing rank leaves the process group without the
    closing barrier, so the job ends with that rank's error (it hung until gloo's 30-minute timeout before)."""
    script = tmp_path / "job.py"
    script.write_text(
        "from tokenprune import evaluate as ev\n"
        "with ev.distributed('cpu') as (d, device):\n"
        "    if d.rank == 1:\n"
        "        raise ValueError('rank 1 could not read its batch')\n"
        "    d.gather({0: 1})\n")
    proc = _torchrun([str(script)], 120)  # a hang fails here
    assert proc.returncode != 0
    assert "ValueError: rank 1 could not read its batch" in proc.stderr


def test_eval_reuse_runs_only_new_configurations(tiny, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(_eval_args(tiny, first, methods="merge", budgets="0.25")) == 0
    prev = json.loads((first / "eval_top1.json").read_text())
    assert len(prev["reference"]["pred"]) == 18
    capsys.readouterr()
    args = _eval_args(tiny, second, "--reuse", str(first / "eval_top1.json"), methods="cls", budgets="0.25")
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "reusing 3 configuration(s)" in log  # unreduced, random, pool
    assert "cls@0.25" in log and "merge@0.25 " not in log
    rows = {r["config"]: r for r in json.loads((second / "eval_top1.json").read_text())["rows"]}
    assert set(rows) == {"unreduced", "cls@0.25", "random@0.25", "pool@0.25", "merge@0.25"}
    assert rows["merge@0.25"] == next(r for r in prev["rows"] if r["config"] == "merge@0.25")
    assert rows["cls@0.25"]["agreement"] is not None
    # a results file of another task/data cannot be reused
    bad = _eval_args(tiny, second, "--reuse", str(first / "eval_top1.json"), "--limit", "9")
    assert main(bad) == 2


def test_eval_reuse_refuses_other_samples(tiny, tmp_path, capsys):
    """--reuse compares the samples, not only their number: another --seed (other images drawn by --limit) or
    another --data folder of as many images would compare reused rows and the reused unreduced predictions
    with other images (agreement against the wrong samples); refused, one line."""
    first = tmp_path / "a"
    assert main(_eval_args(tiny, first, "--limit", "6", methods="merge", budgets="0.5")) == 0
    prev = str(first / "eval_top1.json")
    capsys.readouterr()
    assert main(_eval_args(tiny, tmp_path / "b", "--limit", "6", "--seed", "5", "--reuse", prev,
                           methods="cls", budgets="0.5")) == 2
    err = capsys.readouterr().err
    assert "cannot be combined" in err and "seed" in err, err
    other = tmp_path / "other_data"
    import shutil

    shutil.copytree(tiny["data"], other)
    args = _eval_args(tiny, tmp_path / "c", "--limit", "6", "--reuse", prev, methods="cls", budgets="0.5")
    args[args.index("--data") + 1] = str(other)
    assert main(args) == 2
    assert "cannot be combined" in capsys.readouterr().err
    # the same samples again: reused
    assert main(_eval_args(tiny, tmp_path / "d", "--limit", "6", "--reuse", prev, methods="cls", budgets="0.5")) == 0
    assert "reusing 3 configuration(s)" in capsys.readouterr().out
    # a file of an older tokenprune (no record of its samples) is still reused, with a warning
    old = json.loads(Path(prev).read_text())
    del old["samples"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(_eval_args(tiny, tmp_path / "e", "--limit", "6", "--reuse", str(tmp_path / "old.json"),
                           methods="cls", budgets="0.5")) == 0
    assert "does not record which samples" in capsys.readouterr().err


def _hf_folder(root, kind):
    """A tiny random Hugging Face video / speech encoder saved as a local folder."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vivit":
        model = tf.VivitModel(tf.VivitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=16, num_frames=4,
                                             tubelet_size=[2, 4, 4]))
    else:
        model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                   num_hidden_layers=2, conv_dim=(16, 16), conv_kernel=(10, 3),
                                                   conv_stride=(5, 2), num_conv_pos_embeddings=16,
                                                   num_conv_pos_embedding_groups=4))
    model.save_pretrained(root / kind)
    return root / kind, model.eval()


@pytest.mark.parametrize("kind", ["vivit", "wav2vec2"])
def test_bench_and_plan_on_hf_video_and_speech_folders(kind, tmp_path, capsys):
    """A ViViT or Wav2Vec2 folder is a video / speech model, not an image model: bench feeds it input of its
    own kind (it crashed on an image-shaped input), plan's --input-size counts its tokens."""
    pytest.importorskip("transformers")
    path, model = _hf_folder(tmp_path, kind)
    args = ["bench", "--model", str(path), "--methods", "merge", "--budgets", "0.5", "--batch-sizes", "1",
            "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "out"), "--no-progress", "--threads", "1"]
    assert main(args) == 0, capsys.readouterr().err
    rows = {r["config"]: r for r in json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    plan = tokenprune.plan(model, budget=0.5, method="merge")
    assert rows["merge@0.5"]["flop_ratio"] == pytest.approx(plan.flop_ratio)
    assert rows["merge@0.5"]["tokens_out"] == plan.num_out
    capsys.readouterr()
    assert main(["plan", "--model", str(path), "--budget", "0.5", "--input-size", "20"]) == 0
    out = capsys.readouterr().out
    assert "tokens in=20 out=10" in out, out


def test_eval_speedups_of_another_model_are_not_attached(tiny, tmp_path, capsys):
    """A bench JSON whose configurations have other FLOP ratios than this evaluation's was timed on another
    model or input: its speed-ups are not attached to those rows (they would be plotted as this model's), and a
    warning says so. Rows whose FLOP ratios agree get theirs."""
    assert main(_eval_args(tiny, tmp_path / "first", methods="merge", budgets="0.5")) == 0
    ratio = {r["config"]: r["flop_ratio"]
             for r in json.loads((tmp_path / "first" / "eval_top1.json").read_text())["rows"]}
    bench = {"rows": [{"config": "unreduced", "batch_size": 8, "speedup": 1.0, "flop_ratio": 1.0},
                      {"config": "merge@0.5", "batch_size": 8, "speedup": 1.5, "flop_ratio": ratio["merge@0.5"]},
                      {"config": "random@0.5", "batch_size": 8, "speedup": 1.3,
                       "flop_ratio": ratio["random@0.5"] * 0.8}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    capsys.readouterr()
    args = _eval_args(tiny, tmp_path, "--speedups", str(tmp_path / "bench.json"), methods="merge", budgets="0.5")
    assert main(args) == 0
    err = capsys.readouterr().err
    rows = {r["config"]: r for r in json.loads((tmp_path / "eval_top1.json").read_text())["rows"]}
    assert rows["merge@0.5"]["speedup"] == 1.5
    assert "speedup" not in rows["random@0.5"]
    assert "random@0.5" in err and "FLOP ratio" in err, err


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_unusable_out_folder_is_refused_before_running(command, tiny, tmp_path, capsys):
    """--out that is a file (or cannot be created) is refused in one line before anything runs, not after the
    whole timing / evaluation (whose results were then lost)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    if command == "eval":
        args = _eval_args(tiny, blocker, methods="merge", budgets="0.5")
    else:
        args = ["bench", "--model", "vit_small_patch16_224", "--model-args", json.dumps(TINY_ARGS), "--methods",
                "merge", "--budgets", "0.5", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--out",
                str(blocker), "--no-progress", "--threads", "1"]
    capsys.readouterr()
    assert main(args) == 2
    cap = capsys.readouterr()
    assert "unreduced" not in cap.out, cap.out
    assert len(cap.err.strip().splitlines()) == 1 and "--out" in cap.err, cap.err


def test_bench_drift_note_on_cpu_does_not_blame_a_gpu(tmp_path, monkeypatch):
    """The note on the unreduced model's drift over the run names the device it ran on (here the CPU), and a
    speed-up at the end reads as faster, not '-20% longer'."""
    from tokenprune import bench as B

    times = iter([10.0, 5.0, 8.0, 4.0])  # unreduced, merge, then the unreduced at the end: 20% faster

    def fake_time_fn(fn, device, warmup, repeats):  # the timer, not what is tested: the note's wording
        fn()
        return B.Timing(next(times), 1.0, 1.0, repeats)

    monkeypatch.setattr(B, "time_fn", fake_time_fn)
    args = ["bench", "--model", "vit_small_patch16_224", "--model-args", json.dumps(TINY_ARGS), "--methods",
            "merge", "--budgets", "0.5", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--out",
            str(tmp_path), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    notes = [n for n in json.loads((tmp_path / "bench.json").read_text())["notes"] if "at the end" in n]
    assert len(notes) == 1 and "GPU" not in notes[0] and "cpu" in notes[0], notes
    assert "faster" in notes[0] and "-20" not in notes[0], notes


def test_thread_cpu_us_times_each_function_in_the_same_rounds():
    """``bench.thread_cpu_us`` (the host-work timer of ``bench_forward.py --parts dryhost``): one entry per function,
    microseconds a call, and more work measures more."""
    from tokenprune.bench import thread_cpu_us

    calls = {"none": 0, "some": 0}

    def counted(name, work):
        def fn():
            calls[name] += 1
            sum(range(work))
        return fn

    got = thread_cpu_us({"none": counted("none", 0), "some": counted("some", 20000)}, calls=20, runs=3)
    assert set(got) == {"none", "some"} and 0 <= got["none"] < got["some"]
    assert calls == {"none": 5 + 3 * 20, "some": 5 + 3 * 20}  # warm-up, then every round runs each


def test_step_clock_records_each_step_and_leaves_the_scores():
    """``bench.StepClock`` (bench_vlm.py's decode rate): one time a call, scores untouched, the median step."""
    from tokenprune.bench import StepClock

    clock = StepClock("cpu")
    scores = torch.randn(2, 5)
    for _ in range(4):
        assert clock(None, scores) is scores
    assert len(clock.t) == 4 and clock.t == sorted(clock.t)
    clock.t = [0.0, 1.0, 1.5, 4.5]  # steps 1.0, 0.5, 3.0: the median is the middle one
    assert clock.median_step_s() == 1.0
