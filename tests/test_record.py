"""The study record: one shape from reading to CSV and ledger, round trips that lose nothing."""

import csv
import io

import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientData
from cxr_batch.record import COLUMNS, Scores, StudyRecord
from cxr_batch.results import AtomicCsvWriter, read_records
from cxr_batch.study import CSV_IDENTIFIERS, Identifiers


def scored_record() -> StudyRecord:
    probs = tuple(round(0.05 * (k + 1), 6) for k in range(len(FINDINGS)))
    flags = tuple(int(p >= 0.5) for p in probs)
    return StudyRecord(
        file="a/b.dcm", ids=Identifiers(patient_id="P1", patient_name="DOE JANE", study_uid="1.2.3", sop_uid="1.2.3.4",
                                        accession_number="A1", study_date="20240301", institution="General"),
        patient=PatientData(age=57.0, age_source="header:PatientAge", sex="F", sex_source="sidecar",
                            notes=["metadata implausible age '130': treated as unknown", "second note"]),
        scores=Scores(probs, flags, "abnormal", 0.25), report="P1_x.pdf", model="m@1", weights_sha256="0" * 64)


def test_columns_are_derived_from_the_record():
    row = scored_record().to_row()
    assert tuple(row) == COLUMNS
    assert set(CSV_IDENTIFIERS) <= set(COLUMNS) and "patient_name" not in COLUMNS  # names stay in reports
    assert all(isinstance(v, str) for v in row.values())


def test_row_formatting():
    row = scored_record().to_row()
    assert row["age"] == "57" and row["sex"] == "F" and row["view"] == "" and row["view_source"] == "unknown"
    assert row["p_Atelectasis"] == "0.050000" and row["flag_Atelectasis"] == "0" and row["flag_Hernia"] == "1"
    assert row["findings"] == ";".join(f for k, f in enumerate(FINDINGS) if 0.05 * (k + 1) >= 0.5)
    assert row["triage_score"] == "0.250000" and row["notes"].count("; ") == 1


def test_unscored_record_has_empty_score_cells():
    record = StudyRecord(file="x.png", status="error", reason="empty file (0 bytes)", model="m@1")
    row = record.to_row()
    assert row["status"] == "error" and row["p_Hernia"] == "" and row["priority"] == "" and row["findings"] == ""
    back = StudyRecord.from_row(row)
    assert back.scores is None and back.status == "error" and back.reason == "empty file (0 bytes)"


def test_csv_round_trip(tmp_path):
    record = scored_record()
    with AtomicCsvWriter(tmp_path / "results.csv") as writer:
        writer.write(record)
    (back,) = read_records(tmp_path / "results.csv")
    assert back.worklist_rank == 1  # one run, one worklist: the only scored study is read first
    record.worklist_rank = 1
    assert back.to_row() == record.to_row()
    assert back.findings == record.findings and back.priority == "abnormal"
    assert back.ids.patient_name == ""  # not in the CSV


def test_json_round_trip_keeps_everything():
    record = scored_record()
    back = StudyRecord.from_json(record.to_json())
    assert back == record and back.ids.patient_name == "DOE JANE"


@pytest.mark.parametrize("age, text", [(26.24, "26.24"), (0.5, "0.5"), (100.0, "100")])
def test_age_cells(age, text):
    record = StudyRecord(file="x", patient=PatientData(age=age, age_source="metadata"))
    assert record.to_row()["age"] == text
    assert StudyRecord.from_row(record.to_row()).patient.age == age


def test_commas_and_quotes_survive_and_control_characters_do_not():
    record = StudyRecord(file="odd, name\nwith newline.png", status="error", reason='bad "quote", here')
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writerow(record.to_row())
    (row,) = list(csv.DictReader(io.StringIO(buf.getvalue()), fieldnames=list(COLUMNS)))
    assert row["file"] == "odd, namewith newline.png" and row["reason"] == record.reason
    assert buf.getvalue().count("\n") == 1  # one line per row, whatever the file is called


def test_a_ledger_record_with_the_source_s_utc_offset_still_opens_in_the_release_before():
    """The source's Timezone Offset From UTC (Identifiers.timezone_offset) is new: the release
    before builds its Identifiers from the record's "ids" whole, and a ledger written by this
    one stopped it (TypeError: unexpected keyword 'timezone_offset') after a downgrade. The
    identifiers it knows stay in "ids", the new one goes apart and comes back whole; and an
    identifier this release does not know (a later one's) no longer stops it."""
    from dataclasses import replace

    record = scored_record()
    record.ids = replace(record.ids, timezone_offset="-0500")
    data = record.to_json()
    before = {"patient_id", "patient_name", "study_uid", "series_uid", "sop_uid", "accession_number", "study_date",
              "institution", "sop_class_uid", "patient_birth_date", "patient_sex", "patient_age", "study_time",
              "study_id", "referring_physician", "issuer_of_patient_id", "issuer_universal_id",
              "issuer_universal_id_type", "patient_id_type", "other_patient_ids"}  # Identifiers at 8b26ece
    assert set(data["ids"]) <= before
    back = StudyRecord.from_json(data)
    assert back == record and back.ids.timezone_offset == "-0500"
    later = {**data, "ids": {**data["ids"], "some_later_identifier": "x"}}
    assert StudyRecord.from_json(later) == record


def test_a_ledger_record_keeps_when_its_image_was_acquired_and_one_written_before_still_opens():
    """The acquisition time (OBX-14's source) is kept apart in "ids_more" with the offset, so a
    daemon restarted on its ledger resends an ORU with the same OBX-14; a record written before
    it existed (no "ids_more", or one with the offset alone) opens with none, and the release
    before this one (which knows only "ids") finds nothing in "ids" it does not know."""
    from dataclasses import replace

    record = scored_record()
    record.ids = replace(record.ids, timezone_offset="-0500", acquisition_datetime="20240301101233.5+0900")
    data = record.to_json()
    assert "acquisition_datetime" not in data["ids"]
    assert StudyRecord.from_json(data).ids.acquisition_datetime == "20240301101233.5+0900"
    for older in ({k: v for k, v in data.items() if k != "ids_more"}, {**data, "ids_more": {"timezone_offset": "-0500"}}):
        back = StudyRecord.from_json(older)
        assert back.ids.acquisition_datetime == "" and back.ids.patient_id == record.ids.patient_id
