"""Hostile senders against the DICOM node: how long until a modality gets through, and what the
node's memory does, per attack.

    python benchmarks/listen_attacks.py [--weights BUNDLE] [--object-mb 300] [--objects 3] [--no-tls]

Runs ``cxr-batch listen`` as a subprocess (default [listen] settings: 10 associations, 64 KiB
PDUs, handshake_timeout 10 s, pdu_timeout 30 s, min_rate 4 KiB/s after 60 s, scoring.max_file_bytes
1 GiB; no PDFs), once on a
plain port and once with TLS, and against each, one at a time, on loopback:

- idle TCP to the TLS port: one connection that sends nothing (TLS node only);
- idle beyond the limit: 20 TCP connections (twice max_associations) that send nothing, from
  four hosts (five each);
- one host's idle flood: 64 TCP connections (max_pending) from one host that send nothing (the
  node lets it have max_associations_per_host, 5, in their handshake and closes the rest);
- stalled mid-PDU: 10 associations (max_associations) asked for, each sending a P-DATA-TF
  header that declares 1,000 bytes and then 100 bytes: from one host (the node accepts
  max_associations_per_host, 5, of them) and from ten (one each: every slot held);
- trickling: ten hosts hold one association each (every slot) and send a C-ECHO-RQ every 20 s,
  each PDU whole and in time (dropped by min_rate once min_rate_grace, 60 s, has passed);
- gigabyte PDU: one association sends a P-DATA-TF header declaring 1.2 GB and pushes 1 GiB;
- big objects (plain node only): ``--objects`` C-STOREs of ``--object-mb`` MB each at once,
  streamed by pynetdicom from sparse files.

The attackers connect from other loopback addresses (127.0.0.2 and up: other hosts, as the node
sees them) than the modality (127.0.0.1). The attack is held while the clock runs: "held" is how
many connections or associations the node let the attacker hold (idle connections it closed at
once are not counted), "echo" the time until a
legitimate modality's C-ECHO succeeds (retrying every 0.5 s), "scored" until a C-STORE of a real
NIH radiograph, sent after the echo, has its row in results.csv. "RSS +" is the node process's peak resident memory during
the attack over its value just before (sampled every 20 ms from /proc; the reading workers are
other processes and receive nothing from the network).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path, real_images  # noqa: E402
from benchmarks.listen_latency import free_port  # noqa: E402
from tests.dicomwire import (P_DATA_TF, associate, closed_by_peer, command_set, connect, p_data,  # noqa: E402
                             pdu_header, push, tls_client)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


class PeakRss:
    """The peak of ``rss(pid)`` while in the block, sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, StopIteration):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Modality:
    """A legitimate sender (pynetdicom), over TLS when ``tls`` is a client context."""

    def __init__(self, port: int, tls: ssl.SSLContext | None):
        self.port, self.tls = port, tls

    def associate(self):
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
        ae.add_requested_context(Verification)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        return ae.associate("127.0.0.1", self.port, ae_title="CXRBATCH",
                            tls_args=(self.tls, "127.0.0.1") if self.tls else None)

    def echo(self) -> bool:
        assoc = self.associate()
        if not assoc.is_established:
            return False
        answer = assoc.send_c_echo()
        assoc.release()
        return bool(answer) and answer.Status == 0

    def store(self, ds) -> bool:
        assoc = self.associate()
        if not assoc.is_established:
            return False
        answer = assoc.send_c_store(ds)
        assoc.release()
        return bool(answer) and answer.Status == 0


