"""``cxr-batch train``: prepare -> cache -> train -> thresholds -> evaluate -> export bundle.

Reads top to bottom like torchvision's reference script: data, model, loss, optimizer,
scheduler, resume, epoch loop, checkpoint. Under ``torchrun --nproc_per_node=N`` it trains with
DistributedDataParallel (NCCL on CUDA, gloo on CPU); rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cxr_batch.device import pick_device
from cxr_batch.files import atomic_write_bytes
from cxr_batch.findings import FINDINGS
from cxr_batch.model import build_model, imagenet_backbone_state, load_imagenet_backbone
from cxr_batch.patient import PatientEncoding

from . import metrics
from .augment import train_transform
from .config import TrainConfig
from .data import (FINAL_WEIGHTS, HISTORY, INIT_INFO, PRIOR_INFO, Context, encode_patients, evaluation_loader,
                   load_splits, predict, unique_training_images)
from .evaluate import auc_text, evaluate_run
from .prepare import PREPARED, multi_hot, prepare
from .prior import apply_patient_prior, fit_patient_logistic, init_skip_from_logistic

log = logging.getLogger("cxr_batch.train")


# ---------------------------------------------------------------- data
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


def load_checkpoint(path: Path, device) -> dict:
    """A resume checkpoint, loaded as data only (``weights_only=True``): a checkpoint planted in
    a run folder cannot run code. Raises ValueError with a plain reason."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"{path} is not a checkpoint this program wrote (refused to load it: "
                         f"{type(e).__name__}); remove it to train from the start") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "lr_scheduler", "epoch"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint this program wrote (keys missing)")
    return ckpt


def load_initial_weights(model, source: str, adds_prior: bool = False) -> None:
    """Weights from a bundle folder (verified) or a state dict file. A bundle whose weights
    already hold a patient prior cannot take a second one (``adds_prior``): its baseline
    would be counted twice."""
    from cxr_batch.bundle import load_bundle

    path = Path(source)
    if not path.is_dir():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return
    bundle = load_bundle(path)
    if adds_prior and bundle.manifest.get("training", {}).get("patient_prior", {}).get("method") == "logistic":
        raise ValueError(f"{path} already has a patient prior in its weights; set patient_prior = \"none\" "
                         "to evaluate and export it")
    model.load_state_dict(bundle.model.state_dict())


# ---------------------------------------------------------------- one epoch / evaluation
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


def epoch_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    pred = (p >= 0.5).astype(int)
    s = metrics.summary(y, p, pred)
    return {k: s[k] for k in ("precision_macro", "recall_macro", "f1_macro", "mean_auc")}


# ---------------------------------------------------------------- main
def save_atomic(obj, path: Path) -> None:
    """``torch.save`` that leaves the old file or the new one, never half of one: a Ctrl-C while
    a checkpoint is written must not cost the epochs it holds (``--resume`` reads it)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_run_file(path, buffer.getvalue())


def write_run_file(path: Path, data: bytes) -> None:
    """``atomic_write_bytes`` that says, on a full disk, which file and how to go on (the bare
    error named neither): the checkpoint written last is whole, so ``--resume`` continues from it."""
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise OSError(f"cannot write {path} ({e.strerror or e}): the last whole checkpoint.pt in {path.parent}, if "
                      "any, is kept; free space there and run the same command with --resume to continue") from None


def rng_state() -> dict:
    """The random state the next epoch draws its shuffling, augmentation and dropout from: in
    the checkpoint, so a resumed run trains the epochs an uninterrupted one would have."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# settings a resumed run may change: how long and where it runs, not what it learns from
RESUME_MAY_CHANGE = {"epochs", "time_limit_minutes", "device", "workers", "out", "bootstrap"}


def settings(args: dict) -> dict:
    """A run's configuration as {'lr': .., 'preprocessing.image_size': ..}: its tables' keys by name."""
    flat = {}
    for key, value in json.loads(json.dumps(args)).items():  # through JSON: tuples and lists alike
        if key in ("model", "preprocessing") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# settings that name a file or folder: the same one named otherwise (relative, then absolute; a
