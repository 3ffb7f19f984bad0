"""Accuracy retained under token reduction: top-1, kNN and WER, single- or multi-process.

Every evaluation compares configurations -- the unreduced model, each method
at each budget, recipes -- on the same data in the same process. A metric is
reported with its *retention* (metric / unreduced metric) and with the
*agreement* of the reduced model's predictions with the unreduced model's.

Multi-process (``torchrun --nproc_per_node N``): batches are dealt to ranks
round-robin (batch ``j`` runs on rank ``j % N``) and the per-batch outputs are
gathered in batch order, so every batch is exactly the batch a single
process would run and the metrics are identical to a single-process run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import api, consumer, registry, speech
from .data import to_tensor
from .models import load_timm
from .recipes import load_recipe
from .plan import check_budget

BASELINES = ("random", "pool")  # always evaluated beside the methods asked for


# ----------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model ready to evaluate or time, and what is needed to feed it."""

    model: torch.nn.Module
    name: str
    family: str  # "timm" or "hf"
    modality: str = "image"  # "image", "speech", "audio", "video"
    img_size: tuple[int, int] | None = None
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    processor: object = None
    num_classes: int = 0
    encoder: torch.nn.Module | None = None  # the part to time (HF: the vision/audio encoder)
    random_weights: bool = False  # a timm name built without --weights / --pretrained


def parse_model_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-args is not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(out, dict):
        raise ValueError(f"--model-args must be a JSON object, got {text!r}")
    return out


def load_model(spec: str, weights: str | None = None, model_args: dict | None = None,
               num_classes: int | None = None, pretrained: bool = False, seed: int = 0,
               announce: Callable[[str], None] | None = None) -> LoadedModel:
    """A model from a timm name, a local folder (timm layout: ``config.json`` with
    ``architecture``; or a Hugging Face folder) or a Hugging Face id.

    ``announce(description)`` is called once the spec is known to name a model, right before the
    (slow) build or download: a bad spec raises before anything is announced."""
    model_args = dict(model_args or {})
    announce = announce or (lambda text: None)
    path = Path(spec)
    if path.exists():
        cfg_file = path / "config.json" if path.is_dir() else None
        cfg = json.loads(cfg_file.read_text()) if cfg_file is not None and cfg_file.exists() else {}
        if "architecture" in cfg:
            announce(f"{path.name} ({cfg['architecture']}, timm) from {path.resolve()}")
            return _load_timm(cfg["architecture"], path, {**cfg.get("model_args", {}), **model_args},
                              num_classes, False, seed, label=path.name)
        if "model_type" in cfg:
            return _load_hf(str(path), model_args, announce, f"{path.name} ({cfg['model_type']}, Hugging Face) "
                                                             f"from {path.resolve()}")
        if path.is_file() and path.suffix in (".safetensors", ".pth", ".bin"):
            raise ValueError(f"{spec} is a bare weights file: give the architecture with --model <timm name> "
                             f"--weights {spec}")
        raise ValueError(f"{spec} is neither a timm folder (config.json with 'architecture') nor a Hugging "
                         "Face folder (config.json with 'model_type')")
    if weights is not None:
        announce(f"{spec} (timm) with weights from {weights}")
        return _load_timm(spec, Path(weights), model_args, num_classes, False, seed, label=spec)
    import timm

    if timm.is_model(spec.split(".")[0]) or spec.startswith(("hf-hub:", "hf_hub:")):
        announce(f"{spec} (timm) " + ("with pretrained weights from the hub" if pretrained else "with RANDOM weights"))
        return _load_timm(spec, None, model_args, num_classes, pretrained, seed, label=spec)
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        return _load_hf(spec, model_args, announce, f"{spec} (Hugging Face hub or cache)")
    raise ValueError(f"unknown model {spec!r}: not a timm model name (timm.list_models()), not a local path, "
                     "not a Hugging Face id (owner/name)")


