"""End-to-end scan throughput against model-only throughput, decode rate and peak memory.

    python benchmarks/scan_throughput.py [--n 100] [--batch-size 16] [--device auto]
                                         [--memory-n 2000] [--images DIR] [--weights BUNDLE]

Prints, for one process on the same real NIH images and batch size:
- decode rate: read + preprocess images/s of one worker (no model);
- model-only: forward images/s on tensors already in memory (after a warm-up batch);
- end-to-end: ``run_scan`` images/s (find, read in worker processes, preprocess, infer,
  write results.csv), and its ratio to model-only (target >= 0.85 on the 2-core CPU machine);
- peak resident memory of a ``cxr-batch scan --no-pdf`` of --memory-n images (process tree,
  from /proc) and its images/s, against the end-to-end rate on --n images (flat with scale).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import PeakMemory, bundle_path, link_folder, real_images  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.discover import Candidate  # noqa: E402
from cxr_batch.inference import Engine, load_study  # noqa: E402
from cxr_batch.study import ScoringRules  # noqa: E402
from cxr_batch.runtime import make_policy  # noqa: E402
from cxr_batch.scan import ScanConfig, run_scan  # noqa: E402


def decode_rate(paths: list[Path], bundle) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a reading worker
    t0 = time.perf_counter()
    for p in paths:
        load_study(Candidate(p, p.name), bundle.preprocessing, bundle.encoding, ScoringRules())
    rate = len(paths) / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def model_only_rate(engine: Engine, images: torch.Tensor, tabular: torch.Tensor, bs: int) -> float:
    """Score ``images`` in batches exactly as the scan does (float32 re-scoring near thresholds
    included), from tensors already in memory, after a warm-up batch."""
    engine.probabilities(images[:bs], tabular[:bs])  # warm-up: kernel selection, allocator
    if engine.policy.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(images), bs):
        engine.probabilities(images[i:i + bs], tabular[i:i + bs])
    if engine.policy.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path)
    ap.add_argument("--weights")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--memory-n", type=int, default=2000, help="0 skips the memory run")
    args = ap.parse_args()

    import os

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    images = real_images(args.images)
    weights = bundle_path(args.weights)
    bundle = load_bundle(weights)
    policy = make_policy(args.device, args.precision)
    engine = Engine(bundle, policy)
    print(f"device: {policy.describe()}; batch size {args.batch_size}; {cores} cores; model {bundle.label}")

    sample = images[: min(64, len(images))]
    rate = decode_rate(sample, bundle)
    print(f"decode (read + preprocess), one worker: {rate:8.1f} images/s")

    # the same images the end-to-end run reads, preprocessed once, as tensors in memory
    sources = [images[i % len(images)] for i in range(args.n)]
    loaded = [load_study(Candidate(p, p.name), bundle.preprocessing, bundle.encoding, ScoringRules())
              for p in sources]
    x = torch.stack([item.image for item in loaded])
    t = torch.stack([item.tabular for item in loaded])
    if policy.device.type == "cuda":
        x, t = x.to(policy.device), t.to(policy.device)
    model_rate = model_only_rate(engine, x, t, args.batch_size)
    print(f"model only (tensors in memory):  {model_rate:8.1f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        folder = link_folder(images, args.n, Path(tmp) / "studies")
        cfg = ScanConfig(weights=str(weights), device=args.device, precision=args.precision,
                         batch_size=args.batch_size, workers=args.workers, progress=False, pdf=False)
        summary = run_scan(folder, Path(tmp) / "out", cfg)
        e2e = summary.counts["ok"] / summary.seconds
        print(f"end to end ({args.n} images):     {e2e:8.1f} images/s")
        print(f"end-to-end / model-only:         {e2e / model_rate:8.2f}  (target >= 0.85 on CPU)")

        if args.memory_n:
            big = link_folder(images, args.memory_n, Path(tmp) / "big")
            cmd = [sys.executable, "-m", "cxr_batch", "scan", str(big), "--out", str(Path(tmp) / "big_out"),
                   "--weights", str(weights), "--device", args.device, "--precision", args.precision,
                   "--batch-size", str(args.batch_size), "--quiet", "--no-pdf"]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
            with PeakMemory(proc.pid) as mem:
                _, err = proc.communicate()
            if proc.returncode != 0:
                print(err, file=sys.stderr)
                raise SystemExit(f"memory run failed with exit code {proc.returncode}")
            run = json.loads((Path(tmp) / "big_out" / "run.json").read_text())
            print(f"scan of {args.memory_n} images: peak RSS {mem.peak / 2**30:.2f} GiB (process tree; target < 2 GB), "
                  f"{run['counts'].get('ok', 0) / run['seconds']:.1f} images/s")


if __name__ == "__main__":
    main()
