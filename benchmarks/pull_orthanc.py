"""``cxr-batch pull`` from a real Orthanc: studies/s of a backlog, and what a second pull costs.

    python benchmarks/pull_orthanc.py [--studies 40] [--weights BUNDLE] [--retrieve move|get]

Starts Orthanc (Debian's ``orthanc``, as tests/orthanc.py does) on loopback, uploads
``--studies`` real NIH radiographs (1024 x 1024, 8 bit) as DX DICOMs (explicit VR little endian),
one study each, on consecutive days, and runs as a user would::

    cxr-batch pull --from ORTHANC@127.0.0.1:P --port N --since 2000-01-01 --out DIR \\
        --send-to ORTHANC@127.0.0.1:P --hl7-to 127.0.0.1:H --no-pdf --device cpu

with an MLLP RIS (hl7apy, tests/ris.py) in this process. Prints the pull's own figure (from the
first query to the last result delivered, start-up excluded: its log's "in X s" line), the
command's wall time (start-up, model load included), and the second identical pull's wall time
(nothing retrieved, nothing sent). No heatmaps, no PDFs. ``--orthanc-nodelay`` starts Orthanc
with ``TCP_NODELAY=1``: its DICOM server (DCMTK) then turns Nagle's algorithm off, and its
answers no longer wait for the peer's delayed ACK. Checks that Orthanc holds one SR per
image and the RIS one message per study.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import REPO, bundle_path, real_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--weights", help="bundle folder (default: the bundled weights)")
    parser.add_argument("--retrieve", choices=["move", "get"], default="move")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--orthanc-nodelay", action="store_true",
                        help="start Orthanc with TCP_NODELAY=1 (DCMTK then turns Nagle's algorithm off)")
    args = parser.parse_args()

    from cxr_batch.dicom_build import radiograph
    from tests.orthanc import Orthanc, orthanc_missing
    from tests.ris import RIS
    from tests.watchkit import free_port

    if orthanc_missing(dicomweb=False):
        raise SystemExit(orthanc_missing(dicomweb=False))
    images = real_images()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        environment = {"TCP_NODELAY": "1"} if args.orthanc_nodelay else {}
        with Orthanc(root / "pacs", modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)}, dicomweb=False,
                     environment=environment) as pacs:
            day0 = dt.date(2024, 1, 1)
            for i in range(args.studies):
                ds = radiograph(np.asarray(Image.open(images[i % len(images)]).convert("L")), PatientID=f"B{i:04d}",
                                AccessionNumber=f"ACC{i:04d}", ViewPosition="PA",
                                StudyDate=(day0 + dt.timedelta(days=i)).strftime("%Y%m%d"))
                path = root / "upload.dcm"
                ds.save_as(path, enforce_file_format=True)
                pacs.rest("POST", "/instances", data=path.read_bytes())
            with RIS() as ris:
                cmd = [sys.executable, "-m", "cxr_batch", "pull", "--from", f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                       "--ae-title", "CXRBATCH", "--port", str(port), "--since", "2000-01-01", "--out",
                       str(root / "out"), "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--hl7-to",
                       str(ris.endpoint), "--no-pdf", "--no-heatmaps", "--device", "cpu", "--retrieve", args.retrieve,
                       "--batch-size", str(args.batch_size), "--weights", str(bundle_path(args.weights))]
                figures = []
                for _ in range(2):
                    start = time.perf_counter()
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    wall = time.perf_counter() - start
                    if done.returncode != 0:
                        raise SystemExit(f"pull exited {done.returncode}:\n{done.stderr[-3000:]}")
                    m = re.search(r"failed in ([\d.]+) s \(([\d.]+) studies/s\)", done.stderr)
                    figures.append((wall, float(m[1]), float(m[2])))
                srs = len(pacs.instances()) - args.studies
                messages = len(ris.received)
    (wall1, pull1, rate1), (wall2, pull2, _) = figures
    nagle = "TCP_NODELAY=1" if args.orthanc_nodelay else "Nagle on, its default"
    print(f"pull of {args.studies} studies from Orthanc ({nagle}; C-{args.retrieve.upper()}, "
          f"{bundle_path(args.weights).name}, cpu): {pull1:.1f} s from the first query to the last result delivered ({rate1:.2f} studies/s); "
          f"command wall time {wall1:.1f} s with start-up")
    print(f"second identical pull: nothing retrieved, nothing sent; {pull2:.1f} s of pulling, {wall2:.1f} s wall time")
    print(f"Orthanc holds {srs} SRs for {args.studies} images; the RIS received {messages} messages")


if __name__ == "__main__":
    main()
