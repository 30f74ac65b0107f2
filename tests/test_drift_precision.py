"""A reference and a window must hold a quantity at the same precision. results.csv keeps pixel
spacing to 4 significant digits, image statistics to 4 decimals and probabilities to 6; a
reference made from studies in memory (``python -m training.reference``) and the daemons' windows
(read from the ledger) hold them whole. A detector whose pixel spacing is corrected for
magnification (GE writes 0.1943109) has one value at a site: 0.1943109 on one side and 0.1943 on
the other made a Kolmogorov-Smirnov distance of 1, an alarm in every window, "median 0.194 ->
0.194"."""

from __future__ import annotations

from cxr_batch.bundle import load_bundle
from cxr_batch.drift import compare, make_reference
from cxr_batch.results import read_records
from cxr_batch.scan import ScanConfig, run_scan
from training.reference import score_folders

from .dicomgen import grey, write

SPACING = "0.1943109"


def test_the_same_studies_from_memory_and_from_results_csv_raise_no_alarm(tmp_path, nih_images, small_bundle):
    folder = tmp_path / "studies"
    folder.mkdir()
    for i, p in enumerate(nih_images[:30]):
        write(folder / f"s{i:02d}.dcm", grey(p), PixelSpacing=[SPACING, SPACING], PatientID=f"P{i:02d}")
    in_memory = score_folders(load_bundle(small_bundle), [(folder, None)], device="cpu", workers=0)
    assert {r.acquisition.pixel_spacing for r in in_memory} == {float(SPACING)}
    run_scan(folder, tmp_path / "out", ScanConfig(weights=str(small_bundle), device="cpu", precision="fp32",
                                                  pdf=False, progress=False, workers=0))
    from_csv = [r for r in read_records(tmp_path / "out" / "results.csv") if r.ok]
    assert len(from_csv) == len(in_memory) == 30
    for reference, window in ((in_memory, from_csv), (from_csv, in_memory)):  # training.reference / a daemon
        result = compare(make_reference(reference, "the same studies"), window)
        assert result["statistics"]["pixel_spacing"]["effect"] == 0.0, result["statistics"]["pixel_spacing"]
        assert result["alarms"] == [], [a["quantity"] for a in result["alarms"]]
