"""The watch daemon with a real DICOM sender: storescp writes into the watched folder, storescu
sends; SIGKILL mid-stream and restart; slow writers, duplicates and malformed files."""

import signal
import subprocess
import time
from collections import Counter

import numpy as np
import pytest

from .dicomgen import grey, have, write
from .watchkit import free_port, rows_now, start_daemon, status, wait_for


@pytest.mark.slow
@pytest.mark.skipif(not have("storescp", "storescu"), reason="dcmtk not installed")
def test_storescp_stream_with_sigkill_restart_is_exactly_once(tmp_path, nih_images, small_bundle):
    incoming, out, send = tmp_path / "incoming", tmp_path / "out", tmp_path / "send"
    incoming.mkdir()
    config = tmp_path / "watch.toml"
    config.write_text("[watch]\nbatch_size = 4\nmax_wait = 0.3\nsettle = 0.5\nbroken_deadline = 4.0\n"
                      "rescan_interval = 2.0\nworkers = 0\n")
    files = [write(send / f"{i:02d}.dcm", grey(p), PatientID=f"P{i:02d}") for i, p in enumerate(nih_images[:12])]
    port = free_port()
    scp = subprocess.Popen(["storescp", "--output-directory", str(incoming), "-aet", "CXR", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        time.sleep(0.5)
        subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(str, files[:6])], check=True,
                       capture_output=True, timeout=60)
        assert wait_for(lambda: len(rows_now(out)) >= 2), daemon.stderr.read() if daemon.poll() is not None else ""
        sender = subprocess.Popen(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(str, files[6:])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon.send_signal(signal.SIGKILL)  # mid-stream: some sent, some being received
        daemon.wait()
        sender.wait(timeout=60)
        # a re-sent instance, a malformed file, and a slow writer while the daemon is down and after
        subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), str(files[0])], check=True,
                       capture_output=True, timeout=60)
        (incoming / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
        slow_src = write(send / "slow.dcm", grey(nih_images[12]), PatientID="SLOW").read_bytes()
        daemon = start_daemon(incoming, out, small_bundle, config)
        with open(incoming / "slow.dcm", "wb") as f:
            for i in range(0, len(slow_src), len(slow_src) // 6):
                f.write(slow_src[i:i + len(slow_src) // 6])
                f.flush()
                time.sleep(0.4)  # written in chunks over about 2.5 s
        assert wait_for(lambda: len(rows_now(out)) >= 14), [r["file"] for r in rows_now(out)]
        time.sleep(2.5)  # a rescan or two more: nothing may be added twice
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        for proc in (daemon, scp):
            if proc.poll() is None:
                proc.kill()
    rows = rows_now(out)
    ok = [r for r in rows if r["status"] == "ok"]
    counts = Counter(r["sop_uid"] for r in ok)
    assert len(ok) == 13 and all(c == 1 for c in counts.values())  # 12 sent + the slow one, each once
    assert {r["patient_id"] for r in ok} == {f"P{i:02d}" for i in range(12)} | {"SLOW"}
    errors = [r for r in rows if r["status"] == "error"]
    assert [r["file"] for r in errors] == ["garbage.dcm"]
    for r in ok:
        pdf = out / "reports" / r["report"]
        assert pdf.exists() and pdf.read_bytes().rstrip().endswith(b"%%EOF")
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".results")]
    assert leftovers == []
    assert (out / "reports" / "worklist.pdf").exists() and status(out)["state"] == "stopped"
