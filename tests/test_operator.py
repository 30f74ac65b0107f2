"""The unlucky operator (issue 21): mistakes a new operator makes, on real NIH images, through the CLI.

Each mistake is refused early with the reason and the fix, or the safe thing is done and said;
nothing scored is lost and nothing loops.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cxr_batch.folderlock import FolderLock
from cxr_batch.results import read_records, read_results
from cxr_batch.scan import ScanConfig, run_scan
from cxr_batch.study import Identifiers

from .dicomgen import grey, write
from .test_evaluate_calibrate import cli_here
from .watchkit import free_port, node_config, watch_config

JOURNAL = (".cxr-batch", "scan-journal.jsonl")
LOADED = "bundle sha256"  # the log line of a model that has loaded


def cli(*args, timeout=300):
    """The real command line in a process of its own."""
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def copies(tmp_path, images, name="many"):
    folder = tmp_path / name
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    return folder


def quick(bundle, **kw):
    """A fast in-process scan configuration (float32: rows are compared between runs)."""
    return ScanConfig(**{"weights": str(bundle), "device": "cpu", "precision": "fp32", "batch_size": 4, "workers": 0,
                         "progress": False, "heatmaps": False, **kw})


def journal_lines(out):
    try:
        return out.joinpath(*JOURNAL).read_text().count("\n")
    except OSError:
        return 0


def scored_as(row):
    """A row without its worklist_rank: a study's rank is among all the rows of the run it ends up in."""
    return {k: v for k, v in row.items() if k != "worklist_rank"}


def orphans(out):
    """Reports no row names (the worklist aside)."""
    named = {r["report"] for r in read_results(out / "results.csv")}
    return [p.name for p in (out / "reports").glob("cxr_*.pdf") if p.name not in named]


# ------------------------------------------------------------------ outputs apart from inputs
@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_scan_results_in_or_around_the_studies_are_refused_before_any_work(studies, tmp_path, small_bundle, where):
    out = {"is": studies, "inside": studies / "results", "contains": tmp_path}[where]
    before = listing(tmp_path)
    code, err = cli_here("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu")
    assert code == 2 and "the scanned folder" in err and "choose a folder outside it" in err, err
    assert f"--out {studies.parent / 'studies-results'}" in err  # a place that works
    assert LOADED not in err and listing(tmp_path) == before  # no model, nothing written


def test_watch_with_results_in_the_watched_folder_is_refused_instead_of_looping(studies, tmp_path, small_bundle):
    config = watch_config(tmp_path / "w.toml")
    before = listing(studies)
    for extra in (["--out", studies], ["--out", studies / "results"],
                  ["--out", tmp_path / "out", "--quarantine-dir", studies / "failed"]):
        proc = cli("watch", studies, *extra, "--weights", small_bundle, "--config", config, "--device", "cpu",
                   timeout=120)  # a daemon that loops never exits: the timeout fails the test
        assert proc.returncode == 2, proc.stderr
        assert "the watched folder" in proc.stderr and "choose a folder outside it" in proc.stderr
        assert LOADED not in proc.stderr and "Traceback" not in proc.stderr
    assert listing(studies) == before and not (tmp_path / "out").exists()


def test_listen_refuses_an_archive_around_its_spool_and_a_port_in_use_before_the_model(tmp_path, small_bundle):
    config = node_config(tmp_path / "node.toml", port=free_port())
    out = tmp_path / "node"
    proc = cli("listen", "--out", out, "--archive-dir", out, "--weights", small_bundle, "--config", config,
               "--device", "cpu", timeout=120)
    assert proc.returncode == 2 and "contains the spool" in proc.stderr, proc.stderr
    assert not out.exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("listen", "--out", out, "--port", port, "--weights", small_bundle, "--config", config,
                   "--device", "cpu", timeout=120)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "choose another --port" in proc.stderr and LOADED not in proc.stderr
    assert not out.exists()  # no empty results folder, ledger or status.json left behind


def test_evaluate_and_calibrate_refuse_outputs_inside_the_studies(studies, tmp_path, nih, small_bundle):
    before = listing(studies)
    common = ["--labels", nih / "labels.csv", "--weights", small_bundle, "--device", "cpu", "--workers", 0]
    for command in ("evaluate", "calibrate"):
        code, err = cli_here(command, studies, *common, "--out", studies / "site")
        assert code == 2 and "lies inside the s" in err and "choose a folder outside it" in err, (command, err)
    assert listing(studies) == before


def test_merge_never_writes_over_a_shard(studies, tmp_path, small_bundle):
    shards = []
    for i in range(2):
        run_scan(studies, tmp_path / f"s{i}", quick(small_bundle, pdf=False, shard=(i, 2)))
        shards.append(tmp_path / f"s{i}" / "results.csv")
    before = shards[0].read_bytes()
    for target in (shards[0], shards[1].parent / "run.json"):
        proc = cli("merge", *shards, "--out", target)
        assert proc.returncode == 1 and "would overwrite a shard" in proc.stderr, proc.stderr
    assert shards[0].read_bytes() == before
    assert cli("merge", *shards, "--out", tmp_path / "all.csv").returncode == 0


