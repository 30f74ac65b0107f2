"""Batched inference: model inputs from assembled studies, the engine, and batch scoring.

:func:`score_batches` reads candidates through a :class:`~cxr_batch.sandbox.StudyReader`
(worker processes with a memory ceiling, reading ahead while the model runs), turns each
batch into model inputs, scores it and yields :class:`ScoredBatch` es in candidate order, so
callers (CSV, PDF reports, the watcher) consume results as they come and memory stays flat.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import numpy as np
import torch

from .assemble import AssembledStudy, assemble_study
from .bundle import Bundle
from .discover import Candidate
from .findings import DEFAULT_URGENT
from .image_stats import image_statistics
from .metadata import MetadataRow
from .patient import PatientEncoding
from .preprocess import Preprocessing, eval_transform, eval_transform_batch
from .record import Scores, StudyRecord
from .runtime import RunPolicy, available_cores, default_workers
from .sandbox import ReadLimits, StudyReader
from .study import ScoringRules
from .triage import triage

log = logging.getLogger("cxr_batch")


@dataclass
class BatchOptions:
    """What batch scoring needs of a run's configuration."""

    batch_size: int = 16
    workers: int | None = None  # reading processes; None: runtime.default_workers(); 0: in this process
    urgent: tuple[str, ...] = DEFAULT_URGENT
    rules: ScoringRules = field(default_factory=ScoringRules)
    limits: ReadLimits = field(default_factory=ReadLimits)
    progress: bool = True


@dataclass
class Loaded:
    """One study after reading: its record and, when it is to be scored, the model inputs."""

    record: StudyRecord
    image: torch.Tensor | None = None  # [3, S, S] float32, normalised
    tabular: torch.Tensor | None = None  # [3] float32, encoded patient data


def model_inputs(study: AssembledStudy, prep: Preprocessing, encoding: PatientEncoding) -> Loaded:
    """An assembled study's model inputs (none when it is not to be scored)."""
    if study.grey is None:
        return Loaded(study.record)
    p = study.record.patient
    image = eval_transform(study.grey, prep)
    tabular = torch.from_numpy(encoding.encode(p.age, p.view, p.sex))
    return Loaded(study.record, image, tabular)


def load_study(cand: Candidate, prep: Preprocessing, encoding: PatientEncoding, rules: ScoringRules,
               metadata: dict[str, MetadataRow] | None = None) -> Loaded:
    """Assemble one candidate in this process and build its model inputs (benchmarks, tests)."""
    return model_inputs(assemble_study(cand, rules, metadata), prep, encoding)


@dataclass
class Batch:
    records: list[StudyRecord]
    ok: list[int]  # positions in records that have model inputs
    images: torch.Tensor | None  # [len(ok), 3, S, S]
    tabular: torch.Tensor | None  # [len(ok), 3]


def collate_on_device(studies: list[AssembledStudy], prep: Preprocessing, encoding: PatientEncoding,
                      device: torch.device) -> Batch:
    """A batch whose images are preprocessed on ``device`` (a GPU): the decoded uint8 images
    are sent once, and crop, resize and normalisation run there (cxr_batch.preprocess)."""
    ok = [i for i, s in enumerate(studies) if s.grey is not None]
    if not ok:
        return Batch([s.record for s in studies], [], None, None)
    images = eval_transform_batch([studies[i].grey for i in ok], prep, device)
    tabular = torch.from_numpy(np.stack([encoding.encode(p.age, p.view, p.sex)
                                         for p in (studies[i].record.patient for i in ok)])).to(device)
    return Batch([s.record for s in studies], ok, images, tabular)


def collate(items: list[Loaded]) -> Batch:
    ok = [i for i, it in enumerate(items) if it.image is not None]
    images = torch.stack([items[i].image for i in ok]) if ok else None
    tabular = torch.stack([items[i].tabular for i in ok]) if ok else None
    return Batch([it.record for it in items], ok, images, tabular)


