"""Batched inference: DataLoader workers read and preprocess while the model runs.

``load_study`` turns one candidate file into a record (identifiers, patient data with
sources, status) plus the model's inputs; ``score_batches`` drives a DataLoader over the
candidates and yields scored batches in candidate order, so callers (CSV, PDF reports, the
watcher) consume results as they come and memory stays flat.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .bundle import Bundle
from .discover import Candidate
from .findings import DEFAULT_URGENT, FINDINGS
from .metadata import MetadataRow, patient_from_metadata, read_sidecar
from .patient import PatientData
from .preprocess import eval_transform
from .readers import ID_FIELDS, ReadError, ScoringRules, SkipStudy, check_view, read_study
from .runtime import RunPolicy, available_cores, default_workers
from .triage import triage

log = logging.getLogger("cxr_batch")


@dataclass
class ScanOptions:
    batch_size: int = 16
    workers: int | None = None  # None: runtime.default_workers()
    urgent: tuple[str, ...] = DEFAULT_URGENT
    rules: ScoringRules = field(default_factory=ScoringRules)
    progress: bool = True


@dataclass
class Loaded:
    """One study after reading: its row so far and, when readable, the model inputs."""

    record: dict
    image: torch.Tensor | None = None  # [3, S, S] float32, normalised
    tabular: torch.Tensor | None = None  # [3] float32, encoded patient data


def _patient_columns(p: PatientData) -> dict:
    return {
        "age": p.age, "age_source": p.age_source, "sex": p.sex or "", "sex_source": p.sex_source,
        "view": p.view or "", "view_source": p.view_source, "notes": "; ".join(p.notes),
    }


def load_study(cand: Candidate, bundle_prep, encoding, rules: ScoringRules,
               metadata: dict[str, MetadataRow] | None = None) -> Loaded:
    """Read, merge patient data (header > sidecar > metadata CSV) and preprocess one file."""
    record = {"file": cand.rel, "status": "ok", "reason": ""}
    if cand.problem:
        return Loaded({**record, "status": "error", "reason": cand.problem})
    patient, ids, grey, failure = PatientData(), {}, None, None
    try:
        study = read_study(cand.path, rules)
        patient, ids, grey = study.patient, study.ids, study.grey
    except (ReadError, SkipStudy) as e:
        failure = e
        patient = getattr(e, "patient", None) or PatientData()
        ids = getattr(e, "ids", None) or {}
    except Exception as e:  # a reader bug must cost one row, never the scan
        failure = ReadError(f"unexpected {type(e).__name__} while reading: {e}")
    sidecar = read_sidecar(cand.path)
    if sidecar is not None:
        patient.fill_from(sidecar[0])
        ids = {**sidecar[1], **{k: v for k, v in ids.items() if v}}
    if metadata is not None and cand.path.name in metadata:
        row = metadata[cand.path.name]
        patient.fill_from(patient_from_metadata(row))
        if not ids.get("patient_id") and row.patient_id:
            ids["patient_id"] = row.patient_id
    record.update({k: ids.get(k, "") for k in ID_FIELDS})
    record.update(_patient_columns(patient))
    if failure is None:
        try:
            check_view(patient, rules)  # the view may come from a sidecar or the CSV
        except SkipStudy as e:
            failure = e
    if failure is not None:
        record["status"] = "skipped" if isinstance(failure, SkipStudy) else "error"
        record["reason"] = str(failure)
        return Loaded(record)
    image = eval_transform(grey, bundle_prep)
    tabular = torch.from_numpy(encoding.encode(patient.age, patient.view, patient.sex))
    return Loaded(record, image, tabular)


class StudyDataset(Dataset):
    def __init__(self, candidates: list[Candidate], bundle: Bundle, rules: ScoringRules,
                 metadata: dict[str, MetadataRow] | None = None):
        self.candidates = candidates
        self.prep, self.encoding, self.rules, self.metadata = bundle.preprocessing, bundle.encoding, rules, metadata

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Loaded:
        return load_study(self.candidates[i], self.prep, self.encoding, self.rules, self.metadata)

    def __getitems__(self, indices: list[int]) -> list[Loaded]:
        """A whole batch at once (DataLoader calls this when it exists): decoded by a thread
        pool, since PNG/DICOM decoding and resizing release the GIL. In the main process
        (workers = 0) this uses every core between the model's batches."""
        if _decode_threads() <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        return list(_pool().map(self.__getitem__, indices))


