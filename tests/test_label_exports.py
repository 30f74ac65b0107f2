"""Labels tables as a spreadsheet exports them: "Unicode text" (UTF-16), "CSV" in the computer's
own code page (Latin-1), empty rows saved as ',,,', blank lines, an empty file. Each is read, or
refused saying what it is and how to save it; a mistake's row is the row a spreadsheet shows."""

from __future__ import annotations

import pytest

from cxr_batch.labels import LabelsError, read_labels
from cxr_batch.metadata import MetadataError, load_metadata_csv

TABLE = "Image Index,Finding Labels,Patient ID\r\n00000001_000.png,Cardiomegaly,1\r\n00000002_000.png,No Finding,2\r\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])  # Excel's "Unicode text": with and without a BOM
def test_a_utf16_export_is_named_with_how_to_save_it(tmp_path, encoding):
    path = tmp_path / "labels.csv"
    path.write_bytes(TABLE.replace(",", "\t").encode(encoding))
    with pytest.raises(LabelsError, match=r"UTF-16 text.*CSV UTF-8") as e:  # before: "it is binary data"
        read_labels(path)
    assert "binary" not in str(e.value)
    with pytest.raises(MetadataError, match=r"UTF-16 text.*CSV UTF-8"):  # the same table as --metadata
        load_metadata_csv(path)


def test_a_latin1_export_is_named_with_how_to_save_it(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes((TABLE + "00000003_000.png,Effusion,J\u00fcrgen\r\n").encode("latin-1"))
    # before: "is not a readable CSV: 'utf-8' codec can't decode byte 0xfc in position 105: invalid start byte"
    with pytest.raises(LabelsError, match=r"not UTF-8 text \(byte fc on line 4, offset \d+\): save it as 'CSV UTF-8"):
        read_labels(path)


def test_an_empty_file_is_said_to_be_empty(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"")
    with pytest.raises(LabelsError, match="is empty; expected"):  # before: "No columns to parse from file"
        read_labels(path)
    path.write_text("Image Index,Finding Labels\r\n,\r\n\r\n")  # a header and empty rows: nothing labelled
    with pytest.raises(LabelsError, match="has no rows"):
        read_labels(path)


def test_empty_rows_of_a_spreadsheet_are_no_mistake_and_rows_keep_their_numbers(tmp_path):
    """A sheet with a blank row and formatted empty rows below the table (',,' when saved) was
    refused ("an empty 'Image Index' in row 4 ()"); a mistake after a blank line was named one row
    too early."""
    path = tmp_path / "labels.csv"
    path.write_text("Image Index,Finding Labels,Patient ID\r\n\r\n" + TABLE.split("\r\n", 1)[1] + ",,\r\n,,\r\n")
    table = read_labels(path)
    assert table.files == ["00000001_000.png", "00000002_000.png"]
    assert table.y.sum(axis=1).tolist() == [1, 0] and table.patient_ids == ["1", "2"]
    path.write_text("Image Index,Finding Labels\n\n00000001_000.png,Cardiomegaly\n,\n00000002_000.png,Pneumothorx\n")
    with pytest.raises(LabelsError, match=r"in row 5 \(00000002_000.png\)"):  # row 5 as a spreadsheet shows it
        read_labels(path)


@pytest.mark.parametrize("written", ["no finding", "NO FINDING", "No finding"])
def test_no_finding_in_another_case_says_how_to_write_it(tmp_path, written):
    path = tmp_path / "labels.csv"
    path.write_text(f"Image Index,Finding Labels\na.png,{written}\n")
    with pytest.raises(LabelsError, match=rf"'{written}' \(write it as No Finding\)"):
        read_labels(path)


def test_findings_joined_by_another_separator_say_to_join_them_by_a_bar(tmp_path):
    """'Effusion;Mass' was said as "unknown finding name(s) 'Effusion in row 2": the hint was cut at
    the name's own ';'."""
    path = tmp_path / "labels.csv"
    path.write_text('Image Index,Finding Labels\na.png,Effusion;Mass\nb.png,"Effusion, Mass"\n')
    with pytest.raises(LabelsError) as e:
        read_labels(path)
    said = str(e.value)
    assert "'Effusion;Mass' (findings are joined by '|': Effusion|Mass)" in said, said
    assert "'Effusion, Mass' (findings are joined by '|': Effusion|Mass)" in said, said
    assert "row 2 (a.png), row 3 (b.png)" in said, said


def test_a_latin1_byte_is_named_where_a_text_editor_finds_it(tmp_path):
    # "byte e9 at offset 11" was the offset inside pandas's read buffer, not in the file: a user
    # looking there found nothing
    path = tmp_path / "labels.csv"
    raw = (TABLE + "00000003_000.png,Effusion,J\u00fcrgen\r\n").encode("latin-1")
    path.write_bytes(raw)
    with pytest.raises(LabelsError) as e:
        read_labels(path)
    offset = raw.index("\u00fc".encode("latin-1"))
    assert f"(byte fc on line 4, offset {offset}): save it as" in str(e.value), str(e.value)
