"""Accuracy retained by each method and budget on labelled data, against the unreduced model.

    tokenprune eval --model ../shared/assets/vit-s14-cifar10 --limit 500           # top-1, CIFAR-10
    tokenprune eval --model ../shared/assets/vit-s14-cifar10 --num-classes 0 --task knn
    tokenprune eval --model ../shared/assets/whisper-tiny.en --task wer
    tokenprune eval --task consumer --train-limit 5000 [--after-encoder]      # frozen readout on all tokens
    torchrun --nproc_per_node 2 -m tokenprune.cli eval ...                        # sharded, same numbers

The unreduced model and the random-drop and pooling baselines are always
included. Writes ``<name>.json``, ``<name>.csv`` and ``<name>.png`` (Pareto
plot: metric retained against the plan's FLOP ratio) under ``--out``.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from ._common import (BUDGET_HELP, DTYPE_NAMES, UsageError, add_model_source_arguments, check_device, check_lists,
                      device_arg, info, make_out_dir, nonnegative_int, positive_int, set_threads, torch_dtype, warn)

DEFAULT_MODEL = ("vit-s14-cifar10",)


def add_model_arguments(p, default_model: str = "vit-s14-cifar10 in the assets folder (the real ViT-S/14 "
                                                "CIFAR-10 classifier)"):
    """Model, methods, budgets, device and output arguments shared by eval and bench."""
    add_model_source_arguments(p, default_model)
    p.add_argument("--methods", default="merge,cls",
                   help="comma-separated methods (tokenprune.methods(); an unknown name is refused with the list), "
                        "or 'all' for every registered one")
    p.add_argument("--budgets", default="0.5,0.25,0.1", help=f"comma-separated budgets; {BUDGET_HELP}")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME_OR_YAML",
                   help="also evaluate a named recipe or a recipe YAML file (repeatable) (default: none)")
    p.add_argument("--device", type=device_arg, default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weights and activations dtype")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", default="tokenprune_results", metavar="DIR", help="output folder")
    p.add_argument("--name", default=None, help="file stem of the results (default: the command and task)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--task", default="auto", choices=["auto", "top1", "knn", "wer", "consumer"],
                   help="auto: top1 for classifiers, knn for feature extractors, wer for Whisper; consumer: a small "
                        "transformer readout trained on ALL output patch tokens of the unreduced model (train data, "
                        "--train-limit), frozen, then fed each method's reduced tokens (tokenprune.consumer)")
    p.add_argument("--after-encoder", action="store_true",
                   help="with --task consumer: each method acts once, after the last block (as FasterVLM / ApET "
                        "prune a VLM's visual tokens), instead of its own plan inside the encoder")
    p.add_argument("--readout-epochs", type=positive_int, default=3, help="with --task consumer: training epochs")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="labelled test data: .tar.gz of class folders or ImageFolder dir; for wer a folder with "
                        "manifest.json (default: the assets' CIFAR-10 test archive, or speech clips for wer)")
    p.add_argument("--train-data", default=None, metavar="PATH",
                   help="kNN memory bank (default: the assets' CIFAR-10 train archive)")
    p.add_argument("--limit", type=nonnegative_int, default=500,
                   help="test samples (spread evenly over classes); 0 = all")
    p.add_argument("--train-limit", type=nonnegative_int, default=2000,
                   help="kNN bank / readout training set size; 0 = all")
    p.add_argument("--k", type=positive_int, default=20, help="kNN neighbours (cosine, weights exp(sim/0.07))")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per forward")
    p.add_argument("--allow-random", action="store_true",
                   help="evaluate a model with RANDOM weights (a timm name without --weights/--pretrained) "
                        "instead of refusing; its numbers are then marked RANDOM WEIGHTS in the output and plot")
    p.add_argument("--speedups", default=None, metavar="BENCH_JSON",
                   help="a `tokenprune bench` JSON of the same model: also plot accuracy retained against its "
                        "measured speed-ups (<name>_speedup.png) (default: none)")
    p.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                   help="results JSON of an earlier run (same model, task, data, seed, dtype; checked): its "
                        "configurations are kept, not run again; the output holds both (default: none)")


def pick_task(task: str, lm) -> str:
    if lm.modality in ("audio", "video"):  # every task reads images (or Whisper's speech)
        raise UsageError(f"eval measures image models (top-1, kNN, consumer) and Whisper (WER); {lm.name} is a "
                         f"{lm.modality} encoder, which it has no data or metric for: use tokenprune bench or plan "
                         "for it, or tokenprune.apply() in your own evaluation")
    if task != "auto":
        if task == "wer" and lm.modality != "speech":
            raise ValueError(f"--task wer needs a speech model (Whisper); {lm.name} is {lm.modality}")
        return task
    if lm.modality == "speech":
        return "wer"
    return "top1" if lm.num_classes > 0 else "knn"


def check_path(path, what, given=True):
    """``given``: the path came from ``what`` on the command line; else it is ``what``'s default in the assets
    folder, and the message says where that folder came from."""
    if path is not None and not Path(path).exists():
        if given:
            raise FileNotFoundError(f"{what} {path} does not exist")
        from ..data import assets_dir, assets_source

        raise UsageError(f"no {what} given, and its default {path} does not exist (assets folder {assets_dir()}, "
                         f"from {assets_source()}); give {what} PATH, or --assets DIR")


def run(args):
    from .. import evaluate as ev

    check_path(args.data, "--data")
    check_path(args.train_data, "--train-data")
    check_path(args.speedups, "--speedups")
    check_path(args.reuse, "--reuse")
    if args.speedups:  # a file that is no bench JSON: refused now, not after the whole evaluation
        ev.attach_speedups([], args.speedups)
    budgets = ev.parse_list(args.budgets, float)
    methods = ev.parse_list(args.methods)
    check_lists(methods, budgets, args.recipe)
    configs, notes = ev.build_configs(methods, budgets, args.recipe)  # bad method/budget/recipe: fail now
    check_device(args.device)
    make_out_dir(args.out)
    set_threads(args.threads)
    with ev.distributed(args.device) as (dist_, device):
        return _run(args, configs, notes, dist_, device)


def _run(args, configs, notes, dist_, device):
    import torch

    from .. import evaluate as ev
    from ..data import default_asset
    from ._common import load_model, random_timm, resolve_model

    log = print if dist_.main else (lambda *a, **k: None)
    say = info if dist_.main else (lambda *a, **k: None)  # progress lines, on stderr
    spec, _ = resolve_model(args.model, DEFAULT_MODEL)
    if random_timm(spec, args) and not args.allow_random:  # refused before loading anything
        raise UsageError(f"{spec} would have RANDOM weights (a timm name without --weights or --pretrained), "
                         "so its accuracy means nothing; give --weights or --pretrained, a local folder, or "
                         "--allow-random to evaluate it anyway")
    lm = load_model(spec, args) if dist_.main else _quiet(load_model, spec, args)
    warnings = ["RANDOM WEIGHTS"] if lm.random_weights else []
    dtype = torch_dtype(args.dtype)
    lm.model.to(device=device, dtype=dtype)
    task = pick_task(args.task, lm)
    data = {}
    limit = args.limit or None
    t0 = time.perf_counter()
    if task == "wer":
        from ..data import load_speech_manifest

        folder = args.data or str(default_asset("speech-hifitts-6097"))
        check_path(folder, "--data", given=args.data is not None)
        say(f"reading speech clips from {folder}")
        rows = load_speech_manifest(folder, limit)
        data = {"wavs": [str(w) for w, _ in rows], "texts": [t for _, t in rows]}
        n = len(rows)
    else:
        from ..data import load_image_folder

        path = args.data or str(default_asset("cifar10", "cifar10_jpeg_test.tar.gz"))
        check_path(path, "--data", given=args.data is not None)
        say(f"reading {'all' if limit is None else limit} test images from {path}")
        data["images"], data["labels"], classes = load_image_folder(path, limit=limit, seed=args.seed)
        n = len(data["images"])
        if task in ("knn", "consumer"):
            tpath = args.train_data or str(default_asset("cifar10", "cifar10_jpeg_train.tar.gz"))
            check_path(tpath, "--train-data", given=args.train_data is not None)
            say(f"reading the {'kNN bank' if task == 'knn' else 'readout training set'} from {tpath}")
            data["train_images"], data["train_labels"], tclasses = load_image_folder(
                tpath, limit=args.train_limit or None, seed=args.seed)
            if tclasses != classes:
                raise ValueError(f"train classes {tclasses} differ from test classes {classes}")
        elif lm.num_classes and len(classes) > lm.num_classes:
            raise ValueError(f"the data has {len(classes)} classes but the model's head has {lm.num_classes}")
        elif lm.num_classes != len(classes):
            warnings.append(f"HEAD HAS {lm.num_classes} CLASSES, DATA {len(classes)}")
            if dist_.main:
                warn(f"the model's head has {lm.num_classes} classes but the data has {len(classes)} "
                     f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): label i is compared "
                     "with head output i, so top-1 is not meaningful (agreement still is); "
                     "use --num-classes 0 --task knn for a backbone")
    if task == "consumer":
        configs, more = _consumer_setup(args, lm, configs, data, device, dtype, say)
        notes = notes + more
    elif args.after_encoder:
        raise UsageError("--after-encoder goes with --task consumer")
    if lm.random_weights and dist_.main:
        warn("evaluating RANDOM weights (--allow-random): every accuracy below is meaningless")
    say(f"evaluating {len(configs)} configurations on {n} samples")
    log(f"task {task}: {lm.name} on {n} samples ({time.perf_counter() - t0:.0f} s to load), "
        f"{len(configs)} configurations, {dist_.world} process(es), {device} {args.dtype}")
    for note in notes:
        log(f"note: {note}")
    reused, reference = {}, None
    # which samples were evaluated (--reuse compares them): the data's path and, where --limit draws
    # images at random, the seed; for kNN / consumer also the train set and the settings of the readout
    samples = {"data": str(Path(folder if task == "wer" else path).resolve())}
    if task != "wer":
        samples["seed"] = args.seed
    if task in ("knn", "consumer"):
        samples.update(train_data=str(Path(tpath).resolve()), train_samples=len(data["train_images"]))
        samples.update({"k": args.k} if task == "knn" else
                       {"readout_epochs": args.readout_epochs, "after_encoder": args.after_encoder})
    prev = None  # the --reuse file, read once here
    if args.reuse:
        reused, reference = ev.load_reusable(args.reuse, task, lm.name, n, args.dtype, samples)
        import json

        prev = json.loads(Path(args.reuse).read_text())
        if "samples" not in prev and dist_.main:
            warn(f"--reuse {args.reuse} does not record which samples it ran on (an older tokenprune): "
                 "its rows are combined on trust that --data, --seed and the train set are the same")
    todo = [c for c in configs if c.name not in reused or (c.method is None and reference is None)]
    if reused:
        log(f"reusing {len(configs) - len(todo)} configuration(s) from {args.reuse}")
    reference = reference or {}
    stem = args.name or f"eval_{task}{'_after_encoder' if args.after_encoder else ''}"

    def save_partial(done):  # a long run that is stopped keeps what it measured
        ev.write_results(list(reused.values()) + done, {"partial": True, "task": task, "model": lm.name},
                         Path(args.out), stem + ".partial")

    new, run_notes = ev.evaluate(lm, todo, task, data, batch_size=args.batch_size, device=device, dtype=dtype,
                                 dist_=dist_, show=not args.no_progress, k=args.k, log=log, reference=reference,
                                 on_row=save_partial)
    for suffix in (".json", ".csv") if dist_.main else ():
        Path(args.out, stem + ".partial" + suffix).unlink(missing_ok=True)
    new = {r["config"]: r for r in new}
    rows = [new.get(c.name) or reused[c.name] for c in configs if c.name in new or c.name in reused]
    rows += [r for name, r in reused.items() if name not in new and name not in {c.name for c in configs}]
    if not dist_.main:
        return 0
    meta = {"command": "tokenprune " + " ".join(sys.argv[1:]), "task": task, "model": lm.name,
            "warnings": warnings, "random_weights": lm.random_weights,
            "data": args.data, "samples": samples,
            "num_samples": n, "train_samples": len(data.get("train_images", [])) or None,
            "device": device, "dtype": args.dtype, "world_size": dist_.world, "batch_size": args.batch_size,
            "torch": torch.__version__, "python": platform.python_version(), "notes": notes + run_notes,
            "reference": ev.reference_to_json(reference)}
    if prev is not None:  # keep the provenance of the reused rows
        meta["earlier_commands"] = prev.get("earlier_commands", []) + [prev.get("command")]
    if args.speedups:
        mismatched = []
        matched = ev.attach_speedups(rows, args.speedups, mismatched)
        log(f"speed-ups from {args.speedups} for {matched} configuration(s)")
        if mismatched:
            warn(f"--speedups {args.speedups} has other FLOP ratios for {', '.join(mismatched)} (timed on another "
                 "model or input size); their speed-ups are left out")
        meta["speedups"] = args.speedups
    paths = ev.write_results(rows, meta, Path(args.out), stem)
    from ..plots import pareto_plot

    metric = {"top1": "top-1", "knn": f"kNN-{args.k} top-1", "wer": "WER",
              "consumer": "frozen-consumer top-1" + (" (after the encoder)" if args.after_encoder else "")}[task]
    loud = "".join(f"{w}: " for w in warnings)  # random weights / a mismatched head: in the title itself
    title = f"{loud}{lm.name}: {metric} retained, {n} samples ({args.dtype})"
    ylabel = f"{metric} retained (% of unreduced)"
    plot_kw = {"title": title, "ylabel": ylabel + "; <75% drawn at 75", "ymin": 75.0}
    if task == "wer":  # WER itself (lower is better); "retained" of 1 - WER means nothing once WER > 100%
        plot_kw = {"title": f"{loud}{lm.name}: WER, {n} utterances ({args.dtype})", "y": "wer",
                   "ylabel": "WER (%, lower is better; >100% drawn at 100)", "ymax": 100.0}
    paths["png"] = pareto_plot(rows, Path(args.out) / f"{stem}.png", **plot_kw)
    if args.speedups:
        for r in rows:
            if r.get("method") is None:
                r.setdefault("speedup", 1.0)
        paths["png_speedup"] = pareto_plot(rows, Path(args.out) / f"{stem}_speedup.png", x="speedup",
                                           xlabel="measured speed-up over unreduced (x, bench)", **plot_kw)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    for w in warnings:
        warn(f"these results are marked {w}")
    return 0


def _consumer_setup(args, lm, configs, data, device, dtype, say):
    """Train the frozen readout on the unreduced model's output tokens of the train images (the same on every
    rank: same data, same seed) and, with --after-encoder, turn each method into one stage after the last
    block. Returns the configurations and notes."""
    import math

    import torch

    from .. import adapters, consumer
    from .. import evaluate as ev
    from ..data import to_tensor

    if lm.family != "timm" or lm.modality != "image":
        raise UsageError(f"--task consumer reads a timm image ViT's output tokens; {lm.name} is {lm.family} "
                         f"{lm.modality}")
    imgs, labels = data["train_images"], torch.tensor(data["train_labels"])
    say(f"output tokens of {len(imgs)} train images (unreduced), then the readout")
    bs = args.batch_size
    size = lm.img_size or 224  # (height, width): a model may be built for a non-square input
    toks = []
    with torch.no_grad():
        for j in range(math.ceil(len(imgs) / bs)):
            x = to_tensor(imgs[j * bs:(j + 1) * bs], size, lm.mean, lm.std).to(device, dtype)
            toks.append(consumer.output_tokens(lm.model, x)[0].half())
    classes = max(int(labels.max()) + 1, len(set(data["labels"])))
    data["readout"] = consumer.train_readout(torch.cat(toks), labels, classes, epochs=args.readout_epochs,
                                             batch_size=min(256, len(imgs)), device=device, seed=args.seed, log=say)
    if not args.after_encoder:
        return configs, []
    info = adapters.for_model(lm.model).info()
    out, notes = [], []
    for c in configs:
        if c.method is None:
            out.append(c)
        elif c.method not in consumer.AFTER_ENCODER:
            notes.append(f"{c.method} has no after-the-encoder form; left out")
        else:
            options, schedule = consumer.after_encoder(c.method, c.budget, info.depth, info.num_tokens)
            out.append(ev.Config(c.label, c.method, c.budget, {**c.options, **options}, schedule))
    return out, list(dict.fromkeys(notes))


def _quiet(fn, *a, **k):
    """``fn`` with its stderr lines silenced (ranks other than 0 of a torchrun)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **k)
