"""What an unlucky operator meets with ``cxr-batch watch`` on a PACS export folder: files copied
in slowly, stalled copies, Ctrl-C at any moment, odd folders. Each test runs the daemon as a
user starts it and reads what a user reads: results.csv, the reports, status.json."""

import pytest

from .watchkit import rows_now, start_daemon, status, stop, wait_for, watch_config

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
