import numpy as np
import pytest

from cxr_batch.patient import PatientData, PatientEncoding, parse_age, parse_sex, parse_view, patient_from_values


@pytest.mark.parametrize("raw, years", [
    ("057Y", 57.0), ("57", 57.0), (57, 57.0), ("006M", 0.5), ("003W", 0.06), ("010D", 0.03), (" 45y ", 45.0),
])
def test_parse_age(raw, years):
    assert parse_age(raw) == (pytest.approx(years, abs=0.01), None)


@pytest.mark.parametrize("raw", ["150Y", "-3", "abc", "12X"])
def test_implausible_or_unparsable_age_is_unknown_with_reason(raw):
    value, why = parse_age(raw)
    assert value is None and why


def test_missing_age_is_unknown_without_reason():
    assert parse_age(None) == (None, None) and parse_age("") == (None, None)


@pytest.mark.parametrize("raw, sex", [("M", "M"), ("f", "F"), ("Female", "F"), ("O", None), ("", None)])
def test_parse_sex(raw, sex):
    assert parse_sex(raw)[0] == sex


@pytest.mark.parametrize("raw, view", [
    ("PA", "PA"), ("AP", "AP"), ("LL", "LATERAL"), ("CHEST PA ERECT", "PA"), ("Thorax a.p. supine", "AP"),
    ("CHEST_LAT", "LATERAL"), ("postero-anterior", "PA"), ("antero-posterior", "AP"), ("whatever", None),
])
def test_parse_view(raw, view):
    assert parse_view(raw)[0] == view


@pytest.mark.parametrize("raw", ["AP\\PA", "PA\\AP", "CHEST AP/PA", "THORAX PA + AP"])
def test_a_view_that_names_both_pa_and_ap_is_unknown_with_reason(raw):
    """A multi-valued ViewPosition or a text naming both frontal views does not say which one
    the image is: it was PA whatever the order (the first pattern tried), a wrong view code for
    every AP image so labelled."""
    value, why = parse_view(raw)
    assert value is None and "both PA and AP" in why
    assert parse_view("LAT\\PA")[0] == "LATERAL"  # a possible lateral is still never scored


def test_encoding_known_and_unknown_values():
    enc = PatientEncoding()
    assert np.allclose(enc.encode(57, "PA", "M"), [0.57, 0.0, 0.0])
    assert np.allclose(enc.encode(80, "AP", "F"), [0.80, 1.0, 1.0])
    # unknown is the neutral 0.5, never a silent zero (newborn, PA, male)
    assert np.allclose(enc.encode(None, None, None), [0.5, 0.5, 0.5])
    assert np.allclose(enc.encode(130, "LATERAL", "X"), [1.0, 0.5, 0.5])
    assert PatientEncoding.from_dict(enc.to_dict()) == enc


def test_fill_from_keeps_higher_priority_source():
    header = patient_from_values(None, "F", "PA", "header")
    sidecar = patient_from_values("040Y", "M", None, "sidecar")
    header.fill_from(sidecar)
    assert (header.age, header.age_source) == (40.0, "sidecar")
    assert (header.sex, header.sex_source) == ("F", "header")
    assert isinstance(PatientData().notes, list)
