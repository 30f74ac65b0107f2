"""Repeated patient-level K-fold cross-validation for model v2 (the evidence behind its recipe).

    python -m training.crossval --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \
        --metadata-table ../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz \
        --out runs/cv --config training/configs/v2.toml [--stage train|report|all] [--variant NAME]

Stage "train": for every variant of the config and every repeat (fold seed), trains one model per
fold on the other folds' images (random init, patient input fixed at the unknown code, so its
logits are image evidence) and saves the held-out fold's logits at the snapshot epochs, for the
EMA and the raw weights (``<out>/<variant>/rep<r>/fold<k>/preds.npz``). It is resumable: a
checkpoint is written after every epoch and finished folds are skipped, so a killed run started
again with the same command continues. Nothing depends on wall-clock time (a SIGSTOP/SIGCONT
pause changes only the recorded seconds).

Stage "report" (CPU seconds): fits the patient prior on the full NIH table without the shared
patients, combines image and prior logits with calibration fitted out of fold (cross-fitting on
the same folds), scores everything out of fold, runs the paired patient-level bootstrap
comparisons and writes ``<out>/cv_report.json``, ``<out>/oof.csv`` and a reliability diagram.
Choices follow the rules written in :func:`choose` (stated before the runs, see the model card).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import tomllib
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr_batch.findings import FINDINGS
from cxr_batch.metrics import MIN_RESAMPLES
from cxr_batch.model import ModelConfig, build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing, normalise

from . import cache, cvstats
from .augment import eval_transform_batch, train_transform
from .cache import build_cache, build_views, cache_size_for
from .prepare import multi_hot
from .table_prior import PriorConfig, encode_rows, fit_prior, prior_logits, prior_probabilities_uncentred, read_table

log = logging.getLogger("cxr_batch.crossval")
URGENT = FINDINGS.index("Pneumothorax")


# ---------------------------------------------------------------- configuration
@dataclass
class Variant:
    """One training recipe of the image path (each costs a full cross-validation)."""

    name: str
    image_size: int = 64
    epochs: int = 60
    snapshots: list = field(default_factory=lambda: [20, 40, 60])  # epochs whose OOF logits are kept
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.5
    hidden_dim: int = 128
    ema_decay: float = 0.99
    label_smoothing: float = 0.0
    pos_weight_max: float = 10.0
    seed_offset: int = 0  # added to every model seed of this variant (another draw of the same recipe)
    view_balance: bool = False  # weight the loss so that view given "No Finding" or not matches the NIH table

    @property
    def cost(self) -> float:
        """Inference cost relative to one 64-px model (the convolutions scale with the pixels)."""
        return (self.image_size / 64) ** 2

    def __post_init__(self):
        bad = [e for e in self.snapshots if not 1 <= e <= self.epochs]
        if bad:
            raise ValueError(f"variant {self.name}: snapshot epochs {bad} outside 1..{self.epochs}")


@dataclass
class CVConfig:
    folds: int = 5
    fold_seeds: list = field(default_factory=lambda: [0])  # one repeat per seed
    test_fraction: float = 0.0  # > 0: that share of the patients is held out of every fold and every choice
    test_seed: int = 0
    train_seed: int = 1000
    variants: list = field(default_factory=list)
    priors: list = field(default_factory=lambda: [PriorConfig()])
    combine_methods: list = field(default_factory=lambda: ["prior_only", "sum", "shared", "image_per_finding", "per_finding"])
    combine_C: float = 1.0
    threshold_methods: list = field(default_factory=lambda: ["precision_f1", "f1", "youden"])
    precision_min: float = 0.30
    bootstrap: int = 2000
    bootstrap_seed: int = 7
    crossfit_repeats: int = 20  # extra random partitions for the post-hoc choices
    ece_bins: int = 10
    max_cost: float | None = None  # largest inference cost (Variant.cost) the choice may take: the speed budget
    overrides: dict = field(default_factory=dict)  # fix a choice by hand: image / prior / combine / thresholds

    @classmethod
    def from_toml(cls, path: Path) -> "CVConfig":
        """Read and check a config before any work: unknown keys, wrong types and impossible
        values are a :class:`ConfigError` naming the key (a typo must not cost a GPU run)."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        try:
            variants = [Variant(**_checked(Variant, v, f"[[variant]] {i + 1}")) for i, v in enumerate(_tables(data.pop("variant", []), "variant"))]
            priors = [PriorConfig(**_checked(PriorConfig, p, f"[[prior]] {i + 1}")) for i, p in enumerate(_tables(data.pop("prior", []), "prior"))]
            cfg = cls(variants=variants, priors=priors or [PriorConfig()], **_checked(cls, data, "top level"))
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        problems = cfg.problems()
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
        return cfg

    def problems(self) -> list[str]:
        out = []
        if self.folds < 2:
            out.append(f"folds = {self.folds}: at least 2")
        if not 0.0 <= self.test_fraction <= 0.5:
            out.append(f"test_fraction = {self.test_fraction}: between 0 (no held-out test) and 0.5")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            out.append(f"variant names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                       "each variant writes to a folder of its name")
        for v in self.variants:
            if v.epochs < 1 or v.image_size < 16 or v.batch_size < 2:
                out.append(f"variant {v.name}: epochs >= 1, image_size >= 16 and batch_size >= 2")
        if self.max_cost is not None:
            cheapest = min((v.cost for v in self.variants), default=None)
            if self.max_cost <= 0 or (cheapest is not None and self.max_cost < cheapest):
                out.append(f"max_cost = {self.max_cost}: must be > 0 and at least the cheapest variant's cost "
                           f"({cheapest})")
        if self.crossfit_repeats < 0 or self.ece_bins < 1:
            out.append("crossfit_repeats >= 0 and ece_bins >= 1")
        # the minimum `cxr-batch evaluate` and `train` hold a 95% interval to (fewer: each tail
        # rests on a handful of resamples); the intervals and paired differences here need one
        if self.bootstrap < MIN_RESAMPLES:
            out.append(f"bootstrap = {self.bootstrap}: at least {MIN_RESAMPLES} resamples "
                       "(cxr_batch.metrics.MIN_RESAMPLES) for the 95% intervals")
        bad = set(self.overrides) - {"image", "prior", "combine", "thresholds"}
        if bad:
            out.append(f"[overrides]: unknown {sorted(bad)} (image, prior, combine or thresholds)")
        return out

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r} in the config: {[v.name for v in self.variants]}")

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    """A cross-validation config that cannot be run, with the key named."""


def _tables(value, name: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{name}: expected [[{name}]] tables")
    return value


def _checked(cls, data: dict, where: str) -> dict:
    """``data`` for ``cls(**data)``: every key a field of ``cls``, every value of its default's type
    (an int where a float is expected is fine; a field whose default is None takes a number)."""
    fields = cls.__dataclass_fields__
    internal = {"variants", "priors"}  # filled from the [[variant]] and [[prior]] tables
    unknown = sorted(k for k in data if k not in fields or k in internal)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(k for k in fields if k not in ('variants', 'priors'))})")
    for key, value in data.items():
        f = fields[key]
        if f.default is MISSING and f.default_factory is MISSING:
            continue  # a required field (a variant's name): any TOML value names it
        default = f.default if f.default is not MISSING else f.default_factory()
        if default is None:
            ok = value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
        if key == "snapshots" and ok:
            ok = all(isinstance(e, int) and not isinstance(e, bool) for e in value)
        if not ok:
            want = "a list of whole numbers" if key == "snapshots" else type(default).__name__ if default is not None else "a number"
            raise ValueError(f"{where}: {key} = {value!r} should be {want}")
    return data


