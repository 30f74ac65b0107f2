"""merge: one whole sharded scan or nothing, unless a partial merge is asked for."""

import json
import shutil
import subprocess
import sys

import pytest

from cxr_batch.results import MergeError, merge_results, read_results
from cxr_batch.scan import ScanConfig, run_scan


def scan_shards(root, images, bundle, prefix: str, pdf: bool):
    """Shards 0/2 and 1/2 of ``images`` scanned into ROOT/PREFIX0 and ROOT/PREFIX1."""
    (root / "studies").mkdir()
    for p in images:
        shutil.copy(p, root / "studies" / p.name)
    for i in range(2):
        run_scan(root / "studies", root / f"{prefix}{i}", ScanConfig(weights=str(bundle), device="cpu", batch_size=4,
                                                                      workers=0, progress=False, pdf=pdf, shard=(i, 2)))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, nih_images, small_bundle):
    """Folders of shards 0/2 and 1/2 of the same 6 images: results.csv with run.json."""
    root = tmp_path_factory.mktemp("shards")
    scan_shards(root, nih_images[:6], small_bundle, "s", pdf=False)
    return root


@pytest.fixture()
def shards(scanned, tmp_path):
    """This test's own copy of the shard folders: results.csv paths."""
    out = []
    for i in range(2):
        shutil.copytree(scanned / f"s{i}", tmp_path / f"s{i}")
        out.append(tmp_path / f"s{i}" / "results.csv")
    return out


def merge_cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_batch", "merge", *map(str, args)], capture_output=True, text=True)


def test_every_shard_merges_and_one_missing_is_refused(shards, tmp_path):
    assert merge_results(shards, tmp_path / "all.csv") == 6
    with pytest.raises(MergeError, match=r"shard\(s\) 1/2 missing"):
        merge_results(shards[:1], tmp_path / "half.csv")
    assert not (tmp_path / "half.csv").exists()
    refused = merge_cli(shards[0], "--out", tmp_path / "half.csv")
    assert refused.returncode == 1 and "1/2 missing" in refused.stderr and "--allow-partial" in refused.stderr
    partial = merge_cli(shards[0], "--out", tmp_path / "half.csv", "--allow-partial")
    assert partial.returncode == 0 and "partial merge: shard(s) 1/2 missing" in partial.stderr
    assert len(read_results(tmp_path / "half.csv")) == 3


def test_shards_of_other_scans_are_refused(shards, tmp_path):
    run = json.loads((shards[1].parent / "run.json").read_text())
    (shards[1].parent / "run.json").write_text(json.dumps({**run, "weights_sha256": "f" * 64}))
    with pytest.raises(MergeError, match="different weights"):
        merge_results(shards, tmp_path / "m.csv")
    (shards[1].parent / "run.json").write_text(json.dumps({**run, "config": {**run["config"], "shard": [1, 3]}}))
    with pytest.raises(MergeError, match="different splits"):
        merge_results(shards, tmp_path / "m.csv", allow_partial=True)


def test_a_results_file_without_its_run_json_needs_allow_partial(shards, tmp_path):
    lone = tmp_path / "copied" / "results.csv"
    lone.parent.mkdir()
    shutil.copy(shards[1], lone)
    with pytest.raises(MergeError, match="no readable run.json"):
        merge_results([shards[0], lone], tmp_path / "m.csv")
    assert merge_results([shards[0], lone], tmp_path / "m.csv", allow_partial=True) == 6


def test_a_run_json_that_is_not_an_object_is_read_as_unreadable(shards, tmp_path):
    # a run.json holding a list (another tool's, edited by hand) ended `merge` in an
    # AttributeError traceback; the scan's own reader of run.json took it as absent
    (shards[1].parent / "run.json").write_text("[1, 2]\n")
    refused = merge_cli(*shards, "--out", tmp_path / "m.csv")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "no readable run.json" in refused.stderr
    assert merge_results(shards, tmp_path / "m.csv", allow_partial=True) == 6

