"""What publishing one batch costs the watch daemon as its ledger grows.

    python benchmarks/watch_publish.py [--sizes 1000 10000 100000] [--batch 8] [--repeat 5]

For each ledger size N (synthetic scored studies), prints the seconds the daemon spends after
scoring a batch of ``--batch`` new studies: the ledger commit, appending the rows to
results.csv, and rebuilding the worklist over its window (the last 24 h, at most 500 studies),
as ``Watcher.process`` does (median of ``--repeat`` batches); and the one-off rewrite of
results.csv from the ledger that happens at each start. No model runs: the cost measured is
publishing, which must not grow with N.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic(i: int):
    from cxr_batch.findings import FINDINGS
    from cxr_batch.patient import PatientData
    from cxr_batch.record import Scores, StudyRecord
    from cxr_batch.study import Identifiers

    probs = tuple(((i * 7 + k * 13) % 100) / 100 for k in range(len(FINDINGS)))
    flags = tuple(int(p >= 0.5) for p in probs)
    priority = "urgent" if flags[7] else ("abnormal" if any(flags) else "normal")
    return StudyRecord(
        file=f"p{i // 100:05d}/IM{i:07d}.dcm", model="bench@1", weights_sha256="0" * 64, report=f"cxr_{i:020d}.pdf",
        ids=Identifiers(patient_id=f"P{i // 3:07d}", study_uid=f"1.2.3.{i}", sop_uid=f"1.2.3.{i}.1",
                        accession_number=f"A{i:08d}", study_date="20240415"),
        patient=PatientData(age=40 + i % 50, age_source="header:PatientAge", sex="MF"[i % 2], sex_source="header",
                            view="PA", view_source="header:ViewPosition"),
        scores=Scores(probs, flags, priority, max(p - 0.5 for p in probs) / 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from benchmarks.common import bundle_path
    from cxr_batch.bundle import load_bundle
    from cxr_batch.ledger import Ledger
    from cxr_batch.reports import ReportOptions, ReportWriter
    from cxr_batch.results import AtomicCsvWriter, append_rows

    bundle = load_bundle(bundle_path(None))
    print(f"batch of {args.batch} new studies; worklist window: last 24 h, at most 500 studies")
    print(f"{'ledger rows':>12}  {'commit':>8}  {'append':>8}  {'worklist':>9}  {'per batch':>10}  {'start-up rewrite':>17}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            ledger = Ledger(out / "ledger.sqlite")
            for start in range(0, size, 2000):
                chunk = [(f"uid:{i}", f"c{i}", synthetic(i)) for i in range(start, min(size, start + 2000))]
                ledger.commit(chunk, [])
            t0 = time.perf_counter()
            with AtomicCsvWriter(out / "results.csv") as writer:
                for record in ledger.iter_records():
                    writer.write(record)
            ledger.mark_published()
            rewrite = time.perf_counter() - t0
            reports = ReportWriter(out / "reports", bundle, ReportOptions())
            times = {"commit": [], "append": [], "worklist": []}
            for r in range(args.repeat):
                base = size + r * args.batch
                batch = [(f"uid:{i}", f"c{i}", synthetic(i)) for i in range(base, base + args.batch)]
                t0 = time.perf_counter()
                outcomes = ledger.commit(batch, [])
                t1 = time.perf_counter()
                append_rows(out / "results.csv", [o.record for o in outcomes])
                ledger.mark_published([o.key for o in outcomes])
                t2 = time.perf_counter()
                reports.write_worklist(ledger.recent(time.time() - 24 * 3600, 500))
                t3 = time.perf_counter()
                times["commit"].append(t1 - t0)
                times["append"].append(t2 - t1)
                times["worklist"].append(t3 - t2)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{size:>12,}  {med['commit']:7.3f}s  {med['append']:7.3f}s  {med['worklist']:8.3f}s  "
                  f"{sum(med.values()):9.3f}s  {rewrite:16.2f}s")
            ledger.close()


if __name__ == "__main__":
    main()
