import json
import os
from pathlib import Path

import pandas as pd
import pytest

from cxr_batch.metadata import MetadataError, load_metadata_csv, patient_from_metadata, read_sidecar
from cxr_batch.study import Identifiers


def test_nih_csv_rows_match_the_table(nih):
    rows = load_metadata_csv(nih / "labels.csv")
    table = pd.read_csv(nih / "labels.csv")
    assert len(rows) == len(table) == 480
    first = table.iloc[0]
    row = rows[first["Image Index"]]
    p = patient_from_metadata(row)
    assert (p.age, p.sex, p.view) == (float(first["Patient Age"]), first["Patient Gender"], first["View Position"])
    assert p.age_source == p.sex_source == p.view_source == "metadata"
    assert row.patient_id == str(first["Patient ID"])


def test_full_nih_table_gz_can_be_filtered(nih):
    rows = load_metadata_csv(nih / "metadata" / "Data_Entry_2017_v2020.csv.gz", only={"00000001_000.png"})
    assert list(rows) == ["00000001_000.png"]


def test_csv_without_nih_columns_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MetadataError, match="lacks column"):
        load_metadata_csv(tmp_path / "m.csv")


def test_sidecar_dicom_keywords_and_sources(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "x.json").write_text(json.dumps({"PatientID": "P9", "PatientAge": "063Y", "PatientSex": "F",
                                                 "ViewPosition": "AP"}))
    header = read_sidecar(tmp_path / "x.png")
    patient, ids = header.patient, header.ids
    assert (patient.age, patient.sex, patient.view) == (63.0, "F", "AP")
    assert patient.age_source == "sidecar" and ids.patient_id == "P9"


def test_broken_sidecar_is_a_note_not_a_failure(tmp_path):
    (tmp_path / "x.json").write_text("{oops")
    header = read_sidecar(tmp_path / "x.png")
    patient, ids = header.patient, header.ids
    assert patient.age is None and ids == Identifiers() and "not used" in patient.notes[0]
    assert read_sidecar(tmp_path / "absent.png") is None


def test_a_sidecar_from_elsewhere_a_pipe_or_a_huge_file_is_never_read(tmp_path):
    """A sidecar must not bring another folder's patient data into a study, block on a pipe or
    fill memory: each is a note and the study keeps its own data."""
    import os

    outside, folder = tmp_path / "outside", tmp_path / "studies"
    outside.mkdir()
    folder.mkdir()
    (outside / "secret.json").write_text(json.dumps({"PatientID": "SECRET", "PatientAge": "033Y"}))
    (folder / "a.json").symlink_to(outside / "secret.json")
    os.mkfifo(folder / "b.json")
    with open(folder / "c.json", "wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: 300 MB that cost no disk
    (folder / "own.json").write_text(json.dumps({"PatientID": "OWN"}))
    (folder / "d.json").symlink_to(folder / "own.json")  # a link within the folder is fine
    for name, why in (("a", "symbolic link out of"), ("b", "not a regular file"), ("c", "over the limit")):
        header = read_sidecar(folder / f"{name}.png")
        assert header.ids == Identifiers() and header.patient.age is None, name
        assert why in header.patient.notes[0], (name, header.patient.notes)
    assert read_sidecar(folder / "d.png").ids.patient_id == "OWN"


@pytest.mark.parametrize("content, what", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "it is a PNG image"),
    (b"PK\x03\x04" + b"\x00" * 64, "it is a ZIP archive or an Excel workbook"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00", "it is a DICOM file"),
    # where, as labels says it: a text editor finds the byte on that line
    ("Image Index,Patient ID\nbébé.png,1\n".encode("latin-1"), "it is not UTF-8 text (byte e9 on line 2, offset 24)"),
])
def test_a_metadata_file_that_is_not_csv_is_named_with_what_it_is(tmp_path, content, what):
    (tmp_path / "meta.csv").write_bytes(content)
    with pytest.raises(MetadataError) as e:
        load_metadata_csv(tmp_path / "meta.csv")
    assert str(tmp_path / "meta.csv") in str(e.value) and what in str(e.value) and "codec" not in str(e.value)


