"""``cxr-batch watch``: a daemon that reports every study in a PACS export folder once, and
never stops for one study or one fault.

- Events from watchdog (inotify, or polling for network shares) plus a periodic rescan, so a
  missed event is never a missed study; files present at start are processed.
- A file is taken once complete: size and times unchanged for ``settle`` seconds, and it reads
  to the end. A file that still does not read is retried until ``broken_deadline`` seconds after
  its last change, then gets an error row. Temporary names (.part, .tmp, hidden) are ignored
  until renamed.
- Each study is keyed by its SOPInstanceUID (content sha256 without one), read cheaply and in
  bounds (cxr_batch.keys), and recorded in an SQLite ledger (cxr_batch.ledger): an error row is
  provisional and a later intact copy replaces it; a changed file with the same UID is scored
  again and the old result kept as superseded; the same bytes again are a duplicate.
- A batch's PDFs are written first (named from the study key), then its records committed to
  the ledger in one transaction, then its rows appended to results.csv and the worklist
  rebuilt over a window. A kill at any point leaves each study reported or not yet reported;
  on restart results.csv is rewritten from the ledger and missing PDFs are made again.
- Every step of a study is contained: a failure is that study's error row and a log line,
  never an exit. A write that fails (disk full, I/O error) puts the daemon in a "degraded"
  state (status.json says why): it retries with back-off and catches up when it can write.
- One daemon per results folder (an exclusive lock); SIGTERM/SIGINT finish the current batch,
  flush and exit 0, leaving status.json at "stopped".
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import stat
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .bundle import load_bundle
from .checkpoints import checkpoint
from .config import bounded
from .discover import Candidate, find_candidates, is_ignored_name, leaves_folder
from .drift_watch import DriftWatch
from .display import plural
from .files import FILE_MODE, atomic_write_bytes, private_dir, remove_stale_temp
from .folderlock import FolderBusy, FolderLock, WatchedFolderClaim
from .folders import refuse_overlap
from .inference import Engine, model_inputs, score_batches
from .journal import refuse_scan_results
from .keys import content_sha256, reads_as_its_beginning, study_key
from .ledger import Ledger, Outcome, results_stamp
from .metadata import load_metadata_csv
from .record import StudyRecord, log_name, name_bytes
from .results import AtomicCsvWriter, append_rows, read_results
from .runconfig import RunConfig
from .runtime import default_workers, make_policy
from .sandbox import StudyReader
from .stopping import StopSignal
from .study import ReadError
from .triage import worklist_key

log = logging.getLogger("cxr_batch")
STATE_DIR = ".cxr-batch"


@dataclass
class WatchConfig(RunConfig):
    """The ``[watch]`` table of ``--config`` (and ``[scoring]``), command-line options over it."""

    batch_size: int = bounded(8, min=1, max=4096)
    max_wait: float = bounded(0.5, min=0.0)  # seconds a ready study waits for its batch to fill
    settle: float = bounded(1.0, min=0.0)  # size and times unchanged this long: the writer is done
    broken_deadline: float = bounded(60.0, min=0.0)  # unreadable this long after its last change: an error row
    rescan_interval: float = bounded(30.0, gt=0.0)  # full rescan, the safety net for missed events
    polling: bool = False  # PollingObserver, for network shares where inotify sees nothing
    poll_interval: float = bounded(1.0, gt=0.0)
    archive_dir: str | None = None  # move processed files here (default: leave in place)
    quarantine_dir: str | None = None  # move failed files here
    heartbeat_interval: float = bounded(5.0, gt=0.0)
    worklist_hours: float = bounded(24.0, gt=0.0)  # the worklist shows studies reported this recently...
    worklist_max: int = bounded(500, min=1, max=100_000)  # ...and at most this many (results.csv has all)
    worklist_interval: float = bounded(30.0, min=0.0)  # rebuilt at most this often while studies stream in (at once when idle)
    retry_max: float = bounded(60.0, gt=0.0)  # longest wait between retries after a failed write
    # drift monitoring (cxr_batch.drift_watch): every drift_every scored studies (0: off), the newest
    # drift_window studies of this model against drift_reference (a bundle or a results folder; by
    # default the bundle's own reference, else the first drift_window studies the model scored here)
    drift_every: int = bounded(100, min=0)
    drift_window: int = bounded(500, min=1)
    drift_min_studies: int = bounded(20, min=1)
    drift_alpha: float = bounded(0.001, gt=0.0, max=0.5)
    drift_reference: str | None = None


class OutputError(Exception):
    """Writing an output (report, ledger, results.csv) failed: the daemon degrades and retries."""


# inotify's limits, met when the file-system watch is set up: instances (EMFILE), watches (ENOSPC)
_WATCH_LIMITS = (errno.EMFILE, errno.ENOSPC, errno.ENOMEM)


def _is_output_fault(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, sqlite3.OperationalError)
                                      and any(w in str(e) for w in ("full", "disk", "I/O", "readonly", "locked")))


def file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a file from another at the same path: (size, mtime_ns,
    ctime_ns). Size and mtime alone do not: a correction of the same size copied with its times
    kept (``cp -p``, ``rsync -t``, an export tool that keeps them), renamed over the file or
    written into it, has both; its ctime is when it was written or renamed here (setting the
    times sets it too, and no copy carries it over)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class Pending:
    size: int
    mtime_ns: int
    ctime_ns: int
    changed_at: float  # monotonic time the stamp last changed
    ready_at: float | None = None  # when it was found complete (latency starts here)
    retry_at: float = 0.0

    @property
    def stamp(self) -> tuple[int, int, int]:
        return self.size, self.mtime_ns, self.ctime_ns


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def uptime() -> float:
    """Seconds on a clock no one sets that counts a suspend: CLOCK_BOOTTIME (Linux), else the
    monotonic clock. time.monotonic() stops while the machine sleeps: a reading workstation
    suspended overnight woke with yesterday's studies still inside the worklist's window."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.monotonic() if boottime is None else time.clock_gettime(boottime)


# the most a scored DICOM file may grow by and still be the rest of its copy (grew_after_scoring)
TRAILING_BYTES_MAX = 1 << 20


class ArrivalWindow:
    """Which of the ledger's studies arrived in the last hours, by a clock no one sets
    (``clock``, :func:`uptime`): the worklist window by wall-clock stamps alone lost studies to a
    clock step (a daemon started with the clock a day slow stamped its studies a day old, and
    once the clock was corrected they fell off the worklist minutes old). ``marks``: (``clock``
    time, the ledger's last seq then), the run's start and each worklist since."""

    def __init__(self, first_seq: int, now: float | None = None, clock=uptime):
        self.clock = clock
        self.marks: deque[tuple[float, int]] = deque([(clock() if now is None else now, first_seq)])

    def mark(self, now: float, last_seq: int) -> None:
        self.marks.append((now, last_seq))

    def after(self, hours: float, now: float) -> int:
        """A seq every study recorded after which arrived in the last ``hours`` (or at most one
        mark earlier): the last mark at or before the window's start, else the run's start."""
        start = now - 3600 * hours
        while len(self.marks) > 1 and self.marks[1][0] <= start:
            self.marks.popleft()  # the window has passed it: the next mark bounds it closer
        return self.marks[0][1]