# ------------------------------------------------------------------ an interrupted scan
def start_scan(studies, out, bundle, *extra):
    return subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", str(studies), "--out", str(out), "--weights",
                             str(bundle), "--device", "cpu", "--precision", "fp32", "--batch-size", "2",
                             "--workers", "1", *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def interrupt_midway(proc, out, how):
    """Send ``how`` once some studies are written, long before the last."""
    end = time.time() + 240
    while journal_lines(out) < 4 and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    assert proc.poll() is None, "the scan ended before it could be interrupted"
    proc.send_signal(how)
    # reaped first: reading workers end once their scan is gone, and a zombie still looks alive
    returncode = proc.wait(timeout=240)
    return returncode, proc.stderr.read()


@pytest.mark.parametrize("how, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_scan_keeps_every_study_scored_and_resumes(tmp_path, nih_images, small_bundle, how, code):
    studies = copies(tmp_path, nih_images[:40])
    out = tmp_path / "out"
    returncode, err = interrupt_midway(start_scan(studies, out, small_bundle), out, how)
    assert returncode == code, err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {how.name}" in last and "--resume" in last and "Aborted" not in err
    rows = read_results(out / "results.csv")
    run = json.loads((out / "run.json").read_text())
    assert 0 < len(rows) < 40 and len(rows) == journal_lines(out) - 1  # every study scored is a row
    assert run["complete"] is False and run["stopped_by"] == how.name and "--resume" in run["how_to_finish"]
    assert run["files_not_scored"] == 40 - len(rows)
    assert orphans(out) == [] and not list(out.glob(".*.tmp"))
    if how == signal.SIGTERM:
        return
    # a plain scan into the folder is refused with the fix; nothing changes
    first = (out / "results.csv").read_bytes()
    again = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu")
    assert again.returncode == 1 and "unfinished scan" in again.stderr and "--resume" in again.stderr
    assert LOADED not in again.stderr and (out / "results.csv").read_bytes() == first
    # --resume finishes it: the rows scored before are kept as they were
    done = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--precision", "fp32",
               "--resume", "--quiet")
    assert done.returncode == 0, done.stderr
    final = {r["file"]: r for r in read_results(out / "results.csv")}
    assert len(final) == 40 and all(scored_as(final[r["file"]]) == scored_as(r) for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] is True and run["kept_from_earlier_scan"] == len(rows) and run["counts"] == {"ok": 40}
    assert orphans(out) == [] and len(list((out / "reports").glob("cxr_*.pdf"))) == 40


def test_a_killed_scan_leaves_nothing_the_next_one_does_not_clean_or_reuse(tmp_path, nih_images, small_bundle):
    studies = copies(tmp_path, nih_images[:80])
    out = tmp_path / "out"
    proc = start_scan(studies, out, small_bundle, "--no-pdf")
    interrupt_midway(proc, out, signal.SIGKILL)
    scored = journal_lines(out) - 1
    assert list(out.glob(".results.csv.*.tmp")) and not (out / "results.csv").exists()
    refused = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf")
    assert refused.returncode == 1 and "killed" in refused.stderr and "--resume" in refused.stderr
    done = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf",
               "--resume", "--quiet")
    assert done.returncode == 0, done.stderr
    assert not list(out.glob(".*.tmp")) and len(read_results(out / "results.csv")) == 80
    assert json.loads((out / "run.json").read_text())["kept_from_earlier_scan"] >= scored > 0


def test_a_second_scan_never_silently_replaces_the_first(studies, tmp_path, nih_images, small_bundle):
    out = tmp_path / "out"
    run_scan(studies, out, quick(small_bundle))
    first = (out / "results.csv").read_bytes()
    proc = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu")
    assert proc.returncode == 1 and "already holds the results of an earlier scan (6 rows)" in proc.stderr
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr and LOADED not in proc.stderr
    assert (out / "results.csv").read_bytes() == first
    # --overwrite: the earlier results go, and with them the report of a study no longer there
    gone = sorted(studies.iterdir())[0]
    gone.unlink()
    run_scan(studies, out, quick(small_bundle), earlier="overwrite")
    assert len(read_results(out / "results.csv")) == 5 and orphans(out) == []
    assert len(list((out / "reports").glob("cxr_*.pdf"))) == 5
    # --resume after one study changed and one came: only those two are read
    before = {r["file"]: r for r in read_results(out / "results.csv")}
    changed = sorted(studies.iterdir())[0]
    shutil.copy(nih_images[10], changed)
    shutil.copy(nih_images[11], studies / "new.png")
    summary = run_scan(studies, out, quick(small_bundle), earlier="resume")
    after = {r["file"]: r for r in read_results(out / "results.csv")}
    assert summary.kept == 4 and len(after) == 6 and orphans(out) == []
    assert all(scored_as(after[f]) == scored_as(before[f]) for f in before if f != changed.name)
    assert after[changed.name]["p_Mass"] != before[changed.name]["p_Mass"]
    # resuming with settings that change rows is refused
    proc = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--resume",
               "--urgent", "Mass")
    assert proc.returncode == 1 and "urgent" in proc.stderr and "--overwrite" in proc.stderr


