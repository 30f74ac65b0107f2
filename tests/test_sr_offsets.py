"""The SR's times and their UTC offset in hostile zones and from sources that say their own
offset (tests/test_sr.py has the SR itself; its scan is shared)."""

from __future__ import annotations

import datetime as dt
import io
import re
import subprocess

import pydicom

from cxr_batch.dicom import identifiers
from cxr_batch.sr import SRFactory, build_sr, sr_bytes
from tests import test_sr
from tests.dicomgen import have
from tests.test_sr import ACCEPTED_DCIODVFY_WARNINGS, _variants

sr_scan = test_sr.sr_scan  # the fixture: its scan, shared with tests/test_sr.py


def test_an_sr_made_in_a_zone_whose_offset_had_seconds_says_one_moment(sr_scan, small_bundle, monkeypatch):
    """A clock reset to 1970 (a dead RTC battery) in Africa/Monrovia, whose offset then was
    -00:44:30: the SR's Timezone Offset From UTC said -0044 (the seconds cut off), its
    ContributionDateTime -0045 (pydicom's rounding) and its local time kept the 30 seconds, so
    the SR named two moments, neither of them right. Its time is written with a whole-minute
    offset: content time, offset and DT name the moment it was made (to the minute's rounding)."""
    import time

    import cxr_batch.clock as clock
    from cxr_batch.bundle import load_bundle

    moment = dt.datetime(1970, 1, 1, 0, 0, 5, tzinfo=dt.timezone.utc)
    monkeypatch.setenv("TZ", "Africa/Monrovia")
    time.tzset()
    monkeypatch.setattr(clock, "utc_now", lambda: moment)
    try:
        studies, _, rows, _ = sr_scan
        bundle = load_bundle(small_bundle)
        record = _variants(studies, rows)["as scored"]
        data = SRFactory(bundle).sr_bytes(record)
        assert data == sr_bytes(build_sr(record, bundle))
        sr = pydicom.dcmread(io.BytesIO(data))
    finally:
        monkeypatch.undo()
        time.tzset()
    stamps = {e.ContributionDateTime for e in sr.ContributingEquipmentSequence if "ContributionDateTime" in e}
    assert stamps == {sr.ContentDate + sr.ContentTime + sr.TimezoneOffsetFromUTC}
    said = dt.datetime.strptime(sr.ContentDate + sr.ContentTime[:6] + sr.TimezoneOffsetFromUTC, "%Y%m%d%H%M%S%z")
    assert said == moment


def test_an_sr_for_a_source_that_says_its_utc_offset_writes_its_times_at_that_offset(sr_scan, small_bundle, berlin,
                                                                                    tmp_path):
    """A modality in New York says its study time is at -0500 (Timezone Offset From UTC); the
    SR and the Encapsulated PDF, made in Berlin, copied that study time and wrote their own
    offset, +0100, beside it: one offset for every time of the object (PS3.3 C.12.1.1.8), so
    the study read as made six hours away from when it was. The objects say the source's offset,
    and their own times, the same moments, at it."""
    from cxr_batch.bundle import load_bundle
    from cxr_batch.dicom_build import encapsulated_pdf
    from cxr_batch.sr import report_header
    from tests.conftest import DST_NIGHT_AFTER

    studies, _, rows, _ = sr_scan
    source = pydicom.dcmread(studies / "full.dcm")
    source.TimezoneOffsetFromUTC = "-0500"
    ids = identifiers(source)
    record = _variants(studies, rows)["as scored"]
    record.ids = ids
    bundle = load_bundle(small_bundle)
    berlin(DST_NIGHT_AFTER)  # 02:15 +0100 in Berlin: 20:15 -0500 the evening before in New York
    data = SRFactory(bundle).sr_bytes(record)
    assert data == sr_bytes(build_sr(record, bundle))
    sr = pydicom.dcmread(io.BytesIO(data))
    assert (sr.StudyDate, sr.StudyTime) == (source.StudyDate, source.StudyTime)
    assert (sr.TimezoneOffsetFromUTC, sr.ContentDate, sr.ContentTime) == ("-0500", "20261024", "201500")
    if have("dciodvfy"):
        path = tmp_path / "sr.dcm"
        path.write_bytes(data)
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        assert not [x for x in lines if x.startswith("Error")], lines
        assert not [w for w in lines if w.startswith("Warning")
                    and not any(re.search(a, w) for a in ACCEPTED_DCIODVFY_WARNINGS)], lines
    assert {e.ContributionDateTime for e in sr.ContributingEquipmentSequence if "ContributionDateTime" in e} == {
        "20261024201500-0500"}
    pdf = encapsulated_pdf(b"%PDF-1.4 x", {**report_header(ids), "StudyInstanceUID": ids.study_uid}, "report")
    assert (pdf.TimezoneOffsetFromUTC, pdf.ContentDate, pdf.ContentTime) == ("-0500", "20261024", "201500")
    source.TimezoneOffsetFromUTC = "+2500"  # not an offset: the objects say their own
    record.ids = identifiers(source)
    sr = pydicom.dcmread(io.BytesIO(SRFactory(bundle).sr_bytes(record)))
    assert (sr.TimezoneOffsetFromUTC, sr.ContentDate, sr.ContentTime) == ("+0100", "20261025", "021500")
