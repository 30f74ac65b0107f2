"""The watch daemon over a year's ledger: what each rescan, heartbeat, correction and start-up
costs once the ledger holds a site's year of studies.

    python benchmarks/ledger_scale.py [--studies 100000] [--held 40] [--no-startup]

Builds a results folder as a year of ``cxr-batch watch`` leaves it: a ledger of N scored
studies (results.csv written from it) and ``held`` studies held back (two patients: two images
of P-A, one misfiled image of P-B, all three still in the watched folder). Then, in one
process, on a Watcher over that folder (no PDFs, the CPU):

- rescan: :meth:`Watcher.release_held` (every rescan's first step), nothing released;
- release: the misfiled image of one held study removed, then one release_held (its two images
  read again; the other held studies untouched, checked);
- heartbeat: one status.json, counts from the ledger;
- correction: results.csv rewritten whole (a replaced study's publish);
- drift: one evaluation (the start's, and every ``drift_every`` studies);
- the start's look for reports to make again (with PDFs);
and, in a child process, the daemon's start-up: ``cxr-batch watch`` started on the folder,
seconds until status.json says "running", with results.csv as the ledger last wrote it (kept)
and touched (rewritten, as every start did before). "before" figures run the earlier code path
(the held studies' query without its index; results.csv rewritten) in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path  # noqa: E402
from cxr_batch.findings import FINDINGS  # noqa: E402
from cxr_batch.image_stats import ImageStats  # noqa: E402
import cxr_batch.ledger as ledger_module  # noqa: E402
from cxr_batch.ledger import Ledger  # noqa: E402
from cxr_batch.patient import PatientData  # noqa: E402
from cxr_batch.record import HELD_BACK, Scores, StudyRecord  # noqa: E402
from cxr_batch.study import Identifiers  # noqa: E402
from cxr_batch.watch import STATE_DIR, Watcher, WatchConfig  # noqa: E402

CHUNK = 2000  # studies per ledger transaction while building


def scored(i: int, bundle_sha: str) -> StudyRecord:
    """A scored study as watch records one (its numbers vary, their size does not)."""
    probs = tuple(((i * 7919 + k * 104729) % 1000) / 1000 for k in range(len(FINDINGS)))
    flags = tuple(int(p > 0.8) for p in probs)
    return StudyRecord(
        file=f"2026/{i // 1000:03d}/IM{i:06d}.dcm",
        ids=Identifiers(patient_id=f"P{i // 3:07d}", patient_name=f"DOE^JANE{i % 97}", study_uid=f"1.2.826.0.1.{i // 2}",
                        series_uid=f"1.2.826.0.2.{i}", sop_uid=f"1.2.826.0.3.{i}", accession_number=f"A{i:08d}",
                        study_date="20260101", institution="General", patient_birth_date="19600101", patient_sex="F"),
        patient=PatientData(age=50 + i % 40, age_source="dicom", sex="F", sex_source="dicom", view="PA",
                            view_source="dicom"),
        scores=Scores(probs, flags, "urgent" if any(flags) else "routine", max(probs), max(probs)),
        report=f"cxr_{i:06d}.pdf", model="cxr-fpn@3", weights_sha256=bundle_sha,
        image_stats=ImageStats(*(0.1 * k for k in range(10))), scored_at="2026-01-01T00:00:00Z")


def held(study: int, image: int) -> StudyRecord:
    """Image ``image`` (2: the misfiled one, P-B's) of held study ``study``."""
    misfiled = image == 2
    return StudyRecord(
        file=f"held/{study:03d}/IM{image}.dcm", status="skipped",
        reason=f"{HELD_BACK}study of two patients (P-A{study}, P-B{study})",
        ids=Identifiers(patient_id=f"P-{'B' if misfiled else 'A'}{study}", study_uid=f"1.2.826.9.{study}",
                        sop_uid=f"1.2.826.9.{study}.{image}", patient_birth_date="19700202" if misfiled else "19600101",
                        patient_sex="F"))


def build(watch_dir: Path, out: Path, n: int, n_held: int, bundle_sha: str) -> None:
    """The results folder: ledger and results.csv; the held studies' files in the watched folder."""
    ledger = Ledger(out / STATE_DIR / "ledger.sqlite")
    for start in range(0, n, CHUNK):
        studies = [(f"uid:1.2.826.0.3.{i}", f"{i:064x}", scored(i, bundle_sha)) for i in range(start, min(n, start + CHUNK))]
        files = [(r.file, 1000, i, i, key, "ok") for i, (key, _, r) in enumerate(studies, start)]
        ledger.commit(studies, files)
    for s in range(n_held):
        studies = [(f"uid:1.2.826.9.{s}.{k}", f"{s:032x}{k:032x}", held(s, k)) for k in range(3)]
        for _, _, r in studies:
            path = watch_dir / r.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"held image")
        ledger.commit(studies, [])
    ledger.close()