def prior_name(p: PriorConfig) -> str:
    return f"{p.rows}-hide{p.hide_rate:g}"


# ---------------------------------------------------------------- data
def load_labels(path: Path) -> pd.DataFrame:
    table = read_table(path)
    if table["image"].duplicated().any():
        raise ValueError(f"{path}: duplicated image names")
    return table


def load_sources(images: list[str], labels: list[str]) -> pd.DataFrame:
    """The labelled images of one or more folders (``--images DIR --labels CSV`` pairs, e.g. the
    480 shared NIH images and the 1,083 of nih_extra): the labels tables concatenated, with the
    folder of each image in ``images_dir``. An image name in two tables is an error (the same
    NIH image twice would sit on both sides of a split)."""
    if len(images) != len(labels):
        raise SystemExit(f"give one --labels per --images ({len(images)} --images, {len(labels)} --labels)")
    parts = [load_labels(Path(lab)).assign(images_dir=str(img)) for img, lab in zip(images, labels)]
    table = pd.concat(parts, ignore_index=True)
    twice = table["image"][table["image"].duplicated()]
    if len(twice):
        raise SystemExit(f"{len(twice)} image name(s) in more than one labels table, e.g. {sorted(twice)[:3]}")
    return table


def test_split(labels: pd.DataFrame, cfg: "CVConfig") -> np.ndarray:
    """bool [N]: the held-out test rows, ``test_fraction`` of the patients (every image of a
    patient on one side), stratified like the folds; all False when test_fraction is 0."""
    if cfg.test_fraction <= 0:
        return np.zeros(len(labels), dtype=bool)
    k = max(2, int(round(1 / cfg.test_fraction)))
    y = multi_hot(labels["labels"])
    return cvstats.assign_folds(y, labels["patient_id"].to_numpy(), k, cfg.test_seed) == 0


def folds_table(labels: pd.DataFrame, cfg: CVConfig) -> pd.DataFrame:
    """Per image: its patient, whether it is held-out test (``test``) and its fold in each repeat
    (-1 for a test image: it is in no fold)."""
    y = multi_hot(labels["labels"])
    out = labels[["image", "patient_id"]].copy()
    test = test_split(labels, cfg)
    dev = np.flatnonzero(~test)
    for r, seed in enumerate(cfg.fold_seeds):
        fold = np.full(len(labels), -1)
        fold[dev] = cvstats.assign_folds(y[dev], labels["patient_id"].to_numpy()[dev], cfg.folds, seed)
        out[f"fold_rep{r}"] = fold
    if cfg.test_fraction > 0:
        out["test"] = test.astype(int)
    return out


def caches_ready(out: Path, names: list[str], cfg: "CVConfig") -> bool:
    """Whether ``out/cache`` holds every variant's decoded images (built elsewhere and copied,
    e.g. to a GPU machine that has no copy of the PNGs): then the PNGs are not needed."""
    return all(cache.built(out / "cache", names, Preprocessing(image_size=v.image_size)) for v in cfg.variants)


def image_paths(labels: pd.DataFrame) -> dict:
    """{image name: its file}, from ``images_dir`` (see :func:`load_sources`)."""
    return {n: Path(d) / n for n, d in zip(labels["image"], labels["images_dir"])}


def load_cache(images, names: list[str], image_size: int, out: Path) -> np.ndarray:
    """uint8 [N, C, C] in the order of ``names`` (decoded once, shared by every fold). ``images``:
    the folder of every image, or {name: file}."""
    size = cache_size_for(Preprocessing(image_size=image_size))
    folder = out / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    arr, index = build_cache(images, names, size, folder, workers=1)
    return np.ascontiguousarray(arr[[index[n] for n in names]])


def load_views(images, names: list[str], image_size: int, out: Path) -> np.ndarray:
    """float32 [N, S, S] in the order of ``names``: each image as inference makes the model's view
    of it (:func:`training.cache.build_views`), what held-out and in-sample logits are computed on."""
    folder = out / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    arr, index = build_views(images, names, Preprocessing(image_size=image_size), folder, workers=1)
    return np.ascontiguousarray(arr[[index[n] for n in names]])