def test_resume_and_overwrite_together_are_a_usage_error_that_keeps_the_first_scan(studies, tmp_path, small_bundle):
    # README: [--resume | --overwrite]; both given took the last one, so a `--resume` typed
    # before `--overwrite` deleted the earlier results the operator meant to keep
    out = tmp_path / "out"
    run_scan(studies, out, quick(small_bundle))
    before = listing(out), (out / "results.csv").read_bytes()
    for both in (["--resume", "--overwrite"], ["--overwrite", "--resume"]):
        code, err = cli_here("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", *both)
        assert code == 2 and "--resume and --overwrite" in err and LOADED not in err, err
        assert (listing(out), (out / "results.csv").read_bytes()) == before


def test_resume_of_a_scan_by_a_newer_release_is_refused_and_keeps_its_results(studies, tmp_path, small_bundle):
    # cxr-batch rolled back after an upgrade: --resume kept the newer scan's rows as this version
    # reads them and wrote results.csv again with this version's columns (the newer ones lost)
    out = tmp_path / "out"
    run_scan(studies, out, quick(small_bundle, pdf=False))
    journal = out.joinpath(*JOURNAL)
    header, rest = journal.read_text().split("\n", 1)
    journal.write_text(json.dumps({**json.loads(header), "journal": 2}) + "\n" + rest)
    before = listing(out), (out / "results.csv").read_bytes(), journal.read_bytes()
    code, err = cli_here("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf",
                         "--no-heatmaps", "--resume")
    assert code == 1 and "written by a newer cxr-batch (scan journal format 2" in err and LOADED not in err, err
    assert (listing(out), (out / "results.csv").read_bytes(), journal.read_bytes()) == before


def test_a_daemon_never_takes_over_a_scans_results_folder(studies, tmp_path, small_bundle):
    # `watch DIR --out RESULTS_OF_A_SCAN` rebuilt a ledger from the scan's results.csv and
    # appended its own studies to it: one results.csv, two runs, a run.json describing neither
    out = tmp_path / "out"
    run_scan(studies, out, quick(small_bundle, pdf=False))
    before = listing(out), (out / "results.csv").read_bytes()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for command in (["watch", incoming], ["listen", "--port", free_port()]):
        proc = cli(*command, "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf", timeout=120)
        assert proc.returncode == 1 and "holds the results of a scan" in proc.stderr, proc.stderr
        assert LOADED not in proc.stderr and "Traceback" not in proc.stderr
        assert (listing(out), (out / "results.csv").read_bytes()) == before


def test_a_busy_results_folder_is_refused_before_the_model_loads(studies, tmp_path, small_bundle):
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out, "scan"):
        proc = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu")
    assert proc.returncode == 1 and "is in use by cxr-batch scan" in proc.stderr
    assert LOADED not in proc.stderr and listing(out) == [".cxr-batch.lock"]


