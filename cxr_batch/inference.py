"""Batched inference: the dataset that prepares model inputs, the engine, and batch scoring.

:class:`StudyDataset` turns candidate files into assembled studies plus the model's inputs;
:func:`score_batches` drives a DataLoader over it and yields :class:`ScoredBatch` es in
candidate order, so callers (CSV, PDF reports, the watcher) consume results as they come and
memory stays flat.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .assemble import assemble_study
from .bundle import Bundle
from .discover import Candidate
from .findings import DEFAULT_URGENT
from .metadata import MetadataRow
from .patient import PatientEncoding
from .preprocess import Preprocessing, eval_transform
from .record import Scores, StudyRecord
from .runtime import RunPolicy, available_cores, default_workers
from .study import ScoringRules
from .triage import triage

log = logging.getLogger("cxr_batch")


@dataclass
class BatchOptions:
    """What batch scoring needs of a run's configuration."""

    batch_size: int = 16
    workers: int | None = None  # None: runtime.default_workers()
    urgent: tuple[str, ...] = DEFAULT_URGENT
    rules: ScoringRules = field(default_factory=ScoringRules)
    progress: bool = True


@dataclass
class Loaded:
    """One study after reading: its record and, when it is to be scored, the model inputs."""

    record: StudyRecord
    image: torch.Tensor | None = None  # [3, S, S] float32, normalised
    tabular: torch.Tensor | None = None  # [3] float32, encoded patient data


def load_study(cand: Candidate, prep: Preprocessing, encoding: PatientEncoding, rules: ScoringRules,
               metadata: dict[str, MetadataRow] | None = None) -> Loaded:
    """Assemble one candidate and, when it is to be scored, build its model inputs."""
    study = assemble_study(cand, rules, metadata)
    if study.grey is None:
        return Loaded(study.record)
    p = study.record.patient
    image = eval_transform(study.grey, prep)
    tabular = torch.from_numpy(encoding.encode(p.age, p.view, p.sex))
    return Loaded(study.record, image, tabular)


class StudyDataset(Dataset):
    """Candidates -> :class:`Loaded` studies. A batch is decoded by the dataset's own thread
    pool (PNG/DICOM decoding and resizing release the GIL), so in the main process (workers = 0)
    every core decodes between the model's batches; in a DataLoader worker one thread does."""

    def __init__(self, candidates: list[Candidate], bundle: Bundle, rules: ScoringRules,
                 metadata: dict[str, MetadataRow] | None = None, threads: int | None = None):
        self.candidates = candidates
        self.prep, self.encoding, self.rules, self.metadata = bundle.preprocessing, bundle.encoding, rules, metadata
        self.threads = available_cores() if threads is None else threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Loaded:
        return load_study(self.candidates[i], self.prep, self.encoding, self.rules, self.metadata)

    def __getitems__(self, indices: list[int]) -> list[Loaded]:
        """A whole batch at once (DataLoader calls this when it exists)."""
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cxr-decode")
        return list(self._pool.map(self.__getitem__, indices))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __getstate__(self):  # sent to DataLoader workers: a thread pool does not travel
        return {**self.__dict__, "_pool": None}


def _worker_init(_worker_id: int) -> None:
    # A worker decodes one image at a time; the model's threads live in the main process.
    torch.set_num_threads(1)
    get_worker_info().dataset.threads = 1


@dataclass
class Batch:
    records: list[StudyRecord]
    ok: list[int]  # positions in records that have model inputs
    images: torch.Tensor | None  # [len(ok), 3, S, S]
    tabular: torch.Tensor | None  # [len(ok), 3]

    def pin_memory(self):  # DataLoader calls this when pin_memory=True
        if self.images is not None:
            self.images, self.tabular = self.images.pin_memory(), self.tabular.pin_memory()
        return self


def collate(items: list[Loaded]) -> Batch:
    ok = [i for i, it in enumerate(items) if it.image is not None]
    images = torch.stack([items[i].image for i in ok]) if ok else None
    tabular = torch.stack([items[i].tabular for i in ok]) if ok else None
    return Batch([it.record for it in items], ok, images, tabular)


