"""One scan of a folder: find files, score them in batches, write results.csv (and reports)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import atomic_write_bytes, load_bundle
from .discover import find_candidates
from .inference import Engine, ScanOptions, score_batches
from .metadata import load_metadata_csv
from .results import AtomicCsvWriter
from .runtime import make_policy

log = logging.getLogger("cxr_batch")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


@dataclass
class ScanSummary:
    results: Path
    counts: Counter = field(default_factory=Counter)
    priorities: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    device: str = ""
    worklist: Path | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.counts["error"] else EXIT_OK

    def line(self) -> str:
        n = sum(self.counts.values())
        rate = self.counts["ok"] / self.seconds if self.seconds > 0 else 0.0
        pr = ", ".join(f"{self.priorities[p]} {p}" for p in ("urgent", "abnormal", "normal"))
        return (f"{n} files: {self.counts['ok']} scored ({pr}), {self.counts['skipped']} skipped, "
                f"{self.counts['error']} failed in {self.seconds:.1f} s ({rate:.1f} images/s) -> {self.results}")


def run_scan(
    studies: Path,
    out: Path,
    *,
    weights: Path | None = None,
    metadata_csv: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    options: ScanOptions = ScanOptions(),
    shard: tuple[int, int] | None = None,
    reports=None,
) -> ScanSummary:
    """Scan ``studies`` into ``out/results.csv``, and PDF reports into ``out/reports`` unless
    ``reports`` (a ``reports.ReportOptions``) is None.

    Raises BundleError, MetadataError or DeviceError when nothing can be done.
    """
    studies, out = Path(studies), Path(out)
    bundle = load_bundle(weights)
    policy = make_policy(device, precision)
    log.info("model %s (sha256 %s...) on %s", bundle.label, bundle.sha256[:12], policy.describe())
    out.mkdir(parents=True, exist_ok=True)
    candidates = find_candidates(studies, exclude=[out])
    if shard is not None:
        index, count = shard
        candidates = [c for i, c in enumerate(candidates) if i % count == index]
    metadata = None
    if metadata_csv is not None:
        metadata = load_metadata_csv(metadata_csv, only={c.path.name for c in candidates})
    log.info("%d candidate files under %s", len(candidates), studies)

    summary = ScanSummary(results=out / "results.csv", device=policy.describe())
    engine = Engine(bundle, policy)
    writer_pdf = None
    if reports is not None:
        from .reports import ReportWriter

        writer_pdf = ReportWriter(out / "reports", bundle, reports)
    start = time.perf_counter()
    with AtomicCsvWriter(summary.results) as writer:
        for scored in score_batches(candidates, engine, options, metadata):
            if writer_pdf is not None:
                writer_pdf.add_batch(scored)
            for row in scored.rows:
                writer.write(row)
                summary.counts[row["status"]] += 1
                if row["status"] == "ok":
                    summary.priorities[row["priority"]] += 1
                else:
                    log.warning("%s: %s: %s", row["file"], row["status"], row["reason"])
        if writer_pdf is not None:
            summary.worklist = writer_pdf.write_worklist()
    summary.seconds = time.perf_counter() - start
    run_info = {
        "studies": str(studies), "model": bundle.label, "weights_sha256": bundle.sha256,
        "device": policy.describe(), "precision": policy.precision, "batch_size": options.batch_size,
        "shard": list(shard) if shard else None, "counts": dict(summary.counts),
        "priorities": dict(summary.priorities), "seconds": round(summary.seconds, 3),
        "refined_in_fp32": engine.refined,
    }
    atomic_write_bytes(out / "run.json", (json.dumps(run_info, indent=2) + "\n").encode(), mode=0o640)
    return summary
