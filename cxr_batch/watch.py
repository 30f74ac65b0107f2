"""``cxr-batch watch``: a crash-safe daemon that reports every study in a PACS export folder once.

- Events from watchdog (inotify, or polling for network shares) plus a periodic rescan, so a
  missed event is never a missed study; files present at start are processed.
- A file is taken once complete: size and mtime unchanged for ``settle`` seconds, and it reads
  to the end. A file that still does not read is retried until ``broken_deadline`` seconds after
  its last change, then gets an error row. Temporary names (.part, .tmp, hidden) are ignored
  until renamed.
- Exactly once, across crashes: studies are keyed by SOPInstanceUID (content sha256 without
  one) in an SQLite ledger. A batch's PDFs are written (atomically) first, then its rows are
  committed to the ledger in one transaction, then results.csv and the worklist are rewritten
  from the ledger (atomically). A kill at any point leaves either the study reported or not yet
  reported; on restart it is redone, never duplicated. Re-sent copies are recognised by key.
- Batches for throughput, latency for triage: ready files are scored together up to
  ``batch_size`` or after ``max_wait`` seconds, through the same batched inference as scan.
- SIGTERM/SIGINT finish the current batch, flush and exit 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .bundle import atomic_write_bytes, load_bundle
from .config import bounded
from .discover import Candidate, find_candidates, is_ignored_name
from .inference import Engine, score_batches
from .ledger import Ledger
from .metadata import load_metadata_csv
from .readers import sniff
from .record import StudyRecord
from .results import AtomicCsvWriter
from .runconfig import RunConfig
from .runtime import make_policy

log = logging.getLogger("cxr_batch")


@dataclass
class WatchConfig(RunConfig):
    """The ``[watch]`` table of ``--config`` (and ``[scoring]``), command-line options over it."""

    batch_size: int = bounded(8, min=1, max=4096)
    workers: int | None = bounded(0, min=0, max=64)  # 0: decode in the main process (lowest latency)
    max_wait: float = bounded(0.5, min=0.0)  # seconds a ready study waits for its batch to fill
    settle: float = bounded(1.0, min=0.0)  # size and mtime unchanged this long: the writer is done
    broken_deadline: float = bounded(60.0, min=0.0)  # unreadable this long after its last change: an error row
    rescan_interval: float = bounded(30.0, gt=0.0)  # full rescan, the safety net for missed events
    polling: bool = False  # PollingObserver, for network shares where inotify sees nothing
    poll_interval: float = bounded(1.0, gt=0.0)
    archive_dir: str | None = None  # move processed files here (default: leave in place)
    quarantine_dir: str | None = None  # move failed files here
    heartbeat_interval: float = bounded(5.0, gt=0.0)


@dataclass
class Pending:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time the size/mtime last changed
    ready_at: float | None = None  # when it was found complete (latency starts here)
    retry_at: float = 0.0


def study_key(path: Path) -> str:
    """SOPInstanceUID for DICOM, else the sha256 of the content."""
    with open(path, "rb") as f:
        head = f.read(132)
    if sniff(head) not in ("png", "jpeg"):
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            if uid:
                return "uid:" + uid
        except Exception:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Watcher:
    def __init__(self, watch_dir: Path, out: Path, cfg: WatchConfig):
        self.watch_dir, self.out, self.cfg = Path(watch_dir).resolve(), Path(out), cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.out / ".cxr-batch"
        self.ledger = Ledger(self.state_dir / "ledger.sqlite")
        self.bundle = load_bundle(cfg.weights)
        self.policy = make_policy(cfg.device, cfg.precision)
        self.engine = Engine(self.bundle, self.policy)
        self.options = cfg.batch_options()
        self.metadata_csv = Path(cfg.metadata) if cfg.metadata else None
        self.reports = None
        if cfg.pdf:
            from .reports import ReportWriter

            self.reports = ReportWriter(self.out / "reports", self.bundle, cfg.report_options())
        self.pending: dict[str, Pending] = {}
        self.events: queue.Queue[str] = queue.Queue()
        self.stop = False
        self.processed = 0
        self.last_error = ""
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.cleanup_temp()
        self.publish()  # results.csv and worklist reflect the ledger even before new work
        observer = self._observer()
        observer.start()
        log.info("watching %s -> %s (model %s on %s)", self.watch_dir, self.out, self.bundle.label,
                 self.policy.describe())
        next_rescan = 0.0
        next_beat = 0.0
        try:
            while not self.stop:
                now = time.monotonic()
                if now >= next_rescan:
                    self.rescan()
                    next_rescan = now + self.cfg.rescan_interval
                self.drain_events()
                batch = self.ready_batch(now)
                if batch:
                    self.process(batch)
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + self.cfg.heartbeat_interval
                if not batch:
                    time.sleep(0.1)
        finally:
            observer.stop()
            observer.join(timeout=5)
            self.heartbeat(stopping=True)
            self.ledger.close()
        log.info("stopped after %d studies", self.processed)
        return 0

    def _on_signal(self, signum, _frame):
        log.info("signal %d: finishing the current batch", signum)
        self.stop = True

    def _observer(self):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        events = self.events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if not event.is_directory:
                    events.put(event.src_path)
                    if getattr(event, "dest_path", None):
                        events.put(event.dest_path)

        observer = PollingObserver(timeout=self.cfg.poll_interval) if self.cfg.polling else Observer()
        observer.schedule(Handler(), str(self.watch_dir), recursive=True)
        return observer

    def cleanup_temp(self) -> None:
        """Our own temp files from a killed run (results, reports): never left where users look."""
        for folder in (self.out, self.out / "reports"):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and p.name.endswith(".tmp"):
                        p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ finding complete files
    def track(self, path: Path) -> None:
        try:
            rel = path.relative_to(self.watch_dir).as_posix()
        except ValueError:
            return
        if any(is_ignored_name(part) for part in Path(rel).parts) or rel.lower().endswith(".json"):
            return
        try:
            st = path.stat()
        except OSError:
            self.pending.pop(rel, None)  # gone (renamed or deleted)
            return
        if not path.is_file() or self.ledger.file_handled(rel, st.st_size, st.st_mtime_ns):
            return
        current = self.pending.get(rel)
        if current is None or (current.size, current.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.pending[rel] = Pending(st.st_size, st.st_mtime_ns, time.monotonic())

    def rescan(self) -> None:
        for cand in find_candidates(self.watch_dir, exclude=[self.out]):
            if cand.problem is None:
                self.track(cand.path)

    def drain_events(self) -> None:
        while True:
            try:
                self.track(Path(self.events.get_nowait()))
            except queue.Empty:
                return

    def ready_batch(self, now: float) -> list[str]:
        """Paths complete by the settle rule; returned once a batch is full or has waited."""
        ready = []
        for rel, p in list(self.pending.items()):
            try:
                st = (self.watch_dir / rel).stat()
            except OSError:
                del self.pending[rel]
                continue
            if (st.st_size, st.st_mtime_ns) != (p.size, p.mtime_ns):
                self.pending[rel] = Pending(st.st_size, st.st_mtime_ns, now)
                continue
            if now - p.changed_at >= self.cfg.settle and now >= p.retry_at:
                p.ready_at = p.ready_at or now
                ready.append(rel)
        if not ready:
            return []
        oldest = min(self.pending[r].ready_at for r in ready)
        if len(ready) >= self.cfg.batch_size or now - oldest >= self.cfg.max_wait or self.stop:
            return sorted(ready, key=lambda r: self.pending[r].ready_at)[: self.cfg.batch_size]
        return []

    # ------------------------------------------------------------------ one batch
    def process(self, rels: list[str]) -> None:
        now = time.monotonic()
        keys, new, duplicates = {}, [], []
        for rel in rels:
            try:
                keys[rel] = study_key(self.watch_dir / rel)
            except OSError:
                self.pending.pop(rel, None)
                continue
            (duplicates if self.ledger.is_reported(keys[rel]) else new).append(rel)
        # two copies of one instance in the same batch: the first one counts
        seen, unique = set(), []
        for rel in new:
            (duplicates if keys[rel] in seen else unique).append(rel)
            seen.add(keys[rel])
        candidates = [Candidate(self.watch_dir / rel, rel) for rel in unique]
        metadata = None
        if self.metadata_csv is not None and candidates:
            metadata = load_metadata_csv(self.metadata_csv, only={c.path.name for c in candidates})
        studies: list[tuple[str, StudyRecord]] = []
        handled, defer = [], []
        for scored in score_batches(candidates, self.engine, self.options, metadata):
            for pos, record in enumerate(scored.records):
                p = self.pending[record.file]
                if record.status == "error" and now - p.changed_at < self.cfg.broken_deadline:
                    defer.append(record.file)  # maybe still being written: try again later
                    continue
                if self.reports is not None and record.ok:
                    self.reports.report(record, scored.inputs(pos))
                studies.append((keys[record.file], record))
        for rel in defer:
            self.pending[rel].retry_at = now + max(self.cfg.settle, 1.0)
        for key, record in studies:
            handled.append(self._file_record(record.file, key, record.status))
        for rel in duplicates:
            handled.append(self._file_record(rel, keys[rel], "duplicate"))
            log.info("duplicate key=%s file=%s: already reported", keys[rel], rel)
        self.ledger.record(studies, [h for h in handled if h is not None])
        self.publish()
        done = time.monotonic()
        for key, record in studies:
            p = self.pending.pop(record.file, None)
            latency = done - p.ready_at if p and p.ready_at else 0.0
            log.info("study key=%s file=%s status=%s priority=%s latency=%.2fs", key, record.file, record.status,
                     record.priority or "-", latency)
            self.processed += 1
            self.move(record.file, record.status)
        for rel in duplicates:
            self.pending.pop(rel, None)
            self.move(rel, "duplicate")

    def _file_record(self, rel: str, key: str, outcome: str):
        try:
            st = (self.watch_dir / rel).stat()
        except OSError:
            return None
        return rel, st.st_size, st.st_mtime_ns, key, outcome

    def move(self, rel: str, status: str) -> None:
        target = self.cfg.quarantine_dir if status == "error" else self.cfg.archive_dir
        if not target:
            return
        dest = Path(target) / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.watch_dir / rel), dest)
        except OSError as e:
            log.error("could not move %s to %s: %s", rel, target, e)

    # ------------------------------------------------------------------ outputs
    def publish(self) -> None:
        """Rewrite results.csv and the worklist from the ledger (atomically)."""
        records = self.ledger.records()
        with AtomicCsvWriter(self.out / "results.csv") as writer:
            for record in records:
                writer.write(record)
        if self.reports is not None and records:
            self.reports.write_worklist(records)

    def heartbeat(self, stopping: bool = False) -> None:
        status = {"pid": os.getpid(), "state": "stopping" if stopping else "running", "time": time.time(),
                  "started": self.started, "watch_dir": str(self.watch_dir), "studies_reported": self.ledger.count(), "processed_this_run": self.processed,
                  "pending": len(self.pending), "model": self.bundle.label, "device": self.policy.describe()}
        atomic_write_bytes(self.out / "status.json", (json.dumps(status, indent=2) + "\n").encode(), mode=0o644)

