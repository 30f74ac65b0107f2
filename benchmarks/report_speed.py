"""PDF report generation speed on CPU: reports/s with and without Grad-CAM heatmaps.

    python benchmarks/report_speed.py [--n 24]

Scores --n real NIH images with the bundled weights, then times writing their PDF reports
(one page each) twice: with heatmaps for flagged findings (one backward pass per flagged
finding) and without. Model scoring is outside the timed part.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path, link_folder, real_images  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.discover import find_candidates  # noqa: E402
from cxr_batch.inference import BatchOptions, Engine, score_batches  # noqa: E402
from cxr_batch.reports import ReportOptions, ReportWriter  # noqa: E402
from cxr_batch.runtime import make_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--weights")
    args = ap.parse_args()
    bundle = load_bundle(bundle_path(args.weights))
    engine = Engine(bundle, make_policy("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_folder(real_images(), args.n, Path(tmp) / "studies")
        batches = list(score_batches(find_candidates(folder), engine, BatchOptions(batch_size=8, workers=0, progress=False)))
        flagged = sum(len(r.findings) for b in batches for r in b.records)
        print(f"{args.n} studies, {flagged} flagged findings, {torch.get_num_threads()} threads")
        for heatmaps in (False, True):
            writer = ReportWriter(Path(tmp) / f"reports_{heatmaps}", bundle, ReportOptions(heatmaps=heatmaps))
            t0 = time.perf_counter()
            for b in batches:
                writer.report_batch(b)
            writer.write_worklist([r for b in batches for r in b.records])
            dt = time.perf_counter() - t0
            print(f"heatmaps {'on ' if heatmaps else 'off'}: {args.n / dt:6.2f} reports/s ({dt / args.n * 1000:.0f} ms each)")


if __name__ == "__main__":
    main()