def view_weights(labels: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """float [N]: per image, P_NIH(view | no finding or not) / P_here(view | the same), from the full
    NIH table. The nih_extra images are not a random sample: their "No Finding" images are 63% AP
    against 35% in NIH, so unweighted, "looks like an AP film" would teach "no finding" (the
    opposite of the NIH truth, where AP films come from sicker patients). The weights correct the
    view mix within each stratum only; finding prevalences are corrected later, on the logits."""
    def shares(views: pd.Series, normal: pd.Series) -> dict:
        out = {}
        for nf in (True, False):
            v = views[normal == nf]
            out.update({(nf, view): float((v == view).mean()) if len(v) else 0.0 for view in ("AP", "PA")})
        return out

    here = shares(labels["view"], labels["labels"] == "No Finding")
    nih = shares(table["view"], table["labels"] == "No Finding")
    w = np.ones(len(labels))
    for i, (view, text) in enumerate(zip(labels["view"], labels["labels"])):
        key = (text == "No Finding", view)
        if key in here and here[key] > 0:
            w[i] = nih[key] / here[key]
    return w / w.mean()


# pos_weights: copied from training/train.py (kept here so this module does not depend on a file
# under refactoring): sqrt(negatives / positives), capped, 1 for a class without positives.
def pos_weights(y: np.ndarray, cap: float) -> np.ndarray:
    pos = y.sum(axis=0)
    neg = len(y) - pos
    w = np.where(pos > 0, np.sqrt(neg / np.maximum(pos, 1)), 1.0)
    return np.clip(w, 1.0, cap).astype(np.float32)


# ---------------------------------------------------------------- training one model
def build_v2_model(v: Variant) -> nn.Module:
    return build_model(ModelConfig(dropout=v.dropout, hidden_dim=v.hidden_dim, tabular_skip=True))


@torch.inference_mode()
def image_logits(model, images: np.ndarray, prep: Preprocessing, unknown: float, batch: int = 64,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """Logits [N, 14] with the patient input at the unknown code (the image evidence). ``images``:
    model views (float [N, S, S] in [0, 1], :func:`load_views`: the inference transform's, only
    normalised here), or uint8 cache rows [N, C, C] (cropped and resized here, as training's
    cache allows: not exactly what a scan computes)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch]))[:, None].to(device)
        x = eval_transform_batch(x, prep) if x.dtype == torch.uint8 else normalise(x.float(), prep)
        tab = torch.full((len(x), 3), unknown, device=device)
        out.append(model(x.contiguous(memory_format=torch.channels_last), tab).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(FINDINGS)), np.float32)


def _as_tensors(snaps: dict) -> dict:
    """Snapshot logits as tensors, so that a checkpoint loads with ``weights_only=True``."""
    return {e: {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in d.items()} for e, d in snaps.items()}


def _as_arrays(snaps: dict) -> dict:
    return {e: {k: t.numpy() for k, t in d.items()} for e, d in snaps.items()}


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_model(images: np.ndarray, y: np.ndarray, v: Variant, seed: int, folder: Path,
                held_out: np.ndarray | None = None, keep_states: bool = False,
                device: str = "cpu", checkpoint_every: int = 1, weights: np.ndarray | None = None,
                test: np.ndarray | None = None, views: np.ndarray | None = None) -> dict:
    """Train on ``images`` [N, C, C] uint8 / ``y`` [N, 14]; at each snapshot epoch store logits
    of ``held_out`` images (and of the training images: their ``views`` [N, S, S], as
    :func:`image_logits` takes them, else ``images``) for the EMA and the raw weights, and
    with ``keep_states`` their state dicts. Resumes from ``folder/checkpoint.pt``, written every
    ``checkpoint_every`` epochs (0: never; on a GPU an epoch takes well under a second and a
    checkpoint, with the optimiser and EMA states, is 150 MB). Augmentation runs on the CPU with
    the seeded generator; the model on ``device``. ``weights`` [N]: per-image loss weights (mean
    1), e.g. :func:`view_weights`. ``test`` [M, C, C]: held-out test images, scored at each
    snapshot like ``held_out`` (``<which>_test``)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dev = torch.device(device)
    prep = Preprocessing(image_size=v.image_size)
    unknown = PatientEncoding().unknown_value
    model = build_v2_model(v).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=v.lr, weight_decay=v.weight_decay)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(v.ema_decay), use_buffers=True)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weights(y, v.pos_weight_max)).to(dev),
                                     reduction="none")
    wt = torch.from_numpy(np.ones(len(y)) if weights is None else np.asarray(weights)).float()
    gen = torch.Generator().manual_seed(seed)
    start, history, snaps = 0, [], {}
    ckpt_path = folder / "checkpoint.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True, map_location="cpu")  # data only: a planted checkpoint cannot run code
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        ema.load_state_dict(ck["ema"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        start, history, snaps = ck["epoch"], ck["history"], _as_arrays(ck["snapshots"])
        log.info("%s: resumed after epoch %d", folder, start)
    n, bs = len(images), v.batch_size
    steps = max(1, n // bs)  # drop the last partial batch (BatchNorm on a handful of images is noisy)
    yt = torch.from_numpy(y.astype(np.float32))
    no_mirror = torch.zeros(bs, dtype=torch.bool)
    tab = torch.full((bs, 3), unknown, device=dev)
    for epoch in range(start, v.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).numpy()
        total = torch.zeros((), device=dev)  # summed on the device: one synchronisation per epoch
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            x = train_transform(torch.from_numpy(images[idx])[:, None], no_mirror[:len(idx)], prep, generator=gen)
            target = yt[idx]
            if v.label_smoothing:
                target = target * (1 - v.label_smoothing) + v.label_smoothing / 2
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            w = wt[idx].to(dev, non_blocking=True)
            per_image = criterion(model(x, tab[:len(idx)]), target.to(dev, non_blocking=True)).mean(dim=1)
            loss = (per_image * w).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update_parameters(model)
            total += loss.detach()
        row = {"epoch": epoch + 1, "train_loss": total.item() / steps, "seconds": time.perf_counter() - t0}
        if epoch + 1 in v.snapshots:
            t1 = time.perf_counter()
            snap = {}
            for which, m in (("ema", ema.module), ("raw", model)):
                if held_out is not None:
                    snap[f"{which}_held_out"] = image_logits(m, held_out, prep, unknown, device=dev)
                if test is not None:
                    snap[f"{which}_test"] = image_logits(m, test, prep, unknown, device=dev)
                snap[f"{which}_train"] = image_logits(m, images if views is None else views, prep, unknown, device=dev)
                if keep_states:
                    atomic_save({k: t.detach().cpu().clone() for k, t in m.state_dict().items()},
                                folder / f"state_{which}_epoch{epoch + 1}.pt")
            snaps[epoch + 1] = snap
            row["snapshot_seconds"] = time.perf_counter() - t1
        history.append(row)
        log.info("%s epoch %d/%d loss %.4f %.1fs", folder.name, epoch + 1, v.epochs, row["train_loss"], row["seconds"])
        if checkpoint_every and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == v.epochs):
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                         "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                         "history": history, "snapshots": _as_tensors(snaps)}, ckpt_path)
    return {"history": history, "snapshots": snaps, "model": model, "ema": ema.module}


def snapshot_arrays(snaps: dict) -> dict:
    """{epoch: {key: [n, 14]}} -> flat arrays for an npz: epochs [S], '<key>' [S, n, 14]."""
    epochs = sorted(snaps)
    keys = sorted(snaps[epochs[0]]) if epochs else []
    return {"epochs": np.array(epochs), **{k: np.stack([snaps[e][k] for e in epochs]) for k in keys}}


def run_fold(images: np.ndarray, y: np.ndarray, fold: np.ndarray, f: int, v: Variant, seed: int, folder: Path,
             weights: np.ndarray | None = None, views: np.ndarray | None = None, **train_kw) -> None:
    """Train (or resume, or extend to more epochs) the model of fold ``f`` and write its held-out
    logits to ``folder/preds.npz``. The last checkpoint is kept so that a variant can later be
    trained for more epochs with the same command. Rows with fold -1 (the held-out test) are
    never trained on; they are scored at each snapshot (``<which>_test``, rows ``test_rows``).
    ``views``: the images as inference sees them (:func:`load_views`), what every row is scored on."""
    done = folder / "preds.npz"
    if done.exists() and set(v.snapshots) <= set(np.load(done)["epochs"].tolist()):
        log.info("%s: done, skipped", folder)
        return
    tr, te, ts = np.flatnonzero((fold != f) & (fold >= 0)), np.flatnonzero(fold == f), np.flatnonzero(fold < 0)
    t0 = time.perf_counter()
    scored = images if views is None else views
    result = train_model(images[tr], y[tr], v, seed, folder, held_out=scored[te],
                         weights=None if weights is None else weights[tr],
                         test=scored[ts] if len(ts) else None, views=scored[tr], **train_kw)
    arrays = snapshot_arrays(result["snapshots"])
    np.savez_compressed(folder / "preds.tmp.npz", train_rows=tr, held_out_rows=te, test_rows=ts, **arrays)
    os.replace(folder / "preds.tmp.npz", done)
    (folder / "history.json").write_text(json.dumps({"variant": asdict(v), "seed": seed, "fold": f,
                                                     "history": result["history"],
                                                     "seconds_this_process": time.perf_counter() - t0}, indent=1))


def loss_weights(args, v: Variant, labels: pd.DataFrame) -> np.ndarray | None:
    """The variant's per-image loss weights (None: unweighted), computed on the labelled rows."""
    if not v.view_balance:
        return None
    return view_weights(labels, read_table(Path(args.metadata_table)))


def stage_train(args, cfg: CVConfig, labels: pd.DataFrame, folds: pd.DataFrame) -> None:
    y = multi_hot(labels["labels"])
    names = list(labels["image"])
    variants = [cfg.variant(args.variant)] if args.variant else cfg.variants
    repeats = range(len(cfg.fold_seeds)) if args.repeat is None else [args.repeat]
    dev = folds["fold_rep0"].to_numpy() >= 0
    for v in variants:
        images = load_cache(image_paths(labels), names, v.image_size, Path(args.out))
        views = load_views(image_paths(labels), names, v.image_size, Path(args.out))
        weights = loss_weights(args, v, labels[dev])
        if weights is not None:
            full = np.ones(len(labels))
            full[dev] = weights
            weights = full
        for r in repeats:
            fold = folds[f"fold_rep{r}"].to_numpy()
            for f in (range(cfg.folds) if args.folds is None else args.folds):
                # the same initial weights for a fold in every variant: paired comparisons
                seed = cfg.train_seed + 100 * r + f + v.seed_offset
                run_fold(images, y, fold, f, v, seed, Path(args.out) / v.name / f"rep{r}" / f"fold{f}",
                         weights=weights, views=views, device=args.device, checkpoint_every=args.checkpoint_every)


FINAL_SEED_OFFSET = 999  # the final model's seed: train_seed + 999 (no fold uses it)


def stage_final(args, cfg: CVConfig, labels: pd.DataFrame, folds: pd.DataFrame) -> None:
    """Train ``--variant`` on every development image (all folds; never the held-out test),
    keeping the EMA and raw state dicts at every snapshot epoch in ``<out>/<variant>/final``,
    and scoring the held-out test images there (``preds.npz``, ``<which>_test``) at each one."""
    v = cfg.variant(args.variant)
    y = multi_hot(labels["labels"])
    fold = folds["fold_rep0"].to_numpy()
    dev, ts = np.flatnonzero(fold >= 0), np.flatnonzero(fold < 0)
    images = load_cache(image_paths(labels), list(labels["image"]), v.image_size, Path(args.out))
    views = load_views(image_paths(labels), list(labels["image"]), v.image_size, Path(args.out))
    weights = loss_weights(args, v, labels.iloc[dev])
    folder = Path(args.out) / v.name / "final"
    if (folder / "preds.npz").exists():
        log.info("%s: done, skipped", folder)
        return
    t0 = time.perf_counter()
    seed = cfg.train_seed + FINAL_SEED_OFFSET + v.seed_offset
    result = train_model(images[dev], y[dev], v, seed, folder, keep_states=True, weights=weights,
                         test=views[ts] if len(ts) else None, views=views[dev], device=args.device,
                         checkpoint_every=args.checkpoint_every)
    np.savez_compressed(folder / "preds.tmp.npz", train_rows=dev, test_rows=ts, **snapshot_arrays(result["snapshots"]))
    os.replace(folder / "preds.tmp.npz", folder / "preds.npz")
    (folder / "history.json").write_text(json.dumps({"variant": asdict(v), "seed": seed, "history": result["history"],
                                                     "seconds_this_process": time.perf_counter() - t0}, indent=1))


# ---------------------------------------------------------------- collecting out-of-fold logits
def collect_oof(out: Path, v: Variant, r: int, n: int, k: int, row_map: np.ndarray | None = None) -> dict | None:
    """{(epoch, 'ema'|'raw'): logits [n, 14]} for a finished repeat, else None. Also the
    in-sample logit spread: {(epoch, which): mean over folds of the per-finding std}.
    ``row_map``: row of the report for each row of the training table (with a held-out test, the
    report sees the development rows only)."""
    folder = out / v.name / f"rep{r}"
    files = [folder / f"fold{f}" / "preds.npz" for f in range(k)]
    if not all(p.exists() for p in files):
        return None
    oof, spread = {}, {}
    for p in files:
        d = np.load(p)
        for s, e in enumerate(d["epochs"]):
            for which in ("ema", "raw"):
                key = (int(e), which)
                rows = d["held_out_rows"] if row_map is None else row_map[d["held_out_rows"]]
                oof.setdefault(key, np.full((n, len(FINDINGS)), np.nan))[rows] = d[f"{which}_held_out"][s]
                spread.setdefault(key, []).append(d[f"{which}_train"][s].std(axis=0))
    # a snapshot epoch that only some folds reached (a variant trained longer in some folds) is left out
    oof = {key: z for key, z in oof.items() if np.isfinite(z).all()}
    spread = {key: sds for key, sds in spread.items() if key in oof}
    return {"oof": oof, "train_std": {key: np.mean(sds, axis=0) for key, sds in spread.items()},
            "seconds": [sum(h["seconds"] + h.get("snapshot_seconds", 0.0) for h in
                            json.loads((folder / f"fold{f}" / "history.json").read_text())["history"])
                        for f in range(k)]}


# ---------------------------------------------------------------- report helpers
def prevalence_by_fold(y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """[N, 14]: for each row, the prevalence of the *other* folds (what 'predicting the training
    prevalence' means out of fold)."""
    out = np.zeros(y.shape)
    for f in np.unique(folds):
        out[folds == f] = y[folds != f].mean(axis=0)
    return out


def calibration_summary(y: np.ndarray, p: np.ndarray, prev: np.ndarray, bins: int) -> dict:
    b, b0 = cvstats.brier(y, p), cvstats.brier_reference(y, prev)
    return {"mean_auc": cvstats.mean_auc(y, p), "brier": b, "brier_prevalence": b0, "brier_skill": 1 - b / b0,
            f"ece_{bins}": cvstats.ece(y, p, bins), "ece_15": cvstats.ece(y, p, 15),
            "mean_predicted": float(p.mean()), "prevalence": float(y.mean())}


def random_partitions(n_rows: int, patients: np.ndarray, y: np.ndarray, k: int, repeats: int, seed: int) -> list:
    return [cvstats.assign_folds(y, patients, k, seed + 1000 + i) for i in range(repeats)]


def combination_scores(y, z_img, z_prior, folds, partitions, method, C, prev_fn, bins) -> dict:
    """Cross-fitted calibration of one combination method: on the training folds and on extra
    random partitions (mean and sd over them)."""
    from joblib import Parallel, delayed

    # The partitions are independent fits (the slowest part of the report): one process per core.
    fits = Parallel(n_jobs=-1)(delayed(cvstats.cross_fit)(z_img, z_prior, y, part, method, C)
                               for part in [folds, *partitions])
    p = fits[0]
    main = calibration_summary(y, p, prev_fn(folds), bins)
    reps = [calibration_summary(y, q, prev_fn(part), bins) for q, part in zip(fits[1:], partitions)]
    spread = {f"{m}_over_partitions": [float(np.mean([r[m] for r in reps])), float(np.std([r[m] for r in reps]))]
              for m in ("brier", "brier_skill", f"ece_{bins}", "mean_auc")}
    return {**main, **spread, "p": p}


def threshold_scores(y, p, folds, partitions, method, precision_min) -> dict:
    from sklearn.metrics import f1_score

    def score(part):
        flags = cvstats.cross_fit_thresholds(y, p, part, method, precision_min=precision_min)
        return {"f1_macro": float(f1_score(y, flags, average="macro", zero_division=0.0)),
                "f1_micro": float(f1_score(y, flags, average="micro", zero_division=0.0)),
                "studies_flagged": float(flags.any(axis=1).mean()),
                "studies_flagged_pneumothorax": float(flags[:, URGENT].mean()),
                "flags_per_study": float(flags.sum(axis=1).mean())}

    main = score(folds)
    reps = [score(part) for part in partitions]
    return {**main, **{f"{m}_over_partitions": [float(np.mean([r[m] for r in reps])), float(np.std([r[m] for r in reps]))]
                       for m in main}}


def subgroup_table(labels: pd.DataFrame, y: np.ndarray, scores: dict, bins: int) -> dict:
    """By view, sex and age band: n, findings with both label values, mean AUROC of each score
    (over those findings), and Brier / pooled ECE of the calibrated model ('model')."""
    age = pd.to_numeric(labels["age"], errors="coerce")
    groups = {
        "view=PA": labels["view"] == "PA", "view=AP": labels["view"] == "AP",
        "sex=M": labels["sex"] == "M", "sex=F": labels["sex"] == "F",
        "age<40": age < 40, "age40-59": (age >= 40) & (age < 60), "age>=60": age >= 60,
    }
    out = {}
    for name, mask in groups.items():
        m = mask.to_numpy()
        if m.sum() < 2:
            continue
        ym = y[m]
        both = int(((ym.sum(0) > 0) & (ym.sum(0) < len(ym))).sum())
        row = {"n": int(m.sum()), "findings_with_both_labels": both, "positives": int(ym.sum())}
        for k, s in scores.items():
            row[f"mean_auc_{k}"] = cvstats.mean_auc(ym, s[m])
        row["brier_model"] = cvstats.brier(ym, scores["model"][m])
        row[f"ece_{bins}_model"] = cvstats.ece(ym, scores["model"][m], bins)
        row["mean_predicted_model"] = float(scores["model"][m].mean())
        row["prevalence"] = float(ym.mean())
        out[name] = row
    return out


def choose(candidates: list[dict], comparisons: dict, max_cost: float | None = None) -> dict:
    """The pre-stated selection rules (also in the model card):

    1. within a variant, the snapshot epoch and EMA-or-raw with the best out-of-fold image-only
       mean AUROC (free choices, a little optimistic: say so);
    2. across variants, in order of inference cost (then config order), the first (cheapest,
       default) recipe unless a later one within the speed budget ``max_cost`` has a paired gain
       in image-only mean AUROC over the one chosen so far whose 95% CI lies above 0.
    """
    best_by_variant = {}
    for c in candidates:
        b = best_by_variant.get(c["variant"])
        if b is None or c["image_only_mean_auc"] > b["image_only_mean_auc"]:
            best_by_variant[c["variant"]] = c
    ordered = sorted(best_by_variant.values(), key=lambda c: c["cost"])  # stable: config order within a cost
    chosen = ordered[0]
    for c in ordered[1:]:
        if max_cost is not None and c["cost"] > max_cost:
            continue
        key = f"{c['id']} - {chosen['id']}"
        if key in comparisons and comparisons[key]["ci95"][0] > 0:
            chosen = c
    return chosen


def candidate_id(variant: str, epoch: int, which: str, rep: int) -> str:
    return f"{variant}/e{epoch}/{which}/rep{rep}"


def report_row_map(labels: pd.DataFrame) -> np.ndarray | None:
    """Training-table row -> report row, when the report sees only the development rows
    (``row_all``, set by :func:`main`); None when they are the same."""
    if "row_all" not in labels:
        return None
    rows = labels["row_all"].to_numpy()
    out = np.full(rows.max() + 1 if len(rows) else 0, -1)
    out[rows] = np.arange(len(rows))
    return out


def image_candidates(out: Path, cfg: CVConfig, y: np.ndarray, row_map: np.ndarray | None = None) -> tuple[list, dict, dict]:
    """Every finished (variant, repeat, snapshot epoch, EMA or raw) with its out-of-fold image-only
    scores: (candidates, {id: OOF logits}, {variant/rep: run facts})."""
    candidates, oofs, runs = [], {}, {}
    for v in cfg.variants:
        for r in range(len(cfg.fold_seeds)):
            got = collect_oof(out, v, r, len(y), cfg.folds, row_map)
            if got is None:
                log.info("variant %s repeat %d not finished: left out of the report", v.name, r)
                continue
            runs[f"{v.name}/rep{r}"] = {"seconds_per_fold": got["seconds"], "epochs": v.epochs,
                                        "image_size": v.image_size}
            for (e, which), z in got["oof"].items():
                cid = candidate_id(v.name, e, which, r)
                oofs[cid] = z
                candidates.append({"id": cid, "variant": v.name, "image_size": v.image_size, "cost": v.cost, "epoch": e,
                                   "weights": which, "repeat": r,
                                   "image_only_mean_auc": cvstats.mean_auc(y, z),
                                   "image_only_auc": cvstats.auc_per_class(y, z).tolist(),
                                   "oof_logit_std": z.std(axis=0).mean().item(),
                                   "in_sample_logit_std": float(np.mean(got["train_std"][(e, which)]))})
    if not candidates:
        raise SystemExit("no finished cross-validation run to report on")
    return candidates, oofs, runs


def best_by_variant(candidates: list[dict]) -> list[dict]:
    """Rule 1 of :func:`choose` (repeat 0): each variant's best candidate, in order of cost
    (config order within a cost)."""
    best = {}
    for c in candidates:
        if c["repeat"] == 0:
            b = best.get(c["variant"])
            if b is None or c["image_only_mean_auc"] > b["image_only_mean_auc"]:
                best[c["variant"]] = c
    return sorted(best.values(), key=lambda c: c["cost"])


def variant_comparisons(y: np.ndarray, bests: list[dict], oofs: dict, resamples: list) -> dict:
    """Paired differences between the variants' best candidates, every pair as "later - earlier":
    what rule 2 of :func:`choose` reads."""
    return {f"{b['id']} - {a['id']}": cvstats.paired_difference(y, oofs[b["id"]], oofs[a["id"]], resamples)
            for i, a in enumerate(bests) for b in bests[i + 1:]}


def pick_image(cfg: CVConfig, candidates: list[dict], comparisons: dict) -> dict:
    if "image" in cfg.overrides:
        found = [c for c in candidates if c["id"] == cfg.overrides["image"]]
        if not found:
            raise SystemExit(f"[overrides] image = {cfg.overrides['image']!r} is none of the finished candidates: "
                             f"{', '.join(sorted(c['id'] for c in candidates))}")
        return found[0]
    return choose([c for c in candidates if c["repeat"] == 0], comparisons, cfg.max_cost)


def stage_choose(args, cfg: CVConfig, labels: pd.DataFrame) -> dict:
    """Only the image choice of the report (seconds, no patient prior): ``<out>/choice.json`` with
    the chosen candidate and every variant's best, e.g. to fetch only the chosen final model's
    weights from a GPU machine. The report stage makes the same choice from the same numbers."""
    y = multi_hot(labels["labels"]).astype(float)
    resamples, _ = cvstats.patient_bootstrap_indices(labels["patient_id"].to_numpy(), y, cfg.bootstrap, cfg.bootstrap_seed)
    candidates, oofs, _ = image_candidates(Path(args.out), cfg, y, report_row_map(labels))
    bests = best_by_variant(candidates)
    comparisons = variant_comparisons(y, bests, oofs, resamples)
    chosen = pick_image(cfg, candidates, comparisons)
    keep = ("id", "variant", "image_size", "cost", "epoch", "weights", "image_only_mean_auc")
    choice = {"chosen": {k: chosen[k] for k in keep}, "bests": [{k: c[k] for k in keep} for c in bests],
              "comparisons": comparisons, "max_cost": cfg.max_cost}
    (Path(args.out) / "choice.json").write_text(json.dumps(choice, indent=1, default=_json_default) + "\n")
    for c in bests:
        print(f"  best of {c['variant']:8s} {c['id']:24s} image-only AUROC {c['image_only_mean_auc']:.3f}  cost {c['cost']:.2f}")
    for k, v in comparisons.items():
        print(f"  paired {k}: {v['difference']:+.3f} (95% CI {v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f})")
    print(f"chosen image evidence {chosen['id']}")
    return choice


# ---------------------------------------------------------------- report stage
def stage_report(args, cfg: CVConfig, labels: pd.DataFrame, folds_df: pd.DataFrame) -> dict:
    out = Path(args.out)
    y = multi_hot(labels["labels"]).astype(float)
    n, K = y.shape
    patients = labels["patient_id"].to_numpy()
    enc = PatientEncoding()
    x = encode_rows(labels, enc)
    report: dict = {"config": cfg.to_dict(), "commands": {"report": "python -m training.crossval --stage report ..."}}
    report["data"] = {
        "images": n, "patients": int(len(np.unique(patients))), "one_image_per_patient": bool(len(np.unique(patients)) == n),
        "positives": dict(zip(FINDINGS, y.sum(0).astype(int).tolist())), "no_finding": int((y.sum(1) == 0).sum()),
        "views": labels["view"].value_counts().to_dict(), "sexes": labels["sex"].value_counts().to_dict(),
        "folds": {f"rep{r}": {f"fold{f}": {"images": int((folds_df[f'fold_rep{r}'] == f).sum()),
                                             "positives": y[folds_df[f'fold_rep{r}'].to_numpy() == f].sum(0).astype(int).tolist()}
                              for f in range(cfg.folds)} for r in range(len(cfg.fold_seeds))},
    }

    # patient priors on the full table, without any shared patient
    full = read_table(Path(args.metadata_table))
    # every patient of the labelled folders, held-out test ones included: a prior meant for
    # scoring a patient must not have been fitted on that patient's rows
    shared = set(getattr(args, "all_patients", None) or patients)
    priors, prior_probs = {}, {}
    for pc in cfg.priors:
        name = prior_name(pc)
        path = out / f"prior_{name}.json"
        if path.exists():
            prior = json.loads(path.read_text())
        else:
            prior = fit_prior(full, shared, pc, enc)
            path.write_text(json.dumps(prior, indent=1))
        priors[name] = prior
        prior_probs[name] = prior_probabilities_uncentred(prior, x)
    folds0 = folds_df["fold_rep0"].to_numpy()
    resamples, redrawn = cvstats.patient_bootstrap_indices(patients, y, cfg.bootstrap, cfg.bootstrap_seed)
    report["bootstrap"] = {"resamples": cfg.bootstrap, "unit": "patient", "redrawn_for_a_missing_class": redrawn,
                           "every_class_present_in_every_resample": True}
    report["priors"] = {}
    for name, p in prior_probs.items():
        report["priors"][name] = {k: priors[name][k] for k in ("rows", "patients", "excluded_patients", "excluded_rows", "config")}
        report["priors"][name].update({"mean_auc_on_shared": cvstats.mean_auc(y, p),
                                       "auc": dict(zip(FINDINGS, cvstats.auc_per_class(y, p).tolist()))})
    names = list(prior_probs)
    report["prior_comparisons"] = {f"{a} - {b}": cvstats.paired_difference(y, prior_probs[a], prior_probs[b], resamples)
                                   for i, a in enumerate(names) for b in names[i + 1:]}
    chosen_prior = cfg.overrides.get("prior") or max(names, key=lambda k: report["priors"][k]["mean_auc_on_shared"])
    prior = priors[chosen_prior]
    z_prior = prior_logits(prior, x)
    report["chosen_prior"] = chosen_prior
    # hidden values: how much of the prior's ranking survives when 30% of values are unknown
    rng = np.random.default_rng(0)
    x_hidden = np.where(rng.random(x.shape) < 0.3, np.float32(enc.unknown_value), x)
    report["priors"][chosen_prior]["mean_auc_on_shared_30pct_values_hidden"] = cvstats.mean_auc(
        y, prior_probabilities_uncentred(prior, x_hidden))

    # metadata-only baselines
    base_full = prior_probs[chosen_prior]
    base_cv = np.zeros_like(y)  # age/sex/view regression fitted on the other folds of the 480
    for f in range(cfg.folds):
        tr, te = folds0 != f, folds0 == f
        from sklearn.linear_model import LogisticRegression
        for k in range(K):
            base_cv[te, k] = LogisticRegression(max_iter=1000).fit(x[tr], y[tr, k]).predict_proba(x[te])[:, 1]
    report["metadata_only"] = {
        "full_table_regression": {"mean_auc": cvstats.mean_auc(y, base_full),
                                  "ci95": cvstats.percentile_ci(cvstats.bootstrap_mean_auc(y, {"b": base_full}, resamples)["b"]),
                                  "auc": cvstats.auc_per_class(y, base_full).tolist()},
        "regression_fitted_out_of_fold_on_the_480": {"mean_auc": cvstats.mean_auc(y, base_cv)},
    }

    # image candidates
    candidates, oofs, runs = image_candidates(out, cfg, y, report_row_map(labels))
    report["runs"] = runs
    prev_fn = lambda part: prevalence_by_fold(y, part)  # noqa: E731
    for c in candidates:  # with patient data, the default combination, cross-fitted on the training folds
        fold_c = folds_df[f"fold_rep{c['repeat']}"].to_numpy()
        p = cvstats.cross_fit(oofs[c["id"]], z_prior, y, fold_c, "shared", cfg.combine_C)
        c["with_patient_shared"] = calibration_summary(y, p, prev_fn(fold_c), cfg.ece_bins)
    report["candidates"] = candidates

    # paired comparisons of the image evidence (repeat 0): epochs, EMA vs raw, variants
    comparisons = {}
    bests = best_by_variant(candidates)
    for b in bests:
        for c in candidates:
            if c["variant"] == b["variant"] and c["repeat"] == 0 and c["id"] != b["id"]:
                comparisons[f"{b['id']} - {c['id']}"] = cvstats.paired_difference(y, oofs[b["id"]], oofs[c["id"]], resamples)
    comparisons.update(variant_comparisons(y, bests, oofs, resamples))
    report["image_comparisons"] = comparisons
    chosen = pick_image(cfg, candidates, comparisons)
    report["chosen_image"] = {k: chosen[k] for k in ("id", "variant", "image_size", "epoch", "weights")}
    z_img = oofs[chosen["id"]]

    # combination / calibration methods, cross-fitted
    partitions = random_partitions(n, patients, y, cfg.folds, cfg.crossfit_repeats, cfg.bootstrap_seed)
    methods, probs = {}, {}
    for m in cfg.combine_methods + ["image_only"]:
        res = combination_scores(y, z_img, z_prior, folds0, partitions, m, cfg.combine_C, prev_fn, cfg.ece_bins)
        probs[m] = res.pop("p")
        methods[m] = res
    report["combination_methods"] = methods
    with_patient = [m for m in cfg.combine_methods if m != "prior_only"]
    chosen_method = cfg.overrides.get("combine") or min(with_patient, key=lambda m: methods[m]["brier_over_partitions"][0])
    report["chosen_combination"] = chosen_method
    p_model = probs[chosen_method]
    report["combination_comparisons"] = {
        f"{chosen_method} - {m}": {
            "mean_auc": cvstats.paired_difference(y, p_model, probs[m], resamples),
            "brier": cvstats.paired_metric_difference(y, p_model, probs[m], resamples, cvstats.brier)}
        for m in methods if m != chosen_method}
    params_all = cvstats.fit_combination(z_img, z_prior, y, chosen_method, cfg.combine_C)
    report["combination_fitted_on_all_oof"] = params_all

    # the headline: the calibrated model with patient data vs image only vs metadata only
    prev = prev_fn(folds0)
    main = calibration_summary(y, p_model, prev, cfg.ece_bins)
    boot = cvstats.bootstrap_mean_auc(y, {"model": p_model, "image": z_img, "meta": base_full, "prior_cal": probs["prior_only"]}, resamples)
    main["mean_auc_ci95"] = cvstats.percentile_ci(boot["model"])
    main["auc"] = dict(zip(FINDINGS, cvstats.auc_per_class(y, p_model).tolist()))
    main["brier_per_finding"] = dict(zip(FINDINGS, ((p_model - y) ** 2).mean(0).tolist()))
    main["brier_prevalence_per_finding"] = dict(zip(FINDINGS, ((prev - y) ** 2).mean(0).tolist()))
    main["brier_difference_vs_prevalence"] = cvstats.paired_metric_difference(y, p_model, prev, resamples, cvstats.brier)
    main["ece_difference_ci95"] = None
    main["reliability"] = cvstats.reliability_table(y, p_model, cfg.ece_bins)
    report["model_with_patient_data"] = main
    report["model_image_only"] = {"mean_auc": cvstats.mean_auc(y, z_img), "ci95": cvstats.percentile_ci(boot["image"]),
                                  "auc": dict(zip(FINDINGS, cvstats.auc_per_class(y, z_img).tolist())),
                                  "note": "ranking of the image logits; the exported model with patient data unknown "
                                          "ranks identically within each finding (a >= 0)"}
    report["gain_over_metadata_only"] = {
        "vs_full_table_regression": cvstats.paired_difference(y, p_model, base_full, resamples),
        "vs_prior_calibrated_out_of_fold": cvstats.paired_difference(y, p_model, probs["prior_only"], resamples),
        "image_only_vs_full_table_regression": cvstats.paired_difference(y, z_img, base_full, resamples),
    }

    # thresholds on the cross-fitted probabilities
    thr = {m: threshold_scores(y, p_model, folds0, partitions, m, cfg.precision_min) for m in cfg.threshold_methods}
    chosen_thr = cfg.overrides.get("thresholds") or max(
        cfg.threshold_methods, key=lambda m: (round(thr[m]["f1_macro_over_partitions"][0], 2), -thr[m]["studies_flagged"]))
    final_thr = cvstats.grid_thresholds(y, p_model, chosen_thr, precision_min=cfg.precision_min)
    report["threshold_methods"] = thr
    report["chosen_thresholds"] = {"method": chosen_thr, "grid": "0.01..0.99 step 0.01",
                                   "precision_min": cfg.precision_min,
                                   "values": dict(zip(FINDINGS, final_thr.tolist())),
                                   "at_grid_floor_0.01": int((final_thr <= 0.01).sum())}
    flags = (p_model >= final_thr).astype(int)
    report["chosen_thresholds"]["in_sample_on_oof"] = {
        "studies_flagged": float(flags.any(1).mean()), "studies_flagged_pneumothorax": float(flags[:, URGENT].mean())}

    # subgroups
    report["subgroups"] = subgroup_table(labels, y, {"model": p_model, "image": z_img, "metadata": base_full}, cfg.ece_bins)

    # repeats of the training CV (if run): the chosen recipe's numbers on each repeat
    rep_rows = {}
    for c in candidates:
        if (c["variant"], c["epoch"], c["weights"]) == (chosen["variant"], chosen["epoch"], chosen["weights"]):
            fold_c = folds_df[f"fold_rep{c['repeat']}"].to_numpy()
            p = cvstats.cross_fit(oofs[c["id"]], z_prior, y, fold_c, chosen_method, cfg.combine_C)
            rep_rows[f"rep{c['repeat']}"] = {**calibration_summary(y, p, prev_fn(fold_c), cfg.ece_bins),
                                             "image_only_mean_auc": c["image_only_mean_auc"],
                                             "gain_vs_full_table_regression": cvstats.mean_auc(y, p) - cvstats.mean_auc(y, base_full)}
    report["chosen_recipe_by_repeat"] = rep_rows

    # files: OOF predictions, report, reliability diagram
    oof = pd.DataFrame({"image": labels["image"], "patient_id": labels["patient_id"], "fold": folds0})
    for k, f in enumerate(FINDINGS):
        oof[f"y_{f}"] = y[:, k].astype(int)
    for k, f in enumerate(FINDINGS):
        oof[f"img_logit_{f}"] = np.round(z_img[:, k], 5)
    for k, f in enumerate(FINDINGS):
        oof[f"prior_logit_{f}"] = np.round(z_prior[:, k], 5)
    for k, f in enumerate(FINDINGS):
        oof[f"p_{f}"] = np.round(p_model[:, k], 5)
    oof.to_csv(out / "oof.csv", index=False)
    reliability_png(y, p_model, probs["prior_only"], cfg.ece_bins, out / "reliability.png")
    (out / "cv_report.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    print_summary(report)
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def reliability_png(y, p, p_prior, bins, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5))
    for probs, label in ((p, "model v2, with patient data"), (p_prior, "patient data only (calibrated)")):
        rows = [r for r in cvstats.reliability_table(y, probs, bins) if r["n"]]
        a.plot([r["mean_predicted"] for r in rows], [r["observed"] for r in rows], "o-",
               label=f"{label}: ECE {cvstats.ece(y, probs, bins):.3f}")
    a.plot([0, 1], [0, 1], "k--", lw=0.8)
    a.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
          title=f"Out-of-fold reliability, all image-finding pairs, {bins} bins")
    a.legend(fontsize=8)
    b.hist(np.ravel(p), bins=np.linspace(0, 1, bins + 1), color="grey")
    b.set(xlabel="predicted probability", ylabel="image-finding pairs", yscale="log", title="how many pairs per bin")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_summary(r: dict) -> None:
    m, g = r["model_with_patient_data"], r["gain_over_metadata_only"]
    print(f"chosen image evidence {r['chosen_image']['id']}, prior {r['chosen_prior']}, combination {r['chosen_combination']}")
    for c in sorted(r["candidates"], key=lambda c: c["id"]):
        w = c["with_patient_shared"]
        print(f"  {c['id']:28s} image-only AUROC {c['image_only_mean_auc']:.3f}  with patient data {w['mean_auc']:.3f}  "
              f"Brier {w['brier']:.4f}  ECE {w['ece_10']:.4f}  OOF logit sd {c['oof_logit_std']:.2f}  in-sample {c['in_sample_logit_std']:.2f}")
    for k, v in r["image_comparisons"].items():
        print(f"  paired {k}: {v['difference']:+.3f} (95% CI {v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f})")
    for k, v in r["combination_methods"].items():
        print(f"  combination {k:12s} AUROC {v['mean_auc']:.3f}  Brier {v['brier']:.4f} (partitions {v['brier_over_partitions'][0]:.4f})  "
              f"skill {v['brier_skill']:.3f}  ECE10 {v['ece_10']:.4f}  ECE15 {v['ece_15']:.4f}")
    print(f"OOF mean AUROC with patient data {m['mean_auc']:.3f} (95% CI {m['mean_auc_ci95'][0]:.3f}-{m['mean_auc_ci95'][1]:.3f}); "
          f"image only {r['model_image_only']['mean_auc']:.3f}; metadata-only (full table) "
          f"{r['metadata_only']['full_table_regression']['mean_auc']:.3f}")
    d = g["vs_full_table_regression"]
    print(f"paired gain over metadata-only: {d['difference']:+.3f} (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    print(f"Brier {m['brier']:.4f} vs prevalence {m['brier_prevalence']:.4f} (skill {m['brier_skill']:.3f}); "
          f"pooled ECE 10 bins {m['ece_10']:.4f}, 15 bins {m['ece_15']:.4f}")
    for k, v in r["threshold_methods"].items():
        print(f"  thresholds {k:13s} cross-fitted macro F1 {v['f1_macro']:.3f} (partitions {v['f1_macro_over_partitions'][0]:.3f}) "
              f"flags {v['studies_flagged']:.2f} of studies, Pneumothorax {v['studies_flagged_pneumothorax']:.2f}")
    print(f"chosen thresholds ({r['chosen_thresholds']['method']}): {r['chosen_thresholds']['values']}")
    meta = r["metadata_only"]["full_table_regression"]["auc"]
    print("per finding: positives, OOF AUROC with patient data / image only / metadata only, threshold")
    for k, f in enumerate(FINDINGS):
        print(f"  {f:19s} {r['data']['positives'][f]:3d}  {m['auc'][f]:.3f} / {r['model_image_only']['auc'][f]:.3f} / "
              f"{meta[k]:.3f}  t={r['chosen_thresholds']['values'][f]:.2f}")
    print("subgroups: n, findings with both labels, mean AUROC model / image / metadata, Brier, ECE, mean p vs prevalence")
    for name, g2 in r["subgroups"].items():
        print(f"  {name:10s} n={g2['n']:3d} {g2['findings_with_both_labels']:2d}  {g2['mean_auc_model']:.3f} / "
              f"{g2['mean_auc_image']:.3f} / {g2['mean_auc_metadata']:.3f}  Brier {g2['brier_model']:.4f}  "
              f"ECE {g2['ece_10_model']:.4f}  {g2['mean_predicted_model']:.3f} vs {g2['prevalence']:.3f}")
    for name, g2 in r["priors"].items():
        print(f"prior {name}: {g2['rows']} rows, {g2['patients']} patients ({g2['excluded_patients']} shared patients, "
              f"{g2['excluded_rows']} rows excluded): mean AUROC on the 480 {g2['mean_auc_on_shared']:.3f}")
    for k, v in r["prior_comparisons"].items():
        print(f"  paired {k}: {v['difference']:+.3f} (95% CI {v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f})")
    for k, v in r["combination_comparisons"].items():
        print(f"  paired {k}: AUROC {v['mean_auc']['difference']:+.3f} (CI {v['mean_auc']['ci95'][0]:+.3f} to "
              f"{v['mean_auc']['ci95'][1]:+.3f}), Brier {v['brier']['difference']:+.4f} (CI {v['brier']['ci95'][0]:+.4f} "
              f"to {v['brier']['ci95'][1]:+.4f})")
    for k, v in r["gain_over_metadata_only"].items():
        print(f"  gain {k}: {v['difference']:+.3f} (95% CI {v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f}; "
              f"share of resamples not better {v['share_not_better']:.3f})")
    d = m["brier_difference_vs_prevalence"]
    print(f"  Brier minus prevalence Brier: {d['difference']:+.5f} (95% CI {d['ci95'][0]:+.5f} to {d['ci95'][1]:+.5f})")
    for k, v in r["chosen_recipe_by_repeat"].items():
        print(f"  {k}: with patient data {v['mean_auc']:.3f}, image only {v['image_only_mean_auc']:.3f}, "
              f"Brier skill {v['brier_skill']:.3f}, ECE {v['ece_10']:.4f}")
    for k, v in r["runs"].items():
        print(f"  run {k}: seconds per fold {[round(s) for s in v['seconds_per_fold']]}")


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, action="append",
                    help="folder of labelled PNGs; repeat with --labels for several folders")
    ap.add_argument("--labels", required=True, action="append",
                    help="NIH metadata rows of the images (labels.csv), one per --images")
    ap.add_argument("--metadata-table", required=True, help="the full NIH Data_Entry table, for the patient prior")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=["cache", "train", "final", "choose", "report", "all"], default="all",
                    help="cache: only decode the images for every variant's size into <out>/cache; "
                         "final: train --variant on every development image (<out>/<variant>/final); "
                         "choose: only the image choice of the report (<out>/choice.json)")
    ap.add_argument("--variant", help="train only this variant (the one the final stage trains)")
    ap.add_argument("--repeat", type=int, help="train only this repeat (index into fold_seeds)")
    ap.add_argument("--folds", type=lambda t: [int(f) for f in t.split(",")],
                    help="train only these folds, e.g. 1,2 (two processes can share a run folder: one per fold set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the models train: cpu, cuda, cuda:1 ...")
    ap.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                    help="resumable checkpoint every EPOCHS epochs (0: none; default 1)")
    return ap.parse_args(argv)


