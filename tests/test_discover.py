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
