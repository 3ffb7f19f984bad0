"""Accuracy at equal cost on the real ViT-S/14 CIFAR-10 classifier: the README's tables and Pareto plot.

For ToMe's placement (``merge`` with ``placement="attn"``), every tokenprune method, and the ``random`` and
``pool`` baselines, at each budget, on the CIFAR-10 test images:

- top-1 of the model's own head, and its agreement with the unreduced model;
- kNN-20 top-1 of the pre-logit [CLS] feature against a bank of the UNREDUCED model's train features
  (cosine, weights exp(sim / 0.07)): how far the reduced features move in the unreduced feature space;
- frozen-consumer top-1 (``tokenprune.consumer``): a 2-block transformer readout with attention pooling,
  trained on all output patch tokens of the unreduced model over the train images, frozen, fed the
  reduced model's output patch tokens;
- the measured FLOP ratio: ``torch.utils.flop_counter`` over one whole forward (patch embedding, blocks,
  the reducers' own matrix products, head) on a float32 CPU copy with SDPA's math backend (so attention
  is counted), reduced over unreduced.

Every accuracy has a 95% Wilson interval. Then the frozen consumer for pruning AFTER the encoder (one
stage after the last block, as FasterVLM / ApET / DivPrune prune a VLM's visual tokens) at 0.25 / 0.1 /
0.05. Optionally (default on CUDA) the speed of ``merge`` with both placements and of ``pitome`` on
ViT-B/16 (random weights, fp16) at batch 256 and 1, against the unreduced model.

Writes ``accuracy.json``, ``accuracy.md`` (the tables) and ``accuracy_pareto.png`` under ``--out``.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/accuracy.py --assets .assets --out $OUT     # GPU, ~5 min
    PYTHONPATH=. python scripts/accuracy.py --assets ../shared/assets --out /tmp/acc --smoke    # CPU plumbing

``--assets`` holds ``vit-s14-cifar10/`` and ``cifar10/*.tar.gz`` (the layout of the shared assets folder).
Images are decoded (nvJPEG) and upsampled (bicubic) on the device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tokenprune  # noqa: E402
from tokenprune import consumer  # noqa: E402
from tokenprune.models import load_timm  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOME = ("merge", {"placement": "attn"})
# label -> (method, options); "tome" is ToMe's algorithm in ToMe's placement (inside every block)
METHODS = {
    "tome": TOME,
    "merge": ("merge", {}),
    "pitome": ("pitome", {}),
    "pitome-all": ("pitome", {"candidates": 1e9}),  # every token a candidate: ToMe's rule on an energy-ranked split
    "cls+tome": (["cls", TOME], {}),
    "cls": ("cls", {}),
    "apet": ("apet", {}),
    "diverse": ("diverse", {}),
    "maelre": ("maelre", {}),
    "random": ("random", {}),
    "pool": ("pool", {}),
}
LEFT_OUT = {"threshold": "its per-stage thresholds must be trained first (tokenprune.training); untrained they "
                         "mean nothing", "pipeline": "compositions are listed by their parts (cls+tome)"}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- data
def read_tar(path: Path, limit: int | None):
    """JPEG bytes (uint8 tensors) and labels from a tar.gz of class folders, in (class, name) order;
    ``limit``: the first ``limit / classes`` of each class."""
    with tarfile.open(path) as tar:
        raw = {}
        for m in tar:  # archive order: one pass over the gzip stream
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg")):
                raw[m.name] = tar.extractfile(m).read()
    classes = sorted({Path(n).parent.name for n in raw})
    names = sorted(raw, key=lambda n: (classes.index(Path(n).parent.name), n))
    if limit:
        per = max(1, limit // len(classes))
        names = [n for c in classes for n in [n for n in names if Path(n).parent.name == c][:per]]
    data = [torch.frombuffer(bytearray(raw[n]), dtype=torch.uint8) for n in names]
    labels = torch.tensor([classes.index(Path(n).parent.name) for n in names])
    return data, labels, classes


def decode(data, device) -> torch.Tensor:
    """``[N, 3, h, w]`` uint8 on ``device`` (nvJPEG on CUDA, in chunks)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = []
    gpu = torch.device(device).type == "cuda"
    for i in range(0, len(data), 2048):
        chunk = data[i:i + 2048]
        if gpu:
            try:
                out += decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
                continue
            except (RuntimeError, TypeError, ValueError) as e:  # no nvJPEG in this build: decode on the CPU
                log(f"GPU JPEG decoding failed ({str(e)[:120]}); decoding on the CPU")
                gpu = False
        out += [decode_jpeg(d, mode=ImageReadMode.RGB) for d in chunk]
    return torch.stack([o.to(device) for o in out])


