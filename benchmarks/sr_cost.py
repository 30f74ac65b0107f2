"""What a DICOM SR per study costs: a scan with and without ``--dicom-sr``, the SR's build and
write time per study (from a profile of the SR run), and one C-STORE of an SR to a local dcmtk
``storescp`` when it is installed.

    python benchmarks/sr_cost.py [--n 40] [--weights BUNDLE]

Input: ``--n`` NIH radiographs (512 x 512) written as DX DICOMs (explicit VR, 8 bits). One
reading worker; no PDFs; start-up counted in both scan times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import real_images  # noqa: E402


def make_dicoms(n: int, dest: Path) -> Path:
    import numpy as np
    from PIL import Image

    from cxr_batch.dicom_build import radiograph, save

    for i, src in enumerate(real_images()[:n]):
        pixels = np.asarray(Image.open(src).convert("L"))
        save(radiograph(pixels, PatientAge="050Y", PatientSex="F", ViewPosition="PA"), dest / f"{i:03d}.dcm")
    return dest


def seconds_in(stats: pstats.Stats, function: str) -> float:
    return sum(v[3] for k, v in stats.stats.items() if k[2] == function and k[0].endswith("sr.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_seconds(files: list[Path], work: Path, repeats: int = 10) -> list[float] | None:
    """Seconds per C-STORE (one association each, as the node's sender does) to storescp."""
    if shutil.which("storescp") is None:
        return None
    from cxr_batch.integration.dicom_send import Destination, send_dataset

    port = free_port()
    (work / "pacs").mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(work / "pacs"), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        out = []
        for i in range(repeats):
            t0 = time.perf_counter()
            result = send_dataset(files[i % len(files)], Destination("PACS", "127.0.0.1", port))
            out.append(time.perf_counter() - t0)
            if not result.ok:
                raise SystemExit(f"storescp did not store the SR: {result.reason}")
        return out
    finally:
        scp.terminate()
        scp.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--weights")
    args = ap.parse_args()
    from cxr_batch.scan import ScanConfig, run_scan

    with tempfile.TemporaryDirectory(prefix="cxr-sr-cost-") as tmp:
        work = Path(tmp)
        studies = make_dicoms(args.n, work / "studies")
        options = dict(weights=args.weights, pdf=False, progress=False, workers=1)
        t0 = time.perf_counter()
        run_scan(studies, work / "plain", ScanConfig(**options))
        plain = time.perf_counter() - t0
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        run_scan(studies, work / "sr", ScanConfig(**options, dicom_sr=True))
        profile.disable()
        with_sr = time.perf_counter() - t0
        stats = pstats.Stats(profile)
        build, write = seconds_in(stats, "build_sr"), seconds_in(stats, "sr_bytes")
        print(f"{args.n} DX DICOMs (512 x 512, 8 bits), one reading worker, no PDFs, start-up counted")
        print(f"  scan without SRs {plain:.1f} s, with --dicom-sr {with_sr:.1f} s (under the profiler)")
        print(f"  per SR: build (highdicom) {build / args.n:.2f} s, write {write / args.n:.2f} s")
        sent = store_seconds(sorted((work / "sr" / "dicom").glob("*.dcm")), work)
        if sent is None:
            print("  C-STORE: storescp (dcmtk) not installed, not measured")
        else:
            sent.sort()
            print(f"  one C-STORE of an SR to storescp (own association): median {sent[len(sent) // 2] * 1000:.0f} ms "
                  f"over {len(sent)}")


if __name__ == "__main__":
    main()
