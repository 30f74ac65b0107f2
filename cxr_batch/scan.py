"""One scan of a folder: find files, score them in batches, write results.csv (and reports)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_codes
from .bundle import load_bundle, refuse_output_in_bundle
from .files import atomic_write_bytes, private_dir
from .config import ConfigError, to_plain
from .discover import find_candidates
from .evidence import bundle_evidence
from .inference import Engine, score_batches
from .metadata import load_metadata_csv
from .folderlock import FolderLock
from .record import log_name
from .results import AtomicCsvWriter
from .runconfig import RunConfig
from .runtime import default_workers, make_policy
from .sandbox import StudyReader

log = logging.getLogger("cxr_batch")



@dataclass
class ScanConfig(RunConfig):
    """Everything a scan is told: command-line options over the ``[scan]`` and ``[scoring]``
    tables of ``--config``. Recorded whole in run.json."""

    shard: tuple[int, int] | None = None  # (i, N): every N-th file from the i-th
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.shard is not None and not (self.shard[1] >= 1 and 0 <= self.shard[0] < self.shard[1]):
            raise ConfigError(f"scan.shard = {self.shard}: expected i/N with 0 <= i < N")


@dataclass
class ScanSummary:
    results: Path
    counts: Counter = field(default_factory=Counter)
    priorities: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    device: str = ""
    worklist: Path | None = None
    srs: int = 0  # DICOM SRs written
    reports_failed: int = 0  # studies scored whose PDF could not be written
    worklist_failed: bool = False
    files_found: int = 0  # candidate files under the folder, before --shard
    without_patient_data: int = 0  # scored with age, sex and view all unknown

    @property
    def exit_code(self) -> int:
        if self.files_found == 0:
            return exit_codes.NO_FILES
        failed = self.counts["error"] or self.reports_failed or self.worklist_failed
        return exit_codes.SOME_FAILED if failed else exit_codes.OK

    def line(self) -> str:
        if self.files_found == 0:
            return f"no files found: nothing scored (is the folder mounted?) -> {self.results}"
        n = sum(self.counts.values())
        rate = self.counts["ok"] / self.seconds if self.seconds > 0 else 0.0
        pr = ", ".join(f"{self.priorities[p]} {p}" for p in ("urgent", "abnormal", "normal"))
        outputs = ""
        if self.reports_failed or self.worklist_failed:
            outputs = (f"; {self.reports_failed} report(s)" + (" and the worklist" if self.worklist_failed else "")
                       + " could not be written (see the log)")
        return (f"{n} files: {self.counts['ok']} scored ({pr}; {self.without_patient_data} without patient data), "
                f"{self.counts['skipped']} skipped, {self.counts['error']} failed in {self.seconds:.1f} s "
                f"({rate:.1f} images/s){outputs} -> {self.results}")


def run_scan(studies: Path, out: Path, cfg: ScanConfig = ScanConfig()) -> ScanSummary:
    """Scan ``studies`` into ``out/results.csv``, and PDF reports into ``out/reports`` when
    ``cfg.pdf``. Raises BundleError, MetadataError, DeviceError or FolderBusy when nothing can
    be done. A report or the worklist that cannot be written costs only itself: results.csv
    is written and the summary's exit code says 3."""
    studies, out = Path(studies), Path(out)
    policy = make_policy(cfg.device, cfg.precision)
    options = cfg.batch_options(cfg.progress)
    workers = default_workers(policy.device) if cfg.workers is None else cfg.workers
    # the reading workers start while the model loads
    with StudyReader(workers, cfg.scoring, options.limits) as reader:
        bundle = load_bundle(cfg.weights)
        refuse_output_in_bundle(out, bundle.path)
        log.info("model %s (bundle sha256 %s...) on %s", bundle.label, bundle.sha256[:12], policy.describe())
        evidence = bundle_evidence(bundle.manifest, bundle.path)
        if evidence.problem:
            log.warning("weights %s have no validation evidence (%s): how often they are right is not known; "
                        "every report says so", bundle.label, evidence.problem)
        private_dir(out)
        with FolderLock(out, "scan"):
            return _scan(studies, out, cfg, bundle, policy, options, reader, evidence.problem)


def _scan(studies: Path, out: Path, cfg: ScanConfig, bundle, policy, options, reader,
          evidence_problem: str) -> ScanSummary:
    candidates = find_candidates(studies, exclude=[out], follow_links=cfg.follow_links)
    files_found = len(candidates)
    if not files_found:
        log.warning("no files under %s: nothing to score (an unmounted share or a wrong path?)", studies)
    if cfg.shard is not None:
        index, count = cfg.shard
        candidates = [c for i, c in enumerate(candidates) if i % count == index]
    metadata = None
    if cfg.metadata is not None:
        metadata = load_metadata_csv(cfg.metadata, only={c.path.name for c in candidates})
    log.info("%d candidate files under %s", len(candidates), studies)

    summary = ScanSummary(results=out / "results.csv", device=policy.describe(), files_found=files_found)
    engine = Engine(bundle, policy)
    reports = None
    if cfg.pdf:
        from .reports import ReportWriter

        reports = ReportWriter(out / "reports", bundle, cfg.report_options())
    srs = None
    if cfg.dicom_sr:
        from .sr import SR_FOLDER, SRWriter  # highdicom is imported only when SRs are made

        srs = SRWriter(out / SR_FOLDER, bundle)
    records = []
    start = time.perf_counter()
    with AtomicCsvWriter(summary.results) as writer:
        for scored in score_batches(candidates, engine, options, metadata, reader=reader):
            for pos, record in enumerate(scored.records):
                if reports is not None and record.ok and not reports.report(record, scored.inputs(pos)):
                    summary.reports_failed += 1
                if srs is not None and record.ok and srs.report(record) is not None:
                    summary.srs += 1
                writer.write(record)
                summary.counts[record.status] += 1
                if record.ok:
                    summary.priorities[record.priority] += 1
                    summary.without_patient_data += record.patient.all_unknown
                else:
                    log.warning("row %d (%s): %s: %s", writer.count, log_name(record.file), record.status,
                                record.reason)
            if reports is not None:
                records.extend(scored.records)
        if reports is not None:
            try:
                summary.worklist = reports.write_worklist(records)
            except Exception as e:  # results.csv is still written
                summary.worklist_failed = True
                log.error("worklist not written: %s: %s", type(e).__name__, e)
    summary.seconds = time.perf_counter() - start
    if summary.without_patient_data:
        log.warning("%d studies scored without any patient data (age, sex and view unknown): their results rest "
                    "on the image alone", summary.without_patient_data)
    run_info = {
        "studies": str(studies), "model": bundle.label, "weights_sha256": bundle.sha256,
        "device": policy.describe(), "precision": policy.precision, "config": to_plain(cfg),
        "files_found": files_found, "counts": dict(summary.counts), "priorities": dict(summary.priorities),
        "scored_without_patient_data": summary.without_patient_data, "validation_evidence_problem": evidence_problem,
        "seconds": round(summary.seconds, 3), "refined_in_fp32": engine.refined, "fp32_after_images": engine.fp32_from,
    }
    if cfg.dicom_sr:
        run_info["dicom_sr_written"] = summary.srs
    atomic_write_bytes(out / "run.json", (json.dumps(run_info, indent=2) + "\n").encode())
    return summary