def test_a_scan_that_cannot_start_leaves_no_results_folder(studies, tmp_path, small_bundle, nih_images):
    proc = cli("scan", studies, "--out", tmp_path / "o1", "--weights", small_bundle, "--device", "cpu",
               "--metadata", nih_images[0])  # an image given as the metadata table
    assert proc.returncode == 1 and "is not a CSV file" in proc.stderr and LOADED not in proc.stderr
    shutil.copytree(small_bundle, tmp_path / "bad")
    with open(tmp_path / "bad" / "model.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    proc = cli("scan", studies, "--out", tmp_path / "o2", "--weights", tmp_path / "bad", "--device", "cpu")
    assert proc.returncode == 1 and "checksum" in proc.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ metadata that matches nothing
def test_metadata_that_matches_no_file_is_said_with_counts_and_an_example(studies, tmp_path, nih, small_bundle):
    table = pd.read_csv(nih / "labels.csv", dtype=str)
    renamed = table.assign(**{"Image Index": "IMG_" + table["Image Index"]})  # the images were renamed since
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    out = tmp_path / "out"
    proc = cli("scan", studies, "--out", out, "--metadata", tmp_path / "renamed.csv", "--weights", small_bundle,
               "--device", "cpu", "--no-pdf")
    assert proc.returncode == 0 and len(read_results(out / "results.csv")) == 6  # the scan still runs
    first = sorted(p.name for p in studies.iterdir())[0]
    # names shown by their shape (a name may identify the patient): the difference still shows
    assert "has a row for 0 of 6 files" in proc.stderr and "e.g. file '99999999_999.png' has no row" in proc.stderr
    assert "names files like 'XXX_99999999_999.png'" in proc.stderr and "Fix:" in proc.stderr
    assert first not in proc.stderr
    match = json.loads((out / "run.json").read_text())["metadata_match"]
    assert match["matched"] == 0 and match["files"] == 6 and match["unmatched_example"] == first
    # half of them: said too; all of them: nothing to say
    table[~table["Image Index"].isin(sorted(p.name for p in studies.iterdir())[:3])].to_csv(tmp_path / "half.csv",
                                                                                             index=False)
    run_scan(studies, tmp_path / "o2", quick(small_bundle, pdf=False, metadata=str(tmp_path / "half.csv")))
    assert json.loads((tmp_path / "o2" / "run.json").read_text())["metadata_match"]["matched"] == 3
    run_scan(studies, tmp_path / "o3", quick(small_bundle, pdf=False, metadata=str(nih / "labels.csv")))
    match = json.loads((tmp_path / "o3" / "run.json").read_text())["metadata_match"]
    assert match["matched"] == match["files"] == 6 and match["unmatched_example"] == ""


def test_dicom_files_are_not_counted_as_missing_from_the_metadata_table(tmp_path, small_bundle):
    """The quick start: 3 PNGs with a table, 3 DICOMs whose headers carry the patient data. The
    table covers every file that needs it, so there is nothing to warn about."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    proc = cli("scan", examples / "studies", "--out", tmp_path / "out", "--metadata", examples / "metadata.csv",
               "--weights", small_bundle, "--device", "cpu", "--no-pdf")
    assert proc.returncode == 0, proc.stderr
    assert "has a row for" not in proc.stderr
    match = json.loads((tmp_path / "out" / "run.json").read_text())["metadata_match"]
    assert match["matched"] == match["files"] == 3
    rows = read_results(tmp_path / "out" / "results.csv")
    assert len(rows) == 6 and all(r["age_source"].startswith(("header:", "metadata")) for r in rows)


# ------------------------------------------------------------------ smaller things
def test_findings_are_typed_in_any_case_and_a_typo_gets_a_suggestion(studies, tmp_path, small_bundle):
    from cxr_batch.watch import WatchConfig

    out = tmp_path / "out"
    proc = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf",
               "--urgent", "pneumothorax,pleural thickening")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "run.json").read_text())["config"]["urgent"] == ["Pneumothorax", "Pleural_Thickening"]
    assert WatchConfig(urgent=("EFFUSION",)).urgent == ("Effusion",)  # a [watch] or [scan] table too
    typo = cli("scan", studies, "--out", tmp_path / "o2", "--urgent", "Pnumothorax")
    assert typo.returncode == 2 and "did you mean Pneumothorax" in typo.stderr


@pytest.mark.parametrize("empty", ["", ",", " , "])
def test_an_empty_urgent_list_is_a_usage_error_not_a_silent_end_of_the_urgent_bucket(studies, tmp_path, empty):
    # `--urgent "$URGENT"` with the variable unset scored every pneumothorax as merely abnormal
    code, err = cli_here("scan", studies, "--out", tmp_path / "out", "--urgent", empty)
    assert code == 2 and "names no finding" in err and "urgent = []" in err, err
    assert not (tmp_path / "out").exists()


def test_study_date_reads_as_a_date_in_pandas_and_back_as_dicom(tmp_path, nih_images, small_bundle):
    studies = tmp_path / "studies"
    write(studies / "one.dcm", grey(nih_images[0]), StudyDate="20240301")
    run_scan(studies, tmp_path / "out", quick(small_bundle, pdf=False))
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert table["study_date"].tolist() == ["2024-03-01"]  # text, not the float 20240301.0
    assert read_records(tmp_path / "out" / "results.csv")[0].ids.study_date == "20240301"  # DICOM DA again


def test_a_date_in_another_spelling_is_read_not_cut_to_eight_characters(tmp_path, nih_images, small_bundle):
    """An ACR-NEMA date (2024.03.01: old archives) or an ISO one is the same date; a value no
    date can be read from is kept whole, never cut into another-looking value ('2024-13-')."""
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), StudyDate="2024.03.01", PatientBirthDate="1950.02.03")
    write(studies / "b.dcm", grey(nih_images[1]), StudyDate="2024-13-45")
    run_scan(studies, tmp_path / "out", quick(small_bundle, pdf=False))
    table = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str).set_index("file")
    assert table.loc["a.dcm", "study_date"] == "2024-03-01"
    assert table.loc["b.dcm", "study_date"] == "2024-13-45"
    records = {r.file: r for r in read_records(tmp_path / "out" / "results.csv")}
    assert records["a.dcm"].ids.study_date == "20240301"
    ids = Identifiers(study_date="2024-03-01", patient_birth_date="1950-02-03")  # e.g. from a metadata CSV
    assert (ids.study_date, ids.patient_birth_date) == ("20240301", "19500203")
    assert Identifiers(study_date=" 20240301 ").study_date == "20240301"


def test_a_header_value_pydicom_finds_invalid_is_not_printed(tmp_path, nih_images, small_bundle):
    """pydicom warns about invalid header values by quoting them ('Invalid value for VR DA:
    '1950-02-03''): a birth date, a name, an ID in the log, beside library paths. The log carries
    no patient identifier; what matters to the result is said in its notes, without the value."""
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientBirthDate="1950-02-03", PatientAge="58 years",
          PatientID="ZQ" * 40, StudyDate="2024-13-45")
    proc = cli("scan", studies, "--out", tmp_path / "out", "--weights", small_bundle, "--device", "cpu", "--dicom-sr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for leak in ("1950-02-03", "58 years", "ZQZQ", "2024-13-45", "UserWarning", "valuerep"):
        assert leak not in proc.stderr, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str).iloc[0]
    assert "age" in row["notes"] and row["age_source"] == "unknown"



def test_log_lines_do_not_break_the_progress_bar(studies, tmp_path, small_bundle):
    """On a terminal: a warning printed mid-scan starts a line of its own, above the bar."""
    import fcntl
    import pty
    import struct
    import termios

    (studies / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # an error row: a warning line
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", str(studies), "--out", str(tmp_path / "o"),
                             "--weights", str(small_bundle), "--device", "cpu", "--no-pdf", "--batch-size", "1",
                             "--workers", "0"], stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the scan is done
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert proc.wait(timeout=300) == 3  # the broken file's row
    text = output.decode("utf-8", "replace")
    assert "scan: " in text and "%|" in text  # the bar was drawn
    (warning,) = [p for p in text.replace("\r", "\n").split("\n") if "corrupt or truncated PNG" in p]
    assert warning.startswith("cxr-batch: row 7 (file#"), warning  # not glued to the end of a bar


def test_status_json_is_exact_json_even_on_a_full_disk(small_disk):
    from cxr_batch.watch import write_status

    path = small_disk / "status.json"
    write_status(path, {"state": "running", "reason": ""})
    assert path.read_bytes() == (json.dumps({"state": "running", "reason": ""}, indent=2) + "\n").encode()
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the volume to the last block
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    with pytest.raises(OSError):  # not even a temp file fits now
        (small_disk / "probe").write_bytes(b"x" * 4096)
    degraded = {"state": "degraded", "reason": "OSError: [Errno 28] No space left on device"}
    write_status(path, degraded)
    assert json.loads(path.read_bytes()) == degraded and path.read_bytes().endswith(b"}\n")


def test_worklist_footer_says_page_n_of_m(tmp_path):
    from pypdf import PdfReader

    from cxr_batch.reports import ReportOptions, worklist_pdf

    from .test_reports import NOW, model_info, scored

    records = [scored({"Mass": 0.9 if i % 2 else 0.2}, file=f"s{i}.png", patient_id=f"P{i:03d}") for i in range(70)]
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), model_info(), NOW))
    texts = [page.extract_text() for page in PdfReader(tmp_path / "w.pdf").pages]
    assert len(texts) >= 2
    for n, txt in enumerate(texts, start=1):
        assert f"Page {n} of {len(texts)}" in txt


def test_no_encapsulated_pdf_for_a_png_and_a_note_says_why(tmp_path, nih_images, small_bundle):
    studies = copies(tmp_path, nih_images[:1], "mixed")
    write(studies / "one.dcm", grey(nih_images[1]))
    run_scan(studies, tmp_path / "out", quick(small_bundle, dicom_pdf=True))
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    png = rows[nih_images[0].name]
    assert "no DICOM encapsulated PDF: the source is not a DICOM image" in png["notes"]
    assert not (tmp_path / "out" / "reports" / png["report"].replace(".pdf", ".dcm")).exists()
    assert (tmp_path / "out" / "reports" / rows["one.dcm"]["report"].replace(".pdf", ".dcm")).is_file()


def test_metadata_counts_only_the_files_whose_content_needs_a_row(tmp_path, nih, nih_images, small_bundle):
    """A hostile export: a DICOM named .png, a DICOM without its preamble, a PNG named .dcm, an
    empty file, a text file named .dcm, a FIFO and a symbolic-link loop. Only a PNG or JPEG by
    content needs a row: DICOM headers carry the patient data, and files that are no image
    (empty, text, not a regular file) are never scored, so 'N get no patient data and are
    scored with...' must not count them. Nothing hangs."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "studies" / "dicom"
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(examples / "NIH00100" / "STUDY1" / "SERIES1" / "IM0001.dcm", studies / "dicom_named.png")
    dicom = (examples / "NIH00574" / "STUDY1" / "SERIES1" / "IM0001").read_bytes()
    (studies / "nopreamble.dcm").write_bytes(dicom[132:])
    shutil.copy(nih_images[0], studies / nih_images[0].name)  # a PNG the table has
    shutil.copy(nih_images[1], studies / "png_named.dcm")  # a PNG it has not
    (studies / "empty.png").write_bytes(b"")
    (studies / "notes.dcm").write_text("exported by hand\n")
    os.mkfifo(studies / "pipe.png")
    (studies / "loop_a").symlink_to("loop_b")
    (studies / "loop_b").symlink_to("loop_a")
    out = tmp_path / "out"
    proc = cli("scan", studies, "--out", out, "--metadata", nih / "labels.csv", "--weights", small_bundle,
               "--device", "cpu", "--no-pdf", timeout=300)
    assert proc.returncode == 3, proc.stderr  # the empty file, the FIFO and the loop failed, with their rows
    assert "has a row for 1 of 2 files" in proc.stderr and "1 get no patient data" in proc.stderr
    match = json.loads((out / "run.json").read_text())["metadata_match"]
    assert match["files"] == 2 and match["matched"] == 1 and match["unmatched_example"] == "png_named.dcm"
    rows = {r["file"]: r for r in read_results(out / "results.csv")}
    assert {f for f, r in rows.items() if r["status"] == "ok"} == {"dicom_named.png", "nopreamble.dcm",
                                                                   nih_images[0].name, "png_named.dcm"}
    assert rows["nopreamble.dcm"]["age_source"].startswith("header:")
    assert rows[nih_images[0].name]["age_source"] == "metadata"


def test_a_file_rewritten_after_it_was_read_is_read_again_by_resume(tmp_path, nih_images, small_bundle):
    """A study corrected in place (same path) while the scan runs, after its batch was read but
    before the scan noted its content for --resume: the journal took the hash of the corrected
    file for the row of the first version, so --resume kept the first version's row as if it
    were the correction's. Now a file that changed since it was listed is never kept by
    --resume: it is read again."""
    from cxr_batch.reports import report_name

    studies, out = tmp_path / "studies", tmp_path / "out"
    studies.mkdir()
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="FIRST")
    correction = write(tmp_path / "correction.dcm", grey(nih_images[1]), PatientID="CORRECTED")
    pause = tmp_path / "pause"  # the scan waits before its journal entry while this file exists
    pause.touch()
    scan = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", studies, "--out", out, "--weights",
                             small_bundle, "--device", "cpu", "--workers", "0"],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CXR_BATCH_PAUSE_AT": "journal", "CXR_BATCH_PAUSE_FILE": str(pause)})
    try:
        end = time.time() + 120
        while not (out / "reports" / report_name("a.dcm")).exists() and time.time() < end:
            time.sleep(0.1)
        (studies / "a.dcm").write_bytes(correction.read_bytes())
    finally:
        pause.unlink()
        assert scan.wait(timeout=120) == 0, scan.stderr.read()
    assert read_results(out / "results.csv")[0]["patient_id"] == "FIRST"  # what was read then
    proc = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert read_results(out / "results.csv")[0]["patient_id"] == "CORRECTED"