SWITCH_AFTER = 64  # images scored in reduced precision before judging whether re-scoring pays


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
        self.policy_triage = bundle.triage_policy()
        self.thresholds = torch.tensor(bundle.threshold_vector(), dtype=torch.float32)
        self.refined = 0  # images re-scored in float32, for the run log
        self.scored = 0  # images scored at the policy's precision
        self.fp32_from = None  # images scored when re-scoring stopped paying and float32 took over

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
        """Calibrated logits [B, 14], those of images near a threshold re-scored in float32.

        When more than half of the images have needed re-scoring (after at least
        ``SWITCH_AFTER``), reduced precision costs more than float32 alone would (a bundle whose
        probabilities sit near its thresholds, as v2's do): the rest of the run is scored in
        float32 directly, with the same flags."""
        if self.policy.precision == "fp32" or self.refine_margin <= 0:
            return self.logits(images, tabular)
        if self.fp32_from is not None:
            return self.logits(images, tabular, exact=True)
        z = self.logits(images, tabular)
        self.scored += len(z)
        p = torch.sigmoid(z)
        near = ((p - self.thresholds).abs() < self.refine_margin).any(dim=1)
        if self.policy_triage.normal_below is not None:  # the normal bucket's edge decides too
            p_any = torch.from_numpy(self.policy_triage.p_any(p.double().numpy()))
            near |= (p_any - self.policy_triage.normal_below).abs() < self.refine_margin
        if near.any():
            idx = near.nonzero().flatten()
            z[idx] = self.logits(images[idx.to(images.device)], tabular[idx.to(tabular.device)], exact=True)
            self.refined += len(idx)
        if self.scored >= SWITCH_AFTER and self.refined > self.scored / 2:
            self.fp32_from = self.scored
            log.info("%d of %d images needed float32 re-scoring: float32 from now on (faster here)",
                     self.refined, self.scored)
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
    pixel_keys: list[str] | None = None  # [len(records)] AssembledStudy.pixel_key, when asked for

    def inputs(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model inputs (image [3, S, S], tabular [3]) of records[position], if scored."""
        if position not in self.ok:
            return None
        k = self.ok.index(position)
        return self.images[k], self.tabular[k]


def attach_scores(batch: Batch, probs: np.ndarray | None, bundle: Bundle, urgent) -> list[StudyRecord]:
    """Set model identification on every record, and scores, the statistics of the model's
    input (drift monitoring) and the time on the scored ones."""
    policy = bundle.triage_policy(urgent)
    prep = bundle.preprocessing
    stats = image_statistics(batch.images, prep.mean[0], prep.std[0]) if batch.ok else []
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for pos, record in enumerate(batch.records):
        record.model, record.weights_sha256 = bundle.label, bundle.sha256
        if pos in batch.ok:
            k = batch.ok.index(pos)
            t = triage(probs[k], policy)
            record.scores = Scores(tuple(float(v) for v in probs[k]), tuple(int(v) for v in t.flags), t.priority,
                                   t.score, t.p_any)
            record.image_stats, record.scored_at = stats[k], now
    return batch.records


def score_batches(candidates: list[Candidate], engine: Engine, options: BatchOptions,
                  metadata: dict[str, MetadataRow] | None = None,
                  reader: StudyReader | None = None, pixel_keys: bool = False) -> Iterator[ScoredBatch]:
    """Read, preprocess and score ``candidates`` in order, one batch at a time. ``reader``: a
    running StudyReader to use (the watch daemon keeps one); by default one is started here.
    ``pixel_keys``: each batch also has its studies' pixel keys (cxr_batch.provenance.pixel_key),
    from the pixels decoded for scoring, so whoever compares them need not decode them again."""
    if not candidates:
        return
    workers = default_workers(engine.policy.device) if options.workers is None else options.workers
    own = reader is None
    if own:
        reader = StudyReader(workers, options.rules, options.limits).__enter__()
    prep, encoding = engine.bundle.preprocessing, engine.bundle.encoding
    progress, bar = None, contextlib.ExitStack()
    if options.progress and sys.stderr.isatty():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        progress = bar.enter_context(tqdm(total=len(candidates), unit="img", desc="scan", file=sys.stderr))
        bar.enter_context(logging_redirect_tqdm())  # log lines print above the bar, never into it
    # crop/resize/normalise of a batch in threads (torch releases the GIL) while workers read ahead
    threads = ThreadPoolExecutor(max(1, min(4, available_cores())), thread_name_prefix="cxr-prep")
    studies = reader.read(candidates, ahead=2 * options.batch_size, metadata=metadata, min_side=prep.min_side)
    on_gpu = engine.policy.device.type == "cuda"
    try:
        while chunk := list(islice(studies, options.batch_size)):
            # hashed in the threads (hashlib lets go of the GIL), before the batch is made
            keys = list(threads.map(AssembledStudy.pixel_key, chunk)) if pixel_keys else None
            if on_gpu:
                batch = collate_on_device(chunk, prep, encoding, engine.policy.device)
            else:
                batch = collate(list(threads.map(lambda s: model_inputs(s, prep, encoding), chunk)))
            logits = engine.score(batch.images, batch.tabular) if batch.ok else None
            probs = torch.sigmoid(logits).numpy() if batch.ok else None
            records = attach_scores(batch, probs, engine.bundle, options.urgent)
            yield ScoredBatch(records, batch.ok, batch.images, batch.tabular, logits, keys)
            if progress is not None:
                progress.update(len(records))
    finally:
        studies.close()
        threads.shutdown()
        if own:
            reader.close()
        bar.close()