def prep(u8: torch.Tensor, size: int, dtype) -> torch.Tensor:
    """uint8 images -> normalised ``[B, 3, size, size]`` (bicubic, clamped, as ``tokenprune.data.to_tensor``)."""
    x = u8.float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    m = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def encode(model, images, size, dtype, batch, readout=None, keep_tokens=False):
    """Per image: logits, pre-logit feature, readout logits (if ``readout``), patch tokens (``keep_tokens``)."""
    p = model.num_prefix_tokens
    out = {"logits": [], "feats": [], "consumer": [], "tokens": []}
    for i in range(0, len(images), batch):
        x = prep(images[i:i + batch], size, dtype)
        if tokenprune.api.is_applied(model):
            tokens, state = tokenprune.features(model, x)
            sizes = state.sizes
        else:
            tokens, sizes = model.forward_features(x), None
        feats = model.forward_head(tokens, pre_logits=True, **({} if sizes is None else {"sizes": sizes}))
        out["feats"].append(feats.float())
        out["logits"].append(model.head(feats).float())
        if readout is not None:
            valid = None if sizes is None or not bool((sizes[:, p:] <= 0).any()) else sizes[:, p:] > 0
            out["consumer"].append(consumer.consume(readout, tokens[:, p:], valid))
        if keep_tokens:
            out["tokens"].append(tokens[:, p:].half())
    return {k: torch.cat(v) for k, v in out.items() if v}


