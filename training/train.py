"""``cxr-batch train``: prepare -> cache -> train -> thresholds -> evaluate -> export bundle.

Reads top to bottom like torchvision's reference script: data, model, loss, optimizer,
scheduler, resume, epoch loop, checkpoint. Under ``torchrun --nproc_per_node=N`` it trains with
DistributedDataParallel (NCCL on CUDA, gloo on CPU); rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cxr_batch.findings import FINDINGS
from cxr_batch.model import ModelConfig, build_model, load_imagenet_backbone
from cxr_batch.patient import PatientEncoding, patient_from_values
from cxr_batch.preprocess import Preprocessing
from cxr_batch.runtime import pick_device

from . import metrics
from .augment import eval_transform_batch, train_transform
from .cache import build_cache, cache_size_for
from .config import TrainConfig
from .prepare import multi_hot, prepare

log = logging.getLogger("cxr_batch.train")


# ---------------------------------------------------------------- data
def encode_patients(table: pd.DataFrame, encoding: PatientEncoding) -> np.ndarray:
    """[N, 3] patient vectors for prepared rows, with the same parsing and unknown rule as inference."""
    out = np.empty((len(table), 3), dtype=np.float32)
    for i, (age, sex, view) in enumerate(zip(table["age"], table["sex"], table["view"])):
        p = patient_from_values(age, sex, view, "metadata")
        out[i] = encoding.encode(p.age, p.view, p.sex)
    return out


class CachedImages(Dataset):
    """Rows of the prepared table served from the uint8 cache: (image [1,C,C], tabular, y, mirror)."""

    def __init__(self, table: pd.DataFrame, cache: np.ndarray, index: dict, encoding: PatientEncoding):
        self.rows = np.array([index[n] for n in table["image"]])
        self.cache = cache
        self.tabular = torch.from_numpy(encode_patients(table, encoding))
        self.y = torch.from_numpy(multi_hot(table["labels"]).astype(np.float32))
        self.mirror = torch.from_numpy(table["mirror"].to_numpy().astype(bool))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.cache[self.rows[i]]))[None], self.tabular[i], self.y[i], self.mirror[i]


def mask_unknown(tabular: torch.Tensor, rate: float, unknown_value: float) -> torch.Tensor:
    """Replace each patient value by the 'unknown' code with probability ``rate``, so the model
    learns to predict without it (inference gives unknown values the same code)."""
    if rate <= 0:
        return tabular
    mask = torch.rand_like(tabular) < rate
    return torch.where(mask, torch.full_like(tabular, unknown_value), tabular)


def pos_weights(y: np.ndarray, overrides: dict, cap: float) -> np.ndarray:
    """Per-class BCE positive weights: sqrt(negatives / positives) of the training split
    (rarer class, larger weight; the square root keeps rare classes from dominating), capped
    at ``cap``, 1 for a class without positives, then manual overrides by finding name."""
    pos = y.sum(axis=0)
    neg = len(y) - pos
    w = np.where(pos > 0, np.sqrt(neg / np.maximum(pos, 1)), 1.0)
    w = np.clip(w, 1.0, cap)
    for name, value in overrides.items():
        w[FINDINGS.index(name)] = float(value)
    return w.astype(np.float32)


def fit_patient_logistic(tabular: np.ndarray, y: np.ndarray, pos_weight: np.ndarray | None = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per finding on patient vectors [N, 3] -> (coef [14, 3], bias [14]).
    ``pos_weight`` weights positives as the loss does; a class with one label value gets zeros."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((y.shape[1], tabular.shape[1]), dtype=np.float32)
    bias = np.zeros(y.shape[1], dtype=np.float32)
    for c in range(y.shape[1]):
        if len(np.unique(y[:, c])) == 2:
            weight = {0: 1.0, 1: float(pos_weight[c])} if pos_weight is not None else None
            lr = LogisticRegression(class_weight=weight, max_iter=1000, random_state=seed).fit(tabular, y[:, c])
            coef[c], bias[c] = lr.coef_[0], lr.intercept_[0]
    return coef, bias


def init_skip_from_logistic(model, coef: np.ndarray, bias: np.ndarray) -> None:
    """skip_init "logistic": the patient-data path starts as the fitted logistic regression and
    the deep head's last layer at zero, so step 0 predicts what patient data alone predict."""
    with torch.no_grad():
        model.tabular_skip.weight.copy_(torch.from_numpy(coef))
        model.tabular_skip.bias.copy_(torch.from_numpy(bias))
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()


def add_patient_prior(model, coef: np.ndarray, offset: np.ndarray) -> None:
    """patient_prior "logistic": add a patient-data-only logistic regression's log-odds,
    ``coef . x + offset``, to the trained model's logits (through ``tabular_skip``). With
    patient data unknown the term is the same constant for every image, so image-only rankings
    are unchanged. ``offset`` is the regression's intercept, or ``-coef . mean x`` to centre
    the term on the average training patient, which keeps the model's calibration."""
    with torch.no_grad():
        model.tabular_skip.weight.add_(torch.from_numpy(coef).to(model.tabular_skip.weight))
        model.tabular_skip.bias.add_(torch.from_numpy(offset).to(model.tabular_skip.bias))


