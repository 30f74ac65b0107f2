"""``cxr-batch calibrate --version``: the text names the new bundle in every log line, results.csv
row and report it makes, so a newline or an escape sequence is refused before anything is scored."""

from __future__ import annotations

import pytest

from .test_evaluate_calibrate import cli_here as here


@pytest.mark.parametrize("version", ["3.0\nERROR forged line", "3.0\x1b[31mred", "\t", " "])
def test_a_version_that_would_forge_log_lines_is_refused_before_scoring(tmp_path, studies, version):
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{p.name},No Finding\n" for p in studies.iterdir()))
    code, stderr = here("calibrate", studies, "--labels", labels, "--out", tmp_path / "new", "--version", version)
    assert code == 2, stderr  # before: a bundle whose version printed a forged line under every scan
    assert "--version" in stderr and "printable" in stderr, stderr
    assert not (tmp_path / "new").exists()
