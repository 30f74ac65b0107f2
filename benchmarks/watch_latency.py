"""The watch daemon under load: single-study latency and a burst of studies dropped at once.

    python benchmarks/watch_latency.py [--single 20] [--burst 500] [--settle 0.5] [--batch-size 8]

Runs ``cxr-batch watch`` as a subprocess on real NIH images (PNG, patient data unknown) without
heatmaps. Each study is written under a temporary name and renamed, as a PACS does, so "file
complete" is the rename. Latency: from the rename to the study's row in results.csv with its
PDF on disk (median, p95; target p95 under 5 s on the 2-core CPU machine). Burst: from dropping
--burst studies at once to the last row; studies/s and the daemon's peak RSS (process tree).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import PeakMemory, bundle_path, real_images  # noqa: E402


def rows(out: Path) -> dict:
    try:
        with open(out / "results.csv", newline="") as f:
            return {r["file"]: r for r in csv.DictReader(f)}
    except FileNotFoundError:
        return {}


def unique_copies(images: list[Path], n: int, folder: Path, prefix: str) -> list[Path]:
    """``n`` PNGs cycling through ``images``, each with a text chunk naming it: the same pixels
    but distinct files (identical content would be recognised as a re-sent copy and skipped)."""
    from PIL import Image, PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        info = PngImagePlugin.PngInfo()
        info.add_text("cxr-batch-benchmark", f"{prefix}{i}")
        path = folder / f"{prefix}{i:04d}.png"
        Image.open(images[i % len(images)]).save(path, pnginfo=info)
        out.append(path)
    return out


def drop(src: Path, incoming: Path, name: str) -> float:
    tmp = incoming / f"{name}.part"
    shutil.copyfile(src, tmp)
    os.rename(tmp, incoming / name)
    return time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--weights")
    args = ap.parse_args()
    images = real_images()
    with tempfile.TemporaryDirectory() as tmp:
        incoming, out = Path(tmp) / "incoming", Path(tmp) / "out"
        incoming.mkdir()
        config = Path(tmp) / "watch.toml"
        config.write_text(f"[watch]\nsettle = {args.settle}\nmax_wait = 0.2\nbatch_size = {args.batch_size}\n")
        cmd = [sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out), "--config", str(config),
               "--weights", str(bundle_path(args.weights)), "--no-heatmaps"]
        daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (out / "status.json").exists():
                time.sleep(0.1)
            singles = unique_copies(images, args.single, Path(tmp) / "staging", "single_")
            bursts = unique_copies(images, args.burst, Path(tmp) / "staging", "burst_")
            latencies = []
            for i, src in enumerate(singles):
                name = src.name
                t0 = drop(src, incoming, name)
                while True:
                    row = rows(out).get(name)
                    if row and (out / "reports" / row["report"]).exists():
                        break
                    time.sleep(0.02)
                latencies.append(time.monotonic() - t0)
            p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) >= 2 else latencies[0]
            print(f"single study, file complete -> row + PDF (settle {args.settle} s, no heatmaps): "
                  f"median {statistics.median(latencies):.2f} s, p95 {p95:.2f} s over {len(latencies)}")
            if args.burst:
                with PeakMemory(daemon.pid) as mem:
                    t0 = time.monotonic()
                    for src in bursts:
                        drop(src, incoming, src.name)
                    while sum(k.startswith("burst_") for k in rows(out)) < args.burst:
                        time.sleep(0.2)
                    dt = time.monotonic() - t0
                print(f"burst of {args.burst}: {dt:.1f} s, {args.burst / dt:.1f} studies/s, "
                      f"daemon peak RSS {mem.peak / 2**30:.2f} GiB (process tree)")
        finally:
            daemon.send_signal(signal.SIGTERM)
            print(f"daemon exit code after SIGTERM: {daemon.wait(timeout=120)}")


if __name__ == "__main__":
    main()
