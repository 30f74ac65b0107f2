"""What a DICOM SR per study costs: a scan with and without ``--dicom-sr``; per SR, highdicom's
build and write against the per-bundle template's fill (cxr_batch.sr.SRFactory), with the
ratio, on the scan's own records; and one C-STORE of an SR to a local dcmtk ``storescp`` when
it is installed.

    python benchmarks/sr_cost.py [--n 40] [--weights BUNDLE]

Input: ``--n`` NIH radiographs (512 x 512) written as DX DICOMs (explicit VR, 8 bits). One
reading worker; no PDFs; start-up counted in both scan times. The two SR paths are timed one
after the other on the same records (each SR once per path); both must give the same bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
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


def scored_records(studies: Path, results: Path) -> list:
    """The scan's records as the SR writer gets them: results.csv's scores, the DICOM's header."""
    import pydicom

    from cxr_batch.dicom import identifiers
    from cxr_batch.record import StudyRecord
    from cxr_batch.results import read_results

    records = []
    for row in read_results(results):
        record = StudyRecord.from_row(row)
        record.ids = identifiers(pydicom.dcmread(studies / row["file"], stop_before_pixels=True))
        records.append(record)
    return records


def sr_paths(records: list, weights: str | None) -> tuple[float, float, float, float]:
    """Seconds per SR: highdicom build, its write, the template fill; and the template's making."""
    from cxr_batch.bundle import load_bundle
    from cxr_batch.sr import SRFactory, build_sr, sr_bytes

    bundle = load_bundle(weights)
    created = dt.datetime.now()
    build = write = 0.0
    reference = []
    for record in records:
        t0 = time.perf_counter()
        sr = build_sr(record, bundle, created)
        t1 = time.perf_counter()
        reference.append(sr_bytes(sr))
        build, write = build + t1 - t0, write + time.perf_counter() - t1
    factory = SRFactory(bundle)
    t0 = time.perf_counter()
    if factory.template(records[0].ids.sop_class_uid) is None:
        raise SystemExit("the SR template was refused: see the log")
    make = time.perf_counter() - t0
    t0 = time.perf_counter()
    filled = [factory.sr_bytes(record, created) for record in records]
    fill = time.perf_counter() - t0
    if filled != reference:
        raise SystemExit("the template's SRs differ from highdicom's")
    n = len(records)
    return build / n, write / n, fill / n, make


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
        t0 = time.perf_counter()
        run_scan(studies, work / "sr", ScanConfig(**options, dicom_sr=True))
        with_sr = time.perf_counter() - t0
        build, write, fill, make = sr_paths(scored_records(studies, work / "plain" / "results.csv"), args.weights)
        print(f"{args.n} DX DICOMs (512 x 512, 8 bits), one reading worker, no PDFs, start-up counted")
        print(f"  scan without SRs {plain:.1f} s, with --dicom-sr {with_sr:.1f} s")
        print(f"  per SR, highdicom: build {build:.3f} s + write {write:.3f} s = {build + write:.3f} s")
        print(f"  per SR, template fill (same bytes): {fill * 1000:.1f} ms, {(build + write) / fill:.0f}x faster; "
              f"making the template once: {make:.2f} s")
        sent = store_seconds(sorted((work / "sr" / "dicom").glob("*.dcm")), work)
        if sent is None:
            print("  C-STORE: storescp (dcmtk) not installed, not measured")
        else:
            sent.sort()
            print(f"  one C-STORE of an SR to storescp (own association): median {sent[len(sent) // 2] * 1000:.0f} ms "
                  f"over {len(sent)}")


if __name__ == "__main__":
    main()