def test_a_fifo_swapped_in_while_a_preambleless_dicom_is_recognised_does_not_block(tmp_path, monkeypatch):
    """scan --metadata recognises DICOM files by content before scoring. A file replaced by a
    FIFO after it was opened (a hostile sender) must not block that check when it goes on to
    parse a DICOM without a preamble: the parse reads the file already open, not the name."""
    import threading

    from cxr_batch import readers

    dicom = Path(__file__).resolve().parents[1] / "examples" / "studies" / "dicom" / "NIH00574" / "STUDY1" / "SERIES1"
    path = tmp_path / "study.dcm"
    path.write_bytes((dicom / "IM0001").read_bytes()[132:])
    sniff = readers.sniff

    def sniff_then_swap(head):
        path.unlink()
        os.mkfifo(path)
        return sniff(head)

    monkeypatch.setattr(readers, "sniff", sniff_then_swap)
    found = []
    worker = threading.Thread(target=lambda: found.append(readers.content_kind(path)), daemon=True)
    worker.start()
    worker.join(10)
    try:
        assert not worker.is_alive(), "blocked on the FIFO"
        assert found == ["dicom"]
    finally:
        if worker.is_alive():  # let the blocked open return
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_table_of_other_images_named_alike_is_said_to_be_of_other_images(nih, tmp_path):
    # both names shown by their shape: the warning read "file '99999999_999.png' has no row, while
    # the table names files like '99999999_999.png'", pointing at no difference at all
    from cxr_batch.metadata import load_metadata_for

    table = pd.read_csv(nih / "labels.csv", dtype=str)
    table.iloc[:3].to_csv(tmp_path / "three.csv", index=False)
    others = list(table["Image Index"].iloc[10:14])
    _, match = load_metadata_for(tmp_path / "three.csv", others)
    line = match.problem()
    assert "has a row for 0 of 4 files" in line and "names files like" not in line
    assert "named the same way ('99999999_999.png')" in line and "table of other images" in line
    assert "?." not in line, line  # "is it the table of other images?. Fix:"
    assert not any(name in line for name in others + list(table["Image Index"].iloc[:3]))


@pytest.mark.parametrize("sep, named", [(";", "';'"), ("\t", "tab")])
def test_a_table_saved_with_another_separator_is_said_so(nih, tmp_path, sep, named):
    # labels named the separator already; --metadata said "lacks column(s) ['Image Index', ...]"
    table = pd.read_csv(nih / "labels.csv", dtype=str).iloc[:3]
    table.to_csv(tmp_path / "m.csv", index=False, sep=sep)
    with pytest.raises(MetadataError, match=f"is separated by {named}, not by commas"):
        load_metadata_csv(tmp_path / "m.csv")


def test_a_table_with_a_header_and_no_rows_is_said_to_have_none(nih, tmp_path):
    # the warning ended "while the table names files like ''"
    from cxr_batch.metadata import load_metadata_for

    table = pd.read_csv(nih / "labels.csv", dtype=str)
    table.iloc[:0].to_csv(tmp_path / "header.csv", index=False)
    _, match = load_metadata_for(tmp_path / "header.csv", list(table["Image Index"].iloc[:2]))
    line = match.problem()
    assert "has a row for 0 of 2 files" in line and "the table has no rows" in line and "like ''" not in line