class Watcher:
    command = "watch"  # names this program in the results folder's lock
    folder_name = "the watched folder"  # in the log and status.json (the listen node's is its spool)

    def __init__(self, watch_dir: Path, out: Path, cfg: WatchConfig, stop: StopSignal | None = None):
        # absolute but not resolved: a watched link (``incoming -> /mnt/pacs-export``) is watched
        # as a link, so one pointed elsewhere while the daemon runs is another folder, watched at
        # the next heartbeat (resolved once, the old export went on being watched)
        self.watch_dir, self.out, self.cfg = Path(os.path.abspath(watch_dir)), Path(out), cfg
        self.stop, self._install_stop = (stop, False) if stop is not None else (StopSignal(), True)
        self.check_folders()  # before any folder is made or the model loads
        refuse_scan_results(self.out, self.command)
        self.claim = self.claim_watched_folder()  # before the results folder is made
        # The results folder is skipped when it lies inside the watched folder; the DICOM node
        # watches a spool inside its results folder, so there nothing is skipped.
        self.exclude = [] if _inside(self.watch_dir, self.out) else [self.out]
        try:
            private_dir(self.out)
            # a share mounted at OUT (NFS at /mnt/results) and unmounted later leaves the folder it was
            # mounted on: never taken for OUT (results written there are hidden when the share is back)
            self.out_mount = os.path.ismount(self.out)
            self.out_away = False  # OUT was a mount point and is not now: nothing is written until it is again
            self.status_file = StatusFile(self.out / "status.json")
            self.lock = FolderLock(self.out, self.command).acquire()
        except BaseException:
            self.claim.release()
            raise
        try:
            self.state_dir = private_dir(self.out / STATE_DIR)
            ledger_path = self.state_dir / "ledger.sqlite"
            fresh = not ledger_path.exists()
            self.ledger = Ledger(ledger_path)
            if fresh:
                self.rebuild_ledger()
            self.arrivals = ArrivalWindow(self.ledger.last_seq())
            self.bundle = load_bundle(cfg.weights)
            self.policy = make_policy(cfg.device, cfg.precision)
            self.drift = DriftWatch(self.ledger, self.bundle, self.out, every=cfg.drift_every, window=cfg.drift_window,
                                    min_studies=cfg.drift_min_studies, alpha=cfg.drift_alpha,
                                    reference=cfg.drift_reference)
            from .integration.outbox import Outbox  # results sent on: HL7, STOW-RS (and the node's C-STORE)

            self.outbox = Outbox.for_run(self.out, self.ledger.path, self.bundle, cfg)
        except BaseException:
            self.lock.release()
            self.claim.release()
            raise
        self.results_id = self.results_identity()  # the folder and ledger this daemon writes
        self.results_lost = False  # removed or moved while the daemon ran, not yet made again
        self.engine = Engine(self.bundle, self.policy)
        self.options = cfg.batch_options()
        workers = default_workers(self.policy.device) if cfg.workers is None else cfg.workers
        self.reader = StudyReader(workers, cfg.scoring, self.options.limits)
        self.metadata_csv = Path(cfg.metadata) if cfg.metadata else None
        self.reports = None
        if cfg.pdf:
            from .reports import ReportWriter

            self.reports = ReportWriter(self.out / "reports", self.bundle, cfg.report_options())
        self.srs = None
        if cfg.dicom_sr:
            from .sr import SR_FOLDER, SRWriter  # highdicom is imported only when SRs are made

            self.srs = SRWriter(self.out / SR_FOLDER, self.bundle)
        self.pending: dict[str, Pending] = {}
        self.events: queue.Queue[str] = queue.Queue()
        self.processed = 0
        self.started = time.time()
        self.state, self.reason = "starting", ""
        self.failures = 0  # consecutive failed writes
        self.retry_at = 0.0
        self.worklist_due = False
        self.worklist_built = 0.0
        self.csv_whole = False  # results.csv must be rewritten from the ledger
        self.observer = None
        self.watch_missing = False  # the watched folder is gone (a share unmounted, the folder removed)
        self.watched = None  # (device, inode) of the folder the file-system watch is on
        self.watch_real = self.watch_dir  # its path, links resolved (watch_target)
        self.fault = ""  # why writing fails (degrade), apart from a missing watched folder
        self.said: set[tuple[str, str]] = set()  # (file, problem) of entries not read, said in the log
        # the Study Instance UIDs of the studies held back now (images of two patients), counted in
        # status.json: from the ledger at each rescan (release_held), so a restart does not forget one
        self.held_studies: set[str] = set()
        self.two_patient_studies = 0  # studies held back by this run (pull's exit code)

    def check_folders(self) -> None:
        """The results, archive and quarantine folders are apart from the watched folder
        (FolderOverlap): results.csv in the watched folder would be read as a new study at every
        append, an archived file found again, without end."""
        refuse_overlap(self.out, {"the watched folder": self.watch_dir})
        self.check_moves("the watched folder")

    def claim_watched_folder(self) -> WatchedFolderClaim:
        """Refuse (FolderBusy) a watched folder another daemon empties, or to empty one another
        daemon watches: either would see only what the other had not yet moved away."""
        return WatchedFolderClaim(self.watch_dir, bool(self.cfg.archive_dir or self.cfg.quarantine_dir),
                                  what=self.command).acquire()

    def reclaim(self) -> None:
        """The claim follows the folder watched now (a share mounted after the start, a folder
        made again): on the one that was there before, another daemon started since could
        move this one's studies away, or this one another's, unseen."""
        self.claim.release()  # first: the folder back may be the same one, whose claim is this one's
        try:
            self.claim = self.claim_watched_folder()
        except FolderBusy as e:
            log.error("%s (found now that %s is watched again)", e, self.folder_name)

    def check_moves(self, what: str) -> None:
        for name in ("archive_dir", "quarantine_dir"):
            refuse_overlap(getattr(self.cfg, name), {what: self.watch_dir}, f"--{name.replace('_', '-')}")

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        if self._install_stop:
            self.stop.install()
        self.heartbeat()
        self.cleanup_temp()
        self.reader.__enter__()
        observer = None
        try:
            self.recover()
            observer = self.observer = self.start_observer()
            log.info("watching %s -> %s (model %s on %s)", self.watch_dir, self.out, self.bundle.label,
                     self.policy.describe())
            self.outbox.start()
            self.loop()
            self.state = "stopping"
            self.heartbeat()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.outbox.stop()
            self.reader.close()
            self.state = "stopped"
            self.heartbeat()
            self.ledger.close()
            self.lock.release()
            self.claim.release()
        log.info("stopped after %s", plural(self.processed, "study"))
        return 0

    def loop(self) -> None:
        next_rescan = next_beat = 0.0
        while not self.stop:
            now = time.monotonic()
            if now >= next_rescan:
                self.contained(self.rescan)
                next_rescan = now + self.cfg.rescan_interval
            self.drain_events()
            worked = False
            if now >= self.retry_at:
                worked = self.step(now)
            if now >= next_beat:
                self.check_results_dir()
                self.check_watch_dir()
                self.heartbeat()
                next_beat = now + self.cfg.heartbeat_interval
            if not worked:
                time.sleep(0.1)

    def step(self, now: float) -> bool:
        """One round of work: the outputs owed after a failure, then one ready batch, then the
        worklist when it is due. Returns whether a batch was processed."""
        batch = []
        if self.out_away:  # the studies wait in the watched folder for the share to be back
            return False
        try:
            if self.csv_whole:
                self.publish_whole()
            batch = self.ready_batch(now)
            if batch:
                self.process(batch)
            if self.worklist_due and (not batch or now - self.worklist_built >= self.cfg.worklist_interval):
                self.write_worklist()
            self.recovered()
        except OutputError as e:
            self.degrade(str(e))
        except Exception as e:
            if _is_output_fault(e):
                self.degrade(f"{type(e).__name__}: {e}")
            else:  # a bug in one batch: its files get error rows, the daemon goes on
                log.error("unexpected %s while processing a batch of %d: %s", type(e).__name__, len(batch), e,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                reason = f"internal error while processing ({type(e).__name__})"
                self.contained(lambda: self.fail_batch(batch, reason))
        return bool(batch)

    def contained(self, action) -> None:
        """Run ``action``; a failure is logged (or degrades the daemon), never raised."""
        try:
            action()
        except OutputError as e:
            self.degrade(str(e))
        except Exception as e:
            if _is_output_fault(e):
                self.degrade(f"{type(e).__name__}: {e}")
            else:
                log.error("unexpected %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))

    def degrade(self, reason: str) -> None:
        self.failures += 1
        delay = min(self.cfg.retry_max, 2.0 ** min(self.failures, 10))
        self.retry_at = time.monotonic() + delay
        if self.state != "degraded" or reason != self.fault:
            log.error("degraded: %s; retrying in %.0f s", reason, delay)
        self.fault = reason
        self.state, self.reason = "degraded", self.missing_reason(reason)
        self.csv_whole = True  # what was appended may be incomplete: rewrite from the ledger
        self.heartbeat()

    def check_watch_dir(self) -> None:
        """A watched folder that is gone (an export share unmounted, the folder moved or
        removed) is said in the log and status.json, not left to look like a quiet day; once it
        is back it is watched again (the file-system watch went with the old folder) and
        rescanned. So is one that is another folder than was watched (removed and made again, or
        replaced by a link, between two heartbeats): never seen missing, but its watch is gone too."""
        identity = self.watch_identity()
        present = identity is not None
        if not present and not self.watch_missing:
            log.error("%s %s is missing (unmounted, moved or removed): no new study is seen until it is back",
                      self.folder_name, self.watch_dir)
        elif present and self.watch_missing:
            log.info("%s %s is back: watching it again", self.folder_name, self.watch_dir)
            self.reclaim()
            self.contained(self.rewatch)
            self.contained(self.rescan)
        elif present and (identity != self.watched or self.watch_lost()):
            log.info("%s %s was replaced (removed and made again, replaced by a link, or its link pointed elsewhere): watching it again",
                     self.folder_name, self.watch_dir)
            self.reclaim()
            self.contained(self.rewatch)
            self.contained(self.rescan)
        self.watch_missing = not present
        if self.watch_missing or self.reason.startswith(f"{self.folder_name} is missing"):
            # a full disk at the same time is said too, and "running" comes back only when both are over
            self.state = "degraded" if self.watch_missing or self.fault else "running"
            self.reason = self.missing_reason(self.fault)

    def results_identity(self) -> tuple[int, int, int, int] | None:
        """(device, inode) of the results folder and of its ledger file; None when either is gone."""
        try:
            folder, ledger = os.stat(self.out), os.stat(self.ledger.path)
        except (OSError, ValueError):
            return None
        return folder.st_dev, folder.st_ino, ledger.st_dev, ledger.st_ino

    def check_results_dir(self) -> None:
        """A results folder removed or moved (``rm -rf OUT``, ``mv OUT OUT.old``) while the daemon
        runs is made again: the daemon went on committing studies to a ledger no path named any
        more (lost at the next start, with the reports and rows of every study) and stayed
        degraded, its lock gone with the folder. A results folder that was a mount point at
        start and is not now (its share unmounted) is not made again: see :meth:`share_away`."""
        if self.out_mount and not os.path.ismount(self.out):
            self.share_away()
            return
        if self.out_away:
            self.out_away, self.retry_at = False, 0.0
            log.warning("the results folder %s is a mount point again: writing to it again", self.out)
            self.contained(self.ledger.outbound_send_now)  # objects found missing meanwhile wait refused_retry: due now
        identity = self.results_identity()
        # a folder that is not there is always lost: a remake the folder went from again (rm -rf
        # in a loop) took None for its identity, and None == None hid it for ever
        if identity is not None and identity == self.results_id:
            return
        if not self.results_lost:
            log.error("the results folder %s was removed or moved while the daemon ran: it is made again from the "
                      "ledger this daemon holds (every study reported is kept)", self.out)
        self.results_lost = True
        self.contained(self.remake_results_dir)

    def share_away(self) -> None:
        """OUT was a mount point when the daemon started and is not now (a share unmounted, the
        folder it was mounted on left, or not even that): nothing is written to it, not even
        status.json, and no study is taken (they wait in the watched folder), until the share is
        mounted again; asked again at every heartbeat."""
        self.out_away = True
        self.degrade(f"the results folder {self.out} was a mount point when the daemon started and is no longer a "
                     f"mount point (its share unmounted?): nothing is written until it is mounted again")

    def remake_results_dir(self) -> None:
        """The results folder made again: its lock, a copy of the ledger held open (the SQLite
        backup of this connection: every study committed, also since the folder went), the
        outbound senders on the new ledger, results.csv, missing reports and the worklist."""
        if not self.out.parent.is_dir():  # never a share's folders made again on the disk it was mounted over
            raise OutputError(f"the results folder {self.out} is gone with the folder it was in (an unmounted "
                              f"share?): it is made again once {self.out.parent} is back")
        private_dir(self.out)
        if self.lock.held_folder() != _identity(self.out):  # the lock went with the old folder
            try:
                lock = FolderLock(self.out, self.command).acquire()
            except FolderBusy as e:  # another process took OUT: its folder now, said until we stop
                raise OutputError(str(e)) from None
            self.lock.release()
            self.lock = lock
        path = private_dir(self.out / STATE_DIR) / "ledger.sqlite"
        if path.exists():
            raise OutputError(f"{self.out} holds another ledger since its folder was replaced: restart the daemon to "
                              f"use that one, or move it aside to keep this daemon's")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            copy = sqlite3.connect(tmp)
            try:
                self.ledger.db.backup(copy)
            finally:
                copy.close()
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        old, self.ledger = self.ledger, Ledger(path)
        old.close()
        self.drift.ledger = self.ledger
        self.results_id = self.results_identity()
        self.outbox.stop()  # its senders' connections are on the old ledger
        from .integration.outbox import Outbox

        self.outbox = Outbox.for_run(self.out, self.ledger.path, self.bundle, self.cfg)
        self.outbox.start()
        for writer in (self.reports, self.srs):
            if writer is not None:
                private_dir(writer.folder)
        self.results_lost = False
        log.warning("the results folder %s is made again: %s", self.out, plural(self.ledger.count(), "study"))
        self.csv_whole = self.worklist_due = True
        if self.reports is not None:
            self.regenerate_reports()
        self.remake_queued_objects()
        # objects the senders found missing while the folder was gone wait refused_retry: due now
        self.ledger.outbound_send_now()
        self.publish_whole()
        self.retry_at = 0.0  # the batches waiting go now, not after the back-off of the failed writes

    def missing_reason(self, fault: str) -> str:
        """status.json's reason: the missing watched folder, if it is, and why writing fails."""
        missing = f"{self.folder_name} is missing: {self.watch_dir}" if self.watch_missing else ""
        return "; ".join(r for r in (missing, fault) if r)

    def watch_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the watched folder (a link followed), None when it is not a folder."""
        try:
            st = self.watch_dir.stat()
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def watch_lost(self) -> bool:
        """Whether the file-system watch ended (watchdog stops it when its folder is removed; a
        folder made again at once may even get the same inode number)."""
        return self.observer is not None and any(e.stopped_event.is_set() for e in self.observer.emitters)

    def rewatch(self) -> None:
        if self.observer is not None:
            self.observer.unschedule_all()
            self.watched = self.watch_identity()
            try:
                self.observer.schedule(self.handler, str(self.watch_target()), recursive=True)
            except OSError as e:
                if e.errno not in _WATCH_LIMITS:
                    raise
                self.no_watch(e)

    def start_observer(self):
        """The file-system watch, started; None when the kernel gives none (its inotify limits
        reached: the instances of the user, shared by all its programs, or the watches, one a
        folder): the rescan finds the new studies then. The daemon died at start of it."""
        observer = None
        try:
            observer = self._observer()
            observer.start()
            return observer
        except OSError as e:
            if e.errno not in _WATCH_LIMITS:
                raise
            if observer is not None and observer.is_alive():
                observer.stop()
            self.no_watch(e)
            return None

    def no_watch(self, e: OSError) -> None:
        log.warning("no file-system watch on %s (%s: raise fs.inotify.max_user_instances or max_user_watches, or use "
                    "--polling): new studies are found by the rescan, every %g s", self.folder_name, e.strerror or e,
                    self.cfg.rescan_interval)

    def recovered(self) -> None:
        if self.watch_missing:  # writing works again, but nothing new can be seen: still degraded
            if self.fault:
                log.info("recovered: writing again (%s is still missing)", self.folder_name)
                self.fault, self.failures = "", 0
                self.reason = self.missing_reason("")
                self.heartbeat()
            return
        if self.state != "running":
            if self.state == "degraded":
                log.info("recovered: writing again")
            self.state, self.reason, self.failures, self.fault = "running", "", 0, ""
            self.heartbeat()

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
        self.handler = Handler()
        self.watched = self.watch_identity()
        observer.schedule(self.handler, str(self.watch_target()), recursive=True)
        return observer

    def watch_target(self) -> Path:
        """The folder the file-system watch is put on: the watched folder with links resolved
        now (watchdog watches a link itself, not its folder). Its events are taken back to the
        watched path in :meth:`track`; those of a folder watched before (the link pointed
        elsewhere since) are dropped."""
        self.watch_real = Path(os.path.realpath(self.watch_dir))
        return self.watch_real

    def cleanup_temp(self) -> None:
        """Our own temp files from a killed run (results, reports, SRs, ORUs): never left where
        users look."""
        remove_stale_temp(self.out, self.out / "reports", self.out / "dicom", self.out / "hl7")

    # ------------------------------------------------------------------ start-up
    def rebuild_ledger(self) -> None:
        """A new ledger beside an existing results.csv (the ledger was deleted): the rows of
        results.csv are taken back in, so nothing is reported twice and nothing is lost."""
        csv = self.out / "results.csv"
        if not csv.exists():
            return
        rows = []
        for row in read_results(csv):
            record = StudyRecord.from_row(row)
            source = self.watch_dir / record.file
            content = ""
            key = f"uid:{record.ids.sop_uid}" if record.ids.sop_uid else ""
            if not key and source.is_file():
                try:
                    key, content = study_key(source, self.cfg.scoring)
                except OSError:
                    pass
            rows.append((key or f"csv:{record.file}", content, record))
        n = self.ledger.import_rows(rows)
        log.warning("the ledger was missing: rebuilt with %s from results.csv", plural(n, "study"))

    def recover(self) -> None:
        """After any stop: results.csv rewritten from the ledger (unless it is the file the
        ledger last wrote, every row in it: rewritten at every start, a year's results.csv,
        100,000 rows, kept the daemon from scoring for a minute or more), missing reports made
        again, files handled but not yet moved (archive or quarantine) moved."""
        if not self.ledger.csv_current(results_stamp(self.out / "results.csv")):
            self.contained(self.publish_whole)
        if self.reports is not None:
            self.contained(self.regenerate_reports)
        self.contained(self.remake_queued_objects)
        if self.moves_handled_files():
            self.contained(self.sweep_handled)
        self.drift.evaluate()  # the state before any new study
        self.worklist_due = True

    def remake_queued_objects(self) -> None:
        """Results waiting to be sent whose file is gone (with a results folder removed, or an
        hl7/ or dicom/ folder cleaned by hand) or cut short (kept aside): made again from the study's record under the
        same SOPInstanceUID or MSH-10, and due now. They were refused as 'object file missing'
        and offered again every refused_retry for ever: never delivered."""
        from .sr import SR_FOLDER

        from .integration.outbound import put_aside

        missing: dict[str, list[dict]] = {}
        for row in self.ledger.outbound_rows():
            path = self.out / row["path"]
            if not path.is_file():
                missing.setdefault(row["key"], []).append(row)
            elif (aside := put_aside(path, row["uid"], row["sha256"])) is not None:  # cut short: a failed disk or copy
                log.warning("%s waiting to be sent is cut short or damaged: kept as %s, made again", row["path"],
                            aside.name)
                missing.setdefault(row["key"], []).append(row)
        made = []
        for key, rows in missing.items():
            known, record = self.ledger.known(key), self.ledger.record(key)
            if known is None or record is None or not record.ok:
                continue
            revision = known.content if self.ledger.has_superseded(key) else ""
            for row in rows:
                if row["channel"] == "hl7":
                    if (digest := self.outbox.remake_message(record, revision, row["path"])) is not None:
                        self.ledger.outbound_rewritten(row["uid"], "hl7", digest)
                        made.append(row)
                elif row["path"].startswith(f"{SR_FOLDER}/") and self.srs is not None:
                    extra = {"revision": revision, "predecessor": None} if revision else {}
                    self.srs.report(record, f"{key}:{known.content}", **extra)
                    if (self.out / row["path"]).is_file():
                        made.append(row)
        for row in made:
            self.ledger.outbound_send_now([row["uid"]], row["channel"])
        if made:
            log.warning("%s waiting to be sent had lost their file: made again", plural(len(made), "result"))

    def moves_handled_files(self) -> bool:
        """Whether handled files leave the watched folder (the DICOM node's spool always does)."""
        return bool(self.cfg.archive_dir or self.cfg.quarantine_dir)

    def moves_held_files(self) -> bool:
        """Whether a held file (a skipped row) leaves the watched folder: archived (:meth:`move`:
        a quarantine folder takes failures only, so with it alone a held study's files stay in
        place, to be read again once it is resolved)."""
        return bool(self.cfg.archive_dir)

    def sweep_handled(self) -> None:
        """Files the ledger has as handled (same path, size and times) that are still here: a
        stop came between their study's commit and their move. Moved now, as they would have
        been; rescans skip handled files, so nothing else would ever move them."""
        for cand in find_candidates(self.watch_dir, exclude=self.exclude, follow_links=self.cfg.follow_links):
            try:
                st = cand.path.stat()
            except OSError:
                continue
            handled = None if cand.problem else self.ledger.file_outcome(cand.rel, file_stamp(st))
            if handled is not None:
                self.move(cand.rel, handled[1])

    def regenerate_reports(self) -> None:
        missing = [k for k, report in self.ledger.scored_reports()
                   if not report or not (self.out / "reports" / report).exists()]
        if not missing:
            return
        log.info("making %s again", plural(len(missing), "missing report"))
        for key in missing:
            if self.stop:
                return
            record = self.ledger.record(key)
            inputs = None
            source = self.watch_dir / record.file
            content = self.ledger.known(key).content
            if source.is_file() and self.scored_from(source, key, content):
                study = self.reader.read_one(Candidate(source, record.file), self.bundle.preprocessing.min_side)
                loaded = model_inputs(study, self.bundle.preprocessing, self.bundle.encoding)
                if loaded.image is not None:
                    inputs = (loaded.image, loaded.tabular)
            if inputs is None:
                record.add_note("report made again without the image (the file it was scored from is no longer in the watched folder)")
            self.write_report(f"{key}:{content}", record, inputs)
            self.ledger.update_record(key, record)
            checkpoint("report remade")
        self.csv_whole = True

    def scored_from(self, source: Path, key: str, content: str) -> bool:
        """Whether ``source`` is still the file the study ``key`` was scored from (its content
        sha256; the same instance when the ledger, rebuilt from results.csv, has no content).
        PACS exports reuse names (IM0001.dcm): a report made again from whatever file is at the
        study's path showed another patient's image in this patient's report."""
        try:
            now_key, now_content = study_key(source, self.cfg.scoring)
        except Exception:  # unreadable now: not known to be the same file
            return False
        return now_content == content if content else now_key == key

    # ------------------------------------------------------------------ finding complete files
    def track(self, path: Path) -> None:
        try:
            rel = path.relative_to(self.watch_dir).as_posix()
        except ValueError:
            try:  # an event of the file-system watch, on the folder the watched link points to
                rel = path.relative_to(self.watch_real).as_posix()
            except ValueError:
                return
            path = self.watch_dir / rel
        if any(is_ignored_name(part) for part in Path(rel).parts) or rel.lower().endswith(".json"):
            return
        if any(_inside(path, folder) for folder in self.exclude):
            return
        if not self.cfg.follow_links and leaves_folder(path, os.path.realpath(self.watch_dir)):
            return  # a link to outside the folder: not read, as the rescan (find_candidates) leaves it
        try:
            st = path.stat()
        except OSError:
            self.pending.pop(rel, None)  # gone (renamed or deleted)
            return
        if not path.is_file() or self.ledger.file_handled(rel, file_stamp(st)):
            return
        current = self.pending.get(rel)
        if current is None or current.stamp != file_stamp(st):
            self.pending[rel] = Pending(*file_stamp(st), time.monotonic())

    def rescan(self) -> None:
        self.release_held()
        for cand in find_candidates(self.watch_dir, exclude=self.exclude, follow_links=self.cfg.follow_links):
            if cand.problem is None:
                self.track(cand.path)
            elif (cand.rel, cand.problem) not in self.said:
                # what a scan gives a row (a folder that cannot be listed, a FIFO, a link out of
                # the folder) is said once, by its hash: studies in a folder the daemon may not
                # list were never scored, and nobody was told
                self.said.add((cand.rel, cand.problem))
                log.warning("%s: %s", log_name(cand.rel), cand.problem)

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
            if file_stamp(st) != p.stamp:
                self.pending[rel] = Pending(*file_stamp(st), now)
                continue
            if now - p.changed_at >= self.cfg.settle and now >= p.retry_at:
                p.ready_at = p.ready_at or now
                ready.append(rel)
                if len(ready) >= self.cfg.batch_size:
                    # a full batch, oldest first (the dict keeps the order files were found):
                    # the rest waits for its turn, not looked at again in every round (20,000
                    # files present at the start cost 20,000 stats per batch of 8)
                    break
        if not ready:
            return []
        oldest = min(self.pending[r].ready_at for r in ready)
        if len(ready) >= self.cfg.batch_size or now - oldest >= self.cfg.max_wait or self.stop:
            return sorted(ready, key=lambda r: self.pending[r].ready_at)[: self.cfg.batch_size]
        return []

    # ------------------------------------------------------------------ one batch
    def identify(self, rels: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
        """{rel: (key, content)} for the files to score, and the duplicates (the same bytes as a
        study already reported, or twice in this batch). The versions of one instance in a batch
        (its key, other bytes: a correction sent a moment after the image) are taken in the
        order they arrived, one per batch: the first that is not the current result is scored,
        with its resends as duplicates, and the later ones stay pending for the next batch,
        scored then as its revisions. So the last version to arrive stands (a later copy of the
        first, withdrawing a correction, was dropped as a duplicate of the first), as it does
        when the versions come in batches of their own.

        Arrival is the file's ctime: its last write, rename or change of timestamps in this
        folder, which no copy carries over. Its mtime is the source's when the copy keeps
        timestamps (``cp -p``, ``rsync -t``): an original restored from an archive after its
        correction has the older mtime, and two versions exported in one second have equal
        ones. The mtime only breaks a tie of ctimes (one clock tick of the file system)."""
        versions: dict[str, list[tuple[str, str, tuple[int, int]]]] = {}
        for rel in rels:
            path = self.watch_dir / rel
            pending = self.pending[rel]
            try:
                key, content = study_key(path, self.cfg.scoring)
                arrived = (path.stat().st_ctime_ns, pending.mtime_ns)
            except FileNotFoundError:
                self.pending.pop(rel, None)
                continue
            except Exception:  # unreadable (permissions, a FIFO): the reader's row says why
                stamp = f"{rel}:{pending.size}:{pending.mtime_ns}"
                key = content = "file:" + hashlib.sha256(name_bytes(stamp)).hexdigest()
                arrived = (0, pending.mtime_ns)  # a key of its own: never ordered against another version
            versions.setdefault(key, []).append((rel, content, arrived))
        ids, duplicates = {}, []
        for key, group in versions.items():
            group.sort(key=lambda v: v[2])  # stable: equal times keep the batch's order
            known = self.ledger.known(key)
            # an error or a study held back (two patients) is provisional: the same bytes are read again
            current = known.content if known is not None and known.status != "error" and not known.held else None
            chosen = False
            for rel, content, _ in group:
                if content == current:
                    duplicates.append(rel)
                elif not chosen and current is not None and self.grew_after_scoring(rel, key, current, content):
                    duplicates.append(rel)  # the rest of the copy that was scored: not another version
                    current = content
                elif not chosen:
                    ids[rel], current, chosen = (key, content), content, True  # its resends that follow: duplicates
                else:
                    break  # another version: it and the rest wait for the next batch
        return ids, duplicates

    def process(self, rels: list[str]) -> None:
        now = time.monotonic()
        ids, duplicates = self.identify(rels)
        held = self.held_back(ids)
        candidates = [Candidate(self.watch_dir / rel, rel) for rel in ids]
        metadata = None
        if self.metadata_csv is not None and candidates:
            metadata = load_metadata_csv(self.metadata_csv, only={c.path.name for c in candidates})
        studies: list[tuple[str, str, StudyRecord]] = []
        defer = []
        for scored in score_batches(candidates, self.engine, self.options, metadata, reader=self.reader):
            for pos, record in enumerate(scored.records):
                key, content = ids[record.file]
                p = self.pending[record.file]
                if record.status == "error" and now - p.changed_at < self.cfg.broken_deadline:
                    defer.append(record.file)  # maybe still being written: try again later
                    continue
                if record.ok and record.file in held:
                    record.hold_back(held[record.file])
                if record.ok:
                    self.write_report(f"{key}:{content}", record, scored.inputs(pos))
                    self.write_sr(f"{key}:{content}", record)
                studies.append((key, content, record))
        for rel in defer:
            self.pending[rel].retry_at = now + max(self.cfg.settle, 1.0)
        # committed (and so queued for the RIS and the PACS) in worklist order: read-first first
        studies.sort(key=lambda s: (not s[2].ok, worklist_key(s[2].priority, s[2].triage_score, s[2].file)
                                    if s[2].ok else ()))
        checkpoint("reports")
        entries = [(r.file, key, r.status) for key, _, r in studies] + [(rel, "", "duplicate") for rel in duplicates]
        handled = [e for e in (self._file_entry(*entry) for entry in entries) if e is not None]
        replaces = {key: old for key, _, r in studies if (old := self.cut_short_error(r.file, key))}
        try:
            outcomes = self.ledger.commit(studies, handled, self.outbound_objects(studies), replaces)
        except Exception as e:
            if _is_output_fault(e):
                raise OutputError(f"the ledger cannot be written: {e}") from None
            raise
        checkpoint("commit")
        self.publish(outcomes)
        checkpoint("publish")
        self.drift.added(sum(o.record.ok for o in outcomes if o.action != "kept"))
        self.outbox.wake()
        done = time.monotonic()
        for outcome in outcomes:
            record = outcome.record
            p = self.pending.pop(record.file, None)
            taken = p.stamp if p else None
            latency = done - p.ready_at if p and p.ready_at else 0.0
            note = {"replaced": " (replaces an earlier result)", "kept": " (an earlier result is kept)"}.get(
                outcome.action, "")
            log.info("study key=%s %s status=%s priority=%s latency=%.2fs%s", outcome.key, log_name(record.file),
                     record.status, record.priority or "-", latency, note)
            self.processed += 1
            self.move(record.file, "error" if outcome.action == "kept" else record.status, taken)
        for rel in duplicates:
            p = self.pending.pop(rel, None)
            log.info("duplicate %s: the same instance was already reported", log_name(rel))
            self.move(rel, "duplicate", p.stamp if p else None)

    def held_back(self, ids: dict[str, tuple[str, str]]) -> dict[str, str]:
        """{rel: why} of the batch's files (``ids``: {rel: (key, content)}) of a study that holds two
        patients (these and those of the ledger: the same Study Instance UID for another patient ID,
        issuer, name, birth date or sex, in one batch or two, now or before; decided by
        cxr_batch.integration.patients, for listen, pull, watch and scan alike): held back, never
        scored. Scored, one patient's result would be filed in the other's study (the SR in the
        PACS, the ORU to the RIS). Said once per study and batch with both patient IDs, never a
        name; a version of an instance in the batch is compared without the result it replaces (a
        correction of the patient), and without the study's other results naming the patient it
        replaces; a held image withdrawn (:meth:`withdrawn`) is not compared."""
        from .integration.node import patient_header, valid_uid
        from .integration.patients import Patient, held_reason, two_patients

        batch: dict[str, list[tuple[str, str, Patient]]] = {}  # study UID: [(rel, key, patient)]
        for rel, (key, _) in ids.items():
            study, patient = patient_header(self.watch_dir / rel)
            if valid_uid(study):
                batch.setdefault(study, []).append((rel, key, patient))
        held = {}
        for study, images in batch.items():
            keys = {key for _, key, _ in images}
            records = [(key, status, file, Patient.of_ids(ids)) for key, status, file, on_hold, ids
                       in self.ledger.study_patients(study) if not (on_hold and self.withdrawn(key, file))]
            # a version naming another patient than the one it replaces corrects the patient (a
            # temporary ID reconciled in the PACS): the study's images still naming the one it
            # replaces are versions not sent again yet, not a second patient
            corrected = [old for key, _, _, old in records if key in keys and old.id
                         and any(old.apart(new) for _, _, new in images)]
            earlier = [(status, file, p) for key, status, file, p in records
                       if key not in keys and all(old.apart(p) for old in corrected)]
            said = two_patients([*(p for _, _, p in earlier), *(p for _, _, p in images)])
            if not said:
                continue
            self.two_patient_studies += 1
            self.held_studies.add(study)
            scored = sum(status == "ok" for status, _, _ in earlier)
            files = [(file, p) for _, file, p in earlier] + [(rel, p) for rel, _, p in images]
            log.error("study %s holds images of two patients, %s: %s held back, not scored%s; %s", study, said,
                      plural(len(images), "image"),
                      f" ({plural(scored, 'result')} of the study scored before stand: check them)" if scored else "",
                      self.held_remedy(files, for_log=True, scored=scored))
            reason = held_reason(study, said, self.held_remedy(files, for_log=False, scored=scored))
            held.update({rel: reason for rel, _, _ in images})
        return held

    def held_remedy(self, files: list, for_log: bool, scored: int = 0) -> str:
        """What a person does with a study held back, whose files are ``files`` ([(file,
        Patient)]), ``scored`` of them scored before; the DICOM node's study is resolved in the PACS."""
        from .integration.patients import files_said, folder_remedy

        if self.moves_held_files():  # archived: nothing left in the folder to correct, remove or read again
            return (f"its files {files_said(files, for_log)} are archived (--archive-dir): put the misfiled image, "
                    "corrected (its patient or its study), in the watched folder, then the study's other images again")
        # a scored image's result stands when its file is removed (a scored study cleaned away is
        # still compared): the misfiled image scored first is corrected where it lies, not removed
        scored_said = "; a scored image stays in the study when removed: correct it where it lies" if scored else ""
        return folder_remedy(files, f"the study is then read again{scored_said}", for_log)

    def withdrawn(self, key: str, file: str) -> bool:
        """Whether the held image ``key`` (never scored) was taken away from its study: its file,
        left in the watched folder, removed, or replaced by another instance. A folder whose
        held files are moved away (archive, the node's spool) says nothing of it."""
        if self.moves_held_files():
            return False
        try:
            if not (self.watch_dir / file).is_file():
                return True
        except (OSError, ValueError):  # a name the file system refuses
            return True
        handled = self.ledger.last_handled(file)
        return handled is not None and handled[1] != key

    def release_held(self) -> None:
        """Held studies that hold one patient now (a misfiled image removed, or replaced by its
        correction, as :meth:`withdrawn` says, or its correction scored): their held files still
        in the folder are read again, to be scored. A folder whose held files are moved away
        (archived) keeps its held studies held (their files are no longer there to read). The
        studies with held files still there (or moved away) are counted for status.json."""
        from .integration.patients import Patient, two_patients

        held = set()  # the studies still held: status.json's count, from the ledger (a restart included)
        for study in self.ledger.held_studies():
            records = [(key, file, on_hold, Patient.of_ids(ids)) for key, _, file, on_hold, ids
                       in self.ledger.study_patients(study) if not (on_hold and self.withdrawn(key, file))]
            if any(on_hold for _, _, on_hold, _ in records):
                held.add(study)
            if self.moves_held_files() or two_patients(p for *_, p in records):
                continue
            for key, file, on_hold, _ in records:
                path = self.watch_dir / file
                if on_hold and file not in self.pending and path.is_file():
                    log.info("%s: its study %s holds one patient now: read again", log_name(file), study)
                    self.pending[file] = Pending(*file_stamp(path.stat()), time.monotonic())
        self.held_studies = held

    def grew_after_scoring(self, rel: str, key: str, scored: str, content: str) -> bool:
        """Whether the file at ``rel`` is the one whose beginning was scored as ``key`` (content
        ``scored``), grown since: a copy that paused past ``settle`` right after its pixel data
        (the elements after it, trailing padding or digital signatures, written later) read as
        a whole radiograph, and the rest made it another version, scored again as a correction
        (a second SR and ORU). What the result was read from is unchanged, so it stands; the
        study's content becomes the whole file's (recorded now: a crash before the batch's
        commit reads the file again as a duplicate), so a copy of it sent later is a duplicate
        too. Only a changed version of a scored instance is looked at: new arrivals cost nothing."""
        handled = self.ledger.last_handled(rel)
        if handled is None or handled[1] != key or handled[2] == "error":
            return False
        size = handled[0]
        try:
            grown = (self.watch_dir / rel).stat().st_size - size
            # what follows the pixel data of a copy that paused is small (padding, signatures):
            # more is another version, scored again without this process parsing all of it
            if not 0 < grown <= TRAILING_BYTES_MAX or content_sha256(self.watch_dir / rel, limit=size) != scored:
                return False
            if not reads_as_its_beginning(self.watch_dir / rel, size):
                return False  # what it holds after its pixel data changes what it shows: another version
        except (OSError, ReadError):
            return False
        self.ledger.content_grew(key, scored, content)
        log.info("%s grew after it was scored (its copy paused after the pixel data): the same image, its result "
                 "stands", log_name(rel))
        return True

    def cut_short_error(self, rel: str, key: str) -> str | None:
        """The key of the provisional error row this file got while its copy was cut short (a
        copy that stalled past ``broken_deadline``): the file's earlier state had another key
        (a PNG's is its content) and was the beginning of what the file holds now. The whole
        file's record replaces that error; results.csv had both rows, an error for a file that
        reads. An earlier state that was not its beginning (another file at the same path) keeps
        its row."""
        handled = self.ledger.last_handled(rel)
        if handled is None or handled[2] != "error" or handled[1] == key:
            return None
        size, old_key, _ = handled
        known = self.ledger.known(old_key)
        if known is None or known.status != "error" or not known.content:
            return None
        try:
            return old_key if content_sha256(self.watch_dir / rel, limit=size) == known.content else None
        except (OSError, ReadError):  # gone or replaced by a FIFO since it was read: its error stays
            return None

    def outbound_objects(self, studies: list[tuple[str, str, StudyRecord]]) -> dict[str, list[tuple]]:
        """Results to queue for sending with the batch's commit (cxr_batch.integration.outbox):
        {key: [(uid, path relative to the results folder, channel, destination)]}."""
        if not self.outbox:
            return {}
        try:
            return self.outbox.entries([(key, f"{key}:{content}", record, self.revision(key, content))
                                        for key, content, record in studies])
        except OSError as e:
            raise OutputError(f"HL7 messages cannot be written: {e}") from None

    def revision(self, key: str, content: str) -> str:
        """``content`` when this study replaces a result of a different file with the same key (a
        changed instance: its results need identifiers of their own), else ""."""
        earlier = self.ledger.known(key)
        return content if (earlier is not None and earlier.status != "error" and not earlier.held
                           and earlier.content != content) else ""

    def write_report(self, name_key: str, record: StudyRecord, inputs) -> None:
        """A scored study's PDF, named from its key and content (a changed instance gets a new
        report; the superseded one keeps its own). A full or failing disk degrades the
        daemon (nothing of the batch is committed, it is retried); any other failure costs the
        report only, and the study's row then says it was scored but has no report."""
        if self.reports is None:
            return
        try:
            record.report = self.reports.write_study(record, inputs, key=name_key)
        except Exception as e:
            if _is_output_fault(e):
                raise OutputError(f"reports cannot be written: {e}") from None
            log.error("%s: report not made: %s: %s", log_name(record.file), type(e).__name__, e)
            record.status, record.report = "error", ""
            record.reason = f"scored, but its PDF report could not be made ({type(e).__name__})"

    def write_sr(self, name_key: str, record: StudyRecord) -> None:
        """A scored DICOM study's SR (``dicom_sr``), named like its PDF. A full disk degrades
        the daemon; any other failure is a note on the record (cxr_batch.sr)."""
        if self.srs is None or not record.ok:
            return
        try:
            self.srs.report(record, name_key, **self.sr_revision(name_key))
        except OSError as e:
            raise OutputError(f"DICOM SRs cannot be written: {e}") from None

    def sr_revision(self, name_key: str) -> dict:
        """A changed instance (same key, other content) replacing a result: its SR needs a
        SOPInstanceUID of its own (a PACS keeping the first copy of a UID would keep the stale
        result), derived from the new content so that making it again gives the same UID, and
        names the SR it supersedes. The first result of a source keeps the UID derived from
        source and model alone (the same image re-sent: the same SR)."""
        from .sr import sr_file_name

        key, content = name_key.rsplit(":", 1)
        if not self.revision(key, content):
            return {}
        earlier = self.ledger.known(key)
        predecessor = None
        try:
            import pydicom

            predecessor = pydicom.dcmread(self.srs.folder / sr_file_name(f"{key}:{earlier.content}"),
                                          stop_before_pixels=True)
        except Exception as e:  # its file is gone or unreadable: the new SR still gets its own UID
            log.warning("%s: the superseded SR cannot be read (%s); the new one does not name it",
                        log_name(earlier.file), type(e).__name__)
        return {"revision": content, "predecessor": predecessor}

    def fail_batch(self, rels: list[str], reason: str) -> None:
        """After an unexpected failure: the batch's files get error rows, so they are not read
        again and again; a later copy of the same study replaces the error."""
        studies, handled = [], []
        for rel in rels:
            st = self.pending.get(rel)
            if st is None:
                continue
            key = "file:" + hashlib.sha256(name_bytes(f"{rel}:{st.size}:{st.mtime_ns}")).hexdigest()
            record = StudyRecord(file=rel, status="error", reason=reason, model=self.bundle.label,
                                 weights_sha256=self.bundle.sha256)
            studies.append((key, key, record))
            entry = self._file_entry(rel, key, "error")
            if entry is not None:
                handled.append(entry)
            self.pending.pop(rel, None)
        if studies:
            self.publish(self.ledger.commit(studies, handled))

    def _file_entry(self, rel: str, key: str, outcome: str):
        """The file as handled: its stamp when it was taken for its batch, not now (a version
        written over it while the batch was processed is another file, read next)."""
        try:
            st = (self.watch_dir / rel).stat()
        except OSError:
            return None
        taken = self.pending.get(rel)
        return rel, *(taken.stamp if taken is not None else file_stamp(st)), key, outcome

    def move(self, rel: str, status: str, taken: tuple[int, int, int] | None = None) -> None:
        """Archive (or quarantine) a processed file under a name made unique by its content, so a
        later file at the same path never overwrites it. ``taken``: its :func:`file_stamp` when
        it was taken for its batch; a file written over since is another version, left in place
        to be read (archived, it would never be)."""
        target = self.cfg.quarantine_dir if status == "error" else self.cfg.archive_dir
        if not target:
            return
        source = self.watch_dir / rel
        if taken is not None:
            try:
                st = source.stat()
            except OSError:
                return  # gone: nothing to move
            if file_stamp(st) != taken:
                log.info("%s changed while it was processed: left in place, to be read again", log_name(rel))
                return
        try:
            # named from the content: a changed instance (the same key) is kept beside the
            # version it corrects, not deleted as if it were that version again, and the same
            # bytes again (a duplicate) find themselves kept already
            try:
                digest = content_sha256(source)
                tag = digest[:12]
            except OSError:  # unreadable (its permissions: what quarantine is for): named from what is known
                st, digest = source.stat(), None
                tag = hashlib.sha256(name_bytes(f"{rel}:{st.st_size}:{st.st_mtime_ns}")).hexdigest()[:12]
            dest = Path(target) / Path(rel).parent / tagged_name(Path(rel).name, tag)
            if digest is not None and dest.is_file() and content_sha256(dest) == digest:
                source.unlink()  # the very same bytes are kept there already
                return
            # a file of that name with other bytes is a copy cut short (a move across file
            # systems killed, a full archive disk): replaced, never taken for the study
            private_dir(dest.parent)
            _move_file(source, dest)
        except Exception as e:
            log.error("could not move %s to %s: %s", log_name(rel), target, getattr(e, "strerror", None) or e)

    # ------------------------------------------------------------------ outputs
    def publish(self, outcomes: list[Outcome]) -> None:
        """results.csv after a commit: new rows appended (cheap at any size); a replaced row
        means the file is rewritten from the ledger."""
        if not outcomes:
            return
        self.worklist_due = True
        # results.csv deleted or moved away by someone: made again whole (appended to, it was
        # made with the new rows alone, every study before them missing from it). One put in its
        # place since the ledger last wrote it (a backup put back, a sync client, a spreadsheet's
        # save), too: appended to, it was recorded as the ledger's file and kept by every start,
        # the rows it lacked lost for good
        csv = self.out / "results.csv"
        gone = not csv.exists()
        written = self.ledger.csv_stamp()
        replaced = written is not None and results_stamp(csv) != written
        if self.csv_whole or gone or replaced or any(o.action == "replaced" or o.annotated for o in outcomes):
            self.publish_whole()
            return
        fresh = [(o.key, o.record) for o in outcomes if o.action == "new"]
        if not fresh:
            return
        try:
            append_rows(self.out / "results.csv", [r for _, r in fresh])
            checkpoint("append")
            self.ledger.mark_published([k for k, _ in fresh], results_stamp(self.out / "results.csv"))
        except Exception as e:
            if _is_output_fault(e):
                self.csv_whole = True
                raise OutputError(f"results.csv cannot be written: {e}") from None
            raise

    def publish_whole(self) -> None:
        """results.csv rewritten from the ledger, atomically."""
        try:
            with AtomicCsvWriter(self.out / "results.csv", rank=False) as writer:
                for record in self.ledger.iter_records():
                    writer.write(record)
            self.ledger.mark_published(csv_stamp=results_stamp(self.out / "results.csv"))
        except Exception as e:
            if _is_output_fault(e):
                self.csv_whole = True
                raise OutputError(f"results.csv cannot be written: {e}") from None
            raise
        self.csv_whole = False

    def write_worklist(self) -> None:
        """The worklist over the window (``worklist_hours``, at most ``worklist_max``): the
        studies that arrived in it, by the wall clock's stamps and, for this run's, by a clock no
        one sets (:class:`ArrivalWindow`), so a clock step drops none of them."""
        self.worklist_due = False
        if self.reports is None:
            return
        last, now = self.ledger.last_seq(), self.arrivals.clock()  # every study up to ``last`` arrived by ``now``
        records = self.ledger.recent(time.time() - 3600 * self.cfg.worklist_hours, self.cfg.worklist_max,
                                     after_seq=self.arrivals.after(self.cfg.worklist_hours, now))
        self.arrivals.mark(now, last)
        try:
            self.reports.write_worklist(records, alarm=self.drift.worklist_line())
        except Exception as e:
            if _is_output_fault(e):
                self.worklist_due = True
                raise OutputError(f"the worklist cannot be written: {e}") from None
            log.error("worklist not written: %s: %s", type(e).__name__, e)
        self.worklist_built = time.monotonic()

    def heartbeat(self) -> None:
        if self.out_away:  # status.json below an unmounted share would be read as the daemon's
            return
        status = {"pid": os.getpid(), "state": self.state, "reason": self.reason, "time": time.time(),
                  "started": self.started, "watch_dir": str(self.watch_dir), "processed_this_run": self.processed,
                  "pending": len(self.pending), "model": self.bundle.label, "device": self.policy.describe()}
        try:
            status["studies_reported"] = self.ledger.count()
            status["superseded"] = self.ledger.superseded_count()
        except sqlite3.Error:
            pass
        status["drift"] = self.drift.status()
        status.update(self.extra_status())
        self.status_file.write(status)

    def extra_status(self) -> dict:
        """More for status.json: the outbound queues (the DICOM node adds its listener)."""
        held = {"two_patient_studies": len(self.held_studies)} if self.held_studies else {}
        try:
            return {**held, **self.outbox.status(self.ledger)}
        except sqlite3.Error:
            return held


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _move_file(source: Path, dest: Path) -> None:
    """Move ``source`` to ``dest`` so that ``dest`` is never a part of the file: a rename on one
    file system; across file systems a copy to a temp name, flushed, renamed into place, and
    only then the source removed (shutil.move copied straight to ``dest``: a kill or a full
    disk left half a file there, and the next start took it for the study and deleted the
    source)."""
    try:
        os.replace(source, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{hashlib.sha256(name_bytes(dest.name)).hexdigest()[:16]}.tmp")  # fits whatever dest's length
    try:
        shutil.copy2(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    source.unlink()


NAME_MAX = 255  # bytes in one file name (Linux file systems)


def tagged_name(name: str, tag: str) -> str:
    """``IM0001.dcm`` -> ``IM0001.<tag>.dcm``, its stem cut to keep within NAME_MAX bytes: a name
    that was already as long as a name can be could not be made with the tag added, so its file
    was never moved."""
    stem, suffix = Path(name).stem, Path(name).suffix
    if len(name_bytes(suffix)) > 32:  # no extension, only a dot far to the left
        stem, suffix = name, ""
    room = NAME_MAX - len(name_bytes(f".{tag}{suffix}"))
    # cut as bytes: a character cut in two becomes a byte the file system takes as it is
    return f"{name_bytes(stem)[:room].decode('utf-8', 'surrogateescape')}.{tag}{suffix}"


def write_status(path: Path, status: dict) -> str:
    """status.json, exactly the JSON, written atomically (a temp file and a rename: a monitor
    reads the old state or the new one). On a full disk the temp file cannot be written: the
    file is then rewritten in place within the blocks it already has (a few hundred bytes in a
    block of 4 KiB), so monitoring still reads "degraded: disk full". Returns why it was not
    written ("" when it was, or when the disk is full: the daemon's state says that)."""
    data = (json.dumps(status, indent=2) + "\n").encode()
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            _rewrite_in_place(path, data)
            return ""
        return str(e.strerror or e)
    return ""


class StatusFile:
    """status.json of a daemon, rewritten at each heartbeat: a failure is logged once until its
    reason changes (OUT replaced by a file logged the same line every 5 s, burying the line
    that said what went wrong), and the first write after it is said."""

    def __init__(self, path: Path):
        self.path, self.failing = path, ""

    def write(self, status: dict) -> None:
        why = write_status(self.path, status)
        if why and why != self.failing:
            log.error("status.json not written: %s", why)
        elif not why and self.failing:
            log.info("status.json written again")
        self.failing = why


def _rewrite_in_place(path: Path, data: bytes) -> bool:
    """Overwrite ``path`` with ``data`` when that needs no new disk block; False otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        if len(data) > os.fstat(fd).st_blocks * 512:
            return False
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
