"""``cxr-batch scan`` against the TorchXRayVision program a user would write, as whole processes.

    pip install torchxrayvision scikit-image      # the peer's dependencies (benchmark only)
    python benchmarks/scan_vs_peer.py [--sets png512 png1024 dicom] [--n 247] [--dicom-n 16]

For each input set, one after the other on the same files, each timed as a whole process from
its start to its exit (start-up counted on both sides: Python, imports, model, reading, writing):
(a) the peer, ``benchmarks/peer_xrv.py`` (per image, batch 1, float32, 224 px);
(b) ``cxr-batch scan DIR --out OUT --no-pdf --quiet`` in its automatic precision;
(c) the same with ``--precision fp32``, the reference for flags.
Then how many (image, finding) flags of (b) equal (c)'s, the largest probability difference,
and the model alone (tensors in memory, batch 16) at each precision this CPU runs: the ceiling
the end-to-end figure sits under. Input sets: ``png512`` (the NIH images at 512 x 512),
``png1024`` (the 1024 x 1024 ones, cycled), ``dicom`` (2500 x 2000, 12 bits stored,
uncompressed, JPEG-LS and JPEG 2000 lossless, made from a real radiograph). Files are read once
before timing so that no process pays a cold disk cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def warm(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.read_bytes()


def make_png_set(source: Path, n: int, dest: Path) -> Path:
    from benchmarks.common import link_folder, real_images

    return link_folder(real_images(source), n, dest)


def make_dicom_set(n: int, dest: Path) -> Path:
    """n files in each of three transfer syntaxes, 2500 x 2000, from real 1024-px radiographs."""
    import numpy as np
    from PIL import Image
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

    from benchmarks.common import NIH
    from cxr_batch.dicom_build import radiograph, save

    sources = sorted((NIH / "full_res").glob("*.png"))
    dest.mkdir(parents=True)
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("L").resize((2500, 2000), Image.BILINEAR)
        pixels = np.asarray(img).astype(np.uint16) * 16
        ds = radiograph(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096, PatientAge="050Y",
                        PatientSex="F", ViewPosition="PA")
        for ts, tag in ((ExplicitVRLittleEndian, "raw"), (JPEGLSLossless, "jls"), (JPEG2000Lossless, "j2k")):
            save(ds, dest / tag / f"{i:03d}.dcm", ts)
    return dest


def compare(out_fast: Path, out_exact: Path) -> tuple[int, int, float]:
    """(equal flags, all (image, finding) pairs, largest |p_fast - p_fp32|)."""
    from cxr_batch.findings import FINDINGS
    from cxr_batch.results import read_results

    fast, exact = read_results(out_fast), read_results(out_exact)
    same = total = 0
    worst = 0.0
    exact_by_file = {r["file"]: r for r in exact}
    for row in fast:
        other = exact_by_file[row["file"]]
        if row["status"] != "ok":
            continue
        for f in FINDINGS:
            total += 1
            same += row[f"flag_{f}"] == other[f"flag_{f}"]
            worst = max(worst, abs(float(row[f"p_{f}"]) - float(other[f"p_{f}"])))
    return same, total, worst


def model_ceiling(weights: str | None) -> dict[str, float]:
    """Images/s of the model alone (batch 16, channels_last, tensors in memory) per precision."""
    import torch

    from cxr_batch.bundle import load_bundle
    from cxr_batch.inference import Engine
    from cxr_batch.runtime import RunPolicy, cpu_has_native_bf16

    bundle = load_bundle(weights)
    size = bundle.preprocessing.image_size
    x, t = torch.randn(16, 3, size, size), torch.rand(16, 3)
    rates = {}
    precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    for precision in precisions:
        engine = Engine(bundle, RunPolicy(torch.device("cpu"), precision), refine_margin=0.0)
        engine.logits(x, t)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5 or n < 32:
            engine.logits(x, t)
            n += 16
        rates[precision] = n / (time.perf_counter() - t0)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["png512", "png1024", "dicom"])
    ap.add_argument("--n", type=int, default=247, help="images in each PNG set")
    ap.add_argument("--dicom-n", type=int, default=16, help="images in each DICOM transfer syntax")
    ap.add_argument("--weights")
    args = ap.parse_args()
    from benchmarks.common import NIH

    cli = [sys.executable, "-m", "cxr_batch", "scan"]
    weights = ["--weights", args.weights] if args.weights else []
    peer = [sys.executable, str(REPO / "benchmarks" / "peer_xrv.py")]
    print(f"{os.cpu_count()} CPUs; whole processes, start-up counted; scan with --no-pdf")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {}
        if "png512" in args.sets:
            folders["png512 (512 x 512 PNG)"] = make_png_set(NIH / "images", args.n, tmp / "png512")
        if "png1024" in args.sets:
            folders["png1024 (1024 x 1024 PNG)"] = make_png_set(NIH / "full_res", args.n, tmp / "png1024")
        if "dicom" in args.sets:
            base = make_dicom_set(args.dicom_n, tmp / "dicom")
            for tag, what in (("raw", "uncompressed"), ("jls", "JPEG-LS"), ("j2k", "JPEG 2000")):
                folders[f"dicom 2500 x 2000 {what}"] = base / tag
        for label, folder in folders.items():
            n = sum(1 for p in folder.rglob("*") if p.is_file())
            warm(folder)
            t_peer = timed(peer + [str(folder), str(tmp / "peer.csv")])
            t_auto = timed(cli + [str(folder), "--out", str(tmp / f"auto_{label[:6]}"), "--no-pdf", "--quiet",
                                  *weights])
            t_fp32 = timed(cli + [str(folder), "--out", str(tmp / f"fp32_{label[:6]}"), "--no-pdf", "--quiet",
                                  "--precision", "fp32", *weights])
            same, total, worst = compare(tmp / f"auto_{label[:6]}" / "results.csv",
                                         tmp / f"fp32_{label[:6]}" / "results.csv")
            print(f"{label}, {n} images:")
            print(f"  peer (TorchXRayVision program) {t_peer:7.1f} s  ({n / t_peer:5.1f} images/s)")
            print(f"  cxr-batch scan, auto           {t_auto:7.1f} s  ({n / t_auto:5.1f} images/s)  "
                  f"{t_peer / t_auto:.2f}x the peer")
            print(f"  cxr-batch scan, fp32           {t_fp32:7.1f} s  ({n / t_fp32:5.1f} images/s)  "
                  f"{t_peer / t_fp32:.2f}x the peer")
            print(f"  flags auto vs fp32: {same} of {total} (image, finding) pairs equal "
                  f"({100 * same / max(total, 1):.2f}%); largest probability difference {worst:.4f}")
    rates = model_ceiling(args.weights)
    print("model alone (batch 16, tensors in memory): "
          + ", ".join(f"{p} {r:.1f} images/s" for p, r in rates.items()))


if __name__ == "__main__":
    main()
