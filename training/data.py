"""What every training stage reads: prepared rows as tensors, and the model's predictions on them.

Shared by the training loop, the patient prior and the evaluation stage, so none of them
imports another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientEncoding, patient_from_values
from cxr_batch.preprocess import Preprocessing, eval_transform

from .augment import eval_transform_batch
from .cache import read_grey
from .config import TrainConfig
from .prepare import PREPARED, multi_hot

# The run folder's files that one stage writes and a later one reads.
HISTORY = "history.json"  # training loop -> evaluation (epoch table, figures)
FINAL_WEIGHTS = "model_final.pt"  # best checkpoint plus patient prior -> evaluation and export
INIT_INFO = "initialisation.json"  # what the weights started from -> the bundle's manifest
PRIOR_INFO = "prior.json"  # what the patient prior added -> metrics and the bundle's manifest


def read_prepared(out) -> pd.DataFrame:
    """The prepare stage's table (one row per training example; val/test rows once)."""
    return pd.read_csv(f"{out}/{PREPARED}", dtype={"patient_id": str, "age": str}, keep_default_na=False)


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


class DecodedImages(Dataset):
    """Rows of the prepared table decoded from their files and transformed exactly as inference
    does (the scan's reader + ``eval_transform``): (image [3,S,S], tabular, y, mirror). Thresholds,
    the patient prior's weight and the test evaluation use it, so what they measure is what a
    scan computes; the uint8 cache resizes before cropping, which moved inputs by about a grey
    level (benchmarks/eval_input_gap.py). Per-epoch validation keeps the faster cache: it only
    picks the checkpoint and drives the learning rate."""

    def __init__(self, table: pd.DataFrame, images_dir, prep: Preprocessing, encoding: PatientEncoding):
        from pathlib import Path

        self.paths = [Path(images_dir) / name for name in table["image"]]
        self.prep = prep
        self.tabular = torch.from_numpy(encode_patients(table, encoding))
        self.y = torch.from_numpy(multi_hot(table["labels"]).astype(np.float32))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = eval_transform(read_grey(self.paths[i]), self.prep)
        return image, self.tabular[i], self.y[i], torch.tensor(False)


def evaluation_loader(cfg: TrainConfig, table: pd.DataFrame, prep: Preprocessing, encoding: PatientEncoding):
    """A DataLoader over ``table`` with the inference preprocessing (:class:`DecodedImages`)."""
    from torch.utils.data import DataLoader

    return DataLoader(DecodedImages(table, cfg.images, prep, encoding), max(1, cfg.batch_size),
                      num_workers=cfg.workers)


@dataclass
class Context:
    """Where and how a run computes: the configuration, input transform, encoding and device."""

    cfg: TrainConfig
    prep: Preprocessing
    encoding: PatientEncoding
    device: torch.device
    amp_dtype: torch.dtype | None

    def exact(self) -> "Context":
        """This context in float32: what the stages that choose thresholds and the patient prior
        and measure the test use, so that they see the probabilities a float32 scan computes
        (bfloat16 autocast, the training precision on a GPU, moves them by about 1%)."""
        return replace(self, amp_dtype=None)

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


@torch.inference_mode()
def predict(model, loader, ctx: Context, criterion=None, unknown_patient=False) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities [N, 14], targets [N, 14] and mean loss over a loader (no augmentation).
    ``unknown_patient`` gives every image the unknown patient code (image-only evaluation)."""
    model.eval()
    probs, ys, total = [], [], 0.0
    for images, tabular, y, _ in loader:
        images = images.to(ctx.device)
        if images.dtype == torch.uint8:  # cached images: crop and resize here; decoded ones come transformed
            images = eval_transform_batch(images, ctx.prep)
        x = images.contiguous(memory_format=torch.channels_last)
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


def load_splits(cfg: TrainConfig, out, prep: Preprocessing, encoding: PatientEncoding):
    """The prepared table's parts and their datasets, from ``out``'s prepared.csv and cache
    (the cache is built on first use). Returns ({split: table}, {split: CachedImages})."""
    from pathlib import Path

    from .cache import build_cache, cache_size_for

    parts = prepared_parts(out)
    names = [n for t in parts.values() for n in t["image"]]
    cache, index = build_cache(Path(cfg.images), names, cache_size_for(prep), Path(out), cfg.workers)
    return parts, {s: CachedImages(t, cache, index, encoding) for s, t in parts.items()}


def prepared_parts(out) -> dict[str, pd.DataFrame]:
    """The prepared table's train, val and test rows."""
    table = read_prepared(out)
    return {s: table[table["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}


def unique_training_images(train: pd.DataFrame) -> pd.DataFrame:
    """The training part without its balancing copies (mirrored or replicated rows)."""
    return train[train["mirror"] == 0].drop_duplicates("image")