class Engine:
    """The bundle's model on a device under a precision policy, with the bundle's calibration.

    Reduced precision (bf16/fp16) moves probabilities by a few thousandths (benchmarks/
    scan_vs_peer.py prints the largest difference on real images), enough to flip a flag where
    a probability sits right at its threshold. So images with any probability within
    ``refine_margin`` of its threshold are scored again in float32: the fast path then flags
    exactly what the float32 path flags, at the cost of re-running those images only.
    Thresholds compare against calibrated probabilities, so the margin is measured on those.
    """

    def __init__(self, bundle: Bundle, policy: RunPolicy, refine_margin: float = 0.005):
        self.bundle, self.policy, self.refine_margin = bundle, policy, refine_margin
        self.model = bundle.model.to(policy.device, memory_format=torch.channels_last).eval()
        self.thresholds = torch.tensor(bundle.threshold_vector(), dtype=torch.float32)
        self.refined = 0  # images re-scored in float32, for the run log

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, tabular: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """images [B, 3, S, S], tabular [B, 3] (any device) -> float32 calibrated logits [B, 14]
        on CPU (the model's logits through the bundle's calibration, if it has one).
        ``exact`` runs in float32 whatever the policy."""
        dev = self.policy.device
        images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        tabular = tabular.to(dev, non_blocking=True)
        context = torch.autocast(dev.type, enabled=False) if exact else self.policy.autocast()
        with context:
            out = self.model(images, tabular)
        out = out.float().cpu()
        return out if self.bundle.calibration is None else self.bundle.calibration.apply(out)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        """Calibrated logits [B, 14], those of images near a threshold re-scored in float32."""
        z = self.logits(images, tabular)
        if self.policy.precision != "fp32" and self.refine_margin > 0:
            near = ((torch.sigmoid(z) - self.thresholds).abs() < self.refine_margin).any(dim=1)
            if near.any():
                idx = near.nonzero().flatten()
                z[idx] = self.logits(images[idx.to(images.device)], tabular[idx.to(tabular.device)], exact=True)
                self.refined += len(idx)
        return z

    def probabilities(self, images: torch.Tensor, tabular: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(self.score(images, tabular)).numpy()


@dataclass
class ScoredBatch:
    records: list[StudyRecord]
    ok: list[int]  # positions in records that were scored
    images: torch.Tensor | None  # the model inputs of records[ok[i]], for heatmaps and reports
    tabular: torch.Tensor | None
    logits: torch.Tensor | None = None  # [len(ok), 14] calibrated logits (calibrate fits on them)

    def inputs(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model inputs (image [3, S, S], tabular [3]) of records[position], if scored."""
        if position not in self.ok:
            return None
        k = self.ok.index(position)
        return self.images[k], self.tabular[k]


def attach_scores(batch: Batch, probs: np.ndarray | None, bundle: Bundle, urgent) -> list[StudyRecord]:
    """Set model identification on every record and scores on the scored ones."""
    thresholds = np.array(bundle.threshold_vector())
    for pos, record in enumerate(batch.records):
        record.model, record.weights_sha256 = bundle.label, bundle.sha256
        if pos in batch.ok:
            p = probs[batch.ok.index(pos)]
            t = triage(p, thresholds, urgent)
            record.scores = Scores(tuple(float(v) for v in p), tuple(int(v) for v in t.flags), t.priority, t.score)
    return batch.records


def score_batches(candidates: list[Candidate], engine: Engine, options: BatchOptions,
                  metadata: dict[str, MetadataRow] | None = None) -> Iterator[ScoredBatch]:
    """Read, preprocess and score ``candidates`` in order, one batch at a time."""
    if not candidates:
        return
    workers = default_workers(engine.policy.device) if options.workers is None else options.workers
    dataset = StudyDataset(candidates, engine.bundle, options.rules, metadata)
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=engine.policy.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    progress = None
    if options.progress and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=len(candidates), unit="img", desc="scan", file=sys.stderr)
    try:
        for batch in loader:
            logits = engine.score(batch.images, batch.tabular) if batch.ok else None
            probs = torch.sigmoid(logits).numpy() if batch.ok else None
            records = attach_scores(batch, probs, engine.bundle, options.urgent)
            yield ScoredBatch(records, batch.ok, batch.images, batch.tabular, logits)
            if progress is not None:
                progress.update(len(batch.records))
    finally:
        dataset.close()
        if progress is not None:
            progress.close()