def test_ctrl_c_while_the_scan_starts_scores_nothing(tmp_path, nih_images, small_bundle):
    """Ctrl-C while the model loads (a wrong folder typed, seen at once): the scan went on to
    read and score a whole first batch, made its reports, and only then stopped. Now a stop
    asked for before any batch scores nothing: exit 130 with the one line saying --resume."""
    studies, out = copies(tmp_path, nih_images[:6]), tmp_path / "out"
    pause = tmp_path / "pause"  # the scan waits here once its model has loaded
    pause.touch()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", studies, "--out", out, "--weights",
                             small_bundle, "--device", "cpu", "--batch-size", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CXR_BATCH_PAUSE_AT": "loaded", "CXR_BATCH_PAUSE_FILE": str(pause)})
    try:
        err = ""
        while LOADED not in err:
            line = proc.stderr.readline()
            assert line, err
            err += line
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    finally:
        pause.unlink()
    returncode = proc.wait(timeout=120)
    err += proc.stderr.read()
    assert returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT" in err.strip().splitlines()[-1] and "--resume" in err.strip().splitlines()[-1]
    assert read_results(out / "results.csv") == [] and not list(out.glob("reports/cxr_*.pdf"))
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] is False and run["files_not_scored"] == 6


def test_ctrl_c_while_the_command_line_starts_is_one_line_and_exit_130(tmp_path, studies, small_bundle):
    """Ctrl-C in the first tenth of a second, while Python imports click and the command line
    (before a scan's stop handler is in place), printed a KeyboardInterrupt traceback and exited
    -2 or 1. Now: one line and 130, the exit code the README gives for SIGINT."""
    pause = tmp_path / "pause"  # the process waits here, at start-up, before the command line is imported
    pause.touch()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", studies, "--out", tmp_path / "out",
                             "--weights", small_bundle, "--device", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CXR_BATCH_PAUSE_AT": "starting", "CXR_BATCH_PAUSE_FILE": str(pause)})
    try:
        end = time.time() + 60
        while not Path(f"{pause}.here").exists() and proc.poll() is None and time.time() < end:
            time.sleep(0.02)
        assert proc.poll() is None, "the process never paused at start-up"
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
    finally:
        pause.unlink()
    assert proc.wait(timeout=60) == 130, err
    assert err.strip().splitlines() == ["cxr-batch: interrupted (Ctrl-C) while starting: nothing was read or written"]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_scans_stop_handler_is_one_line_and_exit_130(tmp_path, studies, small_bundle,
                                                                        monkeypatch):
    """A Ctrl-C after the command line is imported but before the scan's own handler is installed
    (click reading the options) was click's "Aborted!" and exit 1."""
    from cxr_batch.stopping import StopSignal

    monkeypatch.setattr(StopSignal, "install", lambda self: signal.raise_signal(signal.SIGINT))
    code, err = cli_here("scan", studies, "--out", tmp_path / "out", "--weights", small_bundle, "--device", "cpu")
    assert code == 130 and "Aborted" not in err, err
    assert err.strip().splitlines() == ["cxr-batch: interrupted (Ctrl-C): stopped"]
    assert not (tmp_path / "out").exists()


