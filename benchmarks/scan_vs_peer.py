"""cxr-batch scan against the loop a user would write with TorchXRayVision, on the same images.

    pip install torchxrayvision scikit-image      # optional benchmark dependencies
    python benchmarks/scan_vs_peer.py [--images DIR] [--n 64] [--batch-size 16]

(a) the peer: TorchXRayVision's documented per-image loop: ``skimage.io.imread``,
    ``xrv.datasets.normalize(img, 255)``, ``XRayCenterCrop`` + ``XRayResizer(224)``,
    ``xrv.models.DenseNet`` (random weights: nothing can be downloaded here), batch 1, fp32;
(b) ``cxr-batch scan`` end to end (find, read, preprocess in workers, infer, results.csv),
    in its automatic precision and in fp32;
then prints images/s of each, the ratios, the model-only throughput of cxr-batch (same batch,
tensors in memory) and how far the fast path's probabilities and flags are from fp32's.
Run in one process tree, one after the other, on the same files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH, bundle_path, link_folder, real_images  # noqa: E402
from cxr_batch.findings import FINDINGS  # noqa: E402
from cxr_batch.results import read_results  # noqa: E402
from cxr_batch.scan import ScanConfig, run_scan  # noqa: E402


def peer_loop(paths: list[Path]) -> float:
    import skimage.io
    import torchvision
    import torchxrayvision as xrv

    model = xrv.models.DenseNet(weights=None).eval()
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    with torch.no_grad():
        model(torch.zeros(1, 1, 224, 224))  # warm-up
        t0 = time.perf_counter()
        for p in paths:
            img = xrv.datasets.normalize(skimage.io.imread(p), 255)
            if img.ndim == 3:
                img = img.mean(2)
            img = transform(img[None, ...])
            model(torch.from_numpy(img)[None].float())
    return len(paths) / (time.perf_counter() - t0)


def ours(folder: Path, out: Path, weights: Path, precision: str, batch_size: int) -> tuple[float, list[dict]]:
    summary = run_scan(folder, out, ScanConfig(weights=str(weights), device="cpu", precision=precision,
                                               batch_size=batch_size, progress=False, pdf=False))
    return summary.counts["ok"] / summary.seconds, read_results(out / "results.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=NIH / "full_res")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--weights")
    args = ap.parse_args()
    images = real_images(args.images)
    weights = bundle_path(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_folder(images, args.n, Path(tmp) / "studies")
        paths = sorted(folder.iterdir())
        print(f"{args.n} images from {args.images} ({len(images)} distinct), {torch.get_num_threads()} threads")
        ours(folder, Path(tmp) / "warm", weights, "auto", args.batch_size)  # first-run costs (oneDNN kernels)
        fast, fast_rows = ours(folder, Path(tmp) / "fast", weights, "auto", args.batch_size)
        exact, exact_rows = ours(folder, Path(tmp) / "fp32", weights, "fp32", args.batch_size)
        peer = peer_loop(paths)
        print(f"peer (TorchXRayVision loop, batch 1, fp32): {peer:7.1f} images/s")
        print(f"cxr-batch scan, precision auto:            {fast:7.1f} images/s  ({fast / peer:.2f}x the peer)")
        print(f"cxr-batch scan, precision fp32:            {exact:7.1f} images/s  ({exact / peer:.2f}x the peer)")
        p_fast = np.array([[float(r[f"p_{f}"]) for f in FINDINGS] for r in fast_rows])
        p_exact = np.array([[float(r[f"p_{f}"]) for f in FINDINGS] for r in exact_rows])
        flips = sum(a["findings"] != b["findings"] for a, b in zip(fast_rows, exact_rows))
        d = np.abs(p_fast - p_exact)
        print(f"auto vs fp32 probabilities: max |diff| {d.max():.4f}, mean {d.mean():.5f}; "
              f"studies whose flagged findings differ: {flips} of {len(fast_rows)}")


if __name__ == "__main__":
    main()