# table moved) is the same input
PATH_SETTINGS = ("images", "metadata", "split_lists", "init_backbone", "imagenet", "init_weights")


def input_identity(cfg: TrainConfig) -> dict:
    """What each path setting names, however it was given: a file by its content's sha256, a
    folder by its real path (its images are not hashed), anything else as given."""
    from cxr_batch.bundle import sha256_file

    def identity(value):
        if isinstance(value, (list, tuple)):
            return [identity(v) for v in value]
        if isinstance(value, str) and value and Path(value).is_file():
            return f"sha256:{sha256_file(Path(value))}"
        if isinstance(value, str) and value and Path(value).is_dir():
            return os.path.realpath(value)
        return value

    return {k: identity(getattr(cfg, k)) for k in PATH_SETTINGS}


def check_resumable(path: Path, cfg: TrainConfig) -> None:
    """Refuse to resume the checkpoint at ``path`` under settings it was not trained with (another
    image size, table, image folder, recipe): the weights would go on learning from other inputs
    and the bundle would describe only this command's; or a finished run (its bundle written)
    with no epoch left to train: resumed, it wrote its bundle again (a new bundle_sha256, which
    the results scored with it no longer name). Raises ValueError before any work."""
    from cxr_batch.bundle import MANIFEST_FILE

    bundle = path.parent / "bundle"
    finished = (f"--out {path.parent} holds a finished run (its bundle in {bundle}): nothing to resume"
                if (bundle / MANIFEST_FILE).is_file() else "")
    if not path.is_file():
        if finished:
            raise ValueError(f"{finished}; choose another --out, or remove that folder to train there again")
        return
    ckpt = load_checkpoint(path, "cpu")
    if finished:  # a bundle of an earlier finish, the run trained on since and killed before its new one: finish it
        try:
            made = json.loads((bundle / MANIFEST_FILE).read_text())["training"]["history"]
            finished = finished if [r["epoch"] for r in made] == [r["epoch"] for r in ckpt["history"]] else ""
        except (OSError, ValueError, KeyError, TypeError):
            finished = ""  # a manifest that says no history is no bundle of this checkpoint
    if finished and ckpt["epoch"] + 1 >= cfg.epochs:  # more epochs train it on: a new bundle is meant then
        raise ValueError(f"{finished} (it trained {ckpt['epoch'] + 1} of {cfg.epochs} epochs); give a larger --epochs "
                         "to train it on, or choose another --out")
    saved, now = settings(ckpt.get("args") or {}), settings(cfg.to_dict())
    inputs = ckpt.get("inputs") or {}
    named = {k: json.loads(json.dumps(v)) == inputs[k] for k, v in input_identity(cfg).items() if k in inputs}
    # by what a path names where the checkpoint says (a table edited in place is another table)
    differ = [k for k in now if k.split(".")[0] not in RESUME_MAY_CHANGE and k in saved
              and (not named[k] if k in named else saved[k] != now[k])]
    if differ:
        raise ValueError(f"--resume: the checkpoint in {path.parent} was trained with "
                         + "; ".join(f"{k} {saved[k]} (this command: "
                                     f"{now[k] if saved[k] != now[k] else 'the same path, other content'})"
                                     for k in differ[:4])
                         + ": resume with its settings, or choose another --out to train anew")


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that would overwrite weights: a bundle, a folder in one or a folder of bundles
    (such as the bundled ``weights/``), or an earlier run's checkpoint or bundle unless ``--resume`` says to
    continue it. Raises ValueError before anything is read or written."""
    from cxr_batch.bundle import MANIFEST_FILE

    bundles = [p.parent for p in out.glob(f"*/{MANIFEST_FILE}") if p.parent.name != "bundle"]
    # a folder inside a bundle, such as v1's training_run: its metrics and thresholds are what the card cites
    around = [p for p in Path(os.path.abspath(out)).parents if (p / MANIFEST_FILE).is_file()]
    if around:
        raise ValueError(f"--out {out} is inside the weights bundle {around[0]}: training would overwrite files there; "
                         "choose another --out (a new run folder)")
    if (out / MANIFEST_FILE).is_file() or bundles:
        named = ", ".join(p.name for p in bundles[:3]) or out.name
        raise ValueError(f"--out {out} is a weights bundle or holds bundles ({named}): training would overwrite "
                         "weights there; choose another --out (a new run folder)")
    if resume:
        return
    if (out / "bundle" / MANIFEST_FILE).is_file():
        raise ValueError(f"--out {out} holds a finished run (its bundle in {out / 'bundle'}): choose another --out, "
                         "or remove that folder to train there again")
    if (out / "checkpoint.pt").is_file():
        raise ValueError(f"--out {out} holds an interrupted run (checkpoint.pt): add --resume to continue it, "
                         "or choose another --out to start over")


def initialisation(cfg: TrainConfig, imagenet, backbone) -> dict:
    """What the weights started from, for the bundle's ``training.initialised_from``: each file by
    its content and the format it was read as (the configuration keeps only the path given and
    ``init_format``, often "auto"); ``{"random": true}`` when nothing was loaded."""
    from cxr_batch.bundle import read_manifest, sha256_file

    started = {}
    if cfg.imagenet == "torchvision":
        started["imagenet"] = {"torchvision": "DenseNet121_Weights.IMAGENET1K_V1"}
    elif imagenet is not None:
        started["imagenet"] = imagenet.record()
    if backbone is not None:  # loaded after the ImageNet weights: its backbone is the one trained on
        started["backbone"] = backbone.record()
    if cfg.init_weights:  # loaded last, over the whole model
        path = Path(cfg.init_weights)
        started["weights"] = ({"bundle": str(path), "bundle_sha256": read_manifest(path).get("bundle_sha256")}
                              if path.is_dir() else {"file": str(path), "sha256": sha256_file(path)})
    return started or {"random": True}


def hold_run_folder(out: Path):
    """The run folder's lock, for as long as this run writes there, then the temporary files a
    killed run left (SIGKILL while checkpoint.pt was written leaves a ~100 MB one that no
    later run would remove). A second run into the same folder is refused: both would write
    the same checkpoint. Raises ValueError naming the process that holds it."""
    from cxr_batch.files import remove_stale_temp
    from cxr_batch.folderlock import FolderBusy, FolderLock

    try:
        lock = FolderLock(out, "train", "wait for it to finish, or choose another --out").acquire()
    except FolderBusy as e:
        raise ValueError(str(e)) from None
    if removed := remove_stale_temp(out, out / "bundle"):  # bundle/: its weights, written last
        log.info("removed %d temporary file(s) an interrupted run left in %s", removed, out)
    return lock


def setup_distributed() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run every stage; returns the run folder. Rank 0 writes all files."""
    # the run folder's lock is let go however the run ends: called in-process, a run that raised
    # kept it, and the same call made again was refused ("in use") until the process ended
    with contextlib.ExitStack() as held:
        return run_stages(cfg, resume, held)


