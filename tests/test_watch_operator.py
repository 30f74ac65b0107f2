"""What an unlucky operator meets with ``cxr-batch watch`` on a PACS export folder: files copied
in slowly, stalled copies, Ctrl-C at any moment, odd folders. Each test runs the daemon as a
user starts it and reads what a user reads: results.csv, the reports, status.json."""

import shutil
from pathlib import Path

import pytest

from .dicomgen import grey, write
from .watchkit import ctrl_c_pressed_again_and_again, rows_now, start_daemon, status, stop, wait_for, watch_config

pytestmark = pytest.mark.slow

def test_a_png_whose_copy_stalled_past_the_deadline_ends_with_one_ok_row(tmp_path, nih_images, small_bundle):
    """A copy that stalls longer than broken_deadline gets an error row for what had arrived; when
    the rest arrives, the whole image is scored and its row replaces that error (a PNG has no
    UID: the two versions have different keys, and results.csv kept both rows, an error for a
    file that reads fine)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    data = nih_images[0].read_bytes()
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", broken_deadline=1.0))
    try:
        with open(incoming / "slow.png", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            assert wait_for(lambda: [r["status"] for r in rows_now(out)] == ["error"])
            f.write(data[len(data) // 2:])
        assert wait_for(lambda: any(r["status"] == "ok" for r in rows_now(out)))
        assert wait_for(lambda: status(out).get("pending") == 0)
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert [(r["file"], r["status"]) for r in rows] == [("slow.png", "ok")]
    assert (out / "reports" / rows[0]["report"]).is_file()


def test_ctrl_c_pressed_again_and_again_stops_the_daemon_cleanly(tmp_path, nih_images, small_bundle):
    """A terminal's Ctrl-C goes to the daemon and its reading workers, and an operator presses
    it more than once: the daemon stops as after one, exit 0 and status.json "stopped" (the
    presses after the first, while Python exited, killed it by SIGINT)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    for p in nih_images[:4]:
        shutil.copy(p, incoming / p.name)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"), start_new_session=True)
    try:
        assert wait_for(lambda: len(rows_now(out)) >= 1)
        with ctrl_c_pressed_again_and_again(daemon):
            _, stderr = daemon.communicate(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert status(out)["state"] == "stopped"
    assert len({r["file"] for r in rows_now(out)}) == len(rows_now(out))


def test_results_csv_deleted_under_the_daemon_comes_back_with_every_study(tmp_path, nih_images, small_bundle):
    """An operator deletes (or moves away) results.csv while the daemon runs: the next study's
    row made a new results.csv holding that row alone, every study before it gone from it
    until the next restart."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    for p in nih_images[:2]:
        shutil.copy(p, incoming / p.name)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    try:
        assert wait_for(lambda: len(rows_now(out)) == 2)
        (out / "results.csv").unlink()
        shutil.copy(nih_images[2], incoming / nih_images[2].name)
        assert wait_for(lambda: status(out).get("studies_reported") == 3 and status(out).get("pending") == 0)
        assert len(rows_now(out)) == 3  # published before the heartbeat said 3
    finally:
        assert stop(daemon) == 0
    assert sorted(r["file"] for r in rows_now(out)) == sorted(p.name for p in nih_images[:3])


def embedded_images(pdf, tmp_path) -> set[str]:
    """The sha256 of each image a PDF embeds (poppler's pdfimages)."""
    import hashlib
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    subprocess.run(["pdfimages", "-png", str(pdf), str(folder / "i")], check=True, timeout=60)
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.skipif(shutil.which("pdfimages") is None, reason="poppler's pdfimages not installed")
def test_a_report_made_again_never_shows_the_image_now_at_the_studys_path(tmp_path, nih_images, small_bundle):
    """PACS exports reuse names (IM0001.dcm). A report missing at start (deleted, or the results
    folder removed) is made again from the file at the study's path: when another patient's
    image has since been exported under that name, it went into this patient's report."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    write(incoming / "IM0001.dcm", grey(nih_images[0]), PatientID="FIRST")
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(rows_now(out)) == 1)
        write(incoming / "IM0001.dcm", grey(nih_images[1]), PatientID="SECOND")  # another study, the same name
        assert wait_for(lambda: len(rows_now(out)) == 2)
    finally:
        assert stop(daemon) == 0
    rows = {r["patient_id"]: r for r in rows_now(out)}
    first_report = out / "reports" / rows["FIRST"]["report"]
    first_image = embedded_images(first_report, tmp_path)
    first_report.unlink()
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: first_report.exists() and status(out).get("state") == "running")
    finally:
        assert stop(daemon) == 0
    second_image = embedded_images(out / "reports" / rows["SECOND"]["report"], tmp_path)
    assert not embedded_images(first_report, tmp_path) & second_image
    assert first_image and not first_image & second_image  # the check can tell the two apart
    row = {r["patient_id"]: r for r in rows_now(out)}["FIRST"]
    assert "without the image" in row["notes"]
