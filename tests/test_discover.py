"""Finding study files: content not names, temp and hidden names ignored, problems as rows."""

import os

from cxr_batch.discover import find_candidates, is_ignored_name


def test_order_nesting_sidecars_and_ignored_names(tmp_path):
    (tmp_path / "p1" / "s1").mkdir(parents=True)
    for name in ("b.png", "a.png", "a.json", "lonely.json", ".hidden", "c.dcm.part", "p1/s1/IM0001", "p1/s1/x.tmp"):
        (tmp_path / name).write_bytes(b"x")
    rels = [c.rel for c in find_candidates(tmp_path)]
    assert rels == ["a.png", "b.png", "lonely.json", "p1/s1/IM0001"]


def test_folder_named_like_a_file_is_walked_and_results_folder_excluded(tmp_path):
    (tmp_path / "x.dcm").mkdir()
    (tmp_path / "x.dcm" / "IM1").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("x")
    rels = [c.rel for c in find_candidates(tmp_path, exclude=[tmp_path / "out"])]
    assert rels == ["x.dcm/IM1"]


def test_broken_link_and_loop_are_problems_not_crashes(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "broken")
    os.symlink(tmp_path, tmp_path / "d" / "loop")
    found = {c.rel: c.problem for c in find_candidates(tmp_path)}
    assert "broken symbolic link" in found["broken"]
    assert "loop" in found["d/loop"]


def test_links_that_point_at_each_other_are_called_a_loop_not_broken(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    found = {c.rel: c.problem for c in find_candidates(tmp_path)}
    assert set(found) == {"a.png", "b.png"}
    assert all("symbolic link loop" in p and "broken" not in p for p in found.values())


def test_ignored_names():
    assert is_ignored_name(".x") and is_ignored_name("a.PART") and is_ignored_name("b.crdownload")
    assert not is_ignored_name("IM0001") and not is_ignored_name("a.dcm")


def test_a_link_swapped_after_listing_is_not_read(tmp_path, nih_images):
    """The check happens when the file is read, not only when it is listed: a sender who
    re-points a link at another folder's file between the two gets an error row, not a read."""
    import shutil

    from cxr_batch.assemble import assemble_study
    from cxr_batch.readers import ScoringRules

    folder, outside = tmp_path / "in", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(nih_images[0], folder / ".own.png")  # hidden: not a study of its own
    shutil.copy(nih_images[1], outside / "secret.png")
    (folder / "a.png").symlink_to(folder / ".own.png")
    [cand] = find_candidates(folder)
    assert cand.problem is None and cand.identity is not None
    (folder / "a.png").unlink()
    (folder / "a.png").symlink_to(outside / "secret.png")
    record = assemble_study(cand, ScoringRules()).record
    assert record.status == "error" and "replaced or re-linked" in record.reason
    [again] = find_candidates(folder)  # listed again: now a link out of the folder, not followed
    assert again.problem_status == "skipped" and "outside the scanned folder" in again.problem
