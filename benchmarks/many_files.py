"""Folders of many files: discovery, and the watch daemon draining a folder full at its start.

    python benchmarks/many_files.py [--sizes 1000 5000 20000] [--watch-sizes 1000 4000]

Discovery: ``find_candidates`` over one flat folder of N files (what scan and every watch
rescan do first), seconds. Watch: N small text files (each a `skipped` row: no model time)
present when ``cxr-batch watch`` starts, seconds from the start to the last row; the time per
file should not grow with N (it did: every round looked at every waiting file again).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path  # noqa: E402
from cxr_batch.discover import find_candidates  # noqa: E402


def fill(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        (folder / f"note{i:06d}.txt").write_text(f"not an image {i}\n")


def rows(out: Path) -> int:
    try:
        with open(out / "results.csv", newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (FileNotFoundError, csv.Error):
        return 0


def watch_drain(n: int, weights: str | None, root: Path) -> float:
    incoming, out = root / f"watch{n}", root / f"out{n}"
    fill(incoming, n)
    config = root / "w.toml"
    config.write_text("[watch]\nsettle = 0.2\nmax_wait = 0.1\nheartbeat_interval = 1.0\nworklist_interval = 30.0\n")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out), "--weights",
                             str(bundle_path(weights)), "--device", "cpu", "--no-pdf", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while rows(out) < n:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}")
            time.sleep(0.5)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--watch-sizes", type=int, nargs="*", default=[1000, 4000])
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.sizes:
            folder = root / f"flat{n}"
            fill(folder, n)
            start = time.perf_counter()
            found = find_candidates(folder)
            took = time.perf_counter() - start
            print(f"discovery: {len(found):>7} files in {took:.2f} s ({1e6 * took / n:.0f} us/file)")
            shutil.rmtree(folder)
        for n in args.watch_sizes:
            took = watch_drain(n, args.weights, root)
            print(f"watch start with {n:>6} files waiting: last row after {took:.1f} s ({1e3 * took / n:.1f} ms/file)")


if __name__ == "__main__":
    main()
