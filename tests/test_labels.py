"""Reference labels: the real NIH table, the mistakes a hand-edited table has, and matching to files."""

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.labels import LabelsError, match_labels, read_labels
from cxr_batch.record import log_name

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def write(tmp_path, rows, header=HEADER, name="labels.csv"):
    path = tmp_path / name
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def test_the_nih_table_reads_with_its_documented_counts(nih):
    labels = read_labels(nih / "labels.csv")
    assert len(labels.files) == 480 and labels.has_patient_data
    counts = dict(zip(FINDINGS, labels.y.sum(axis=0)))
    assert counts["Infiltration"] == 98 and counts["Edema"] == 13 and counts["Hernia"] == 15  # shared/data README
    assert (labels.y.sum(axis=1) == 0).sum() == 85  # No Finding
    assert labels.sha256 == hashlib.sha256((nih / "labels.csv").read_bytes()).hexdigest()


@pytest.mark.parametrize("row, message", [
    ("a.png,Pneumothorax|Covid,0,1,50,M,PA", "unknown finding name(s) 'Covid' in row 3 (a.png)"),
    ("a.png,,0,1,50,M,PA", "empty 'Finding Labels'"),
    ("a.png,No Finding|Mass,0,1,50,M,PA", "'No Finding' together with a finding"),
    (",Mass,0,1,50,M,PA", "empty 'Image Index'"),
    ("a.png,Pleural Thickening,0,1,50,M,PA", "unknown finding name(s) 'Pleural Thickening' (write it as Pleural_Thickening)"),
])
def test_hand_edited_mistakes_are_refused_with_the_row(tmp_path, row, message):
    path = write(tmp_path, ["b.png,No Finding,0,2,40,F,AP", row])
    with pytest.raises(LabelsError, match=re.escape(message)):
        read_labels(path)


def test_a_file_labelled_twice_differently_is_refused_the_same_twice_counts_once(tmp_path):
    with pytest.raises(LabelsError, match="the same file with different labels"):
        read_labels(write(tmp_path, ["a.png,Mass,0,1,50,M,PA", "a.png,Nodule,0,1,50,M,PA"]))
    labels = read_labels(write(tmp_path, ["a.png,Mass|Nodule,0,1,50,M,PA", "a.png,Mass|Nodule,0,1,50,M,PA"]))
    assert labels.files == ["a.png"] and labels.y[0].sum() == 2


def test_tables_that_are_not_labels(tmp_path):
    with pytest.raises(LabelsError, match="lacks column"):
        read_labels(write(tmp_path, ["a.png,1"], header="file,label\n"))
    with pytest.raises(LabelsError, match="no rows"):
        read_labels(write(tmp_path, []))
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(LabelsError):
        read_labels(garbage)
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")


def test_a_labels_file_that_is_an_image_or_a_workbook_says_what_it_is(nih_images, tmp_path):
    # `--labels IMAGE.png` said "is not a readable CSV: 'utf-8' codec can't decode byte 0x89 in
    # position 0", where --metadata says what the file is
    with pytest.raises(LabelsError, match="is not a CSV file: it is a PNG image"):
        read_labels(nih_images[0])
    (tmp_path / "labels.xlsx").write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(LabelsError, match="is not a CSV file: it is a ZIP archive or an Excel workbook"):
        read_labels(tmp_path / "labels.xlsx")


def test_labels_without_patient_columns_still_evaluate(tmp_path):
    labels = read_labels(write(tmp_path, ["a.png,Mass"], header="Image Index,Finding Labels\n"))
    assert not labels.has_patient_data and labels.patient_ids == [""]


