"""What ``cxr-batch monitor`` costs on a daemon's results.csv after a year of ``watch``.

    python benchmarks/monitor_large.py [--n 100000] [--window 500] [--weights BUNDLE] [--keep DIR] [--phases]

Scans ``examples/studies`` once (real rows with every column scan writes, scored by the default
bundle or ``--weights``), then writes, for each ``--n``, a results.csv of N rows made from them:
each row a real one with its probabilities, image statistics and age perturbed (seed 0), its own
file name and identifiers, scored_at spread over a year in order (as a daemon appends them), 1%
error rows and 1% scored without image statistics (before drift monitoring). Prints, per N:
the file's size; the ``monitor`` command as a child process (wall and CPU seconds, peak RSS from
wait4, exit code); reading results.csv alone (``cxr_batch.monitor.readable_records``, in a child
process: seconds) and, in another child, tracemalloc's peak of that reading (tracemalloc slows
what it traces, so the seconds come from the first). CPU seconds move less than wall seconds on
a machine shared with other jobs. The drift monitor of ``watch``/``listen``/``pull`` reads its
window from the ledger, not results.csv (``cxr_batch/drift_watch.py``): not measured here.
``--phases`` runs monitor once more and prints its CPU seconds and peak RSS after reading
results.csv, after testing the windows and after writing monitor.json and monitor.pdf.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

READ_ONLY = """
import sys, time, tracemalloc
from pathlib import Path
from cxr_batch.monitor import readable_records
traced = sys.argv[2] == "traced"
if traced:
    tracemalloc.start()
t = time.perf_counter()
records, bad = readable_records(Path(sys.argv[1]))
print(f"{time.perf_counter() - t:.1f}", f"{tracemalloc.get_traced_memory()[1] / 2**20:.0f}" if traced else "")
"""
# monitor once more, saying where its CPU time and memory go: after reading results.csv, after
# testing every window, after writing monitor.json and monitor.pdf (CPU seconds and peak RSS so far)
PHASES = """
import resource, sys
from pathlib import Path
import cxr_batch.monitor as m
def mark(what):
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{what} {u.ru_utime + u.ru_stime:.1f} s {u.ru_maxrss / 1024:.0f} MiB;", end=" ")
read, write = m.readable_records, m.write_outputs
def reading(*a, **k):
    out = read(*a, **k)
    mark("read")
    return out
def writing(*a, **k):
    mark("windows tested")
    write(*a, **k)
    mark("outputs written")
m.readable_records, m.write_outputs = reading, writing
mark("imported")
m.run_monitor(Path(sys.argv[1]), Path(sys.argv[2]), opts=m.MonitorOptions(window=m.WindowSpec.parse(sys.argv[3])))
"""


def real_rows(weights: str | None, tmp: Path) -> list[dict]:
    """The rows of a real scan of examples/studies."""
    out = tmp / "scan"
    cmd = [sys.executable, "-m", "cxr_batch", "scan", str(REPO / "examples" / "studies"), "--metadata",
           str(REPO / "examples" / "metadata.csv"), "--out", str(out), "--no-pdf"]
    if weights:
        cmd += ["--weights", weights]
    subprocess.run(cmd, check=True, capture_output=True, env=child_env())
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    if not rows:
        raise SystemExit("the scan of examples/studies scored nothing")
    return rows


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_large(rows: list[dict], n: int, path: Path) -> None:
    """N rows made from ``rows``: perturbed values, own names, a year of scored_at in order."""
    from cxr_batch.findings import FINDINGS
    from cxr_batch.image_stats import COLUMNS as IMAGE_COLUMNS
    from cxr_batch.record import COLUMNS

    rng = random.Random(0)
    start = dt.datetime(2025, 12, 1, tzinfo=dt.timezone.utc)
    step = dt.timedelta(days=365) / n
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for i in range(n):
            row = dict(rows[i % len(rows)])
            when = start + i * step
            row.update(file=f"p{i // 100:05d}/IM{i:07d}.dcm", patient_id=f"P{i // 3:07d}", study_uid=f"1.2.3.{i}",
                       series_uid=f"1.2.3.{i}.1", sop_uid=f"1.2.3.{i}.1.1", accession_number=f"A{i:08d}",
                       study_date=when.strftime("%Y-%m-%d"), scored_at=when.isoformat(timespec="seconds"),
                       report=f"cxr_{i:020d}.pdf", worklist_rank="")
            if row["age"]:
                row["age"] = f"{min(max(float(row['age']) + rng.randint(-15, 15), 0), 100):g}"
            for f_ in FINDINGS:
                row[f"p_{f_}"] = f"{min(max(float(row[f'p_{f_}']) + rng.gauss(0, 0.02), 0), 1):.6f}"
            for c in IMAGE_COLUMNS:
                row[c] = f"{float(row[c]) + rng.gauss(0, 0.01):.4f}"
            if i % 100 == 37:  # a file that failed
                row.update({c: "" for c in COLUMNS if c.startswith(("p_", "flag_")) or c in IMAGE_COLUMNS},
                           status="error", reason="could not read the file: truncated", findings="", priority="",
                           triage_score="", p_any="")
            elif i % 100 == 71:  # scored before drift monitoring
                row.update(dict.fromkeys(IMAGE_COLUMNS, ""))
            writer.writerow(row)


def run_child(cmd: list[str]) -> tuple[float, float, float, int, str]:
    """Wall seconds, CPU seconds (user + system: less moved by other jobs on a shared machine),
    peak RSS (MiB) of this child alone, exit code, its stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - t, cpu, usage.ru_maxrss / 1024, proc.returncode, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100000], help="rows of results.csv (several: one run each)")
    ap.add_argument("--window", default="500")
    ap.add_argument("--weights", default=None, help="bundle to scan the examples with (default: the default bundle)")
    ap.add_argument("--keep", type=Path, default=None, help="write the results folders here, not in a temp folder")
    ap.add_argument("--phases", action="store_true", help="run monitor once more and say where its time and memory go")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cxr-monitor-bench-") as tmp:
        base = args.keep or Path(tmp)
        rows = real_rows(args.weights, Path(tmp))
        print(f"{len(rows)} real rows of a scan of examples/studies; --window {args.window}")
        print(f"{'rows':>8}  {'MiB':>6}  {'monitor s':>9}  {'CPU s':>6}  {'peak RSS MiB':>12}  {'exit':>4}  "
              f"{'read s':>6}  {'read peak MiB':>13}")
        for n in args.n:
            folder = base / f"results_{n}"
            folder.mkdir(parents=True, exist_ok=True)
            write_large(rows, n, folder / "results.csv")
            size = (folder / "results.csv").stat().st_size / 2**20
            wall, cpu, rss, code, _ = run_child([sys.executable, "-m", "cxr_batch", "monitor", str(folder),
                                                 "--out", str(base / f"monitor_{n}"), "--window", args.window])
            read = [sys.executable, "-c", READ_ONLY, str(folder / "results.csv")]
            read_s = run_child(read + ["-"])[4].split()[0]
            read_peak = run_child(read + ["traced"])[4].split()[1]
            print(f"{n:>8}  {size:>6.1f}  {wall:>9.1f}  {cpu:>6.1f}  {rss:>12.0f}  {code:>4}  {read_s:>6}  "
                  f"{read_peak:>13}", flush=True)
            if args.phases:
                phases = run_child([sys.executable, "-c", PHASES, str(folder), str(base / f"phases_{n}"), args.window])
                print(f"{'':>8}  phases (CPU seconds, peak RSS so far): {phases[4].strip()}", flush=True)


if __name__ == "__main__":
    main()