def test_a_scan_refused_a_folder_another_scan_just_made_leaves_that_folder_and_its_lock(studies, tmp_path,
                                                                                        small_bundle):
    """Two scans started at the same moment into a new --out: the one that found no folder
    but lost the lock to the other "cleaned up the folder it had made": it deleted the other
    scan's lock file (and the folder, when nothing else was in it yet), so a third scan could
    take the folder while the first still wrote it. Now a scan that did not get the lock
    touches nothing."""
    out, pause = tmp_path / "out", tmp_path / "pause"
    pause.touch()  # the second scan waits here after it found no results folder
    second = subprocess.Popen([sys.executable, "-m", "cxr_batch", "scan", studies, "--out", out, "--weights",
                               small_bundle, "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "CXR_BATCH_PAUSE_AT": "created",
                                              "CXR_BATCH_PAUSE_FILE": str(pause)})
    end = time.time() + 120
    while not Path(f"{pause}.here").exists() and time.time() < end:
        time.sleep(0.1)
    out.mkdir()
    with FolderLock(out, "scan"):  # the first scan: it made the folder and holds it
        pause.unlink()
        assert second.wait(timeout=120) == 1 and "is in use by cxr-batch scan" in second.stderr.read()
        assert (out / ".cxr-batch.lock").exists()
        third = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu")
        assert third.returncode == 1 and "is in use by cxr-batch scan" in third.stderr, third.stderr


