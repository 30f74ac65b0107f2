"""Labels tables as a careless data manager leaves them: a column named twice, a spreadsheet's
missing-value marker as a Patient ID, one Patient ID given to two different people. Each is
refused naming the rows or columns, never read into a silently wrong number."""

import re

import pytest
from click.testing import CliRunner

from cxr_batch.cli import main
from cxr_batch.labels import LabelsError, read_labels
from cxr_batch.metadata import MetadataError, load_metadata_csv

HEADER = "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position"


def write(tmp_path, header, rows, name="labels.csv"):
    path = tmp_path / name
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.mark.parametrize("header, named", [
    # a revised labels column added at the end under the same name: which one is meant is not known
    (HEADER + ",Finding Labels", "'Finding Labels' (columns 2 and 7)"),
    # the same with a stray space (pandas keeps both; stripped, one name for two columns)
    (HEADER + ", Finding Labels", "'Finding Labels' (columns 2 and 7)"),
    (HEADER + ",Patient ID ", "'Patient ID' (columns 3 and 7)"),
    (HEADER + ",Image Index", "'Image Index' (columns 1 and 7)"),
])
def test_a_column_named_twice_is_refused_naming_both(tmp_path, header, named):
    path = write(tmp_path, header, ["a.png,No Finding,1,50,M,PA,b.png", "b.png,Effusion,2,60,F,PA,a.png"])
    with pytest.raises(LabelsError, match=re.escape(f"names the column {named} twice")):
        read_labels(path)


def test_a_metadata_table_with_a_column_named_twice_is_refused(tmp_path):
    path = write(tmp_path, HEADER + ",Patient Age ", ["a.png,No Finding,1,50,M,PA,85"])
    with pytest.raises(MetadataError, match=re.escape("names the column 'Patient Age' (columns 4 and 7) twice")):
        load_metadata_csv(path)


def test_evaluate_of_a_table_with_a_column_named_twice_says_so_before_scanning(tmp_path, studies, small_bundle):
    """It stopped with "unexpected AttributeError: 'DataFrame' object has no attribute 'str'"."""
    names = sorted(p.name for p in studies.iterdir())
    path = write(tmp_path, HEADER + ",Patient Gender ", [f"{n},No Finding,{i},50,M,PA,M" for i, n in enumerate(names)])
    result = CliRunner().invoke(main, ["evaluate", str(studies), "--labels", str(path), "--out", str(tmp_path / "ev"),
                                       "--weights", str(small_bundle), "--device", "cpu"])
    assert result.exit_code == 1
    assert "unexpected" not in result.stderr and "names the column 'Patient Gender'" in result.stderr
    assert not (tmp_path / "ev" / "results.csv").exists()


@pytest.mark.parametrize("marker", ["NaN", "nan", "NA", "N/A", "#N/A", "None", "null"])
def test_a_missing_value_marker_as_patient_id_is_refused(tmp_path, marker):
    """An export that wrote "NaN" for every unknown Patient ID made all those studies one patient:
    "30 studies of 1 patient", no interval, and calibration folds of one patient."""
    path = write(tmp_path, HEADER, ["a.png,No Finding,1,50,M,PA", f"b.png,Effusion,{marker},60,F,PA",
                                    f"c.png,Mass,{marker},70,M,PA"])
    with pytest.raises(LabelsError, match=re.escape(f"'Patient ID' {marker!r} in row 3 (b.png), row 4 (c.png)")
                       + ".*leave the cell empty"):
        read_labels(path)


def test_one_patient_id_for_people_of_different_sex_is_refused(tmp_path):
    """Two sites' numbering merged (patient 3 of one is not patient 3 of the other): their studies
    were one patient in the intervals and the folds, and nothing said so."""
    path = write(tmp_path, HEADER, ["a.png,No Finding,3,50,M,PA", "b.png,Effusion,4,60,F,PA",
                                    "c.png,Mass,3,52,F,PA", "d.png,Mass,3,53,M,AP"])
    with pytest.raises(LabelsError, match=re.escape("Patient ID '3' is given to studies of different sex (M, F) in "
                                                    "row 2 (a.png), row 4 (c.png), row 5 (d.png)")):
        read_labels(path)


def test_one_patient_with_a_sex_left_blank_on_one_study_is_one_patient(tmp_path):
    path = write(tmp_path, HEADER, ["a.png,No Finding,3,50,M,PA", "b.png,Effusion,3,51,,PA"])
    assert read_labels(path).patient_ids == ["3", "3"]


