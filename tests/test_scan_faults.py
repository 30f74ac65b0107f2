"""Faults under a scan and the sending of its results: a full disk, a kill at the worst moment,
a receiver that goes away. What the operator is told, what is kept, and that --resume ends with
the rows a scan without the fault writes."""

import json
import os
import shutil
import subprocess
import sys

from cxr_batch.journal import read_journal
from cxr_batch.results import read_results
from cxr_batch.scan import run_scan

from .test_operator import JOURNAL, cli, copies, quick, scored_as
from .watchkit import ctrl_c_pressed_again_and_again, wait_for


def same_numbers(results):
    """{file: row} without when it was scored (nor its rank among the rows of its run)."""
    return {r["file"]: {k: v for k, v in scored_as(r).items() if k != "scored_at"} for r in read_results(results)}


def assert_same_rows(rows: dict, clean: dict) -> None:
    """The same studies with the same values; numbers to within 1e-5. A resumed scan batches the
    studies left otherwise than a clean one, and float32 kernels chosen by batch size may sum in
    another order: a probability's sixth decimal may differ (seen in CI), nothing a reader sees."""
    assert rows.keys() == clean.keys()
    for name, row in rows.items():
        assert row.keys() == clean[name].keys(), name
        for column, value in row.items():
            if value == clean[name][column]:
                continue
            try:
                assert abs(float(value) - float(clean[name][column])) <= 1e-5, (name, column, value, clean[name][column])
            except ValueError:
                assert value == clean[name][column], (name, column)


def scan_cli(studies, out, bundle, *extra):
    return cli("scan", studies, "--out", out, "--weights", bundle, "--device", "cpu", "--precision", "fp32",
               "--batch-size", "4", "--workers", "0", "--no-pdf", "--quiet", *extra)


def test_a_disk_full_mid_scan_is_said_and_resume_ends_with_the_rows_of_a_clean_scan(tmp_path, nih_images,
                                                                                   small_bundle, small_disk):
    """The journal or results.csv could not be written: the scan ended with 'error: : No space
    left on device' (no file named, nothing on what was kept), and the journal kept half a line
    that the next --resume glued its first entry to (that study lost from the journal)."""
    studies = copies(tmp_path, nih_images[:40])
    clean = tmp_path / "clean"
    run_scan(studies, clean, quick(small_bundle, pdf=False))
    out = small_disk / "out"
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # room for a few batches, not for 40
    full = scan_cli(studies, out, small_bundle)
    assert full.returncode == 1, full.stderr
    said = full.stderr
    assert "No space left on device" in said and "--resume" in said and "Traceback" not in said, said
    assert ": : " not in said and "kept" in said, said
    assert not (out / "results.csv").exists() and not list(out.glob(".*.tmp"))
    text = out.joinpath(*JOURNAL).read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no line cut short
    (small_disk / "filler").unlink()
    done = scan_cli(studies, out, small_bundle, "--resume")
    assert done.returncode == 0, done.stderr
    rows = same_numbers(out / "results.csv")
    assert_same_rows(rows, same_numbers(clean / "results.csv"))
    assert set(read_journal(out.joinpath(*JOURNAL))[1]) == set(rows)  # a later resume keeps every study


def test_a_scan_killed_before_its_results_were_queued_says_so_and_resume_sends_them(tmp_path, nih_images,
                                                                                   small_bundle):
    """Killed after results.csv and run.json, before its ORUs were queued: `outbound list` and
    `outbound send` said the folder was 'not a results folder of ... a scan with --hl7-to', so
    the operator read 'nothing to send' and the RIS never got them. Now they say the results
    were never queued and that --resume queues and sends them; it does, each once."""
    import os
    import signal
    import subprocess
    import sys

    from .dicomgen import grey, write
    from .ris import RIS
    from .watchkit import free_port

    studies = tmp_path / "studies"
    studies.mkdir()
    for i, p in enumerate(nih_images[:3]):
        write(studies / f"s{i}.dcm", grey(p), PatientID=f"P{i}", AccessionNumber=f"ACC{i}")
    out = tmp_path / "out"
    args = ["scan", studies, "--out", out, "--weights", small_bundle, "--device",
            "cpu", "--no-pdf", "--quiet"]
    killed = subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args), "--hl7-to", f"127.0.0.1:{free_port()}"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "CXR_BATCH_KILL_AT": "send"})
    assert killed.returncode == -signal.SIGKILL and len(read_results(out / "results.csv")) == 3
    for command in ("list", "send"):
        said = cli("outbound", command, "--out", out)
        assert said.returncode == 1 and "never queued" in said.stderr and "--resume" in said.stderr, said.stderr
    with RIS() as ris:
        done = cli(*args, "--hl7-to", f"127.0.0.1:{ris.endpoint.port}", "--resume")
        assert done.returncode == 0, done.stderr
        assert sorted(m.split("|")[9] for m in map(str, ris.received)) == sorted(
            {m.split("|")[9] for m in map(str, ris.received)}) and len(ris.received) == 3


def test_ctrl_c_pressed_again_and_again_while_the_reading_workers_start_is_a_clean_stop(tmp_path, nih_images,
                                                                                       small_bundle):
    """A terminal's Ctrl-C reaches the whole process group, the reading workers and their fork
    server too: one that reached the fork server while it started killed it, and the scan ended
    with "error: unexpected EOFError" (exit 1, no run.json to --resume from); one pressed again
    while the stopped scan exited printed a KeyboardInterrupt traceback."""
    studies, out, pause = copies(tmp_path, nih_images[:4]), tmp_path / "out", tmp_path / "pause"
    pause.touch()
    scan = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", studies, "--out", out, "--weights", small_bundle,
                             "--device", "cpu", "--workers", "2", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "CXR_BATCH_PAUSE_AT": "created", "CXR_BATCH_PAUSE_FILE": str(pause)})
    try:
        assert wait_for(pause.with_name("pause.here").exists)  # the workers start next
        pause.unlink()
        with ctrl_c_pressed_again_and_again(scan):
            _, stderr = scan.communicate(timeout=300)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert scan.returncode == 130, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert "stopped by SIGINT" in stderr and "--resume" in stderr
    assert json.loads((out / "run.json").read_text())["complete"] is False