def check_inputs(args, needs_table: bool) -> None:
    """Fail in a line, before any work, on what would otherwise fail hours into a run."""
    for name, path in [("--labels", p) for p in args.labels] + [("--metadata-table", args.metadata_table if needs_table else None)]:
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{name} {path}: no such file")
    if args.stage == "final" and not args.variant:
        raise SystemExit("--stage final needs --variant (the recipe to train on every development image)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device on this machine (use --device cpu)")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    check_inputs(args, needs_table=args.stage in ("report", "all", "train", "final"))
    try:
        cfg = CVConfig.from_toml(Path(args.config))
    except ConfigError as e:
        raise SystemExit(f"config: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = load_sources(args.images, args.labels)
    missing = sorted(n for n, p in image_paths(labels).items() if not p.is_file())
    if missing and not caches_ready(out, list(labels["image"]), cfg):
        raise SystemExit(f"{len(missing)} labelled image(s) missing from {', '.join(args.images)}, e.g. {missing[:3]}")
    folds = folds_table(labels, cfg)
    path = out / "folds.csv"
    write = not path.exists()
    if not write:  # a resumed run must keep its folds
        old = pd.read_csv(path, dtype={"patient_id": str})
        same = [c for c in folds.columns if c in old.columns]
        if not old[same].astype(str).equals(folds[same].astype(str)):
            raise SystemExit(f"{path} differs from the folds this config gives: use another --out")
        write = len(old.columns) < len(folds.columns)  # more repeats than before
    if write:  # atomically: processes training other folds in parallel read it at their start
        tmp = path.with_name(f"folds.{os.getpid()}.tmp")
        folds.to_csv(tmp, index=False)
        os.replace(tmp, path)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    if args.stage == "cache":
        for v in cfg.variants:
            load_cache(image_paths(labels), list(labels["image"]), v.image_size, out)
            load_views(image_paths(labels), list(labels["image"]), v.image_size, out)
        return
    if args.stage in ("train", "all"):
        stage_train(args, cfg, labels, folds)
    if args.stage == "final":
        stage_final(args, cfg, labels, folds)
    # choices and reports see the development images only: the held-out test is scored at export
    dev = folds["fold_rep0"].to_numpy() >= 0
    args.all_patients = set(labels["patient_id"])
    dev_labels = labels.assign(row_all=np.arange(len(labels)))[dev].reset_index(drop=True)
    dev_folds = folds[dev].reset_index(drop=True)
    if args.stage == "choose":
        stage_choose(args, cfg, dev_labels)
    if args.stage in ("report", "all"):
        stage_report(args, cfg, dev_labels, dev_folds)


if __name__ == "__main__":
    main()