def test_the_whole_nih_table_is_refused_nothing(nih):
    """NIH's own 112,120 rows (30,805 patients, each of one sex) pass every check above."""
    labels = read_labels(nih / "metadata" / "Data_Entry_2017_v2020.csv.gz")
    assert len(labels.files) == 112120 and len(set(labels.patient_ids)) == 30805


@pytest.mark.parametrize("yes", ["1", "1.0", "TRUE", "yes", "2"])
def test_a_table_of_one_column_per_finding_is_told_how_to_write_finding_labels(tmp_path, yes):
    """A CheXpert-style export (a column per finding holding 1.0, TRUE, yes...) was refused as
    lacking 'Finding Labels' and nothing more: what those columns are, and what to write instead,
    is said. Their values are not guessed at (is 2 a positive? -1 an uncertain one?)."""
    path = write(tmp_path, "Image Index,Patient ID,Atelectasis,Pleural Thickening,effusion,No Finding",
                 [f"a.png,1,{yes},0,0,0", f"b.png,2,0,0,0,{yes}"])
    with pytest.raises(LabelsError, match=re.escape(
            "its columns 'Atelectasis', 'Pleural Thickening', 'effusion', 'No Finding' hold one finding each: "
            "write each row's findings in one 'Finding Labels' column, joined by '|' (Atelectasis|Effusion), "
            "or 'No Finding'")):
        read_labels(path)


@pytest.mark.parametrize("sep", [",", ";"])
def test_excels_separator_line_is_named_rather_than_said_to_lack_the_columns(tmp_path, sep):
    """Excel's 'sep=,' first line made the table "lack" the columns plainly on its next line."""
    path = tmp_path / "labels.csv"
    path.write_bytes(f"sep={sep}\r\n{HEADER}\r\na.png,No Finding,1,50,M,PA\r\n".replace(",", sep).encode())
    hint = re.escape(f"its first line 'sep={sep}' is Excel's separator hint, not the header: delete that line")
    with pytest.raises(LabelsError, match=hint):
        read_labels(path)
    with pytest.raises(MetadataError, match=hint):
        load_metadata_csv(path)


def test_a_header_repeated_inside_the_table_is_named_as_such(tmp_path):
    """Two exports pasted one under the other: the second header was an unknown finding
    'Finding Labels' of a file named 'Image Index'."""
    path = write(tmp_path, HEADER, ["a.png,No Finding,1,50,M,PA", HEADER, "b.png,Mass,2,60,F,PA"])
    with pytest.raises(LabelsError, match=re.escape("the header again (tables pasted one under another?) in row 3")):
        read_labels(path)


def test_a_results_table_given_as_labels_is_never_told_to_rename_its_findings(tmp_path, studies, small_bundle):
    """A scan's results.csv given as --labels was told "rename 'findings' to 'Finding Labels'":
    the model's own flags as the reference, an evaluation of the model against itself."""
    from cxr_batch.scan import ScanConfig, run_scan

    summary = run_scan(studies, tmp_path / "scan", ScanConfig(weights=str(small_bundle), device="cpu", workers=0,
                                                              progress=False, pdf=False))
    with pytest.raises(LabelsError) as refused:
        read_labels(summary.results)
    said = str(refused.value)
    assert "is a cxr-batch results table (the model's own output)" in said and "a reader's" in said
    assert "rename" not in said


def test_patient_ids_excel_rounded_into_scientific_notation_are_refused(tmp_path):
    """Excel shows a 12-digit ID as 1.23457E+11 and saves it so: patients 123456789012 and
    123456789099 became one patient, and nothing said so."""
    path = write(tmp_path, HEADER, ["a.png,No Finding,1.23457E+11,50,M,PA", "b.png,Mass,1.23457E+11,60,M,PA",
                                    "c.png,Mass,7,60,F,PA"])
    with pytest.raises(LabelsError, match=re.escape("'Patient ID' '1.23457E+11' in row 2 (a.png), row 3 (b.png) is "
                                                    "a number in Excel's scientific notation")):
        read_labels(path)


def test_a_second_table_pasted_with_its_byte_order_mark_is_named_as_a_repeated_header(tmp_path):
    """`cat a.csv b.csv` of two UTF-8 exports: the second header starts with a byte-order mark."""
    path = tmp_path / "labels.csv"
    one = ("\ufeff" + HEADER + "\r\na.png,No Finding,1,50,M,PA\r\n").encode()
    path.write_bytes(one + one.replace(b"a.png", b"b.png"))
    with pytest.raises(LabelsError, match=re.escape("the header again (tables pasted one under another?) in row 3")):
        read_labels(path)