def timed(action, repeat: int = 1) -> float:
    """Seconds per call of ``action`` (the least of ``repeat``: the steady cost, not a hiccup)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def startup(watch_dir: Path, out: Path, weights: Path, config: Path) -> float:
    """Seconds from ``cxr-batch watch`` started to status.json saying it runs."""
    status = out / "status.json"
    status.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", "watch", str(watch_dir), "--out", str(out), "--weights",
                             str(weights), "--device", "cpu", "--no-pdf", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}")
            try:
                if json.loads(status.read_text()).get("state") == "running":
                    return time.perf_counter() - start
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--held", type=int, default=40)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--no-startup", action="store_true", help="skip the daemon's start-up (a child process)")
    args = ap.parse_args()
    weights = bundle_path(args.weights)
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
        root = Path(tmp)
        watch_dir, out = root / "incoming", root / "out"
        watch_dir.mkdir()
        config = root / "w.toml"
        config.write_text("[watch]\nheartbeat_interval = 1.0\n")
        cfg = WatchConfig(weights=str(weights), device="cpu", pdf=False)
        start = time.perf_counter()
        build(watch_dir, out, args.studies, args.held, "0" * 64)
        print(f"ledger: {args.studies} scored + {args.held} held studies ({3 * args.held} images) built in "
              f"{time.perf_counter() - start:.1f} s, {(out / STATE_DIR / 'ledger.sqlite').stat().st_size / 2**20:.0f} MiB")
        watcher = Watcher(watch_dir, out, cfg)
        try:
            print(f"publish_whole (start-up; a correction): {timed(watcher.publish_whole):.2f} s "
                  f"(results.csv {(out / 'results.csv').stat().st_size / 2**20:.0f} MiB)")
            # before: the held studies found by reading every record (the query without its index)
            ledger = watcher.ledger
            full_scan = (f"SELECT DISTINCT json_extract(record, '$.ids.study_uid') FROM studies NOT INDEXED "
                         f"WHERE {ledger_module._HELD}")
            before = timed(lambda: ledger.db.execute(full_scan).fetchall(), 3)
            after = timed(ledger.held_studies, 3)
            print(f"held studies found: before (every record read) {before:.3f} s, after (indexed) {after:.4f} s")
            print(f"rescan, release_held, nothing released: {timed(watcher.release_held, 3):.3f} s "
                  f"({len(watcher.held_studies)} studies held)")
            (watch_dir / held(0, 2).file).unlink()  # study 0's misfiled image removed, as its rows say
            took = timed(watcher.release_held)
            released = sorted(watcher.pending)
            expect = sorted(held(0, k).file for k in range(2))
            if released != expect:  # the others untouched
                raise SystemExit(f"release_held released {released} (expected {expect})")
            print(f"release, one study's misfiled image removed: {took:.3f} s (its 2 images read again, "
                  f"no other)")
            print(f"heartbeat (status.json): {timed(watcher.heartbeat, 3):.3f} s")
            print(f"drift evaluation: {timed(watcher.drift.evaluate):.2f} s")
            # with PDFs, every start looks for the reports to make again, a stat each: before, every
            # record read whole to find their names
            reports = out / "reports"
            before = timed(lambda: [k for k, r in ledger.keyed_records()
                                    if r.ok and (not r.report or not (reports / r.report).exists())])
            after = timed(lambda: [k for k, report in ledger.scored_reports()
                                   if not report or not (reports / report).exists()])
            print(f"start-up's look for missing reports (with PDFs): before {before:.2f} s, after {after:.2f} s")
            # results.csv rewritten whole marked every row published again (all the ledger's pages written)
            with ledger.db:
                before = timed(lambda: ledger.db.execute("UPDATE studies SET published = 1"))
            print(f"publish_whole's mark: before (every row) {before:.2f} s, after (those not marked) "
                  f"{timed(ledger.mark_published):.3f} s")
        finally:
            watcher.ledger.close()
            watcher.lock.release()
            watcher.claim.release()
        if not args.no_startup:
            after = startup(watch_dir, out, weights, config)  # results.csv as the ledger last wrote it: kept
            (out / "results.csv").touch()  # before: every start rewrote it, as one touched since is
            before = startup(watch_dir, out, weights, config)
            print(f"daemon start-up, to 'running': before (results.csv rewritten) {before:.1f} s, "
                  f"after (kept) {after:.1f} s")


if __name__ == "__main__":
    main()