def _load_timm(name, weights, model_args, num_classes, pretrained, seed, label) -> LoadedModel:
    torch.manual_seed(seed)  # random weights are reproducible
    kwargs = dict(model_args)
    img_size = kwargs.pop("img_size", None)
    arg_classes = kwargs.pop("num_classes", None)
    num_classes = arg_classes if num_classes is None else num_classes
    try:
        if weights is not None:
            # load with the checkpoint's own head, then reset it: num_classes=0 gives the feature extractor
            model = load_timm(name, weights=weights, img_size=img_size, **kwargs)
            if num_classes is not None and num_classes != model.num_classes:
                model.reset_classifier(num_classes)
        else:
            model = load_timm(name, num_classes=num_classes, img_size=img_size, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build timm model {name!r} with {model_args}: {e}") from None
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else None
    return LoadedModel(model, label, "timm", "image", size, tuple(cfg.get("mean", LoadedModel.mean)),
                       tuple(cfg.get("std", LoadedModel.std)), None, int(getattr(model, "num_classes", 0)), model,
                       random_weights=weights is None and not pretrained)


def _load_hf(spec, model_args, announce=None, description: str = "") -> LoadedModel:
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise ValueError("Hugging Face models need transformers: pip install 'tokenprune[hf]'") from None
    try:
        cfg = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load Hugging Face model {spec!r}: {str(e).splitlines()[0]}") from None
    kind = cfg.model_type
    if announce is not None:
        announce(description or spec)
    kw = dict(attn_implementation="sdpa", **model_args)
    if kind == "whisper":
        model = transformers.WhisperForConditionalGeneration.from_pretrained(spec, **kw).eval()
        processor = transformers.WhisperProcessor.from_pretrained(spec)
        return LoadedModel(model, spec, "hf", "speech", processor=processor, encoder=model.get_encoder())
    model = transformers.AutoModel.from_pretrained(spec, **kw).eval()
    encoder = getattr(model, "vision_model", None) or getattr(model, "vision_tower", None) or model
    vcfg = getattr(cfg, "vision_config", cfg)
    size = getattr(vcfg, "image_size", None)
    modality = {"audio-spectrogram-transformer": "audio", "wav2vec2": "audio", "hubert": "audio",
                "videomae": "video", "vivit": "video"}.get(kind, "image")
    processor = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(spec)
    except Exception:  # noqa: BLE001 -- random-weight configs have no processor; inputs are then synthetic
        pass
    return LoadedModel(model, spec, "hf", modality, (size, size) if isinstance(size, int) else None,
                       processor=processor, encoder=encoder)


# ----------------------------------------------------------------------------- configurations
@dataclass
class Config:
    """One evaluated configuration: the unreduced model, or a method at a budget."""

    label: str  # line in the plot: "unreduced", a method name, or "recipe:<name>"
    method: str | None = None
    budget: float | None = None
    options: dict = field(default_factory=dict)
    schedule: dict | None = None

    @property
    def name(self) -> str:
        return "unreduced" if self.method is None else f"{self.label}@{self.budget:g}"

    def apply(self, model) -> None:
        if self.method is not None:
            api.apply(model, budget=self.budget, method=self.method, schedule=self.schedule, **self.options)


def parse_list(text: str | Sequence | None, kind=str) -> list:
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for t in items:
        t = t.strip() if isinstance(t, str) else t
        if t == "":
            continue
        try:
            out.append(kind(t))
        except ValueError:
            raise ValueError(f"{t!r} is not a {kind.__name__}") from None
    return out


def build_configs(methods: Sequence[str], budgets: Sequence[float], recipes: Sequence[str] = (),
                  baselines: Sequence[str] = BASELINES) -> tuple[list[Config], list[str]]:
    """The unreduced model, every method x budget, the baselines x budgets, then recipes.

    Unknown methods and budgets outside (0, 1] raise at once; a baseline that
    is not registered is skipped with a note.
    """
    known = registry.methods()
    methods = list(methods)
    notes = []
    if "all" in methods:  # every method that runs with its default options (not e.g. a pipeline)
        runnable = []
        for m in known:
            try:
                registry.make(m)
                runnable.append(m)
            except (ValueError, TypeError) as e:
                notes.append(f"'all' leaves out {m!r}: {e}")
        methods = runnable + [m for m in methods if m != "all"]
    methods = list(dict.fromkeys(methods))
    for m in methods:
        registry.get(m)  # unknown method -> ValueError listing the known ones
        try:  # each runs with its default options: one that cannot (a pipeline without reducers) is refused now
            registry.make(m)
        except (ValueError, TypeError) as e:
            raise ValueError(f"method {m!r} cannot run with its default options ({e}); give it as a recipe "
                             "(--recipe FILE.yaml with its method and options)") from None
    for b in budgets:
        check_budget(b)
    configs = [Config("unreduced")]
    order = list(dict.fromkeys(methods))
    for base in baselines:
        if base in order:
            continue
        if base in known:
            order.append(base)
        else:
            notes.append(f"baseline {base!r} is not registered in this install; skipped")
    for m in order:
        configs += [Config(m, m, float(b)) for b in budgets]
    for name in recipes:
        r = load_recipe(name)
        configs.append(Config(f"recipe:{r.name}", r.method, r.budget, dict(r.options), r.schedule))
    return configs, notes


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, num_batches: int) -> list[int]:
        return [j for j in range(num_batches) if j % self.world == self.rank]

    def gather(self, local: dict) -> dict:
        """Union of every rank's ``{batch index: value}``."""
        if self.world == 1:
            return local
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, local)
        out = {}
        for p in parts:
            out.update(p)
        return out