def test_matching_by_file_name_reports_every_mismatch(tmp_path):
    labels = read_labels(write(tmp_path, ["a.png,Mass,0,7,50,M,PA", "b.png,No Finding,0,8,40,F,AP",
                                          "c.png,Nodule,0,9,60,M,PA", "d.png,Edema,0,10,70,F,AP",
                                          "e.png,Hernia,0,11,70,F,AP", "f.png,Mass,0,12,30,M,PA"]))
    rows = [
        {"file": "site/x/a.png", "status": "ok", "reason": "", "patient_id": ""},
        {"file": "b.png", "status": "ok", "reason": "", "patient_id": "from-header"},
        {"file": "c.png", "status": "error", "reason": "truncated", "patient_id": ""},
        {"file": "one/e.png", "status": "ok", "reason": "", "patient_id": ""},
        {"file": "two/e.png", "status": "ok", "reason": "", "patient_id": ""},
        {"file": "z.png", "status": "ok", "reason": "", "patient_id": ""},
        {"file": "export/d.dcm", "status": "ok", "reason": "", "patient_id": ""},  # d.png, exported as DICOM
    ]
    m = match_labels(rows, labels)
    assert m.pairs == [(0, 0), (1, 1), (6, 3)]
    assert m.groups == ["7", "8", "10"]  # the labels' Patient ID wins over the scan's
    assert m.scored_without_label == ["z.png"]
    assert m.labelled_not_scored == [{"file": "c.png", "status": "error", "reason": "truncated"}]
    assert m.labels_without_file == ["f.png"] and m.ambiguous == ["e.png"]
    assert len(m.problems()) == 4
    # why, not only which; a file named as logs name it (its path may name the patient)
    assert f"1 labelled files were not scored: {log_name('c.png')} (truncated)" in m.problems()
    assert not any("z.png" in line or "f.png" in line or "e.png" in line for line in m.problems())
    np.testing.assert_array_equal(labels.y[0], np.eye(14, dtype=np.uint8)[FINDINGS.index("Mass")])


def test_a_sidecar_row_never_stands_for_its_image(tmp_path):
    """A skipped or odd ``a.json`` beside ``a.png`` shares its stem: it must not make the image
    ambiguous and drop it from the evaluation."""
    labels = read_labels(write(tmp_path, ["a.png,Mass,0,7,50,M,PA"]))
    rows = [{"file": "a.json", "status": "skipped", "reason": "symbolic link to outside", "patient_id": ""},
            {"file": "a.png", "status": "ok", "reason": "", "patient_id": ""}]
    m = match_labels(rows, labels)
    assert m.pairs == [(1, 0)] and m.ambiguous == [] and m.labelled_not_scored == []


def test_trailing_commas_do_not_shift_the_columns(tmp_path):
    """Spreadsheets often export a trailing comma on every data row: the header has fewer
    fields than the rows, and pandas would make the first column the index."""
    labels = read_labels(write(tmp_path, ["a.png,Mass,0,7,50,M,PA,", "b.png,No Finding,0,8,40,F,AP,"]))
    assert labels.files == ["a.png", "b.png"] and labels.patient_ids == ["7", "8"]
    assert labels.y[0, FINDINGS.index("Mass")] == 1 and labels.y[1].sum() == 0


def test_label_names_are_printed_without_control_characters_and_cut(tmp_path):
    hostile = "\x1b]0;PWNED\x07evil\nFAKE: all studies normal" + "x" * 10_000 + ".png"
    labels = read_labels(write(tmp_path, [f'"{hostile}",Mass,0,7,50,M,PA']))
    [line] = match_labels([], labels).problems()
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line
    assert line.startswith("1 label rows have no file") and "PWNED" not in line and len(line) < 150


@pytest.mark.parametrize("sep, said", [(";", "';'"), ("\t", "tab")])
def test_a_table_saved_with_semicolons_or_tabs_is_refused_naming_the_delimiter(tmp_path, sep, said):
    """A spreadsheet in a European locale saves ';'-separated 'CSV': the columns are all there,
    so 'lacks column(s) Image Index, Finding Labels' sent the user looking for a missing column."""
    path = write(tmp_path, [r.replace(",", sep) for r in ["a.png,Mass,0,1,50,M,PA"]], header=HEADER.replace(",", sep))
    with pytest.raises(LabelsError, match=f"separated by {re.escape(said)}.*comma-separated"):
        read_labels(path)


def test_a_misspelt_finding_is_refused_with_the_closest_names(tmp_path):
    with pytest.raises(LabelsError, match=re.escape("'Pneumothorx' (did you mean Pneumothorax")):
        read_labels(write(tmp_path, ["a.png,Pneumothorx,0,1,50,M,PA"]))


@pytest.mark.parametrize("second", ["a.png,Mass,0,1,51,M,PA", "a.png,Mass,0,1,50,F,PA", "a.png,Mass,0,1,50,M,AP"])
def test_one_file_twice_with_different_patient_data_is_refused(tmp_path, second):
    """The labels' patient columns are the scan's patient data: two rows for one file that agree on
    its findings but not on its age, sex or view left the scan to use whichever came last."""
    with pytest.raises(LabelsError, match="the same file with different .*row 2 .*row 3"):
        read_labels(write(tmp_path, ["a.png,Mass,0,1,50,M,PA", second]))