PRIOR_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)


def choose_prior_weight(model, coef: np.ndarray, bias: np.ndarray, loader, ctx) -> tuple[float, dict]:
    """The prior weight (from PRIOR_WEIGHTS) whose logits, model + weight x regression, give the
    best mean AUC on the validation loader. Returns (weight, {weight: validation AUC})."""
    p, y, _ = predict(model, loader, ctx)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p))
    prior = loader.dataset.tabular.numpy() @ coef.T + bias
    scores = {w: metrics.mean_auc(y, logits + w * prior) for w in PRIOR_WEIGHTS}
    best = max(scores, key=lambda w: np.nan_to_num(scores[w], nan=-1.0))
    return best, scores


def load_initial_weights(model, source: str) -> None:
    """Weights from a bundle folder (verified) or a state dict file."""
    from cxr_batch.bundle import load_bundle

    path = Path(source)
    state = load_bundle(path).model.state_dict() if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)


# ---------------------------------------------------------------- one epoch / evaluation
@dataclass
class Context:
    cfg: TrainConfig
    prep: Preprocessing
    encoding: PatientEncoding
    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def train_one_epoch(model, loader, criterion, optimizer, ctx: Context, ema=None, progress=False) -> float:
    model.train()
    total, count = 0.0, 0
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, leave=False, unit="batch", desc="train")
    for images, tabular, y, mirror in batches:
        images, y = images.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        tabular = mask_unknown(tabular.to(ctx.device), ctx.cfg.unknown_rate, ctx.encoding.unknown_value)
        x = train_transform(images, mirror.to(ctx.device), ctx.prep).contiguous(memory_format=torch.channels_last)
        with ctx.autocast():
            loss = criterion(model(x, tabular).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item() * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.inference_mode()
def predict(model, loader, ctx: Context, criterion=None, unknown_patient=False) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities [N, 14], targets [N, 14] and mean loss over a loader (no augmentation).
    ``unknown_patient`` gives every image the unknown patient code (image-only evaluation)."""
    model.eval()
    probs, ys, total = [], [], 0.0
    for images, tabular, y, _ in loader:
        x = eval_transform_batch(images.to(ctx.device), ctx.prep).contiguous(memory_format=torch.channels_last)
        tabular = tabular.to(ctx.device)
        if unknown_patient:
            tabular = torch.full_like(tabular, ctx.encoding.unknown_value)
        with ctx.autocast():
            logits = model(x, tabular).float()
        if criterion is not None:
            total += criterion(logits, y.to(ctx.device)).item() * len(y)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        ys.append(y.numpy())
    y_all = np.concatenate(ys) if ys else np.zeros((0, len(FINDINGS)))
    return (np.concatenate(probs) if probs else np.zeros((0, len(FINDINGS)))), y_all, total / max(len(y_all), 1)


def epoch_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    pred = (p >= 0.5).astype(int)
    s = metrics.summary(y, p, pred)
    return {k: s[k] for k in ("precision_macro", "recall_macro", "f1_macro", "mean_auc")}


# ---------------------------------------------------------------- main
def setup_distributed() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run every stage; returns the run folder. Rank 0 writes all files."""
    rank, world = setup_distributed()
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    prep = Preprocessing(image_size=cfg.image_size)
    encoding = PatientEncoding()
    ctx = Context(cfg, prep, encoding, device, amp)
    is_main = rank == 0

    # data: prepare (stage 1) and cache (stage 2) on rank 0, the others wait and read
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and (out / "prepared.csv").exists()):
            prepare(cfg, out)
        table = pd.read_csv(out / "prepared.csv", dtype={"patient_id": str, "age": str}, keep_default_na=False)
        build_cache(Path(cfg.images), list(table["image"]), cache_size_for(prep), out, cfg.workers)
    if world > 1:
        dist.barrier()
    table = pd.read_csv(out / "prepared.csv", dtype={"patient_id": str, "age": str}, keep_default_na=False)
    cache, index = build_cache(Path(cfg.images), list(table["image"]), cache_size_for(prep), out, cfg.workers)
    parts = {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    data = {s: CachedImages(t, cache, index, encoding) for s, t in parts.items()}
    sampler = DistributedSampler(data["train"], world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    per_rank_batch = max(1, cfg.batch_size // world)
    loader_args = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(data["train"], per_rank_batch, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(data["train"]) > per_rank_batch, **loader_args)
    val_loader = DataLoader(data["val"], per_rank_batch, **loader_args)
    test_loader = DataLoader(data["test"], per_rank_batch, **loader_args)

    # model, loss, optimizer, scheduler
    model_cfg = ModelConfig(dropout=cfg.dropout, hidden_dim=cfg.hidden_dim, tabular_skip=cfg.tabular_skip)
    model = build_model(model_cfg)
    if cfg.imagenet:
        load_imagenet_backbone(model, cfg.imagenet)
    model = model.to(device, memory_format=torch.channels_last)
    unique_train = parts["train"][parts["train"]["mirror"] == 0].drop_duplicates("image")
    weights = pos_weights(multi_hot(unique_train["labels"]), cfg.pos_weight_overrides, cfg.pos_weight_max)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(weights).to(device))
    if (cfg.skip_init == "logistic" or cfg.patient_prior == "logistic") and not cfg.tabular_skip:
        raise ValueError("skip_init/patient_prior 'logistic' need tabular_skip = true")
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights)
    elif cfg.skip_init == "logistic":
        # fitted on the patients as training shows them: some values replaced by 'unknown'
        rng = np.random.default_rng(cfg.seed)
        tab = encode_patients(unique_train, encoding)
        masked = np.where(rng.random(tab.shape) < cfg.unknown_rate, encoding.unknown_value, tab)
        y2 = np.tile(multi_hot(unique_train["labels"]), (2, 1))
        init_skip_from_logistic(model, *fit_patient_logistic(np.concatenate([tab, masked]), y2, weights, cfg.seed))
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    ema = None
    if cfg.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    # resume
    start_epoch, best, history = 0, -np.inf, []
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        if is_main:
            log.info("resumed after epoch %d", ckpt["epoch"] + 1)

    # epoch loop
    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss = train_one_epoch(train_model, train_loader, criterion, optimizer, ctx, ema,
                                     progress=is_main and sys.stderr.isatty())
        scored = ema.module if ema is not None else model
        p_val, y_val, val_loss = predict(scored, val_loader, ctx, criterion)
        scheduler.step(val_loss)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, **epoch_metrics(y_val, p_val),
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(row)
        key = {"macro_f1": row["f1_macro"], "mean_auc": row["mean_auc"], "last": epoch}[cfg.select_metric]
        improved = np.nan_to_num(key, nan=-np.inf) > best
        if improved:
            best = float(np.nan_to_num(key, nan=-np.inf))
        if is_main:
            log.info("epoch %(epoch)d  train loss %(train_loss).4f  val loss %(val_loss).4f  precision %(precision_macro).3f  "
                     "recall %(recall_macro).3f  F1 %(f1_macro).3f  AUC %(mean_auc).3f  lr %(lr).2g  %(seconds).1fs" % row
                     + ("  *best*" if improved else ""))
            if improved:
                torch.save(scored.state_dict(), out / "model_classification.pt")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "epoch": epoch, "best": best, "history": history, "args": cfg.to_dict()}, ckpt_path)
            torch.save(optimizer.state_dict(), out / "optimizer_classification.pt")
        out_of_time = cfg.time_limit_minutes and time.monotonic() - started > 60 * cfg.time_limit_minutes
        if world > 1:  # every rank must leave the loop together
            flag = torch.tensor([float(bool(out_of_time))], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(flag)
            out_of_time = flag.item() > 0
        if out_of_time:
            if is_main:
                log.info("time limit of %.1f minutes reached after epoch %d", cfg.time_limit_minutes, epoch + 1)
            break
    if world > 1:
        dist.barrier()
    if not is_main:
        dist.destroy_process_group()
        return out

    # thresholds on validation, evaluation on test, artifacts, bundle
    from .evaluate import evaluate_and_export

    best_model = copy.deepcopy(model)
    if not (out / "model_classification.pt").exists():  # epochs = 0: evaluate/export the initial weights
        torch.save((ema.module if ema is not None else model).state_dict(), out / "model_classification.pt")
    best_model.load_state_dict(torch.load(out / "model_classification.pt", map_location=device, weights_only=True))
    extra = {}
    if cfg.patient_prior == "logistic":
        train_tab = encode_patients(unique_train, encoding)
        coef, bias = fit_patient_logistic(train_tab, multi_hot(unique_train["labels"]), seed=cfg.seed)
        if cfg.patient_prior_weight == "validation":
            weight, scores = choose_prior_weight(best_model, coef, bias, val_loader, ctx)
        else:
            weight, scores = float(cfg.patient_prior_weight), {}
        offset = -(coef @ train_tab.mean(axis=0)) if cfg.patient_prior_center else bias
        add_patient_prior(best_model, weight * coef, (weight * offset).astype(np.float32))
        extra["patient_prior"] = {"weight": weight, "centred": cfg.patient_prior_center,
                                  "validation_mean_auc_by_weight": scores}
        log.info("patient prior added with weight %g", weight)
    evaluate_and_export(cfg, ctx, best_model, val_loader, test_loader, parts, history, out, extra)
    if world > 1:
        dist.destroy_process_group()
    return out
