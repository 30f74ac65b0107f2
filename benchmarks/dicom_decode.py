"""DICOM read + preprocess images/s for one worker, at a realistic detector size.

    python benchmarks/dicom_decode.py [--n 20] [--size 2500x2000]

Builds two DICOMs from a real NIH radiograph upsampled to the given size, 12 bits stored in 16:
uncompressed (Explicit VR Little Endian) and JPEG 2000 lossless; then times ``load_study`` (read,
decode, window, centre crop, resize, normalise) on one thread, as in one DataLoader worker.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.dicom_build import radiograph, save  # noqa: E402
from cxr_batch.discover import Candidate  # noqa: E402
from cxr_batch.inference import load_study  # noqa: E402
from cxr_batch.study import ScoringRules  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", default="2500x2000", help="columns x rows")
    ap.add_argument("--image", type=Path, default=NIH / "full_res" / "00000075_000.png")
    args = ap.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    src = Image.open(args.image).convert("L").resize((cols, rows), Image.BILINEAR)
    pixels = np.asarray(src).astype(np.uint16) * 16
    bundle = load_bundle()
    print(f"{cols} x {rows}, 12 bits stored, one thread (one DataLoader worker)")
    with tempfile.TemporaryDirectory() as tmp:
        for ts in (ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless):
            path = save(radiograph(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096),
                        Path(tmp) / ts.name.replace(" ", "_"), ts)
            cand = Candidate(path, path.name)
            load_study(cand, bundle.preprocessing, bundle.encoding, ScoringRules())  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.n):
                loaded = load_study(cand, bundle.preprocessing, bundle.encoding, ScoringRules())
            rate = args.n / (time.perf_counter() - t0)
            assert loaded.image is not None, loaded.record.reason
            print(f"{ts.name:45s} {path.stat().st_size / 2**20:6.1f} MiB  {rate:6.1f} images/s per worker")


if __name__ == "__main__":
    main()
