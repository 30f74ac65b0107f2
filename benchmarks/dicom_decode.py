"""DICOM read + preprocess images/s for one reading worker, at a realistic detector size.

    python benchmarks/dicom_decode.py [--n 20] [--size 2500x2000] [--weights BUNDLE]

Builds DICOMs from a real NIH radiograph upsampled to the given size, 12 bits stored in 16
(8 for JPEG baseline): uncompressed, JPEG-LS lossless, JPEG 2000 lossless and JPEG baseline.
Times ``load_study`` (read, decode, window, centre crop, resize, normalise) on one thread, as
in one reading worker: at full resolution, and as a scan does it, decoding only what the
bundle's input size needs (JPEG 2000 resolution levels, JPEG DCT scaling); then prints the
largest probability difference between the two decodes with the bundle's model.
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
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH  # noqa: E402
from cxr_batch.assemble import assemble_study  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.dicom_build import radiograph, save  # noqa: E402
from cxr_batch.discover import Candidate  # noqa: E402
from cxr_batch.inference import model_inputs  # noqa: E402
from cxr_batch.study import ScoringRules  # noqa: E402


def rate(cand: Candidate, bundle, min_side: int, n: int):
    load = lambda: model_inputs(assemble_study(cand, ScoringRules(), None, min_side),  # noqa: E731
                                bundle.preprocessing, bundle.encoding)
    load()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        loaded = load()
    assert loaded.image is not None, loaded.record.reason
    return n / (time.perf_counter() - t0), loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", default="2500x2000", help="columns x rows")
    ap.add_argument("--image", type=Path, default=NIH / "full_res" / "00000075_000.png")
    ap.add_argument("--weights")
    args = ap.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    src = Image.open(args.image).convert("L").resize((cols, rows), Image.BILINEAR)
    bundle = load_bundle(args.weights)
    need = bundle.preprocessing.min_side
    print(f"{cols} x {rows}, one thread (one reading worker); model input {bundle.preprocessing.image_size} px, "
          f"reduced decodes deliver a short side of at least {need} px")
    with tempfile.TemporaryDirectory() as tmp:
        for ts in (ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit):
            if ts == JPEGBaseline8Bit:
                ds = radiograph(np.asarray(src))
            else:
                ds = radiograph(np.asarray(src).astype(np.uint16) * 16, bits_stored=12, WindowCenter=2048,
                                WindowWidth=4096)
            path = save(ds, Path(tmp) / ts.name.replace(" ", "_"), ts)
            cand = Candidate(path, path.name)
            full_rate, full = rate(cand, bundle, 0, args.n)
            fast_rate, fast = rate(cand, bundle, need, args.n)
            with torch.no_grad():
                x = torch.stack([full.image, fast.image])
                p = torch.sigmoid(bundle.model(x, torch.stack([full.tabular, fast.tabular])))
            print(f"{ts.name:40s} {path.stat().st_size / 2**20:6.1f} MiB  full {full_rate:6.1f} images/s  "
                  f"as scanned {fast_rate:6.1f} images/s  max |dp| {float((p[0] - p[1]).abs().max()):.4f}")


if __name__ == "__main__":
    main()