def knn(bank, bank_labels, feats, k=20, t=0.07, classes=10) -> torch.Tensor:
    bank = F.normalize(bank.float(), dim=1)
    preds = []
    for i in range(0, len(feats), 1024):
        sim = F.normalize(feats[i:i + 1024].float(), dim=1) @ bank.T
        top, idx = sim.topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(top), classes, device=top.device).scatter_add_(1, bank_labels[idx], (top / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def acc(pred, labels) -> dict:
    k, n = int((pred == labels).sum()), len(labels)
    return {"value": k / n, "ci95": wilson(k, n), "n": n}


def measured_flops(cpu_model, size, method=None, budget=None, options=None, schedule=None) -> float:
    """FLOPs of one forward of one image on the float32 CPU copy (SDPA's math backend: attention counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if method is not None:
        tokenprune.apply(cpu_model, budget=budget, method=method, schedule=schedule, **(options or {}))
    try:
        x = torch.zeros(1, 3, size, size)
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            cpu_model(x)
        return float(fc.get_total_flops())
    finally:
        tokenprune.remove(cpu_model)


# ----------------------------------------------------------------------------- output
def table(rows, budgets, key, title) -> list[str]:
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "unreduced"))
    ref = next(r for r in rows if r["label"] == "unreduced")
    out = [f"**{title}** (unreduced: {ref[key]['value']:.2%}); cell: value [95% interval] (measured FLOP ratio)", "",
           "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for lab in labels:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["label"] == lab and r["budget"] == b), None)
            if r is None or key not in r:
                cells.append("n/a")
            else:
                v = r[key]
                cells.append(f"{v['value']:.2%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}] ({r['flop_ratio']:.3f})")
        out.append(f"| {lab} | " + " | ".join(cells) + " |")
    return out + [""]


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("top1", "top-1 (head)"), ("knn", "kNN-20 (unreduced train bank)"), ("consumer", "frozen consumer")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), dpi=110)
    ref = next(r for r in rows if r["label"] == "unreduced")
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "unreduced"))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for ax, (key, name) in zip(axes, keys):
        for i, lab in enumerate(labels):
            rs = sorted((r for r in rows if r["label"] == lab and key in r), key=lambda r: r["flop_ratio"])
            if not rs:
                continue
            xs = [r["flop_ratio"] for r in rs]
            ys = [100 * r[key]["value"] for r in rs]
            err = [[100 * (r[key]["value"] - r[key]["ci95"][0]) for r in rs],
                   [100 * (r[key]["ci95"][1] - r[key]["value"]) for r in rs]]
            style = "--" if lab in ("random", "pool") else "-"
            ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", ms=3.5, capsize=2, label=lab, color=cmap(i),
                        lw=2.2 if lab == "tome" else 1.2)
        ax.plot([ref["flop_ratio"]], [100 * ref[key]["value"]], "*", color="k", ms=12, label="unreduced")
        ax.set_xlabel("measured FLOP ratio (reduced / unreduced forward)")
        ax.set_ylabel(f"{name} (%)")
        vals = [100 * r[key]["value"] for r in rows if key in r]
        ax.set_ylim(max(min(vals) - 2, 100 * ref[key]["value"] - 30), max(vals) + 1.5)
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- speed
def speed(device) -> list[dict]:
    """ms per forward of ViT-B/16 (random weights, fp16) at bs 256 and 1: unreduced, merge (both placements),
    pitome, budget 0.25 (``scripts/_common.ms``: CUDA events, median of 30 after 10 warm-up calls)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from _common import make_vit, ms

    model, dt = make_vit(device)
    rows = []
    for bs in (256, 1):
        x = torch.randn(bs, 3, 224, 224, device=device, dtype=dt)
        for label, method, opts in [("unreduced", None, {}), ("merge", "merge", {}),
                                    ("merge attn", "merge", {"placement": "attn"}), ("pitome", "pitome", {}),
                                    ("merge-3-stages", "merge", {"layers": [2, 5, 8]}),
                                    ("merge-3-stages attn", "merge", {"layers": [2, 5, 8], "placement": "attn"})]:
            if method:
                tokenprune.apply(model, budget=0.25, method=method, **opts)
            with torch.no_grad():
                t = ms(lambda: model(x), device)
            rows.append({"batch": bs, "config": label, "ms": t})
            log(f"speed bs {bs:>3} {label:<20} {t:8.3f} ms")
            tokenprune.remove(model)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=".assets", help="folder with vit-s14-cifar10/ and cifar10/*.tar.gz")
    ap.add_argument("--out", default=os.environ.get("OUT", "accuracy_results"))
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: 112 px, 30 test / 60 train images, one budget")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--budgets", default="0.6,0.4,0.25,0.15,0.1")
    ap.add_argument("--after-budgets", default="0.25,0.1,0.05")
    ap.add_argument("--methods", default=",".join(METHODS), help="labels of METHODS, comma-separated")
    ap.add_argument("--epochs", type=int, default=3, help="readout training epochs")
    ap.add_argument("--test-limit", type=int, default=0, help="0: all 10,000")
    ap.add_argument("--train-limit", type=int, default=0, help="0: all 50,000")
    ap.add_argument("--no-speed", action="store_true", help="skip the ViT-B/16 speed check (CUDA only)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    size = 112 if args.smoke else 224
    budgets = [float(b) for b in args.budgets.split(",")]
    after_budgets = [float(b) for b in args.after_budgets.split(",")]
    test_limit, train_limit, epochs = args.test_limit or None, args.train_limit or None, args.epochs
    if args.smoke:
        budgets, after_budgets, epochs = [0.25], [0.1], 1
        test_limit, train_limit = test_limit or 30, train_limit or 60
    labels_run = [m for m in args.methods.split(",") if m]
    unknown = [m for m in labels_run if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    assets, out = Path(args.assets), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = assets / "vit-s14-cifar10"
    for need in (weights / "model.safetensors", assets / "cifar10" / "cifar10_jpeg_test.tar.gz",
                 assets / "cifar10" / "cifar10_jpeg_train.tar.gz"):
        if not need.exists():
            raise SystemExit(f"{need} is missing: --assets must hold vit-s14-cifar10/ and cifar10/*.tar.gz")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)

    t0 = time.perf_counter()
    tr_raw, tr_y, classes = read_tar(assets / "cifar10" / "cifar10_jpeg_train.tar.gz", train_limit)
    te_raw, te_y, te_classes = read_tar(assets / "cifar10" / "cifar10_jpeg_test.tar.gz", test_limit)
    assert classes == te_classes, (classes, te_classes)
    tr_img, te_img = decode(tr_raw, device), decode(te_raw, device)
    tr_y, te_y = tr_y.to(device), te_y.to(device)
    t_data = time.perf_counter() - t0
    log(f"data: {len(tr_img)} train / {len(te_img)} test images on {device} in {t_data:.1f} s")

    model = load_timm("vit_small_patch14_dinov2", weights, num_classes=10, img_size=size).eval()
    cpu_model = load_timm("vit_small_patch14_dinov2", weights, num_classes=10, img_size=size).eval().float()
    model = model.to(device, dtype)
    flops0 = measured_flops(cpu_model, size)

    # unreduced: train bank (kNN), train tokens (readout), test reference
    t0 = time.perf_counter()
    tr = encode(model, tr_img, size, dtype, args.batch, keep_tokens=True)
    t_train_fwd = time.perf_counter() - t0
    readout = consumer.train_readout(tr["tokens"], tr_y, len(classes), epochs=epochs, batch_size=min(512, len(tr_y)),
                                     device=device, seed=0, log=log)
    bank = tr["feats"]
    del tr
    t_readout = time.perf_counter() - t0 - t_train_fwd
    log(f"train forward {t_train_fwd:.1f} s, readout {t_readout:.1f} s")

    def measure(label, method, budget, options, schedule=None, ref=None):
        t = time.perf_counter()
        if method is not None:
            tokenprune.apply(model, budget=budget, method=method, schedule=schedule, **options)
        try:
            plan = tokenprune.plan(model) if method is not None else None
            r = encode(model, te_img, size, dtype, args.batch, readout=readout)
        finally:
            tokenprune.remove(model)
        pred, cpred = r["logits"].argmax(1), r["consumer"].argmax(1)
        row = {"label": label, "method": method if isinstance(method, (str, type(None))) else str(method),
               "budget": budget, "options": options, "schedule": schedule,
               "tokens_out": plan.num_out if plan else None, "plan_flop_ratio": plan.flop_ratio if plan else 1.0,
               "flop_ratio": measured_flops(cpu_model, size, method, budget, options, schedule) / flops0
               if method is not None else 1.0,
               "top1": acc(pred, te_y), "knn": acc(knn(bank, tr_y, r["feats"], classes=len(classes)), te_y),
               "consumer": acc(cpred, te_y), "_pred": pred, "_cpred": cpred, "_feats": r["feats"]}
        if ref is not None:
            row["agreement"] = acc(pred, ref["_pred"])
            row["consumer_agreement"] = acc(cpred, ref["_cpred"])
            row["feature_cosine"] = F.cosine_similarity(r["feats"], ref["_feats"]).mean().item()
        row["seconds"] = time.perf_counter() - t
        done.append(row)
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in done]
        (out / "accuracy.partial.json").write_text(json.dumps(public, indent=1) + "\n")  # survives a time-out
        log(f"{label:<10} {budget if budget else '':<5} FLOPs x{row['flop_ratio']:.3f}  top-1 {row['top1']['value']:.2%}"
            f"  kNN {row['knn']['value']:.2%}  consumer {row['consumer']['value']:.2%}  ({row['seconds']:.1f} s)")
        return row

    done: list[dict] = []
    ref = measure("unreduced", None, None, {})
    rows, notes = [ref], [f"{k}: left out, {v}" for k, v in LEFT_OUT.items()]
    for label in labels_run:
        method, options = METHODS[label]
        for b in budgets:
            try:
                rows.append(measure(label, method, b, options, ref=ref))
            except (ValueError, TypeError) as e:
                notes.append(f"{label}@{b:g}: not applicable: {e}")
                log(f"skip {label}@{b:g}: {e}")
    after = [ref]
    depth, n_tok = len(model.blocks), (size // 14) ** 2
    for label in [m for m in labels_run if METHODS[m][0] in consumer.AFTER_ENCODER and not METHODS[m][1]]:
        method = METHODS[label][0]
        for b in after_budgets:
            opts, sched = consumer.after_encoder(method, b, depth, n_tok)
            try:
                after.append(measure(label, method, b, opts, sched, ref=ref))
            except (ValueError, TypeError) as e:
                notes.append(f"after encoder {label}@{b:g}: not applicable: {e}")
                log(f"skip after-encoder {label}@{b:g}: {e}")
    speed_rows = []
    if torch.device(device).type == "cuda" and not args.no_speed and not args.smoke:
        speed_rows = speed(device)

    for r in rows + after:
        for k in ("_pred", "_cpred", "_feats"):
            r.pop(k, None)
    md = [f"# Accuracy at equal cost: ViT-S/14 CIFAR-10, {len(te_img)} test images ({device}, {dtype})", ""]
    md += table(rows, budgets, "top1", "Top-1 (the model's head)")
    md += table(rows, budgets, "knn", "kNN-20 top-1 (pre-logit [CLS] vs the unreduced train bank)")
    md += table(rows, budgets, "consumer", "Frozen-consumer top-1, reduction inside the encoder")
    md += table(after, after_budgets, "consumer", "Frozen-consumer top-1, pruning after the encoder")
    if speed_rows:
        md += ["**ViT-B/16 fp16, budget 0.25, ms per forward**", "", "| config | bs 256 | bs 1 |", "|---|---|---|"]
        for c in dict.fromkeys(r["config"] for r in speed_rows):
            v = {r["batch"]: r["ms"] for r in speed_rows if r["config"] == c}
            md.append(f"| {c} | {v.get(256, float('nan')):.2f} | {v.get(1, float('nan')):.3f} |")
        md.append("")
    md += [f"- {n}" for n in notes]
    meta = {"command": " ".join(["python"] + sys.argv), "device": device, "dtype": str(dtype), "img_size": size,
            "train_images": len(tr_img), "test_images": len(te_img), "readout_epochs": epochs,
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "seconds": {"data": t_data, "train_forward": t_train_fwd, "readout": t_readout,
                        "total": time.perf_counter() - t_start}, "notes": notes,
            "flops_unreduced": flops0}
    (out / "accuracy.json").write_text(json.dumps({**meta, "rows": rows, "after_encoder": after,
                                                   "speed": speed_rows}, indent=1) + "\n")
    (out / "accuracy.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "accuracy_pareto.png", f"ViT-S/14 CIFAR-10, {len(te_img)} test images: accuracy vs measured "
                                             "FLOP ratio (95% Wilson intervals)")
    log("\n".join(md))
    (out / "accuracy.partial.json").unlink(missing_ok=True)
    log(f"wrote {out}/accuracy.json, accuracy.md, accuracy_pareto.png in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
