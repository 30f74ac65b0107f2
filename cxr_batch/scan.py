"""One scan of a folder: find files, score them in batches, write results.csv (and reports)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_codes, journal
from .bundle import DEFAULT_BUNDLE, load_bundle, read_manifest, refuse_output_in_bundle
from .files import atomic_write_bytes, private_dir, remove_stale_temp
from .checkpoints import checkpoint
from .config import ConfigError, to_plain
from .discover import find_candidates
from .display import plural
from .evidence import bundle_evidence
from .folders import refuse_overlap
from .inference import Engine, score_batches
from .keys import content_sha256, uid_conflicts
from .metadata import load_metadata_for
from .folderlock import LOCK_NAME, FolderBusy, FolderLock
from .record import log_name
from .results import AtomicCsvWriter
from .runconfig import RunConfig
from .runtime import default_workers, make_policy
from .readers import content_kind
from .sandbox import StudyReader
from .stopping import StopSignal
from .triage import PRIORITIES, priority_words

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
    held: int = 0  # files not scored: their study's images name two patients (skipped rows)
    worklist_failed: bool = False
    files_found: int = 0  # candidate files under the folder, before --shard
    without_patient_data: int = 0  # scored with age, sex and view all unknown
    kept: int = 0  # rows kept from an earlier scan (--resume)
    not_scored: int = 0  # files left when a signal stopped the scan
    stopped_by: str = ""  # the signal's name (SIGINT, SIGTERM); empty for a complete scan
    signum: int | None = None
    normal_below: float | None = None  # the bundle's P(any) cutoff: how the "normal" bucket is named
    # run_scan's pixel_keys: {file: its provenance.pixel_key} of the studies scored here, '' where
    # their pixels were decoded smaller than stored
    pixel_keys: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.stopped_by:
            return 128 + self.signum if self.signum else exit_codes.INTERRUPTED
        if self.files_found == 0:
            return exit_codes.NO_FILES
        # a study held back is not scored, as pull says of one (a person must resolve it)
        failed = self.counts["error"] or self.reports_failed or self.worklist_failed or self.held
        return exit_codes.SOME_FAILED if failed else exit_codes.OK

    def line(self) -> str:
        if self.stopped_by:
            n = sum(self.counts.values())
            return (f"stopped by {self.stopped_by}: {self.results} holds the {plural(n, 'row')} written so far "
                    f"({self.counts['ok']} scored) and run.json says the scan is incomplete; "
                    f"{plural(self.not_scored, 'file')} not read yet: "
                    f"run the same command with --resume to finish")
        if self.files_found == 0:
            return f"no files found: nothing scored (is the folder mounted?) -> {self.results}"
        n = sum(self.counts.values())
        rate = (self.counts["ok"] - self.kept) / self.seconds if self.seconds > 0 else 0.0
        pr = ", ".join(f"{self.priorities[p]} {priority_words(p, self.normal_below)}" for p in PRIORITIES)
        outputs = ""
        if self.reports_failed or self.worklist_failed:
            outputs = (f"; {plural(self.reports_failed, 'report')}"
                       + (" and the worklist" if self.worklist_failed else "")
                       + " could not be written (see the log)")
        kept = f"{self.kept} kept from the earlier scan; " if self.kept else ""
        bare = self.without_patient_data
        held = f" ({self.held} held back: two patients in one study)" if self.held else ""
        return (f"{plural(n, 'file')}: {self.counts['ok']} scored ({kept}{pr}; {bare} without patient data), "
                f"{self.counts['skipped']} skipped{held}, {self.counts['error']} failed in {self.seconds:.1f} s "
                f"({rate:.1f} images/s){outputs} -> {self.results}")


def run_scan(studies: Path, out: Path, cfg: ScanConfig = ScanConfig(), earlier: str = "refuse",
             stop: StopSignal | None = None, metadata_option: str = "--metadata",
             pixel_keys: bool = False, resumable: bool = True) -> ScanSummary:
    """Scan ``studies`` into ``out/results.csv``, and PDF reports into ``out/reports`` when
    ``cfg.pdf``. ``earlier``: what to do with an earlier scan's results in ``out`` ("refuse",
    "resume" or "overwrite", cxr_batch.journal); ``stop``: set (by SIGINT/SIGTERM) to end
    after the current batch, every study scored so far written and run.json marked incomplete.
    ``metadata_option``: the option that gave ``cfg.metadata``, as warnings about the table name it
    (evaluate's ``--labels``). ``pixel_keys``: the summary's ``pixel_keys`` are filled in, from
    the pixels decoded for scoring (evaluate compares them with a bundle's image lists).
    ``resumable``: the command has --resume (evaluate has not: it scans again), as a stop by a
    full disk says what to run next.

    Every refusal that needs no model comes first: the results folder inside the studies (or
    the reverse) or in a weights bundle (FolderOverlap, BundleError), a bad device
    (DeviceError), the folder in use (FolderBusy), an earlier scan's results
    (EarlierResults), an unreadable metadata table (MetadataError). A report or the worklist
    that cannot be written costs only itself: results.csv is written and the exit code says 3."""
    studies, out = Path(studies), Path(out)
    refuse_overlap(out, {"the scanned folder": studies})
    bundle_dir = Path(cfg.weights) if cfg.weights else DEFAULT_BUNDLE
    read_manifest(bundle_dir)  # --weights that is no bundle is said as such, before --out is checked against it
    refuse_output_in_bundle(out, bundle_dir)
    policy = make_policy(cfg.device, cfg.precision)
    candidates = find_candidates(studies, exclude=[out], follow_links=cfg.follow_links)
    files_found = len(candidates)
    # before --shard: two files of one UID in two shards are found all the same
    conflicts = uid_conflicts(candidates, cfg.scoring)
    if conflicts:  # each scored for its own pixels (a damaged copy still fails on its own reason)
        log.warning("%s share a SOP Instance UID with a file of other content: each is scored with an SR UID of "
                    "its own; their rows' notes name the others, and a person must decide which is the image",
                    plural(len(conflicts), "file"))
    held = two_patient_studies(candidates)  # before --shard too: a study's files may be in two shards
    if cfg.shard is not None:
        index, count = cfg.shard
        candidates = [c for i, c in enumerate(candidates) if i % count == index]
    metadata, match = None, None
    if cfg.metadata is not None:
        # A DICOM header carries the patient data: only PNGs and JPEGs need a row to be complete
        # (a header's gaps are still filled from the table); an empty or text file is never scored.
        names = [c.path.name for c in candidates if not c.problem]
        metadata, match = load_metadata_for(cfg.metadata, names, [c.path.name for c in candidates if not c.problem
                                                                  and content_kind(c.path) in ("png", "jpeg")],
                                            metadata_option)
    settings = journal.row_settings(to_plain(cfg), content_sha256(cfg.metadata) if cfg.metadata else None)
    created = not out.exists()
    checkpoint("created")
    private_dir(out)
    try:
        with FolderLock(out, "scan"):
            removed = remove_stale_temp(out, out / "reports", out / "dicom", out / "hl7")
            if removed:
                log.info("removed %s an earlier scan left when it was killed", plural(removed, "temp file"))
            previous = journal.plan(out, earlier, studies, settings)
            workers = default_workers(policy.device) if cfg.workers is None else cfg.workers
            # the reading workers start while the model loads
            with StudyReader(workers, cfg.scoring, cfg.batch_options().limits) as reader:
                bundle = load_bundle(cfg.weights)
                log.info("model %s (bundle sha256 %s...) on %s", bundle.label, bundle.sha256[:12],
                         policy.describe())
                evidence = bundle_evidence(bundle.manifest, bundle.path)
                if evidence.problem:
                    log.warning("weights %s have no validation evidence (%s): how often they are right is not "
                                "known; every report says so", bundle.label, evidence.problem)
                if previous.found and previous.mode == "overwrite":
                    log.warning("%s of the earlier scan deleted", plural(previous.remove_outputs(), "file"))
                run = ScanRun(studies, out, cfg, bundle, policy, reader, previous, stop, conflicts, held, pixel_keys,
                              resumable)
                return run.scan(candidates, files_found, metadata, match, settings, evidence.problem)
    except FolderBusy:  # the folder is another process's (it may have made it a moment ago): not touched
        raise
    except BaseException:
        if created:  # a scan that could not start leaves no empty results folder behind
            remove_if_unused(out)
        raise


def two_patient_studies(candidates) -> dict[str, str]:
    """{rel: reason} of the DICOM files of each study whose images name two patients (one Study
    Instance UID, a misfiled image): decided over the whole folder as listen and pull decide
    (cxr_batch.integration.patients), none of them to be scored; one scored would put one
    patient's result in the other's study. Reads each DICOM file's header."""
    from .integration.node import patient_header, valid_uid
    from .integration.patients import folder_remedy, held_reason, two_patients

    by_study: dict[str, list] = {}
    for cand in candidates:
        if cand.problem is None and content_kind(cand.path) == "dicom":
            study, patient = patient_header(cand.path)
            if valid_uid(study):
                by_study.setdefault(study, []).append((cand.rel, patient))
    held = {}
    for study, images in by_study.items():
        said = two_patients(p for _, p in images)
        if said:
            logged = folder_remedy(images, "then scan again", for_log=True)
            log.error("study %s holds images of two patients, %s: %s held back, not scored; %s", study, said,
                      plural(len(images), "image"), logged)
            reason = held_reason(study, said, folder_remedy(images, "then scan again"))
            held.update((rel, reason) for rel, _ in images)
    return held


def remove_if_unused(out: Path) -> None:
    """Remove a results folder this scan made when it holds nothing but its lock."""
    try:
        if [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink()
            out.rmdir()
    except OSError:
        pass


class ScanRun:
    """One scan's work once the model has loaded: score, write rows and reports, record the run."""

    def __init__(self, studies: Path, out: Path, cfg: ScanConfig, bundle, policy, reader, previous, stop,
                 uid_conflicts: dict[str, tuple[str, list[str], str]] | None = None,
                 held: dict[str, str] | None = None, pixel_keys: bool = False, resumable: bool = True):
        self.studies, self.out, self.cfg, self.bundle, self.policy = studies, out, cfg, bundle, policy
        self.resumable = resumable
        self.reader, self.previous, self.stop, self.pixel_keys = reader, previous, stop, pixel_keys
        self.uid_conflicts = uid_conflicts or {}  # rel: (uid, the other files, content), cxr_batch.keys.uid_conflicts
        self.held = held or {}  # rel: why it is not scored, for its row and the log (two_patient_studies)
        self.options = cfg.batch_options(cfg.progress)
        self.summary = ScanSummary(results=out / "results.csv", device=policy.describe(),
                                   normal_below=bundle.triage_policy().normal_below)
        self.reports = None
        if cfg.pdf:
            from .reports import ReportWriter

            self.reports = ReportWriter(out / "reports", bundle, cfg.report_options())
        self.srs = None
        if cfg.dicom_sr:
            from .sr import SR_FOLDER, SRWriter  # highdicom is imported only when SRs are made

            self.srs = SRWriter(out / SR_FOLDER, bundle)

    def scan(self, candidates, files_found: int, metadata, match, settings: dict,
             evidence_problem: str) -> ScanSummary:
        """Score ``candidates`` and write the results. ResultsNotWritten when they cannot be
        written (a full disk, a read-only folder), saying what the journal kept."""
        self.record_log, self.kept, self.csv_done = None, 0, False
        try:
            return self._scan(candidates, files_found, metadata, match, settings, evidence_problem)
        except OSError as e:
            raise journal.ResultsNotWritten(self.not_written(e)) from None

    def not_written(self, e: OSError) -> str:
        what = f"{e.strerror or e} ({e.filename or 'the results folder'})"
        if not self.resumable:  # evaluate: the same command replaces this scan (it has no --resume)
            return (f"results not written: {what}; the scan stopped. Once the disk has room (or the folder can be "
                    f"written), run the same command: it scans the studies again")
        # the same command with --overwrite and --resume is a usage error
        resume = "--resume in place of --overwrite" if self.previous.mode == "overwrite" else "--resume"
        if self.csv_done:
            return (f"results.csv is complete, but run.json could not be written: {what}; once the folder can be "
                    f"written, the same command with {resume} writes it (every row is kept)")
        saved = self.kept + (self.record_log.written if self.record_log is not None else 0)
        return (f"results not written: {what}; the scan stopped. The {plural(saved, 'study')} scored so far "
                f"{'is' if saved == 1 else 'are'} kept in its journal ({self.out / journal.STATE_DIR / journal.JOURNAL}): "
                f"once the disk has room (or the folder "
                f"can be written), run the same command with {resume} to keep them and score the rest")

    def _scan(self, candidates, files_found: int, metadata, match, settings: dict,
              evidence_problem: str) -> ScanSummary:
        cfg, summary = self.cfg, self.summary
        summary.files_found = files_found
        if not files_found:
            log.warning("no files under %s: nothing to score (an unmounted share or a wrong path?)", self.studies)
        if match is not None and match.problem():
            log.warning("%s", match.problem())
        kept, todo = self.previous.keep(candidates, self.bundle.sha256, cfg.pdf)
        self.kept = len(kept)
        self.stamps = {c.rel: c.stamp for c in todo}
        if kept:
            log.info("--resume: %s scored before kept (same file content, same weights); %s to read",
                     plural(len(kept), "study"), plural(len(todo), "file"))
        shard = f" (shard {cfg.shard[0]}/{cfg.shard[1]} of {files_found})" if cfg.shard is not None else ""
        log.info("%s under %s%s", plural(len(candidates), "candidate file"), self.studies, shard)
        engine = Engine(self.bundle, self.policy)
        checkpoint("loaded")
        record_log = self.record_log = journal.Journal(self.previous, self.studies, settings)
        records, scored_files = [], set()
        waiting = deque(sorted(kept.items()))  # kept rows, merged into the file order of the new ones
        start = time.perf_counter()
        done = 0
        with AtomicCsvWriter(summary.results) as writer:
            def write(record, fresh: bool):
                self.hold(record)  # a row kept from an earlier scan too
                writer.write(record)
                summary.counts[record.status] += 1
                if record.ok:
                    summary.priorities[record.priority] += 1
                    summary.without_patient_data += record.patient.all_unknown
                    scored_files.add(record.file)
                elif fresh:  # a held study's files were named, by their hash, once in its study's line
                    log.warning("row %d (%s): %s: %s", writer.count, log_name(record.file), record.status,
                                "held back: its study holds images of two patients (said above)"
                                if record.held else record.reason)
                if self.reports is not None:
                    records.append(record)

            # a stop asked for while the model loaded: no batch is begun (Ctrl-C at start-up means
            # "not this scan", not "after one more batch")
            batches = () if self.stop else score_batches(todo, engine, self.options, metadata, reader=self.reader,
                                                         pixel_keys=self.pixel_keys)
            try:
                for batch in batches:
                    for pos, record in enumerate(batch.records):
                        while waiting and waiting[0][0] < record.file:
                            write(waiting.popleft()[1], False)
                        if record.file in self.uid_conflicts:
                            uid, others, _ = self.uid_conflicts[record.file]
                            record.add_note(f"SOP Instance UID {uid} is claimed by other content too (a person must "
                                            "decide which is the image; its SR has a UID of its own): "
                                            + ", ".join(others))
                        self.hold(record)  # before its PDF and SR: none is made
                        self.outputs(record, batch.inputs(pos))
                        write(record, True)
                        if batch.pixel_keys is not None and record.ok:
                            summary.pixel_keys[record.file] = batch.pixel_keys[pos]
                        if record.ok:
                            checkpoint("journal")
                            record_log.add(record, self._sha256(record), self.bundle.sha256)
                    record_log.flush()  # what is written survives any stop, SIGKILL included
                    done += len(batch.records)
                    if self.stop:
                        break
                for _, record in waiting:
                    write(record, False)
            finally:
                record_log.close()
            summary.kept = len(kept)
            summary.not_scored = len(todo) - done
            summary.stopped_by = self.stop.signal_name if self.stop and summary.not_scored else ""
            summary.signum = self.stop.signum if summary.stopped_by else None
            if self.reports is not None:
                try:
                    summary.worklist = self.reports.write_worklist(records)
                except Exception as e:  # results.csv is still written
                    summary.worklist_failed = True
                    log.error("worklist not written: %s: %s", type(e).__name__, e)
        self.csv_done = True
        summary.seconds = time.perf_counter() - start
        if not summary.stopped_by:
            journal.remove_unlisted_outputs(self.out, scored_files)  # reports of files gone or changed since
        if summary.without_patient_data:
            # say how to give them: a newcomer's first scan of PNGs is without --metadata
            how = (f"neither their header, a sidecar nor the {match.option} table gives any" if match else
                   "give them with --metadata (an NIH Data_Entry table) or a <stem>.json sidecar beside each image")
            log.warning("%s scored without any patient data (age, sex and view unknown): their results rest "
                        "on the image alone; %s", plural(summary.without_patient_data, "study"), how)
        self.write_run_json(engine, cfg, settings, evidence_problem, match)
        return summary

    def hold(self, record) -> None:
        """Hold back a record of a study of two patients (scored, the model ran: its scores dropped)."""
        if record.ok and record.file in self.held:
            record.hold_back(self.held[record.file])
            self.summary.held += 1

    def outputs(self, record, inputs) -> None:
        """The study's PDF and SR, before its row (the row names its report)."""
        if not record.ok:
            return
        if self.reports is not None and not self.reports.report(record, inputs):
            self.summary.reports_failed += 1
        # a file whose UID other content claims too: an SR UID of its own (sr.sr_uids' revision), not one a PACS
        # would take for the other's and drop as a duplicate
        revision = {"revision": self.uid_conflicts[record.file][2]} if record.file in self.uid_conflicts else {}
        if self.srs is not None and self.srs.report(record, **revision) is not None:
            self.summary.srs += 1

    def _sha256(self, record) -> str:
        """The content a resumed scan compares with, to keep this record: "" (never kept, read
        again) when the file is gone or has changed since it was listed, so the record may be
        of another version than the bytes hashed now (a study corrected in place while the
        scan ran)."""
        path = self.studies / record.file
        try:
            sha256 = content_sha256(path)
            st = path.stat()
        except Exception:
            return ""
        return sha256 if (st.st_size, st.st_mtime_ns) == self.stamps.get(record.file) else ""

    def write_run_json(self, engine, cfg: ScanConfig, settings: dict, evidence_problem: str, match) -> None:
        summary = self.summary
        run_info = {
            "studies": str(self.studies), "model": self.bundle.label, "weights_sha256": self.bundle.sha256,
            "device": self.policy.describe(), "precision": self.policy.precision, "config": to_plain(cfg),
            "files_found": summary.files_found, "counts": dict(summary.counts), "priorities": dict(summary.priorities),
            "scored_without_patient_data": summary.without_patient_data,
            "validation_evidence_problem": evidence_problem,
            "seconds": round(summary.seconds, 3), "refined_in_fp32": engine.refined,
            "fp32_after_images": engine.fp32_from,
            "complete": not summary.stopped_by, "kept_from_earlier_scan": summary.kept,
        }
        if summary.stopped_by:
            run_info.update({"stopped_by": summary.stopped_by, "files_not_scored": summary.not_scored,
                             "how_to_finish": RESUME_HINT})
        if self.bundle.path is not None:  # absolute: config.weights is as typed, relative to where scan ran
            run_info["bundle_path"] = str(Path(self.bundle.path).resolve())
        if match is not None:
            run_info["metadata_match"] = match.to_dict()
        if cfg.dicom_sr:
            run_info["dicom_sr_written"] = summary.srs
        atomic_write_bytes(self.out / "run.json", (json.dumps(run_info, indent=2) + "\n").encode())


RESUME_HINT = ("run the same scan command again with --resume (same folder, --out and options): the studies scored "
               "are kept, the other files scored")