def test_studies_without_a_patient_id_are_said_to_count_as_their_own_patients(tmp_path):
    """Without a Patient ID every image is its own patient: the intervals and the calibration's
    folds by patient then treat a patient's two images as independent. Said, with the count."""
    labels = read_labels(write(tmp_path, ["a.png,Mass,0,,50,M,PA", "b.png,No Finding,0,7,40,F,PA",
                                          "c.png,Mass,0,,60,M,PA"]))
    rows = [{"file": f, "status": "ok", "reason": "", "patient_id": ""} for f in ("a.png", "b.png", "c.png")]
    matching = match_labels(rows, labels)
    assert matching.summary()["without_patient_id"] == ["a.png", "c.png"]
    assert any(line.startswith("2 labelled studies have no Patient ID") and "its own patient" in line
               for line in matching.problems())
    rows[0]["patient_id"] = "P1"  # a DICOM header's PatientID stands in for the labels'
    assert match_labels(rows, labels).summary()["without_patient_id"] == ["c.png"]


def test_patient_columns_are_used_whichever_of_them_a_table_has(tmp_path, caplog):
    """A table with age, sex and view but no Patient ID column gave the model no patient data
    (all four columns were needed): the columns a table has are used, the ones it lacks are
    unknown for its rows, and the output says which."""
    import logging

    from cxr_batch.metadata import load_metadata_csv as load_metadata

    with caplog.at_level(logging.WARNING, logger="cxr_batch"):
        labels = read_labels(write(tmp_path, ["a.png,Mass,50,M,PA"],
                                   header="Image Index,Finding Labels,Patient Age,Patient Gender,View Position\n"))
        assert labels.has_patient_data
        [row] = load_metadata(labels.path).values()
    assert (row.patient_id, row.age, row.sex, row.view) == ("", "50", "M", "PA")
    assert "no column(s) 'Patient ID'" in caplog.text
    only_age = read_labels(write(tmp_path, ["a.png,Mass,50"], header="Image Index,Finding Labels,Patient Age\n",
                                 name="age.csv"))
    [row] = load_metadata(only_age.path).values()
    assert only_age.has_patient_data and (row.age, row.sex, row.view) == ("50", None, None)
    assert not read_labels(write(tmp_path, ["a.png,Mass"], header="Image Index,Finding Labels\n",
                                 name="none.csv")).has_patient_data


@pytest.mark.parametrize("name", ["png/a.png", "C:\\\\export\\\\a.png"])
def test_an_image_index_that_is_a_path_is_refused(tmp_path, name):
    """'png/a.png' matched its file by stem, but as patient data (matched by file name) it
    matched nothing: the study was scored without age, sex and view, and nothing said why."""
    with pytest.raises(LabelsError, match=r"a path, not a file name, .* in row 2"):
        read_labels(write(tmp_path, [f"{name},Mass,0,1,50,M,PA"]))


def test_a_labels_column_named_otherwise_is_named_with_what_to_rename(nih, tmp_path):
    table = pd.read_csv(nih / "labels.csv", dtype=str).iloc[:3]
    table.rename(columns={"Finding Labels": "Finding Label", "Image Index": "Filename"}).to_csv(
        tmp_path / "l.csv", index=False)
    with pytest.raises(LabelsError, match="rename 'Filename' to 'Image Index', 'Finding Label' to 'Finding Labels'"):
        read_labels(tmp_path / "l.csv")


def test_dicom_files_named_by_their_uid_are_not_matched_by_a_uid_prefix(tmp_path):
    """A PACS export names each file by its SOP Instance UID, without an extension: the part
    after the UID's last dot was taken for an extension, so an unlabelled lateral (…100.2) matched
    the label of the PA beside it (…100.1), which then had two files and left the evaluation
    as ambiguous."""
    labels = read_labels(write(tmp_path, ["1.2.826.0.1.3680043.100.1,Mass,0,7,50,M,PA"]))
    rows = [{"file": "1.2.826.0.1.3680043.100.1", "status": "ok", "reason": "", "patient_id": ""},
            {"file": "1.2.826.0.1.3680043.100.2", "status": "ok", "reason": "", "patient_id": ""}]
    m = match_labels(rows, labels)
    assert m.pairs == [(0, 0)] and not m.ambiguous, m
    assert m.scored_without_label == ["1.2.826.0.1.3680043.100.2"]