def test_a_file_given_for_a_folder_or_a_folder_for_a_file_says_what_to_give(nih, tmp_path):
    # click said "Directory 'x.png' is a file." and "File 'shard0' is a directory.", not what to give
    image = sorted((nih / "images").glob("*.png"))[0]
    proc = cli("scan", image, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "STUDIES is a folder" in proc.stderr and "put it in a folder" in proc.stderr, \
        proc.stderr
    bundle = Path(__file__).parents[1] / "weights" / "cxr-fpn-v3"
    proc = cli("scan", nih / "images", "--out", tmp_path / "o", "--weights", bundle / "model.pt")
    assert proc.returncode == 2 and f"give the bundle's folder: --weights {bundle}" in proc.stderr, proc.stderr
    (tmp_path / "shard0").mkdir()
    (tmp_path / "shard0" / "results.csv").write_text("file\n")
    proc = cli("merge", tmp_path / "shard0", "--out", tmp_path / "merged.csv")
    assert proc.returncode == 2 and f"give its results.csv: {tmp_path / 'shard0' / 'results.csv'}" in proc.stderr, \
        proc.stderr
    proc = cli("scan", nih / "images", "--out", tmp_path / "o", "--metadata", nih)
    assert proc.returncode == 2 and "--metadata takes the table itself, a CSV file" in proc.stderr, proc.stderr
    proc = cli("evaluate", nih / "images", "--out", tmp_path / "o", "--labels", nih)
    assert proc.returncode == 2 and "--labels takes the table itself, a CSV file" in proc.stderr, proc.stderr
    proc = cli("watch", image, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "watch takes the folder that studies arrive in" in proc.stderr, proc.stderr
    proc = cli("monitor", tmp_path / "shard0" / "results.csv", "--out", tmp_path / "m")
    assert proc.returncode == 2 and f"give the folder that holds it: {tmp_path / 'shard0'}" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "merged.csv").exists()


def test_a_results_csv_no_scan_wrote_is_not_called_an_earlier_scan(tmp_path):
    # an --out holding the user's own results.csv was refused as "the results of an earlier scan",
    # and the --overwrite that message offered deleted the user's file
    from cxr_batch.journal import EarlierResults, plan

    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("patient,finding\n17,none\n")
    with pytest.raises(EarlierResults) as refused:
        plan(out, "refuse", tmp_path / "studies", {})
    message = str(refused.value)
    assert "earlier scan" not in message and "no cxr-batch scan wrote" in message, message
    assert "--overwrite would delete it" in message, message
    assert (out / "results.csv").read_text() == "patient,finding\n17,none\n"


def test_ctrl_c_before_a_command_starts_its_work_exits_130_with_one_line(monkeypatch, tmp_path, nih):
    # a Ctrl-C while evaluate (or calibrate, monitor) still imported its modules ended in click's
    # "Aborted!" and exit 1, the code of "nothing could be done", not 130 as the README says
    from click.testing import CliRunner

    import cxr_batch.cli as cli_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "setup_logging", interrupted)
    result = CliRunner().invoke(cli_module.main, ["evaluate", str(nih / "images"), "--labels",
                                                  str(nih / "labels.csv"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 130, (result.exit_code, result.output)
    assert "interrupted (Ctrl-C)" in result.output and "Aborted!" not in result.output, result.output
    assert not (tmp_path / "e").exists()


def test_resuming_with_other_settings_names_them_as_the_options_are_typed(studies, tmp_path, nih, small_bundle):
    # `--resume --metadata labels.csv` after a scan without one said "(metadata_sha256: None then,
    # 'bd8c7c...' now)" and a --no-pdf forgotten "(pdf: False then, True now)": the journal's keys,
    # not the options the operator gives
    from cxr_batch.journal import EarlierResults

    out = tmp_path / "out"
    run_scan(studies, out, quick(small_bundle, pdf=False))
    with pytest.raises(EarlierResults) as refused:
        run_scan(studies, out, quick(small_bundle, metadata=str(nih / "labels.csv"), urgent=("Pneumonia",),
                                     shard=(0, 2), scoring={"views": ["PA"]}), earlier="resume")
    message = str(refused.value)
    assert "--metadata: none then, a table now" in message, message
    assert "--no-pdf then, not now" in message, message
    assert "--urgent: Pneumothorax then, Pneumonia now" in message, message
    assert "--shard: none then, 0/2 now" in message, message
    assert "[scoring] views: PA, AP then, PA now" in message, message
    assert "None" not in message and "sha256" not in message and "True" not in message, message


@pytest.fixture()
def read_only(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs as root (whom modes do not stop),
    else a folder of mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a read-only tmpfs is not allowed here")
        yield folder
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_an_out_that_cannot_be_written_is_named_as_out(studies, tmp_path, nih, small_bundle, read_only):
    # a read-only --out said "/srv/ro/.cxr-batch.lock: Read-only file system" (a lock file the
    # operator never made) or, for calibrate, "/srv/ro/.new.vdjfbgz3.tmp: ..."; a parent that is a
    # file "/srv/file/out: Not a directory": never which option to change
    (tmp_path / "file").write_text("not a folder")
    labels = ["--labels", nih / "labels.csv"]
    run_scan(studies, tmp_path / "scanned", quick(small_bundle, pdf=False))
    for command, out in ((["scan", studies], read_only), (["scan", studies], tmp_path / "file" / "out"),
                         (["evaluate", studies, *labels], read_only / "eval"),
                         (["calibrate", studies, *labels], read_only / "new"),
                         (["watch", studies], read_only), (["monitor", tmp_path / "scanned"], read_only / "m")):
        weights = [] if command[0] == "monitor" else ["--weights", small_bundle, "--device", "cpu"]
        proc = cli(*command, "--out", out, *weights, timeout=120)
        assert proc.returncode == 1 and f"cannot write --out {out}: " in proc.stderr, (command, proc.stderr)
        assert "give a folder this user can write to" in proc.stderr and LOADED not in proc.stderr, proc.stderr


def test_a_status_json_that_cannot_be_written_is_said_once_until_it_changes(tmp_path, caplog):
    # OUT replaced by a file, or status.json by a folder: every heartbeat (5 s) logged
    # "status.json not written" again, burying the line that said what went wrong
    import logging

    from cxr_batch.watch import StatusFile

    path = tmp_path / "status.json"
    path.mkdir()  # a folder where the file goes: the rename over it fails
    status = StatusFile(path)
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        for _ in range(5):
            status.write({"state": "running"})
    said = [r.getMessage() for r in caplog.records if "status.json" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("status.json not written: "), said
    path.rmdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        status.write({"state": "running"})
        status.write({"state": "running"})
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [r.getMessage() for r in caplog.records if "status.json" in r.getMessage()] == ["status.json written again"]


@pytest.fixture()
def bound(studies, tmp_path):
    """``studies`` mounted again at another path (``mount --bind``, as an export folder is
    reached through a second mount point); needs root, skipped otherwise."""
    mount = tmp_path / "export"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(studies), str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a bind mount is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_results_in_the_input_folder_reached_through_another_mount_are_refused(studies, bound, tmp_path,
                                                                             small_bundle):
    """The watched folder reached through a bind mount of the results' parent: the paths differ,
    so the check by path let it through, and each append to results.csv was read as a new study,
    a "skipped" row appended, without end (58 rows in a minute)."""
    config = watch_config(tmp_path / "w.toml")
    before = listing(studies)
    for command, out in (("watch", studies / "results"), ("scan", studies / "results"), ("watch", studies)):
        proc = cli(command, bound, "--out", out, "--weights", small_bundle, "--device", "cpu",
                   *(["--config", config] if command == "watch" else []), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "choose a folder outside it" in proc.stderr and LOADED not in proc.stderr
    assert listing(studies) == before


def test_results_on_a_mount_of_a_folder_inside_the_input_are_refused(studies, tmp_path, small_bundle):
    """``--out /mnt/results``, /mnt/results a bind mount of a folder inside the watched one: the
    comparison by inode walked up the output's path (/mnt, /), never the folder it really lies
    in, and results.csv was written into the watched tree, each append read as a new study."""
    inside = studies / "results"
    inside.mkdir()
    mount = tmp_path / "results"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(inside), str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a bind mount is not allowed here")
    try:
        config = watch_config(tmp_path / "w.toml")
        before = listing(studies)
        for out in (mount, mount / "new"):
            proc = cli("watch", studies, "--out", out, "--weights", small_bundle, "--device", "cpu",
                       "--config", config, timeout=120)
            assert proc.returncode == 2, proc.stderr
            assert "choose a folder outside it" in proc.stderr and LOADED not in proc.stderr
        assert listing(studies) == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
