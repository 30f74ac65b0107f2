"""How values read to a person: finding names, dates, ages, person names, right-to-left text."""

import unicodedata

import pytest

from cxr_batch.display import finding_label, format_age, format_date, person_name, plural, visible, visual_order
from cxr_batch.findings import FINDINGS
from cxr_batch.patient import parse_age


def test_finding_labels_read_as_words():
    assert finding_label("Pleural_Thickening") == "Pleural thickening"
    assert finding_label("Pneumothorax") == "Pneumothorax"
    assert all("_" not in finding_label(f) for f in FINDINGS)


@pytest.mark.parametrize("n, noun, shown", [
    (1, "study", "1 study"), (2, "study", "2 studies"), (0, "file", "0 files"), (1, "flag", "1 flag"),
    (3, "positive", "3 positives"), (1, "day", "1 day"), (2, "day", "2 days"), (2, "quantity", "2 quantities"),
])
def test_a_count_takes_the_number_of_its_noun(n, noun, shown):
    # '1 studies', '1 flags', '1 positives' were in the closing lines, the PDFs and the logs
    assert plural(n, noun) == shown


@pytest.mark.parametrize("raw, shown", [
    ("20240415", "2024-04-15"), ("2024.04.15", "2024-04-15"), ("2024-04-15", "2024-04-15"),
    ("2024-04-15T10:20:00", "2024-04-15"), (" 20240229 ", "2024-02-29"),
    ("20230229", None), ("20241345", None), ("2024", None), ("", None), (None, None), ("yesterday", None),
])
def test_dates_are_iso_or_nothing(raw, shown):
    assert format_date(raw) == shown


@pytest.mark.parametrize("raw, shown", [
    ("057Y", "57 years"), (26.24, "26 years"), (1, "1 year"), ("018M", "1 year"), ("006M", "6 months"),
    ("001M", "1 month"), ("003W", "21 days"), ("010D", "10 days"), ("001D", "1 day"), ("000D", "0 days"),
])
def test_ages_in_whole_units_from_what_the_header_says(raw, shown):
    years, _ = parse_age(raw)
    assert format_age(years) == shown


def test_unknown_age_is_none():
    assert format_age(None) is None and format_age(float("nan")) is None


@pytest.mark.parametrize("raw, shown", [
    ("DOE^JANE", "DOE, JANE"),
    ("Doe^Jane^Marie^Dr^PhD", "Doe, Dr Jane Marie, PhD"),
    ("DOE", "DOE"),
    ("^JANE", "JANE"),
    ("DOE^JANE^^^", "DOE, JANE"),
    ("Jane Doe", "Jane Doe"),  # plain text stays as it was written
    ("  Jane   Doe ", "Jane Doe"),
    ("", ""),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou (山田, 太郎)"),
    ("=山田^太郎", "山田, 太郎"),
])
def test_person_names_family_first(raw, shown):
    assert person_name(raw) == shown


def test_a_name_group_the_font_cannot_draw_is_left_out():
    assert person_name("Yamada^Tarou=山田^太郎", can_draw=str.isascii) == "Yamada, Tarou"


def test_right_to_left_names_are_reordered_and_shaped():
    # Hebrew: reversed for a left-to-right renderer, family name (first in logical order) at the right
    assert visual_order("כהן, דוד") == "דוד ,ןהכ"
    # Arabic: two beh letters join (initial + final presentation forms), then the run is reversed
    shaped = visual_order("بب")
    assert [unicodedata.name(c) for c in shaped] == ["ARABIC LETTER BEH FINAL FORM", "ARABIC LETTER BEH INITIAL FORM"]
    assert visual_order("DOE, JANE") == "DOE, JANE"


def test_visible_shows_controls_as_text_and_keeps_every_letter():
    """A console line names paths and peers' words: C0 and C1 controls (ESC, BEL, CSI 0x9b) and
    line ends become text; accents, right-to-left letters and backslashes stay as they are, so
    a reason made visible once reads the same when made visible again."""
    assert visible("a\x1b[2J\x1b]0;t\x07\x9b31m\r\nb\tc\x7f") == "a\\x1b[2J\\x1b]0;t\\x07\\x9b31m\\r\\nb\\tc\\x7f"
    assert visible("Müller שלום C:\\x") == "Müller שלום C:\\x"
    assert visible(visible("\x1b")) == visible("\x1b")


@pytest.mark.parametrize("tz, shown", [
    ("Europe/Berlin", "2026-10-25 02:30:00 CET (UTC+01:00)"),  # the second 02:30 of the autumn change
    ("UTC", "2026-10-25 01:30:00 UTC+00:00"),
    ("<+0530>-5:30", "2026-10-25 07:00:00 UTC+05:30"),  # a POSIX rule
    # a zone name mistyped (a service's Environment=TZ=...): the C library keeps UTC under the
    # first word, and every report said "Europe (UTC+00:00)", as if it were a European time
    ("Europe/Berln", "2026-10-25 01:30:00 UTC+00:00"),
])
def test_a_time_names_its_zone_only_when_the_system_knows_it(tz, shown):
    import os
    import subprocess
    import sys

    code = ("import datetime as dt; from cxr_batch.display import format_time; "
            "print(format_time(dt.datetime(2026, 10, 25, 1, 30, tzinfo=dt.timezone.utc).astimezone()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TZ": tz})
    assert done.stdout.strip() == shown, done.stderr
