"""The watch ledger: exactly-once keys, file memory, records kept whole across reopening."""

from cxr_batch.ledger import Ledger
from cxr_batch.record import StudyRecord
from cxr_batch.study import Identifiers


def test_study_once_files_remembered_and_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    a = StudyRecord(file="a.dcm", ids=Identifiers(patient_id="P1", patient_name="DOE JANE"), model="m@1")
    ledger.record([("uid:1", a)], [("a.dcm", 10, 111, "uid:1", "ok")])
    # the same key again (a re-sent copy) is not a second study
    ledger.record([("uid:1", StudyRecord(file="copy.dcm"))], [("copy.dcm", 10, 222, "uid:1", "duplicate")])
    ledger.record([("uid:2", StudyRecord(file="b.dcm", status="error", reason="bad"))], [])
    assert ledger.is_reported("uid:1") and not ledger.is_reported("uid:3")
    assert ledger.file_handled("a.dcm", 10, 111) and not ledger.file_handled("a.dcm", 10, 112)
    ledger.close()
    again = Ledger(path)
    records = again.records()
    assert [r.file for r in records] == ["a.dcm", "b.dcm"] and again.count() == 2
    assert records[0] == a and records[0].ids.patient_name == "DOE JANE"
    again.close()