def setup_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world), device


def teardown_distributed(d: Dist, failed: bool = False) -> None:
    """Leave the process group: after a barrier when this rank finished, at once when it failed (a barrier would
    wait for ranks still inside a collective, and the job would hang instead of showing the error)."""
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str):
    """``(Dist, device)`` for a ``with`` block: joins torchrun's process group (if any) and leaves it on exit. An
    error on one rank leaves without the closing barrier, so the error ends the job (torchrun stops the other
    ranks) rather than every rank waiting for the one that failed."""
    d, device = setup_distributed(device)
    try:
        yield d, device
    except BaseException:
        teardown_distributed(d, failed=True)
        raise
    teardown_distributed(d)


# ----------------------------------------------------------------------------- running
def progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@torch.no_grad()
def run_batches(fn: Callable[[int], torch.Tensor], num_batches: int, dist_: Dist, desc: str,
                show: bool) -> list:
    """``fn(j)`` for this rank's batches, gathered from all ranks, in batch order."""
    local = {}
    for j in progress(dist_.mine(num_batches), desc, show and dist_.main):
        out = fn(j)
        local[j] = out.float().cpu() if isinstance(out, torch.Tensor) else out
    allout = dist_.gather(local)
    return [allout[j] for j in range(num_batches)]


def image_forward(lm: LoadedModel, images, batch_size: int, device: str, dtype: torch.dtype, features: bool):
    """``fn(j)`` running batch ``j`` of ``images`` through the model (logits or pooled features)."""
    size = lm.img_size or 224  # (height, width): a model may be built for a non-square input
    model = lm.model

    def fn(j):
        x = to_tensor(images[j * batch_size:(j + 1) * batch_size], size, lm.mean, lm.std).to(device, dtype)
        if lm.family == "timm":
            if features and api.is_applied(model):  # the pooling weights reduced tokens by their sizes
                tokens, state = api.features(model, x)
                return model.forward_head(tokens, pre_logits=True, sizes=state.sizes)
            if features:
                return model.forward_head(model.forward_features(x), pre_logits=True)
            return model(x)
        out = lm.encoder(pixel_values=x)
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0][:, 0]

    return fn


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote on cosine similarity (weights ``exp(sim / T)``)."""
    c = int(num_classes or int(train_labels.max()) + 1)
    tr = torch.nn.functional.normalize(train_feats.float(), dim=1)
    te = torch.nn.functional.normalize(test_feats.float(), dim=1)
    k = min(k, len(tr))
    preds = []
    for i in range(0, len(te), 256):
        sim = te[i:i + 256] @ tr.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), c).scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def plan_info(model) -> dict:
    try:
        p = api.plan(model)
    except ValueError:  # unreduced: every token leaves the encoder (as bench reports it)
        try:
            tokens = api.plan(model, budget=1.0, method="random").info.num_tokens
        except (ValueError, TypeError, NotImplementedError):  # a model tokenprune cannot reduce
            tokens = None
        return {"flop_ratio": 1.0, "tokens_out": tokens}
    return {"flop_ratio": p.flop_ratio, "tokens_out": p.num_out}


def evaluate(lm: LoadedModel, configs: Sequence[Config], task: str, data: dict, *, batch_size: int = 32,
             device: str = "cpu", dtype: torch.dtype = torch.float32, dist_: Dist | None = None,
             show: bool = True, k: int = 20, log=print, reference: dict | None = None,
             on_row: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], list[str]]:
    """Run every configuration on the data; rows of metrics (identical on every rank) and notes.

    ``reference`` (filled in by the unreduced configuration, or given from an earlier run):
    the unreduced model's predictions (``pred`` tensor, or ``hyps`` for WER) and ``metric``.
    ``on_row(rows)`` is called after each configuration (e.g. to save partial results).

    ``data`` for ``top1``: ``images, labels``; for ``knn`` also ``train_images, train_labels``;
    for ``consumer`` also ``readout`` (a frozen ``consumer.Readout``); for ``wer``: ``wavs, texts``.
    """
    dist_ = dist_ or Dist()
    rows, notes = [], []
    ref = reference if reference is not None else {}
    model = lm.model
    for cfg in progress(configs, "configurations", show and dist_.main):
        try:
            cfg.apply(model)
        except (ValueError, TypeError, NotImplementedError) as e:
            notes.append(f"{cfg.name}: not applicable to this model: {e}")
            log(f"skip {cfg.name}: {e}")
            continue
        try:
            t0 = time.perf_counter()
            row = {"config": cfg.name, "label": cfg.label, "method": cfg.method, "budget": cfg.budget,
                   "options": cfg.options or None, **plan_info(model)}
            if task in ("top1", "knn", "consumer"):
                images, labels = data["images"], torch.tensor(data["labels"])
                nb = math.ceil(len(images) / batch_size)
                if task == "consumer":  # the frozen readout trained on all output tokens (tokenprune.consumer)
                    fn = consumer.image_forward(lm, images, data["readout"], batch_size, device, dtype)
                else:
                    fn = image_forward(lm, images, batch_size, device, dtype, features=task == "knn")
                out = torch.cat(run_batches(fn, nb, dist_, cfg.name, show))
                n_seen = len(images)
                if task in ("top1", "consumer"):
                    pred = out.argmax(1)
                else:
                    tr_images = data["train_images"]
                    nb_tr = math.ceil(len(tr_images) / batch_size)
                    fn_tr = image_forward(lm, tr_images, batch_size, device, dtype, features=True)
                    bank = torch.cat(run_batches(fn_tr, nb_tr, dist_, cfg.name + " (train)", show))
                    n_seen += len(tr_images)
                    pred = knn_predict(bank, torch.tensor(data["train_labels"]), out, k)
                row["top1"] = (pred == labels).float().mean().item()
                if cfg.method is None:
                    ref["pred"], ref["metric"] = pred, row["top1"]
                row["retained"] = row["top1"] / ref["metric"] if ref.get("metric") else None
                row["agreement"] = (pred == ref["pred"]).float().mean().item() if "pred" in ref else None
            elif task == "wer":
                row.update(_wer_row(lm, cfg, data, batch_size, dist_, show, ref))
                n_seen = len(data["wavs"])
            else:
                raise ValueError(f"unknown task {task!r}; use top1, knn or wer")
            row["seconds"] = time.perf_counter() - t0
            row["samples_per_s"] = n_seen / row["seconds"]
        finally:
            api.remove(model)
        rows.append(row)
        if dist_.main:
            log(format_row(row, task))
            if on_row is not None:
                on_row(rows)
    return rows, notes


def _wer_row(lm, cfg, data, batch_size, dist_, show, ref) -> dict:
    wavs, texts = data["wavs"], data["texts"]
    nb = math.ceil(len(wavs) / batch_size)

    def fn(j):
        return list(speech.transcribe(lm.model, lm.processor, wavs[j * batch_size:(j + 1) * batch_size],
                                      batch_size=batch_size))

    hyps = [h for part in run_batches(fn, nb, dist_, cfg.name, show) for h in part]
    w = float(speech.wer(texts, hyps))
    norm = [speech.normalize_text(h) for h in hyps]
    out = {"wer": w}
    if cfg.method is None:
        ref["hyps"], ref["metric"] = norm, w
    if "hyps" in ref:
        out["agreement"] = sum(a == b for a, b in zip(norm, ref["hyps"])) / max(1, len(norm))
        # the change in WER (a fraction; x100 = points). No "retained": 1 - WER goes negative once
        # WER > 100%, and a ratio of such numbers means nothing
        out["wer_delta"] = w - ref["metric"]
    return out


def format_row(row: dict, task: str) -> str:
    fr = f"FLOPs x{row['flop_ratio']:.3f}"
    ret = ""
    if task == "wer":  # WER and its change in points; never "retained" (see _wer_row)
        m = f"WER {row['wer']:.2%}"
        if row.get("wer_delta") is not None and row.get("method") is not None:
            ret = f" ({100 * row['wer_delta']:+.2f} points)"
    else:
        m = f"{ {'top1': 'top-1', 'knn': 'kNN top-1'}.get(task, 'consumer top-1')} {row['top1']:.2%}"
        ret = f" retained {row['retained']:.1%}" if row.get("retained") is not None else ""
    agr = f" agreement {row['agreement']:.1%}" if row.get("agreement") is not None else ""
    return f"{row['config']:<22} {fr}  {m}{ret}{agr}  ({row['seconds']:.0f} s)"


def write_results(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.json`` (meta + rows) and ``<stem>.csv`` (rows) under ``out_dir``."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv"}
    paths["json"].write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return paths


def attach_speedups(rows: list[dict], bench_json, mismatched: list | None = None) -> int:
    """Add ``speedup`` (measured by ``tokenprune bench``, at its largest batch) to the rows of the
    same configurations; returns how many rows got one. A configuration whose FLOP ratio in the bench
    file differs from the row's was timed on another model or input: it gets none, and its name is
    appended to ``mismatched``."""
    path = Path(bench_json)
    if not path.exists():
        raise FileNotFoundError(f"--speedups file {path} does not exist")
    try:
        bench_rows = [r for r in json.loads(path.read_text()).get("rows", []) if r.get("speedup")]
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"--speedups {path} is not a results JSON (give the .json `tokenprune bench` wrote)") from None
    if not bench_rows:
        raise ValueError(f"--speedups {path} holds no speed-up rows (is it a tokenprune bench JSON?)")
    big = max(r["batch_size"] for r in bench_rows)
    speed = {r["config"]: r["speedup"] for r in bench_rows if r["batch_size"] == big}
    ratio = {r["config"]: r.get("flop_ratio") for r in bench_rows if r["batch_size"] == big}
    n = 0
    for r in rows:
        theirs, ours = ratio.get(r["config"]), r.get("flop_ratio")
        if theirs is not None and ours is not None and not math.isclose(theirs, ours, rel_tol=1e-6):
            if mismatched is not None:
                mismatched.append(r["config"])
            continue
        if r["config"] in speed:
            r["speedup"] = speed[r["config"]]
            r["speedup_batch"] = big
            n += 1
    return n


__all__ = ["LoadedModel", "load_model", "Config", "build_configs", "evaluate", "knn_predict", "Dist",
           "setup_distributed", "distributed", "write_results", "attach_speedups", "load_reusable"]


def reference_to_json(ref: dict) -> dict:
    out = {"metric": ref.get("metric")}
    if "pred" in ref:
        out["pred"] = ref["pred"].tolist()
    if "hyps" in ref:
        out["hyps"] = list(ref["hyps"])
    return out


def load_reusable(path, task: str, model: str, num_samples: int, dtype: str,
                  samples: dict | None = None) -> tuple[dict[str, dict], dict | None]:
    """Rows of an earlier run (``--reuse``) by configuration name, and its unreduced predictions
    (``None`` if that run did not store them: the unreduced model then runs again)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--reuse file {path} does not exist")
    prev = json.loads(path.read_text())
    want = {"task": task, "model": model, "num_samples": num_samples, "dtype": dtype}
    if samples is not None and "samples" in prev:  # which samples (data path, seed, train set): the same
        # number is not enough. A file of an older tokenprune does not record them (the command warns)
        want["samples"] = samples
    got = {k: prev.get(k) for k in want}
    if got != want:
        def flat(d):  # the sample record's fields beside the others
            return {**{k: v for k, v in d.items() if k != "samples"}, **(d.get("samples") or {})}

        flat_got, flat_want = flat(got), flat(want)
        diff = [k for k in flat_want if flat_got.get(k) != flat_want[k]]
        raise ValueError(f"--reuse {path} was made with {', '.join(f'{k}={flat_got.get(k)!r}' for k in diff)}, "
                         f"this run has {', '.join(f'{k}={flat_want[k]!r}' for k in diff)}; they cannot be combined")
    ref = prev.get("reference")
    if ref and ref.get("pred") is not None:
        ref = {"metric": ref["metric"], "pred": torch.tensor(ref["pred"])}
    elif ref and ref.get("hyps") is not None:
        ref = {"metric": ref["metric"], "hyps": ref["hyps"]}
    else:
        ref = None
    return {r["config"]: r for r in prev.get("rows", [])}, ref