@dataclass
class Batch:
    records: list[dict]
    ok: list[int]  # positions in records that have inputs
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


_POOL = None
_IN_WORKER = False


def _decode_threads() -> int:
    return 1 if _IN_WORKER else available_cores()


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_decode_threads(), thread_name_prefix="cxr-decode")
    return _POOL


def _worker_init(_):
    # Workers decode and resize one image at a time; the model's threads live in the main process.
    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(1)


class Engine:
    """The bundle's model on a device under a precision policy.

    Reduced precision (bf16/fp16) moves probabilities by a few thousandths (benchmarks/
    scan_vs_peer.py prints the largest difference on real images), enough to flip a flag where
    a probability sits right at its threshold. So images with any probability within
    ``refine_margin`` of its threshold are scored again in float32: the fast path then flags
    exactly what the float32 path flags, at the cost of re-running those images only.
    """

    def __init__(self, bundle: Bundle, policy: RunPolicy, refine_margin: float = 0.005):
        self.bundle, self.policy, self.refine_margin = bundle, policy, refine_margin
        self.model = bundle.model.to(policy.device, memory_format=torch.channels_last).eval()
        self.thresholds = torch.tensor(bundle.threshold_vector(), dtype=torch.float32)
        self.refined = 0  # images re-scored in float32, for the run log

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, tabular: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """images [B, 3, S, S], tabular [B, 3] (any device) -> float32 logits [B, 14] on CPU.
        ``exact`` runs in float32 whatever the policy."""
        dev = self.policy.device
        images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        tabular = tabular.to(dev, non_blocking=True)
        context = torch.autocast(dev.type, enabled=False) if exact else self.policy.autocast()
        with context:
            out = self.model(images, tabular)
        return out.float().cpu()

    def probabilities(self, images: torch.Tensor, tabular: torch.Tensor) -> np.ndarray:
        probs = torch.sigmoid(self.logits(images, tabular))
        if self.policy.precision != "fp32" and self.refine_margin > 0:
            near = ((probs - self.thresholds).abs() < self.refine_margin).any(dim=1)
            if near.any():
                idx = near.nonzero().flatten()
                probs[idx] = torch.sigmoid(self.logits(images[idx.to(images.device)],
                                                       tabular[idx.to(tabular.device)], exact=True))
                self.refined += len(idx)
        return probs.numpy()


@dataclass
class ScoredBatch:
    rows: list[dict]
    ok: list[int]
    images: torch.Tensor | None  # the model inputs of rows[ok[i]], for heatmaps and reports
    tabular: torch.Tensor | None


def score_rows(batch: Batch, probs: np.ndarray | None, bundle: Bundle, urgent) -> list[dict]:
    """Attach probabilities, flags, findings and priority to the ok records of a batch."""
    thresholds = np.array(bundle.threshold_vector())
    rows = []
    for pos, record in enumerate(batch.records):
        row = {**record, "model": bundle.label, "weights_sha256": bundle.sha256}
        if pos in batch.ok:
            p = probs[batch.ok.index(pos)]
            t = triage(p, thresholds, urgent)
            row.update({f"p_{f}": float(v) for f, v in zip(FINDINGS, p)})
            row.update({f"flag_{f}": int(v) for f, v in zip(FINDINGS, t.flags)})
            row.update(findings=";".join(t.findings), priority=t.priority, triage_score=t.score)
        rows.append(row)
    return rows


def score_batches(candidates: list[Candidate], engine: Engine, options: ScanOptions,
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
            probs = engine.probabilities(batch.images, batch.tabular) if batch.ok else None
            yield ScoredBatch(score_rows(batch, probs, engine.bundle, options.urgent), batch.ok,
                              batch.images, batch.tabular)
            if progress is not None:
                progress.update(len(batch.records))
    finally:
        if progress is not None:
            progress.close()