def big_object(path: Path, size: int) -> Path:
    """A DX DICOM whose pixel data is ``size`` bytes of zeros, as a sparse file."""
    from cxr_batch.dicom_build import radiograph, save

    side = int((size // 2) ** 0.5)
    ds = radiograph(np.zeros((8, 8), np.uint8), PatientID="BIG")
    del ds.PixelData
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    save(ds, path)
    length = side * side * 2
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", length))
        f.truncate(f.tell() + length)
    return path


def send_file(port: int, path: Path, results: list) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    _config.STORE_SEND_CHUNKED_DATASET = True  # streamed from the file: the attacker's memory stays small
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBATCH", bind_address=(ATTACKER, 0))
    if not assoc.is_established:
        results.append("no association")
        return
    try:
        answer = assoc.send_c_store(path)
        results.append(f"0x{answer.Status:04X}" if answer and "Status" in answer else "no answer")
    except Exception as e:
        results.append(f"{type(e).__name__}: {e}")
    if assoc.is_established:
        assoc.release()


big_results: list[str] = []  # the big objects' C-STORE statuses
ATTACKER = "127.0.0.2"  # another host than the modality's 127.0.0.1, as the node sees it


def attacks(port: int, tls: ssl.SSLContext | None, args, tmp: Path) -> list[tuple[str, object]]:
    """(name, start) pairs; start() begins the attack and returns what to close when it ends."""

    def idle(n: int, hosts: int):
        def start():
            opened = [connect(port, source=f"127.0.0.{2 + k % hosts}") for k in range(n)]
            time.sleep(0.5)
            held = [sock for sock in opened if closed_by_peer(sock, within=0.01) is None]  # not closed at once
            for sock in opened:
                if sock not in held:
                    sock.close()
            return held
        return start

    def associations(hosts: int) -> list:
        held = []
        for k in range(10):
            try:
                held.append(associate(port, tls=tls, source=f"127.0.0.{2 + k % hosts}"))
            except AssertionError:  # refused: that host holds its share of the slots
                continue
        return held

    def stalled(hosts: int):
        def start():
            held = associations(hosts)
            for sock in held:
                sock.sendall(pdu_header(P_DATA_TF, 1000) + bytes(100))
            return held
        return start

    def trickling():
        held = associations(10)
        echo_rq = p_data(command_set(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030, MessageID=1,
                                     CommandDataSetType=0x0101))

        def drip():
            for _ in range(30):  # the answers are left unread: a few hundred bytes each
                for sock in held:
                    try:
                        sock.sendall(echo_rq)
                    except OSError:  # dropped by the node, or closed when the attack ends
                        pass
                time.sleep(20)

        threading.Thread(target=drip, daemon=True).start()
        return held

    def gigabyte():
        sock = associate(port, tls=tls, source=ATTACKER)
        sock.sendall(pdu_header(P_DATA_TF, 1_200_000_000))
        threading.Thread(target=push, args=(sock, 1 << 30), daemon=True).start()
        return [sock]

    def objects():
        path = big_object(tmp / "big.dcm", args.object_mb * 1_000_000)
        threads = [threading.Thread(target=send_file, args=(port, path, big_results), daemon=True)
                   for _ in range(args.objects)]
        for t in threads:
            t.start()
        return threads

    big_results.clear()
    chosen = []
    if tls is not None:
        chosen.append(("idle TCP to the TLS port (1)", idle(1, 1)))
    chosen += [("idle beyond the limit (20, 4 hosts)", idle(20, 4)),
               ("idle, one host (64 connections)", idle(64, 1)),
               ("stalled mid-PDU, one host (10 asked for)", stalled(1)),
               ("stalled mid-PDU, ten hosts (1 each)", stalled(10)),
               ("C-ECHO every 20 s, ten hosts (1 each)", trickling),
               ("PDU declaring 1.2 GB, 1 GiB pushed", gigabyte)]
    if tls is None and args.objects:
        chosen.append((f"{args.objects} objects of {args.object_mb} MB at once", objects))
    return chosen


def row_of(out: Path, patient_id: str) -> bool:
    try:
        return f",{patient_id}," in (out / "results.csv").read_text()
    except OSError:
        return False


def run_node(label: str, weights: Path, images: list[Path], args, tls_files: tuple[Path, Path] | None) -> None:
    from cxr_batch.dicom_build import radiograph

    with tempfile.TemporaryDirectory(prefix="cxr-listen-attacks-") as tmp:
        tmp = Path(tmp)
        out, port = tmp / "out", free_port()
        config = tmp / "node.toml"
        lines = ["[listen]"]
        if tls_files:
            lines += [f'tls_certificate = "{tls_files[1]}"', f'tls_key = "{tls_files[0]}"']
        config.write_text("\n".join(lines) + "\n")
        log = open(tmp / "node.log", "w")
        node = subprocess.Popen([sys.executable, "-m", "cxr_batch", "listen", "--out", str(out), "--port", str(port),
                                 "--config", str(config), "--weights", str(weights), "--no-pdf", "--no-heatmaps"],
                                stdout=subprocess.DEVNULL, stderr=log)
        tls = tls_client(tls_files[1]) if tls_files else None
        modality = Modality(port, tls)
        counter = iter(range(10_000))

        def scored_study() -> float:
            """Seconds from sending a new real radiograph to its row in results.csv."""
            i = next(counter)
            pixels = np.asarray(Image.open(images[i % len(images)]).convert("L"))
            ds = radiograph(pixels, PatientID=f"LEGIT{i:04d}", ViewPosition="PA")
            t0 = time.monotonic()
            while not modality.store(ds):
                time.sleep(0.5)
            while not row_of(out, f"LEGIT{i:04d}"):
                time.sleep(0.05)
            return time.monotonic() - t0

        try:
            end = time.monotonic() + 600
            while not modality.echo():
                if node.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"the node did not start: {(tmp / 'node.log').read_text()[-2000:]}")
                time.sleep(0.5)
            scored_study()  # warm-up
            print(f"\n{label} node (cxr-batch listen, default [listen] limits), warm; no attack: "
                  f"C-STORE -> row {scored_study():.2f} s, node RSS {rss(node.pid) / 2**20:.0f} MiB")
            print(f"  {'attack':<42} {'held':>5} {'echo':>7} {'scored':>8} {'RSS +':>9}")
            for name, start in attacks(port, tls, args, tmp):
                with PeakRss(node.pid) as mem:
                    held = start()
                    count = len(held)  # what the node let the attacker hold (connections, associations)
                    t0 = time.monotonic()
                    while not modality.echo():
                        time.sleep(0.5)
                    echo = time.monotonic() - t0
                    scored = echo + scored_study()
                    for thing in held:
                        if hasattr(thing, "close"):
                            thing.close()
                        else:
                            thing.join(timeout=300)
                print(f"  {name:<42} {count:>5} {echo:>6.1f}s {scored:>7.1f}s {(mem.peak - mem.start) / 2**20:>6.0f} MiB")
            if big_results:
                print(f"  the big objects' C-STORE answers: {', '.join(big_results)}")
            time.sleep(6)  # status.json is rewritten every heartbeat_interval (5 s)
            listen = json.loads((out / "status.json").read_text())["listen"]
            counts = {k: v for k, v in listen.items() if isinstance(v, int) and not isinstance(v, bool) and v}
            print(f"  status.json listen counters: {counts}")
        finally:
            node.send_signal(signal.SIGTERM)
            code = node.wait(timeout=300)
            log.close()
            print(f"  node exit code after SIGTERM: {code}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--object-mb", type=int, default=300)
    ap.add_argument("--objects", type=int, default=3, help="big objects sent at once (0: skip that attack)")
    ap.add_argument("--no-tls", action="store_true", help="only the plain node")
    args = ap.parse_args()
    images, weights = real_images(), bundle_path(args.weights)
    print(f"machine: {os.cpu_count()} CPUs; weights {weights}")
    run_node("plain", weights, images, args, None)
    if not args.no_tls and shutil.which("openssl"):
        with tempfile.TemporaryDirectory(prefix="cxr-listen-tls-") as folder:
            key, cert = Path(folder) / "node.key", Path(folder) / "node.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                            "/CN=node", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                            str(cert)], check=True, capture_output=True)
            run_node("TLS", weights, images, args, (key, cert))


if __name__ == "__main__":
    main()
