"""An unlucky operator's faults on the batch commands (monitor, evaluate): a disk that fills up
under --out is said as such, naming the folder and the file, and never leaves a report beside a
summary of other results; the advice given is one the same command accepts."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from .test_evaluate_calibrate import cli_here as here
from .test_monitor_same_output import synthetic_results
from .test_watch_faults import fill as fill_volume


def fill(disk, leave: int) -> None:
    """Fill the tmpfs ``disk`` until only about ``leave`` bytes are free."""
    filler = fill_volume(disk)
    os.truncate(filler, max(filler.stat().st_size - leave, 0))


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_monitor_on_a_full_disk_names_out_and_keeps_the_last_pair_of_reports(small_disk, tmp_path):
    results = synthetic_results(tmp_path / "results", 120, seed=0, shift_from=80)
    out = small_disk / "monitor"
    code, _ = here("monitor", results, "--out", out, "--window", "40")
    assert code == 5 and {"monitor.json", "monitor.pdf"} <= set(os.listdir(out))
    before = hashes(out)
    # room for a new monitor.json, not for its PDF: the new summary beside the last run's PDF
    # would describe other windows than the PDF shows
    fill(small_disk, (out / "monitor.json").stat().st_size + 16384)
    code, stderr = here("monitor", results, "--out", out, "--window", "30")
    assert code == 1
    assert f"cannot write --out {out}" in stderr and "No space left on device" in stderr
    assert ": : " not in stderr
    assert hashes(out) == before  # the last complete pair, no temp file


def test_evaluate_stopped_by_a_full_disk_mid_scan_gives_advice_evaluate_accepts(small_disk, studies, nih,
                                                                                small_bundle):
    out = small_disk / "evaluation"
    fill(small_disk, 4096)
    code, stderr = here("evaluate", studies, "--labels", nih / "labels.csv", "--weights", small_bundle, "--out", out,
                        "--bootstrap", "0", "--workers", "0", "-q")
    assert code == 1 and "No space left on device" in stderr
    assert "--resume" not in stderr  # evaluate has no such option ("No such option '--resume'")
    assert "the same command" in stderr
    (small_disk / "filler").unlink()
    code, stderr = here("evaluate", studies, "--labels", nih / "labels.csv", "--weights", small_bundle, "--out", out,
                        "--bootstrap", "0", "--workers", "0", "-q")
    assert code == 0, stderr
    assert {"evaluation.json", "evaluation.pdf", "results.csv"} <= set(os.listdir(out))


def test_scan_overwrite_stopped_by_a_full_disk_gives_advice_the_command_line_accepts(small_disk, studies,
                                                                                     small_bundle, tmp_path):
    out = small_disk / "results"
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(studies.iterdir()), one)
    options = ("--weights", small_bundle, "--out", out, "--no-pdf", "--workers", "0", "-q")
    assert here("scan", one, *options)[0] == 0  # what --overwrite deletes leaves too little room for 6 rows
    scan = ("scan", studies, *options)
    fill(small_disk, 0)
    code, stderr = here(*scan, "--overwrite")
    assert code == 1 and "No space left on device" in stderr
    # the same command with --resume added is a usage error (--resume and --overwrite together)
    assert "--resume in place of --overwrite" in stderr
    (small_disk / "filler").unlink()
    code, stderr = here(*scan, "--resume")
    assert code == 0, stderr
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 6


def test_calibrate_on_a_full_disk_names_out_not_its_temporary_folder(small_disk, studies, nih, small_bundle):
    """The weights are copied into a temporary folder beside --out first: a full disk there was
    said as 'error: DISK/.site.sr9uessp.tmp/model.pt: No space left on device', a folder the
    operator never made, with no word of what to do."""
    fill(small_disk, 0)
    out = small_disk / "site"
    code, stderr = here("calibrate", studies, "--labels", nih / "labels.csv", "--weights", small_bundle, "--out", out,
                        "--workers", "0", "-q")
    assert code == 1 and f"cannot write --out {out}" in stderr and "No space left on device" in stderr
    assert "free space on its volume" in stderr
    assert os.listdir(small_disk) == ["filler"]  # no bundle, no temporary folder


def test_calibrate_whose_out_another_calibration_filled_meanwhile_says_so_and_keeps_that_bundle(
        tmp_path, studies, nih, small_bundle, monkeypatch):
    """Two calibrations given the same --out at once: both find it free, and the one that ends
    second was told 'cannot write --out OUT: Directory not empty; give a folder this user can
    write to', advice that does not fit. It must say that another bundle is there now, keep that
    bundle as it is, and leave no temporary folder."""
    import cxr_batch.calibrate

    out = tmp_path / "site"
    scored = cxr_batch.calibrate.score_labelled

    def meanwhile(*args, **kwargs):  # the other calibration puts its bundle in place while this one scores
        result = scored(*args, **kwargs)
        shutil.copytree(small_bundle, out, dirs_exist_ok=True)
        return result

    monkeypatch.setattr(cxr_batch.calibrate, "score_labelled", meanwhile)
    code, stderr = here("calibrate", studies, "--labels", nih / "labels.csv", "--weights", small_bundle, "--out", out,
                        "--workers", "0", "-q")
    assert code == 1
    assert "Directory not empty" not in stderr and "can write to" not in stderr, stderr
    assert f"--out {out}" in stderr and "meanwhile" in stderr and "another --out" in stderr, stderr
    assert hashes(out) == hashes(small_bundle)
    assert sorted(os.listdir(tmp_path)) == ["site", "studies"]


def test_evaluate_and_calibrate_of_an_empty_folder_exit_4_as_scan_does(tmp_path, nih, small_bundle):
    """An unmounted share or a wrong path: scan says 'no files' and exits 4; evaluate and
    calibrate exited 1 with '30 label rows have no file', as if the labels were wrong."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for command, out in (("evaluate", tmp_path / "evaluation"), ("calibrate", tmp_path / "site")):
        code, stderr = here(command, empty, "--labels", nih / "labels.csv", "--weights", small_bundle, "--out", out,
                            "--workers", "0", "-q")
        assert code == 4, (command, stderr)
        assert f"error: no files under {empty}" in stderr, stderr
        assert not (out / "evaluation.json").exists() and not (out / "manifest.json").exists()


def test_files_written_together_stay_as_they_were_when_the_second_cannot_be_renamed(tmp_path, monkeypatch):
    """atomic_write_files renamed monitor.pdf into place, then failed renaming monitor.json over
    the last run's (a share refuses to replace a file open in a viewer: PermissionError): a new PDF
    beside the last run's json, the mixed pair the function is there to prevent."""
    import cxr_batch.files
    from cxr_batch.files import atomic_write_files

    pdf, js = tmp_path / "monitor.pdf", tmp_path / "monitor.json"
    pdf.write_bytes(b"old pdf")
    js.write_bytes(b"old json")
    real_replace = os.replace

    def replace(src, dst):  # monitor.pdf is renamed first
        if os.fspath(dst) == os.fspath(js):
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(cxr_batch.files.os, "replace", replace)
    with pytest.raises(PermissionError):
        atomic_write_files({pdf: b"new pdf", js: b"new json"})
    monkeypatch.undo()
    assert (pdf.read_bytes(), js.read_bytes()) == (b"old pdf", b"old json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.json", "monitor.pdf"]  # no temp file left