def test_a_column_named_otherwise_is_named_with_what_to_rename(nih, caplog, tmp_path):
    # a table with 'Age', 'Sex', 'View' (or a lower-case 'image index') said only that the NIH
    # columns were missing, and its studies were scored without patient data, the user left to
    # guess that a column name was the problem
    table = pd.read_csv(nih / "labels.csv", dtype=str).iloc[:3]
    table.rename(columns={"Patient Age": "Age", "Patient Gender": "sex", "View Position": "View"}).to_csv(
        tmp_path / "other_names.csv", index=False)
    with caplog.at_level("WARNING", logger="cxr_batch"):
        rows = load_metadata_csv(tmp_path / "other_names.csv")
    assert len(rows) == 3
    assert "rename 'Age' to 'Patient Age', 'sex' to 'Patient Gender', 'View' to 'View Position'" in caplog.text
    # a column of another meaning spelt alike is not offered: 'Patient Name' is no 'Patient Age'
    caplog.clear()
    named = table.drop(columns=["Patient Age"]).assign(**{"Patient Name": "DOE^JANE"})
    named.to_csv(tmp_path / "names.csv", index=False)
    with caplog.at_level("WARNING", logger="cxr_batch"):
        load_metadata_csv(tmp_path / "names.csv")
    assert "'Patient Age'" in caplog.text and "rename" not in caplog.text
    table.rename(columns={"Image Index": "image index"}).to_csv(tmp_path / "lower.csv", index=False)
    with pytest.raises(MetadataError, match="rename 'image index' to 'Image Index'"):
        load_metadata_csv(tmp_path / "lower.csv")


def test_a_table_of_paths_is_told_to_hold_file_names(nih, tmp_path):
    # a table whose Image Index held 'images/00000001_000.png' was told to "give the table of these
    # images, or name the images as the table does": the right table, and no renaming would help
    from cxr_batch.metadata import load_metadata_for

    table = pd.read_csv(nih / "labels.csv", dtype=str).iloc[:3]
    names = list(table["Image Index"])
    table["Image Index"] = "images/" + table["Image Index"]
    table.to_csv(tmp_path / "paths.csv", index=False)
    _, match = load_metadata_for(tmp_path / "paths.csv", names)
    line = match.problem()
    assert "has a row for 0 of 3 files" in line
    assert "'Image Index' holds paths ('xxxxxx/99999999_999.png')" in line
    assert "write each image's file name alone" in line and "give the table of these images" not in line


def test_a_table_of_names_without_their_extension_is_told_to_add_it(nih, tmp_path):
    # an Image Index of '00000001_000' for 00000001_000.png: evaluate matched the labels (by the
    # name without its extension) and silently scored every study without the table's patient
    # data, the warning saying "give the table of these images, or name the images as the table does"
    from cxr_batch.metadata import load_metadata_for

    table = pd.read_csv(nih / "labels.csv", dtype=str).iloc[:3]
    names = list(table["Image Index"])
    table["Image Index"] = table["Image Index"].str.replace(".png", "", regex=False)
    table.to_csv(tmp_path / "stems.csv", index=False)
    _, match = load_metadata_for(tmp_path / "stems.csv", names)
    line = match.problem()
    assert "has a row for 0 of 3 files" in line
    assert "names files without their extension ('99999999_999' for '99999999_999.png')" in line, line
    assert "write each file's name with its extension" in line and "give the table of these images" not in line


def test_a_sidecar_key_spelt_otherwise_is_named_in_the_notes(tmp_path):
    # {"Age": 57, "Sex": "F", "View": "PA"} (the words of the report, capitalised) was read as no
    # patient data at all, with no note: the study was scored on the image alone without a word why
    (tmp_path / "x.json").write_text(json.dumps({"PatientID": "18", "Age": 57, "Sex": "F", "View": "PA",
                                                 "Patient_Age": "57", "Modality": "DX"}))
    header = read_sidecar(tmp_path / "x.png")
    assert header.ids.patient_id == "18" and header.patient.age is None
    notes = " ".join(header.patient.notes)
    for key, meant in (("Age", "PatientAge"), ("Sex", "PatientSex"), ("View", "ViewPosition"),
                       ("Patient_Age", "PatientAge")):
        assert f"'{key}' (did you mean '{meant}'?)" in notes, notes
    assert "Modality" not in notes  # a key of no patient datum, not a misspelt one, is no mistake
    (tmp_path / "x.json").write_text(json.dumps({"PatientAge": "057Y", "sex": "F"}))
    assert read_sidecar(tmp_path / "x.png").patient.notes == []