def run_stages(cfg: TrainConfig, resume: bool, held: contextlib.ExitStack) -> Path:
    """:func:`main`'s stages; ``held`` lets go of the run folder's lock when the run ends."""
    out = Path(cfg.out)
    check_out_folder(out, resume)
    # read before any work: a download that cannot happen, or a file that is no DenseNet-121,
    # fails now, not after the data stages
    imagenet = None
    if cfg.imagenet == "torchvision":
        imagenet = imagenet_backbone_state(cfg.imagenet)
    elif cfg.imagenet:
        from .backbones import read_imagenet

        imagenet = read_imagenet(cfg.imagenet)
    rank, world = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    backbone = None
    if cfg.init_backbone:  # its input contract becomes the bundle's: the normalisation it was trained with
        from .backbones import read_backbone

        backbone = read_backbone(cfg.init_backbone, cfg.init_format)
        cfg = replace(cfg, preprocessing=replace(cfg.preprocessing, mean=backbone.mean, std=backbone.std))
        log.info("backbone from %s (%s format): input normalised with mean %s, std %s", backbone.source,
                 backbone.format, backbone.mean, backbone.std)
    if resume:
        check_resumable(out / "checkpoint.pt", cfg)
    inputs = input_identity(cfg)  # in each checkpoint: what a --resume compares its inputs with
    prep = cfg.preprocessing
    encoding = PatientEncoding()
    ctx = Context(cfg, prep, encoding, device, amp)
    is_main = rank == 0

    # data: prepare (stage 1) and cache (stage 2) on rank 0, the others wait and read
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        held.callback(hold_run_folder(out).release)
        if not (resume and (out / PREPARED).exists()):
            prepare(cfg, out)
        (out / INIT_INFO).write_text(json.dumps(initialisation(cfg, imagenet, backbone), indent=2) + "\n")
        load_splits(cfg, out, prep, encoding)
    if world > 1:
        dist.barrier()
    parts, data = load_splits(cfg, out, prep, encoding)
    sampler = DistributedSampler(data["train"], world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    per_rank_batch = max(1, cfg.batch_size // world)
    loader_args = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(data["train"], per_rank_batch, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(data["train"]) > per_rank_batch, **loader_args)
    val_loader = DataLoader(data["val"], per_rank_batch, **loader_args)

    # model, loss, optimizer, scheduler
    model = build_model(cfg.model)
    if imagenet is not None:
        load_imagenet_backbone(model, imagenet if isinstance(imagenet, dict) else imagenet.state)
    if backbone is not None:
        from .backbones import load_backbone

        load_backbone(model, backbone)
    model = model.to(device, memory_format=torch.channels_last)
    unique_train = unique_training_images(parts["train"])
    weights = pos_weights(multi_hot(unique_train["labels"]), cfg.pos_weight_overrides, cfg.pos_weight_max)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(weights).to(device))
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights, adds_prior=cfg.patient_prior == "logistic")
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
        ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        if is_main and ckpt.get("rng") is not None:  # the rank that saved it (other ranks keep their own seeds)
            set_rng_state(ckpt["rng"])
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
                     "recall %(recall_macro).3f  F1 %(f1_macro).3f  AUC %(auc)s  lr %(lr).2g  %(seconds).1fs"
                     % {**row, "auc": auc_text(row["mean_auc"])} + ("  *best*" if improved else ""))
            if improved:
                save_atomic(scored.state_dict(), out / "model_classification.pt")
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "epoch": epoch, "best": best, "history": history, "args": cfg.to_dict(),
                         "inputs": inputs, "rng": rng_state()}, ckpt_path)
            save_atomic(optimizer.state_dict(), out / "optimizer_classification.pt")
            write_run_file(out / HISTORY, (json.dumps(history, indent=2) + "\n").encode())
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

    # the model to evaluate and export: the best checkpoint, plus the patient prior if configured
    # every file from here on whole or not at all, a full disk said as such (torch.save straight to
    # a full disk raised a RuntimeError traceback and left a model_final.pt cut off)
    if not (out / "model_classification.pt").exists():  # epochs = 0: evaluate/export the initial weights
        save_atomic((ema.module if ema is not None else model).state_dict(), out / "model_classification.pt")
    final = build_model(cfg.model).to(device, memory_format=torch.channels_last)
    final.load_state_dict(torch.load(out / "model_classification.pt", map_location=device, weights_only=True))
    prior_info = {"method": cfg.patient_prior}
    if cfg.patient_prior == "logistic":
        exact_val = evaluation_loader(cfg, parts["val"], prep, encoding)  # as inference preprocesses
        prior_info = apply_patient_prior(final, encode_patients(unique_train, encoding),
                                         multi_hot(unique_train["labels"]), exact_val, ctx.exact())
    write_run_file(out / PRIOR_INFO, (json.dumps(prior_info, indent=2) + "\n").encode())
    if not (out / HISTORY).exists():
        write_run_file(out / HISTORY, (json.dumps(history, indent=2) + "\n").encode())
    save_atomic(final.state_dict(), out / FINAL_WEIGHTS)

    # stages 4-6 read what the stages above wrote
    try:
        evaluate_run(cfg, out, ctx)
    except OSError as e:  # a full disk while the reports and the bundle are written: the weights stay
        raise OSError(f"cannot write {e.filename or out} ({e.strerror or e}): the trained weights in {out} are "
                      "kept; free space there and run the same command with --resume to finish the run") from None
    if world > 1:
        dist.destroy_process_group()
    return out
