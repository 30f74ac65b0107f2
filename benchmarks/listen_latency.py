"""The DICOM node end to end: C-STORE in -> SR delivered at the PACS, for single studies and a burst.

    python benchmarks/listen_latency.py [--single 20] [--burst 200] [--batch-size 8] [--max-wait 0.5]
                                        [--weights BUNDLE] [--pdf]

Runs ``cxr-batch listen --send-to PACS@127.0.0.1:P`` as a subprocess, with dcmtk's storescp as
the PACS, on real NIH images (512 x 512, 8 bit) sent as DX DICOMs in explicit VR little endian
by a pynetdicom modality in this process. Start-up is not counted: the clock starts once the
node answers C-ECHO and has scored one warm-up study. Latency: from sending the C-STORE to the study's SR file appearing at the
PACS (median, p95), one study at a time. Burst: --burst studies sent back to back in one
association; from the first C-STORE to the last SR at the PACS, studies/s, and the node's peak
RSS (process tree). No heatmaps; no PDFs unless --pdf.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import PeakMemory, bundle_path, real_images  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def radiographs(images: list[Path], n: int, prefix: str):
    """``n`` DX datasets cycling through ``images``, each a new instance (new UIDs)."""
    from cxr_batch.dicom_build import radiograph

    for i in range(n):
        pixels = np.asarray(Image.open(images[i % len(images)]).convert("L"))
        yield radiograph(pixels, PatientID=f"{prefix}{i:04d}", PatientSex="F", PatientAge="057Y", ViewPosition="PA")


def expected_sr(ds, sha256: str) -> str:
    """The SOPInstanceUID of the SR of ``ds`` (derived from source and model)."""
    from cxr_batch.sr import SourceImage, sr_uids

    source = SourceImage(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)
    return sr_uids(source, sha256)[0]


def associate(port: int):
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
    from pydicom.uid import ExplicitVRLittleEndian

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="CXRBATCH")


def wait_for_echo(port: int, node: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if node.poll() is not None:
            raise SystemExit(f"the node exited with {node.returncode}")
        assoc = associate(port)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise SystemExit("the node did not answer C-ECHO")


def stored_uids(folder: Path) -> set[str]:
    """SOPInstanceUIDs stored by storescp (files <modality prefix>.<SOPInstanceUID>)."""
    return {p.name.split(".", 1)[1] for p in folder.iterdir() if "." in p.name}


def wait_files(folder: Path, uids: set[str], timeout: float = 1800) -> float:
    """When every object of ``uids`` is at the PACS (monotonic clock)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if uids <= stored_uids(folder):
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"{len(uids - stored_uids(folder))} SRs never arrived")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-wait", type=float, default=0.5)
    ap.add_argument("--weights")
    ap.add_argument("--pdf", action="store_true", help="also make PDF reports (default: --no-pdf)")
    args = ap.parse_args()
    from cxr_batch.bundle import load_bundle

    images, weights = real_images(), bundle_path(args.weights)
    sha256 = load_bundle(weights).sha256
    singles = list(radiographs(images, args.single, "single"))
    bursts = list(radiographs(images, args.burst, "burst"))
    (warm_up,) = radiographs(images[-1:], 1, "warmup")
    size = len(warm_up.PixelData)
    print(f"input: NIH images as DX DICOM, 512 x 512 8-bit, explicit VR LE, {size / 1024:.0f} KiB of pixels each; "
          f"batch size {args.batch_size}, max wait {args.max_wait} s, {'with' if args.pdf else 'no'} PDFs, "
          f"no heatmaps; start-up not counted (the clock starts once the node answers C-ECHO and has scored one "
          f"warm-up study)")
    with tempfile.TemporaryDirectory(prefix="cxr-listen-bench-") as tmp:
        out, pacs_dir = Path(tmp) / "out", Path(tmp) / "pacs"
        pacs_dir.mkdir()
        port, pacs_port = free_port(), free_port()
        config = Path(tmp) / "node.toml"
        config.write_text(f"[listen]\nbatch_size = {args.batch_size}\nmax_wait = {args.max_wait}\n")
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = subprocess.Popen([sys.executable, "-m", "cxr_batch", "listen", "--out", str(out), "--port", str(port),
                                 "--send-to", f"PACS@127.0.0.1:{pacs_port}", "--config", str(config), "--weights",
                                 str(weights), "--no-heatmaps", *([] if args.pdf else ["--no-pdf"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_echo(port, node)
            latencies = []
            for ds in [warm_up, *singles]:
                assoc = associate(port)
                t0 = time.monotonic()
                assoc.send_c_store(ds)
                assoc.release()
                latencies.append(wait_files(pacs_dir, {expected_sr(ds, sha256)}) - t0)
            latencies = latencies[1:]
            if latencies:
                p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) >= 2 else latencies[0]
                print(f"single study, C-STORE in -> SR stored at the PACS: median {statistics.median(latencies):.2f} s, "
                      f"p95 {p95:.2f} s over {len(latencies)}")
            if bursts:
                with PeakMemory(node.pid) as mem:
                    assoc = associate(port)
                    t0 = time.monotonic()
                    for ds in bursts:
                        assoc.send_c_store(ds)
                    assoc.release()
                    received = time.monotonic() - t0
                    done = wait_files(pacs_dir, {expected_sr(ds, sha256) for ds in bursts}) - t0
                print(f"burst of {len(bursts)}: all received in {received:.1f} s, all SRs at the PACS in {done:.1f} s: "
                      f"{len(bursts) / done:.1f} studies/s; node peak RSS {mem.peak / 2**30:.2f} GiB (process tree)")
        finally:
            node.send_signal(signal.SIGTERM)
            print(f"node exit code after SIGTERM: {node.wait(timeout=300)}")
            pacs.terminate()
            pacs.wait(timeout=10)


if __name__ == "__main__":
    main()