def test_out_in_a_folder_not_made_yet_is_made_and_one_that_cannot_be_is_one_error_line(shards, tmp_path):
    # `merge shard*/results.csv --out final/results.csv` ended in a FileNotFoundError traceback
    made = merge_cli(*shards, "--out", tmp_path / "final" / "results.csv")
    assert made.returncode == 0, made.stderr
    assert len(read_results(tmp_path / "final" / "results.csv")) == 6
    (tmp_path / "a-file").write_text("not a folder")
    refused = merge_cli(*shards, "--out", tmp_path / "a-file" / "results.csv")
    lines = refused.stderr.splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert lines[0].endswith("a-file is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_out_that_is_not_a_results_file_is_never_replaced(shards, tmp_path):
    # `--out studies/00000001_000.png` replaced a radiograph with the CSV (read-only or not: the
    # write is a rename), and `--out merged/` wrote a file named 'merged' where a folder was meant
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    image.chmod(0o444)
    refused = merge_cli(*shards, "--out", image)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "not a cxr-batch results.csv" in refused.stderr
    assert image.read_bytes() == b"\x89PNG\r\n\x1a\nnot really"
    slash = merge_cli(*shards, "--out", f"{tmp_path / 'merged'}/")
    assert slash.returncode == 2 and "a folder" in slash.stderr, slash.stderr
    assert not (tmp_path / "merged").exists()
    again = tmp_path / "merged.csv"  # an earlier merge's output is replaced, as before
    for _ in range(2):
        assert merge_cli(*shards, "--out", again).returncode == 0
    assert len(read_results(again)) == 6


def test_a_merge_of_shards_with_reports_writes_the_whole_worklist_in_merged_rank_order(tmp_path, nih_images,
                                                                                      small_bundle):
    """Each shard's worklist.pdf numbers its own studies 1..k; the merged results.csv ranks them
    all (a shard's #1 was the merged #3), and no worklist showed that order: a radiologist
    reading the shards' worklists read in the wrong order."""
    from pypdf import PdfReader

    from .dicomgen import grey, write

    (tmp_path / "studies").mkdir()
    for p in nih_images[:7]:
        shutil.copy(p, tmp_path / "studies" / p.name)
    # results.csv holds no names: the merged worklist said 'name not recorded' of every study
    write(tmp_path / "studies" / "named.dcm", grey(nih_images[7]), PatientName="ROE^RICHARD")
    for i in range(2):
        run_scan(tmp_path / "studies", tmp_path / f"s{i}", ScanConfig(
            weights=str(small_bundle), device="cpu", workers=0, progress=False, shard=(i, 2), title="Night batch"))
    done = merge_cli(tmp_path / "s0" / "results.csv", tmp_path / "s1" / "results.csv",
                     "--out", tmp_path / "merged" / "results.csv")
    assert done.returncode == 0, done.stderr
    worklist = tmp_path / "merged" / "worklist.pdf"
    assert f"-> {worklist}" in done.stderr
    text = " ".join(page.extract_text() for page in PdfReader(worklist).pages)
    rows = sorted((int(r["worklist_rank"]), r["report"]) for r in read_results(tmp_path / "merged" / "results.csv"))
    positions = [text.index(report) for _, report in rows]
    assert len(rows) == 8 and positions == sorted(positions) and "Night batch: worklist" in text
    assert "ROE, RICHARD" in text
    # shards scanned without reports: no worklist either
    for i in range(2):
        run_scan(tmp_path / "studies", tmp_path / f"n{i}", ScanConfig(
            weights=str(small_bundle), device="cpu", workers=0, progress=False, shard=(i, 2), pdf=False))
    done = merge_cli(tmp_path / "n0" / "results.csv", tmp_path / "n1" / "results.csv", "--out", tmp_path / "m2.csv")
    assert done.returncode == 0 and not (tmp_path / "worklist.pdf").exists()


@pytest.fixture(scope="module")
def reported(tmp_path_factory, nih_images, small_bundle):
    """Shards 0/2 and 1/2 of 4 images scanned with reports (a worklist each)."""
    root = tmp_path_factory.mktemp("reported")
    scan_shards(root, nih_images[:4], small_bundle, "r", pdf=True)
    return [root / f"r{i}" / "results.csv" for i in range(2)]


def test_merge_never_replaces_a_worklist_pdf_of_its_own_nor_leaves_one_of_other_results(reported, shards, tmp_path):
    """merge writes worklist.pdf beside the merged results.csv: a file of that name the user
    keeps there (not a cxr-batch worklist) was replaced without a word, though results.csv
    itself is never replaced unless cxr-batch's; and a merge of shards without reports, into the
    folder of an earlier merge, left that merge's worklist beside the new results.csv: a list of
    other studies in another order, read as this one's."""
    own = tmp_path / "mine" / "worklist.pdf"
    own.parent.mkdir()
    own.write_bytes(b"%PDF-1.4\n% the ward's own list\n")
    done = merge_cli(*reported, "--out", own.parent / "results.csv")
    assert done.returncode == 0 and own.read_bytes() == b"%PDF-1.4\n% the ward's own list\n", done.stderr
    assert "worklist.pdf" in done.stderr and "not replaced" in done.stderr, done.stderr
    # an earlier merge's worklist beside results.csv, then shards without reports merged there
    merged = tmp_path / "merged" / "results.csv"
    assert merge_cli(*reported, "--out", merged).returncode == 0 and (merged.parent / "worklist.pdf").is_file()
    done = merge_cli(*shards, "--out", merged)
    assert done.returncode == 0, done.stderr
    assert not (merged.parent / "worklist.pdf").exists() and "earlier" in done.stderr, done.stderr
    # a folder in worklist.pdf's place: one readable line, results.csv written
    (tmp_path / "d" / "worklist.pdf").mkdir(parents=True)
    done = merge_cli(*reported, "--out", tmp_path / "d" / "results.csv")
    assert done.returncode == 0 and (tmp_path / "d" / "results.csv").is_file(), done.stderr
    assert "worklist.pdf" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_merged_worklist_of_a_scan_without_an_urgent_bucket_has_none(tmp_path, nih_images, small_bundle):
    """A scan with `urgent = []` (no urgent bucket) records urgent [] in run.json; merge read
    the empty list as 'not given' and wrote the merged worklist with Pneumothorax urgent: its
    header spoke of an urgent bucket the scan never had."""
    from pypdf import PdfReader

    (tmp_path / "studies").mkdir()
    for p in nih_images[:4]:
        shutil.copy(p, tmp_path / "studies" / p.name)
    for i in range(2):
        run_scan(tmp_path / "studies", tmp_path / f"s{i}", ScanConfig(
            weights=str(small_bundle), device="cpu", workers=0, progress=False, shard=(i, 2), urgent=()))
    assert json.loads((tmp_path / "s0" / "run.json").read_text())["config"]["urgent"] == []
    done = merge_cli(tmp_path / "s0" / "results.csv", tmp_path / "s1" / "results.csv",
                     "--out", tmp_path / "merged" / "results.csv")
    assert done.returncode == 0, done.stderr
    text = " ".join(page.extract_text() for page in PdfReader(tmp_path / "merged" / "worklist.pdf").pages)
    assert "urgent bucket's catch" not in text
    shard = " ".join(page.extract_text() for page in PdfReader(tmp_path / "s0" / "reports" / "worklist.pdf").pages)
    assert "urgent bucket's catch" not in shard


def test_shards_of_one_model_under_two_bundle_hashes_are_refused_saying_so(shards, tmp_path):
    """A shard scanned before an upgrade that sealed its bundle again (v3's bundle_sha256 changed
    when its training-image list was added, its weights did not): 'different weights' named two
    paths and sent the operator looking for another model. It names each shard's model and hash,
    and says that one model under two hashes is a bundle sealed again or edited."""
    run = json.loads((shards[1].parent / "run.json").read_text())
    (shards[1].parent / "run.json").write_text(json.dumps({**run, "weights_sha256": "f" * 64}))
    with pytest.raises(MergeError) as refused:
        merge_results(shards, tmp_path / "m.csv")
    said = str(refused.value)
    assert f"{shards[1]} ({run['model']}, bundle_sha256 ffffffff...)" in said, said
    assert f"{shards[0]} ({run['model']}, bundle_sha256 {run['weights_sha256'][:8]}...)" in said, said
    assert "the same model name and version under two bundle_sha256s" in said and "scan" in said
