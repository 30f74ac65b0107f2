from dataclasses import replace
from tests.test_hl7 import scored, _parse  # noqa
from cxr_batch.integration.hl7 import oru_r01, HL7NotMade

def test_scratch(scored):
    records, bundle = scored
    record = records["plain.dcm"]
    for kw in [dict(accession_number="A"*16), dict(accession_number="A"*22), dict(accession_number="A"*23),
               dict(accession_number="A&B"*5), dict(accession_number="A"*40),
               dict(patient_id="P"*64), dict(patient_id="P"*21), dict(patient_sex=""), dict(patient_sex="U"),
               dict(patient_name="Müller^Jürgen=ミュラー^ユルゲン"), dict(study_date=""), dict(patient_birth_date="")]:
        r = replace(record, ids=replace(record.ids, **kw))
        try:
            m = oru_r01(r, thresholds=bundle.thresholds)
            _parse(m)
            print(kw if len(str(kw)) < 60 else list(kw), "OK")
        except HL7NotMade as e:
            print(kw, "NOTMADE", e)
        except Exception as e:
            print(kw, "PARSEFAIL", type(e).__name__, str(e)[:200])
