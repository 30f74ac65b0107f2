"""PDF reports and worklist, read back with a PDF text extractor and rendered with pdftoppm,
one rule at a time; Grad-CAM per finding."""

import datetime as dt
import re
import shutil
import stat
import subprocess

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image as PILImage
from pypdf import PdfReader
from reportlab.pdfgen.canvas import Canvas

from cxr_batch.bundle import load_bundle
from cxr_batch.display import finding_label
from cxr_batch.evidence import bundle_evidence
from cxr_batch.findings import FINDINGS
from cxr_batch.gradcam import gradcam
from cxr_batch.patient import PatientData, parse_age
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.reports import (ModelInfo, ReportOptions, _fonts, _styles, fitted, heatmap_order, overlay, report_name,
                               own_scale, study_pdf, worklist_pdf)
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan

from .conftest import V1_BUNDLE, REPO
from .dicomgen import have, run

EXAMPLES = REPO / "examples"
NOW = dt.datetime(2024, 4, 15, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
ISO_OFFSET = re.compile(r"Generated 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d (\w+ \()?UTC[+-]\d\d:\d\d")
needs_poppler = pytest.mark.skipif(not shutil.which("pdftoppm"), reason="poppler-utils not installed")


def pages(path) -> list[str]:
    return [page.extract_text() for page in PdfReader(path).pages]


def render(pdf: bytes, tmp_path, dpi: int = 100, name: str = "p") -> np.ndarray:
    """Page 1 of ``pdf`` as an RGB array, rendered by poppler."""
    (tmp_path / f"{name}.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", str(dpi), "-f", "1", "-l", "1", "-singlefile",
                    str(tmp_path / f"{name}.pdf"), str(tmp_path / name)], check=True)
    return np.asarray(PILImage.open(tmp_path / f"{name}.png").convert("RGB")).astype(int)


def has_colour_bar(page: np.ndarray, min_length: int) -> bool:
    """A horizontal strip at least ``min_length`` pixels long whose hue runs from blue to red,
    left to right, identical over 5 rows: the colour bar (a heatmap's colours vary by row)."""
    hsv = np.asarray(PILImage.fromarray(page.astype(np.uint8)).convert("HSV")).astype(int)
    hue, coloured = hsv[..., 0], (hsv[..., 1] > 30) & (hsv[..., 2] > 60)
    for y in range(page.shape[0] - 5):
        same = (np.abs(page[y:y + 5] - page[y]).max(axis=(0, 2)) <= 3) & coloured[y]
        for run_ in np.split(np.arange(page.shape[1]), np.flatnonzero(np.diff(same.astype(int))) + 1):
            if len(run_) >= min_length and same[run_[0]]:
                h = hue[y, run_]
                h = np.where(h > 200, h - 256, h)  # red wraps around 0
                if h[0] >= 140 and h[-1] <= 15 and (np.diff(h) <= 4).all():  # PIL hue: blue 170, red 0
                    return True
    return False


def model_info(manifest: dict | None = None, threshold: float = 0.5) -> ModelInfo:
    return ModelInfo("m@1", "0" * 64, {f: threshold for f in FINDINGS}, bundle_evidence(manifest or {}))


def scored(probs: dict[str, float], threshold: float = 0.5, urgent=("Pneumothorax",), file="a.png",
           **ids) -> StudyRecord:
    """A scored record: the given probabilities (others 0.01) with triage as scan does it."""
    from cxr_batch.triage import triage

    p = np.array([probs.get(f, 0.01) for f in FINDINGS])
    t = triage(p, np.full(14, threshold), urgent)
    record = StudyRecord(file=file, scores=Scores(tuple(p), tuple(int(v) for v in t.flags), t.priority, t.score))
    for key, value in ids.items():
        setattr(record.ids, key, value)
    return record


def blob_maps(record: StudyRecord, size: int = 128) -> dict[int, np.ndarray]:
    """A synthetic raw Grad-CAM map per flagged finding: a blob whose strength is its probability."""
    yy, xx = np.mgrid[:size, :size]
    return {FINDINGS.index(f): record.scores.prob(f) * np.exp(-((xx - 30 - 5 * k) ** 2 + (yy - 50) ** 2) / 300.0)
            for k, f in enumerate(record.findings)}


GREY = np.tile(np.linspace(0.2, 0.8, 128), (128, 1))


# ---------------------------------------------------------------- a scan with reports
@pytest.fixture(scope="module")
def example_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    summary = run_scan(EXAMPLES / "studies", out, ScanConfig(
        metadata=str(EXAMPLES / "metadata.csv"), device="cpu", batch_size=4, workers=0, progress=False,
        institution="Example General Hospital", dicom_pdf=True))
    return out, summary, read_results(out / "results.csv")


def test_every_report_is_one_page_with_identifiers_findings_and_statements(example_scan):
    out, summary, rows = example_scan
    assert summary.counts["ok"] == 6
    bundle = load_bundle()
    thin_evidence = bundle_evidence(bundle.manifest, V1_BUNDLE).problem is not None
    for row in rows:
        path = out / "reports" / row["report"]
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o640
        (txt,) = pages(path)  # exactly one page
        assert row["patient_id"] in txt
        assert "not for clinical use" in txt and "Decision support only" in txt
        assert ("no validation evidence" in txt) == thin_evidence
        assert row["weights_sha256"] in txt.replace("\n", "") and ISO_OFFSET.search(txt.replace("\n", " "))
        for f in FINDINGS:
            assert finding_label(f) in txt
        assert "Pleural_Thickening" not in txt
        banner = {"urgent": "URGENT", "abnormal": "ABNORMAL", "normal": "LOW PROBABILITY OF ANY FINDING"}
        assert banner[row["priority"]] in txt
        flagged = [f for f in row["findings"].split(";") if f]
        assert txt.count("FLAGGED") == len(flagged)
        flat = re.sub(r"\s+", " ", txt)
        # v3 sees 64 px: its maps would be P4's 4 x 4 cells, so no map is drawn and the page says why,
        # never a blank picture or a blob under a flagged finding
        if flagged:
            assert ("No heatmaps: this model sees the radiograph at 64 px, and its maps would be 4 x 4 cells, "
                    "too coarse to point to a lung zone.") in flat
            assert "What raised the score" not in flat and "No positive evidence" not in flat
        if row["study_date"]:  # results.csv and the report both say YYYY-MM-DD, never DICOM's YYYYMMDD
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["study_date"]), row["study_date"]
            assert row["study_date"] in txt and row["study_date"].replace("-", "") not in txt
    dicom = {r["file"].split("/")[1]: r for r in rows if r["file"].startswith("dicom/")}
    (txt,) = pages(out / "reports" / dicom["NIH00574"]["report"])
    assert "DOE" in txt and "JANE" in txt and "ACC240312001" in txt and "63 years" in txt
    assert "DICOM header (PatientAge)" in txt and "header:PatientAge" not in txt
    (txt,) = pages(out / "reports" / dicom["NIH01511"]["report"])  # age from the birth date: 26.24 years
    assert "26 years" in txt and "26.24" not in txt and "DICOM header (PatientBirthDate)" in txt
    assert not list((out / "reports").glob("*.tmp")) and not list((out / "reports").glob(".*"))


def test_worklist_shows_every_study_by_priority_then_score(example_scan):
    out, _, rows = example_scan
    txt = "\n".join(pages(out / "reports" / "worklist.pdf"))
    assert "6 scored" in txt and "Page 1" in txt and ISO_OFFSET.search(txt.replace("\n", " "))
    for row in rows:
        assert row["accession_number"] in txt
    positions = sorted(rows, key=lambda r: re.search(rf"ID {re.escape(r['patient_id'])}\b", txt).start())
    rank = {"urgent": 0, "abnormal": 1, "normal": 2}
    keys = [(rank[r["priority"]], -float(r["triage_score"])) for r in positions]
    assert keys == sorted(keys)


def test_dicom_encapsulated_pdf_carries_the_study(example_scan):
    out, _, rows = example_scan
    row = next(r for r in rows if r["file"].startswith("dicom/NIH00574"))
    ds = pydicom.dcmread(out / "reports" / row["report"].replace(".pdf", ".dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.PatientID == "NIH00574" and ds.StudyInstanceUID == row["study_uid"]
    assert bytes(ds.EncapsulatedDocument)[:5] == b"%PDF-"


def test_the_encapsulated_pdf_copies_header_values_as_valid_dicom_and_quotes_none(tmp_path, nih_images,
                                                                                  small_bundle, caplog):
    """--dicom-pdf copied the source's values as they were: a 7-digit or range StudyDate
    (dciodvfy: 'Length invalid for this VR') and pydicom's 'Invalid value for VR DA: ...' printed
    the date on stderr and in the log; a backslash made PatientID, PatientName and the accession
    number multi-valued (VM 2 where 1 is allowed). They are copied as the SR copies them."""
    import warnings

    from .dicomgen import grey, write

    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), StudyDate="2024311", PatientID="SECRET1\\SECRET2",
          PatientName="SMITH^J\\DOE^X", AccessionNumber="ACC\\X")
    write(studies / "b.dcm", grey(nih_images[1]), StudyDate="20240101-20240131")
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=0, progress=False,
                     heatmaps=False, dicom_pdf=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_scan(studies, tmp_path / "out", cfg)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "2024311" in m or "20240101-" in m], said
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    a, b = (pydicom.dcmread(tmp_path / "out" / "reports" / rows[f]["report"].replace(".pdf", ".dcm"))
            for f in ("a.dcm", "b.dcm"))
    assert a.get("StudyDate", "") == "" and b.get("StudyDate", "") == ""
    assert a["PatientID"].VM == a["PatientName"].VM == a["AccessionNumber"].VM == 1
    assert a.PatientID == "SECRET1 SECRET2" and str(a.PatientName) == "SMITH^J DOE^X"


def test_the_encapsulated_pdf_and_the_sr_say_the_same_of_patient_and_study(tmp_path, nih_images, small_bundle):
    """Two objects cxr-batch adds to one study: the Encapsulated PDF left the birth date, study
    time, study ID and referring physician empty and took the sex from the model's inputs (none
    for 'O') where the SR copies the header's. A PACS that checks a new object's patient against
    the one it holds (birth date, sex) flags the report and not the SR. Both copy the same values."""
    from .dicomgen import grey, write

    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientBirthDate="19670302", PatientSex="O", PatientAge="045Y",
          StudyTime="101500", StudyID="S17", ReferringPhysicianName="House^Gregory", IssuerOfPatientID="HOSP-A")
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=0, progress=False,
                     heatmaps=False, dicom_pdf=True, dicom_sr=True)
    run_scan(studies, tmp_path / "out", cfg)
    (row,) = read_results(tmp_path / "out" / "results.csv")
    pdf = pydicom.dcmread(tmp_path / "out" / "reports" / row["report"].replace(".pdf", ".dcm"))
    (sr_path,) = (tmp_path / "out" / "dicom").glob("*.sr.dcm")
    sr = pydicom.dcmread(sr_path)
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        assert str(pdf.get(keyword, "")) == str(sr.get(keyword, "")) != "", keyword
    if have("dciodvfy"):
        said = subprocess.run(["dciodvfy", str(tmp_path / "out" / "reports" / row["report"].replace(".pdf", ".dcm"))],
                              capture_output=True, text=True, timeout=60)
        assert not [x for x in (said.stdout + said.stderr).splitlines() if x.startswith(("Error", "Warning"))], said


@pytest.mark.skipif(not have("img2dcm"), reason="dcmtk not installed")
def test_dicoms_made_by_dcmtk_get_one_page_reports_with_iso_dates(tmp_path, nih_images):
    """As a PACS would send them: dcmtk-made files without extensions, scanned with the bundled weights."""
    studies = tmp_path / "pacs"
    studies.mkdir()
    headers = [("20231105", "ACC-0001", "DOE^JANE^^^", "045Y", "F"), ("19991231", "X9", "Smith^John", "", "M"),
               ("20240229", "A" * 16, "Lopez Garcia^Maria Jose", "003W", "")]
    for k, (date, acc, name, age, sex) in enumerate(headers):
        PILImage.open(nih_images[10 + k]).convert("L").save(tmp_path / "x.jpg", quality=95)
        keys = [f"StudyDate={date}", f"AccessionNumber={acc}", f"PatientName={name}", "ViewPosition=PA",
                f"PatientID=PID{k}"] + ([f"PatientAge={age}"] if age else []) + ([f"PatientSex={sex}"] if sex else [])
        run("img2dcm", *[a for key in keys for a in ("-k", key)], tmp_path / "x.jpg", studies / f"IM{k}")
    run_scan(studies, tmp_path / "out", ScanConfig(device="cpu", batch_size=4, workers=0, progress=False))
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [r["status"] for r in rows] == ["ok"] * 3
    for row, (date, *_) in zip(rows, headers):
        (txt,) = pages(tmp_path / "out" / "reports" / row["report"])
        assert "not for clinical use" in txt
        assert f"{date[:4]}-{date[4:6]}-{date[6:]}" in txt and date not in txt
    assert "21 days" in pages(tmp_path / "out" / "reports" / rows[2]["report"])[0]
    worklist = "\n".join(pages(tmp_path / "out" / "reports" / "worklist.pdf"))
    assert all(acc in worklist for _, acc, *_ in headers)
    # a study that is not scored still shows its accession number on the worklist
    run("img2dcm", "-k", "AccessionNumber=LAT-77", "-k", "ViewPosition=LL", tmp_path / "x.jpg", studies / "IM9")
    run_scan(studies, tmp_path / "out2", ScanConfig(device="cpu", batch_size=4, workers=0, progress=False,
                                                    heatmaps=False))
    worklist = "\n".join(pages(tmp_path / "out2" / "reports" / "worklist.pdf"))
    assert "LAT-77" in worklist and "Not scored" in worklist


def test_failures_are_listed_apart_and_thin_evidence_is_said(tmp_path, studies, small_bundle):
    (studies / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run_scan(studies, tmp_path / "o", ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=0,
                                                 progress=False, heatmaps=False))
    txt = "\n".join(pages(tmp_path / "o" / "reports" / "worklist.pdf"))
    assert "Not scored" in txt and "broken.png" in txt and "1 failed" in txt
    assert "6 scored without patient data" in txt
    # the test bundle has no metrics: every report and the worklist say so
    assert "no validation evidence" in txt and "Not stated by these weights" in txt
    reports = sorted((tmp_path / "o" / "reports").glob("*.pdf"))
    assert len(reports) == 7
    for path in reports:
        if path.name != "worklist.pdf":
            (page,) = pages(path)
            assert "no validation evidence for these weights (no validation metrics in its manifest)" in \
                page.replace("\n", " ")
            assert "Scored without patient data" in page


# ---------------------------------------------------------------- Grad-CAM
def test_heatmap_comes_from_that_findings_output(nih_images):
    from cxr_batch.preprocess import eval_transform
    from cxr_batch.readers import read_pil
    from cxr_batch.study import ScoringRules

    # v1 (224 px): its maps have structure to compare. v2's 64-px maps are 4 x 4 cells upsampled,
    # and may be all zero (no positive evidence), which the reports print as such.
    default = load_bundle()
    tab = torch.tensor([0.5, 0.0, 1.0])
    small = eval_transform(read_pil(nih_images[0], ScoringRules()), default.preprocessing)
    for m in gradcam(default.model.float(), small, tab, list(range(len(FINDINGS)))).values():
        assert m.shape == small.shape[1:] and np.isfinite(m).all() and m.min() >= 0
    bundle = load_bundle(V1_BUNDLE)
    model = bundle.model.float()
    image = eval_transform(read_pil(nih_images[0], ScoringRules()), bundle.preprocessing)
    c1, c2 = FINDINGS.index("Effusion"), FINDINGS.index("Cardiomegaly")
    maps = gradcam(model, image, tab, [c1, c2])
    assert maps[c1].shape == image.shape[1:] and 0 <= maps[c1].min() and maps[c1].max() > 0
    assert np.abs(maps[c1] / maps[c1].max() - maps[c2] / maps[c2].max()).max() > 0.05
    # recompute class c1 by hand: gradient of its logit only; the map keeps its own units
    x = image[None].clone()
    levels = model.pyramid(x)
    feat = levels["p4"]
    logit = model.head_from_pyramid(levels, tab[None])[0, c1]
    (grad,) = torch.autograd.grad(logit, feat)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feat).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach().numpy()
    assert np.allclose(maps[c1], cam, rtol=1e-4, atol=1e-6 * cam.max())


def test_each_map_on_its_own_scale_so_a_weak_urgent_map_is_never_hidden():
    strong = np.outer(np.hanning(64), np.hanning(64))
    maps, strength = own_scale({0: 4.0 * strong, 1: 1.0 * strong, 2: np.zeros_like(strong)})
    assert maps[0].max() == pytest.approx(1.0) and maps[1].max() == pytest.approx(1.0) and maps[2].max() == 0
    assert strength == {0: pytest.approx(1.0), 1: pytest.approx(0.25), 2: 0.0}
    grey = np.full((64, 64), 0.5)
    colour = {k: np.abs(overlay(grey, m).astype(int) - 127).sum() for k, m in maps.items()}
    assert colour[0] == colour[1] > 0 and colour[2] == 0


def test_maps_only_on_a_grid_that_can_point_to_a_lung_zone():
    from cxr_batch.gradcam import map_level

    assert map_level(224) == ("p4", 14) and map_level(128) == ("p4", 8)
    # P4 at 4 x 4 or 6 x 6 cells: no map, a line saying why. P3 is no fallback: v3's 8 x 8 P3 maps
    # hit NIH's radiologist boxes no more often than chance (benchmarks/gradcam_pointing.py --level p3)
    assert map_level(96) is None and map_level(64) is None and map_level(32) is None


def test_a_224_px_model_draws_its_p4_maps_and_states_the_grid(tmp_path, example_scan):
    """The scan's own path (ReportWriter, real Grad-CAM) for a model whose P4 can point to a lung
    zone: v1 (224 px, 14 x 14 cells). One map picture per flagged finding with positive evidence,
    beside the radiograph; v3's reports of the same studies (example_scan) have the radiograph only."""
    run_scan(EXAMPLES / "studies" / "dicom", tmp_path / "out", ScanConfig(
        weights=str(V1_BUNDLE), metadata=str(EXAMPLES / "metadata.csv"), device="cpu", precision="fp32",
        batch_size=3, workers=0, progress=False))
    rows = [r for r in read_results(tmp_path / "out" / "results.csv") if r["findings"]]
    assert rows, "v1 flags something on these studies"
    for row in rows:
        path = tmp_path / "out" / "reports" / row["report"]
        flat = re.sub(r"\s+", " ", pages(path)[0])
        assert "Maps on the model's 14 x 14 grid (pyramid level P4" in flat and "No heatmaps" not in flat
        empty = re.search(r"No positive evidence in the model's map for: ([^(]*)\(", flat)
        n_empty = len(empty.group(1).split(",")) if empty else 0
        images = len(PdfReader(path).pages[0].images)
        assert images == 2 + len(row["findings"].split(";")) - n_empty  # radiograph, colour bar, one map each
    for row in example_scan[2]:
        assert len(PdfReader(example_scan[0] / "reports" / row["report"]).pages[0].images) == 1


def test_a_flagged_finding_without_positive_evidence_is_said_plainly_not_drawn():
    import io

    record = scored({"Effusion": 0.9, "Pneumothorax": 0.6})
    maps = blob_maps(record)
    maps[FINDINGS.index("Effusion")] = np.zeros_like(maps[FINDINGS.index("Effusion")])
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, maps, model_info(), ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "No positive evidence in the model's map for: Effusion" in txt
    assert "p 0.600, threshold 0.500" in txt and "p 0.900, threshold 0.500" not in txt  # only Pneumothorax is drawn


def test_heatmaps_urgent_first_then_by_margin_over_threshold():
    record = scored({"Effusion": 0.9, "Mass": 0.7, "Pneumothorax": 0.55, "Edema": 0.8})
    assert heatmap_order(record, {f: 0.5 for f in FINDINGS}, ("Pneumothorax",)) == \
        ["Pneumothorax", "Effusion", "Edema", "Mass"]
    thresholds = {**{f: 0.5 for f in FINDINGS}, "Effusion": 0.85}  # 0.9 over 0.85 is a small margin
    assert heatmap_order(record, thresholds, ()) == ["Edema", "Mass", "Effusion", "Pneumothorax"]


# ---------------------------------------------------------------- layout, rule by rule
@needs_poppler
def test_fourteen_flags_and_long_identifiers_fit_one_page_with_every_map_and_a_colour_bar(tmp_path):
    probs = {f: 0.95 - 0.03 * k for k, f in enumerate(FINDINGS)}
    record = scored(probs, file="archive/" * 12 + "IM0001_" + "x" * 80 + ".dcm", patient_id="P" * 64,
                    patient_name="Wolfeschlegelsteinhausenbergerdorff^Hubert^Blaine^Dr^Sr" + "W" * 20,
                    accession_number="A" * 16, study_date="20240415")
    record.patient = PatientData(age=57, age_source="metadata", notes=["sidecar unparsable age 'x': treated as unknown"])
    options = ReportOptions(institution="The Very Long Name of a University Teaching Hospital " * 2)
    pdf = study_pdf(record, GREY, blob_maps(record), model_info(), options, NOW)
    (tmp_path / "r.pdf").write_bytes(pdf)
    (txt,) = pages(tmp_path / "r.pdf")  # one page
    flat = re.sub(r"\s+", " ", txt)
    order = heatmap_order(record, {f: 0.5 for f in FINDINGS}, ("Pneumothorax",))
    captions = [flat.index(f"p {probs[f]:.3f}, threshold 0.500") for f in order]
    assert captions == sorted(captions) and order[0] == "Pneumothorax"  # drawn urgent first, then by margin
    assert "Not drawn" not in txt and "2024-04-15" in txt
    assert has_colour_bar(render(pdf, tmp_path), min_length=80)


@needs_poppler
def test_a_report_without_maps_has_no_colour_bar(tmp_path):
    assert not has_colour_bar(render(study_pdf(scored({}), GREY, {}, model_info(), ReportOptions(), NOW), tmp_path),
                              min_length=80)


def test_maps_not_drawn_are_named():
    record = scored({"Effusion": 0.9, "Pneumothorax": 0.6})
    pdf = study_pdf(record, GREY, {}, model_info(), ReportOptions(heatmaps=False), NOW)
    txt = PdfReader(__import__("io").BytesIO(pdf)).pages[0].extract_text()
    assert "Not drawn (heatmaps were turned off for this run): Pneumothorax, Effusion." in re.sub(r"\s+", " ", txt)


def test_an_urgent_banner_says_how_often_the_urgent_finding_was_caught_held_out():
    """Beside URGENT the radiologist reads how far the flag can be trusted: the urgent finding's
    held-out catch (v3's pneumothorax: 0 of 10) as well as the out-of-fold sens./PPV of the flag,
    not only on the low-probability banner."""
    import io

    counts = {f: {"tp": 3, "fn": 1, "fp": 2, "tn": 90} for f in FINDINGS}
    measured = model_info({"metrics": {"test_n": 300, "test_mean_auc": 0.8, "per_finding": counts}})
    pdf = study_pdf(scored({"Pneumothorax": 0.9, "Mass": 0.8}), GREY, {}, measured, ReportOptions(), NOW)
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(pdf)).pages[0].extract_text())
    assert "URGENT" in txt
    assert "Pneumothorax: sensitivity 0.75 at its threshold (flagged 3 of 4 held-out images that had it)" in txt
    assert "Mass: sensitivity" not in txt  # the urgent finding's, not every flag's


def test_no_flag_banner_gives_the_urgent_findings_sensitivity():
    import io

    counts = {f: {"tp": 3, "fn": 1, "fp": 2, "tn": 90} for f in FINDINGS}
    measured = model_info({"metrics": {"test_n": 300, "test_mean_auc": 0.8, "per_finding": counts},
                           "intended_use": "Triage research, not for clinical use."})
    options = ReportOptions(urgent=("Pneumothorax", "Effusion"))
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(scored({}), GREY, {}, measured, options, NOW)))
                 .pages[0].extract_text())
    # no triage table, so no P(any) cutoff: the bucket is "nothing flagged", not "low probability"
    assert "NO FINDING FLAGGED" in txt and "Not a normal result" in txt and "NORMAL" not in txt
    assert "Pneumothorax: sensitivity 0.75 at its threshold (flagged 3 of 4 held-out images that had it)" in txt
    assert "Effusion: sensitivity 0.75" in txt
    assert "Intended use: Triage research, not for clinical use." in txt and "no validation evidence" not in txt
    bare = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(scored({}), GREY, {}, model_info(), options, NOW)))
                  .pages[0].extract_text())
    assert "Pneumothorax: sensitivity at its threshold not measured for these weights" in bare


def test_infant_age_iso_date_and_unrecognised_date():
    import io

    record = scored({}, study_date="20240415")
    record.patient = PatientData(age=parse_age("010D")[0], age_source="header:PatientAge")
    txt = PdfReader(io.BytesIO(study_pdf(record, None, {}, model_info(), ReportOptions(), NOW))).pages[0].extract_text()
    assert "10 days" in txt and "2024-04-15" in txt and "20240415" not in txt
    assert "Image not available" in txt
    record.ids.study_date = "20241345"
    txt = PdfReader(io.BytesIO(study_pdf(record, None, {}, model_info(), ReportOptions(), NOW))).pages[0].extract_text()
    assert "unrecognised date '20241345'" in txt


def test_hostile_names_and_missing_values_render(tmp_path):
    row = scored({"Pneumothorax": 0.9}, file="../x.png", patient_id="../../etc/passwd",
                 patient_name="Zoë Ångström-Łukasiewicz " + "W" * 300)
    row.patient = PatientData(view="AP", view_source="sidecar", notes=["<b>not markup</b>"])
    pdf = study_pdf(row, np.random.default_rng(0).random((64, 64)), {}, model_info(), ReportOptions(), NOW)
    (tmp_path / "r.pdf").write_bytes(pdf)
    (txt,) = pages(tmp_path / "r.pdf")
    assert "Zoë Ångström-Łukasiewicz" in txt and "given to the model as its neutral value" in txt
    assert "URGENT" in txt and "<b>not markup</b>" in txt and "JSON sidecar" in txt
    name = report_name(row.file)
    assert "/" not in name and not name.startswith(".") and ".." not in name and "passwd" not in name
    row.report = "r.pdf"
    assert worklist_pdf([row], ReportOptions(), model_info(), NOW)[:5] == b"%PDF-"


def test_worklist_over_pages_repeats_its_header_with_time_zone(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for i in range(36):
        r = scored({f: float(v) for f, v in zip(FINDINGS, rng.random(14) * 0.7)}, file=f"s{i}.png",
                   patient_id=f"NIH{i:05d}", accession_number=f"ACC{i:09d}", study_date="20240415",
                   patient_name=f"PATIENT{i}^GIVEN")
        r.patient = PatientData() if i % 9 == 0 else PatientData(age=0.5, sex="F", view="PA")
        r.report = f"NIH{i:05d}_20240415_IM0001_{i:010x}.pdf"
        records.append(r)
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), model_info(), NOW))
    texts = pages(tmp_path / "w.pdf")
    assert len(texts) >= 2
    for txt in texts:
        assert "Priority" in txt and "Accession" in txt and "Study date" in txt  # the header row, on every page
    flat = re.sub(r"\s+", " ", "\n".join(texts))
    assert all(f"ACC{i:09d}" in flat for i in range(36)) and "6 months" in flat and "2024-04-15" in flat
    assert "Generated 2024-04-15 10:30:00 UTC+02:00" in flat
    assert "4 scored without patient data" in flat and flat.count("* scored without patient data") == 4


# ---------------------------------------------------------------- right-to-left names, checked by rendering
def _render_line(tmp_path, name: str, draw) -> np.ndarray:
    """Render one line at 4x size: ``draw(canvas)`` draws it; returns the page as an array."""
    canvas = Canvas(str(tmp_path / f"{name}.pdf"), pagesize=(200, 60))
    draw(canvas)
    canvas.save()
    subprocess.run(["pdftoppm", "-png", "-r", "288", "-singlefile", str(tmp_path / f"{name}.pdf"),
                    str(tmp_path / name)], check=True)
    return np.asarray(PILImage.open(tmp_path / f"{name}.png").convert("L")).astype(int)


@needs_poppler
@pytest.mark.parametrize("logical, visual", [
    ("אב", "בא"),  # Hebrew: alef then bet, drawn right to left
    ("بب", "\ufe90\ufe91"),  # Arabic: two joined behs, final form at the left, initial at the right
])
def test_right_to_left_names_render_shaped_and_ordered(tmp_path, logical, visual):
    font = _fonts()[0]
    style = _styles()["cell"]

    def text_at(text):
        def draw(canvas):
            canvas.setFont(font, style.fontSize)
            canvas.drawString(10, 20, text)
        return draw

    def paragraph(canvas):
        p = fitted(logical, style, 150)
        p.wrap(150, 50)
        p.drawOn(canvas, 10, 18)

    def ink(page):  # the inked pixels inside their bounding box: independent of where the line sits
        mask = page < 128
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    def same(a, b):  # equal up to a pixel of anti-aliasing at the edges
        if abs(a.shape[0] - b.shape[0]) > 1 or abs(a.shape[1] - b.shape[1]) > 1:
            return False
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        return (a[:h, :w] == b[:h, :w]).mean() > 0.95

    ours = ink(_render_line(tmp_path, "ours", paragraph))
    expected = ink(_render_line(tmp_path, "expected", text_at(visual)))
    naive = ink(_render_line(tmp_path, "naive", text_at(logical)))  # as stored: wrong order, letters unjoined
    assert same(ours, expected) and not same(naive, expected)


@needs_poppler
def test_page_one_renders_with_a_red_urgent_banner(tmp_path):
    row = scored({"Pneumothorax": 0.9}, patient_id="P1")
    grey = np.tile(np.linspace(0, 1, 128), (128, 1))
    page = render(study_pdf(row, grey, {7: grey.T}, model_info(), ReportOptions(), NOW), tmp_path, dpi=40)
    red = (page[..., 0] > 170) & (page[..., 1] < 80) & (page[..., 2] < 80)
    assert red[: page.shape[0] // 4].sum() > 500  # the banner sits in the top quarter


TRIAGE_TABLE = {
    "measured_on": "out of fold on 1,250 development images",
    "findings": {**{f: {"flagged": True, "sensitivity": 0.4, "specificity": 0.9, "ppv_at_nih_prevalence": 0.2,
                        "flag_rate": 0.11, "positives": 50} for f in FINDINGS},
                 "Effusion": {"flagged": True, "sensitivity": 0.62, "specificity": 0.9, "ppv_at_nih_prevalence": 0.31,
                              "flag_rate": 0.14, "positives": 80},
                 "Hernia": {"flagged": False, "why": "out-of-fold AUROC 0.55 (95% CI 0.41-0.69) reaches 0.5"}},
    "any_finding": {"weights": [0.2] * 14, "bias": -0.5, "normal_below": 0.3, "normal_share_of_abnormal": 0.14,
                    "normal_share_of_no_finding": 0.41, "flagged_share": 0.48, "flags_per_study": 0.9},
}


def test_every_flag_carries_its_sensitivity_and_ppv_and_never_flagged_findings_say_why():
    import io

    info = model_info({"triage": TRIAGE_TABLE, "metrics": {"test_n": 300, "test_mean_auc": 0.7}})
    record = scored({"Effusion": 0.9, "Pneumothorax": 0.6})
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, blob_maps(record), info, ReportOptions(),
                                                             NOW))).pages[0].extract_text())
    assert "Pneumothorax (sens. 0.40, PPV 0.20); Effusion (sens. 0.62, PPV 0.31)" in txt  # the banner
    assert "0.62 / 0.31" in txt and "never flagged" in txt and "chance-level ranking" in txt  # the findings table
    assert "out of fold on 1,250 development images" in txt
    low = scored({})
    low.scores.p_any = 0.12
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(low, GREY, {}, info, ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "LOW PROBABILITY OF ANY FINDING" in txt and "P(any finding) 0.120" in txt
    assert "In validation 14% of studies with a finding fell in this bucket" in txt


def test_worklist_gives_base_rates_trust_beside_flags_and_the_rank_order(tmp_path):
    info = model_info({"triage": TRIAGE_TABLE, "metrics": {"test_n": 300, "test_mean_auc": 0.7}})
    records = [scored({"Effusion": 0.8}, file="a.png", patient_id="PA"),
               scored({"Pneumothorax": 0.55}, file="b.png", patient_id="PB"),
               scored({}, file="c.png", patient_id="PC")]
    records[2].scores.p_any = 0.1
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), info, NOW))
    txt = re.sub(r"\s+", " ", "\n".join(pages(tmp_path / "w.pdf")))
    assert "2 of 3 studies have a flagged finding" in txt
    assert "flagged 48% of studies (0.9 flags per study)" in txt and "41% of studies without a finding" in txt
    assert "Effusion (sens. 0.62, PPV 0.31)" in txt and "P(Pneumothorax) 0.550" in txt
    assert txt.index("ID PB") < txt.index("ID PA") < txt.index("ID PC")  # urgent, abnormal, then low probability


def test_worklist_of_a_model_without_measured_flags_says_so_beside_them(tmp_path):
    """The bundled v2.1 records no per-finding sensitivity/PPV: each report says "not measured",
    but the worklist's column promised "(sens. / PPV of the flag)" and showed the flags bare."""
    records = [scored({"Effusion": 0.8}, file="a.png", patient_id="PA")]
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), model_info(), NOW))
    txt = re.sub(r"\s+", " ", "\n".join(pages(tmp_path / "w.pdf")))
    assert "Effusion" in txt and "sens. / PPV not measured" in txt


def test_a_flag_never_reads_as_below_its_threshold():
    """v3's Nodule threshold is 0.1054: a study at 0.107 is flagged. The report printed the
    probability to 3 decimals and the threshold to 2 ("0.107 | 0.11 | FLAGGED", caption "p 0.11,
    threshold 0.11"), so a radiologist read a flag below its own threshold. Probability and
    threshold are printed alike, so the printed numbers always agree with the flag."""
    import io

    from cxr_batch.triage import triage

    thresholds = np.full(14, 0.5)
    thresholds[FINDINGS.index("Nodule")] = 0.10538
    thresholds[FINDINGS.index("Hernia")] = 0.00043  # a rare finding's operating point: never printed as 0.000
    p = np.full(14, 0.01)
    p[FINDINGS.index("Nodule")], p[FINDINGS.index("Hernia")] = 0.107, 0.00046
    t = triage(p, thresholds, ("Pneumothorax",))
    record = StudyRecord(file="a.png", scores=Scores(tuple(p), tuple(int(v) for v in t.flags), t.priority, t.score))
    info = ModelInfo("m@1", "0" * 64, dict(zip(FINDINGS, thresholds.tolist())), bundle_evidence({}))
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, blob_maps(record), info, ReportOptions(),
                                                             NOW))).pages[0].extract_text())
    assert tuple(record.findings) == ("Nodule", "Hernia")
    assert "Nodule 0.107 0.105 FLAGGED" in txt and "p 0.107, threshold 0.105" in txt
    assert "Hernia 4.6e-04 4.3e-04 FLAGGED" in txt and "p 4.6e-04, threshold 4.3e-04" in txt


def test_a_bundle_without_a_low_probability_cutoff_says_no_finding_flagged_not_low_probability(tmp_path):
    """v1 and v2 have no P(any) cutoff: their 'normal' bucket is any study with nothing over its
    threshold. NIH 00001968 with v1 (P(any finding) 0.473) got 'LOW PROBABILITY OF ANY FINDING'
    and 'LOW' on the worklist: a 47% chance of a finding read as a low one."""
    import io

    record = scored({f: 0.45 for f in ("Atelectasis", "Effusion", "Infiltration", "Nodule")}, patient_id="PX")
    assert record.priority == "normal" and not record.findings
    record.scores.p_any = 0.91  # 1 - product of (1 - p): nothing flagged, a finding likely
    info = model_info()  # no triage table: no cutoff
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, {}, info, ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "NO FINDING FLAGGED" in txt and "LOW PROBABILITY" not in txt
    assert "Not a normal result. P(any finding) 0.910" in txt
    (tmp_path / "w.pdf").write_bytes(worklist_pdf([record], ReportOptions(), info, NOW))
    wl = re.sub(r"\s+", " ", "\n".join(pages(tmp_path / "w.pdf")))
    assert "low probability" not in wl.lower() and "LOW " not in wl
    assert "(0 urgent, 0 abnormal, 1 with no finding flagged)" in wl and "NO FLAG" in wl
    assert "then studies with no finding flagged, each by P(any finding)" in wl


def test_the_encapsulated_pdf_title_never_says_normal(example_scan):
    """The PACS lists an Encapsulated PDF by its DocumentTitle: '... (normal)' read as a clean
    bill in the study browser, while the report inside says 'Not a normal result'."""
    out, _, rows = example_scan
    titles = {r["priority"]: str(pydicom.dcmread(out / "reports" / r["report"].replace(".pdf", ".dcm")).DocumentTitle)
              for r in rows if r["file"].startswith("dicom/")}
    assert titles["normal"] == "Chest X-ray triage report (low probability of any finding)"
    assert all("(normal)" not in t for t in titles.values()) and titles["urgent"].endswith("(urgent)")


def test_a_name_recorded_only_in_ideographs_is_not_said_to_be_missing(tmp_path):
    """'=山田^太郎=やまだ^たろう' (no alphabetic group, as a Japanese modality may send it) printed
    'name not recorded' on the worklist: the name is in the header, in characters the font lacks."""
    import io

    record = scored({"Effusion": 0.8}, patient_id="JP1", patient_name="=山田^太郎=やまだ^たろう")
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, {}, model_info(), ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "(name in characters this report cannot show)" in txt
    (tmp_path / "w.pdf").write_bytes(worklist_pdf([record], ReportOptions(), model_info(), NOW))
    wl = re.sub(r"\s+", " ", "\n".join(pages(tmp_path / "w.pdf")))
    assert "(name in characters this report cannot show)" in wl and "name not recorded" not in wl


def test_a_worklist_without_a_scored_study_says_so_instead_of_an_empty_list(tmp_path, small_bundle):
    """A folder of a lateral and a truncated PNG: the worklist said '0 of 0 studies have a
    flagged finding' over no table at all, which reads like a list that failed to print."""
    from .dicomgen import write

    folder = tmp_path / "studies"
    folder.mkdir()
    write(folder / "lateral.dcm", np.full((64, 64), 100, np.uint8) + np.eye(64, dtype=np.uint8) * 50,
          ViewPosition="LL")
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run_scan(folder, tmp_path / "o", ScanConfig(weights=str(small_bundle), device="cpu", workers=0, progress=False))
    txt = " ".join("\n".join(pages(tmp_path / "o" / "reports" / "worklist.pdf")).split())
    assert "No study to read: every file was skipped or failed (see Not scored below)." in txt
    assert "0 of 0 studies" not in txt


def test_a_long_report_title_never_cuts_the_bucket_from_the_encapsulated_pdf_title(tmp_path, nih_images,
                                                                                   small_bundle):
    """--title 'Thoracic imaging AI triage - overnight emergency department batch ...' made the
    DocumentTitle (64 characters at most) 'Thoracic imaging AI triage - overnight emergency department
    batc': the bucket, what a PACS list is read for, was cut off."""
    from .dicomgen import grey, write

    folder = tmp_path / "studies"
    folder.mkdir()
    write(folder / "a.dcm", grey(nih_images[0]))
    title = "Thoracic imaging AI triage - overnight emergency department batch with a very long title"
    run_scan(folder, tmp_path / "o", ScanConfig(weights=str(small_bundle), device="cpu", workers=0, progress=False,
                                                dicom_pdf=True, title=title))
    (row,) = read_results(tmp_path / "o" / "results.csv")
    doc = str(pydicom.dcmread(tmp_path / "o" / "reports" / row["report"].replace(".pdf", ".dcm")).DocumentTitle)
    words = {"urgent": "urgent", "abnormal": "abnormal", "normal": "no finding flagged"}[row["priority"]]
    assert len(doc) <= 64 and doc.endswith(f" ({words})") and doc.startswith("Thoracic imaging AI triage")


def test_the_radiograph_tile_says_at_what_size_the_model_saw_it():
    """v3 sees 64 x 64 pixels: the tile, enlarged to 60 mm, looked like a poor radiograph with no
    word why; its caption gives the size."""
    import io

    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(scored({}), np.full((64, 64), 0.5), {}, model_info(),
                                                               ReportOptions(), NOW))).pages[0].extract_text())
    assert "Radiograph as the model saw it (64 x 64 pixels)" in txt


def test_a_worklist_of_one_study_says_one_file():
    """A single study's worklist began '1 files: 1 scored ... 1 of 1 studies have a flagged finding'."""
    txt = re.sub(r"\s+", " ", "\n".join(p.extract_text() for p in PdfReader(__import__("io").BytesIO(worklist_pdf(
        [scored({"Effusion": 0.8})], ReportOptions(), model_info(), NOW))).pages))
    assert "1 file: 1 scored" in txt and "1 of 1 studies have" not in txt and "1 of 1 study has a flagged finding" in txt


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_no_worklist_value_runs_into_the_next_column(tmp_path):
    """A worklist of 1,000 studies printed its last row number as '100' over '0' (a 4-digit
    number is wider than the '#' column); 64-character Patient IDs, accession numbers and UIDs
    with no space must stay in their cells too, a UID broken at its dots. Every word of the
    table's numbers lies within one column (pdftotext's word boxes)."""
    from reportlab.lib.units import mm

    from cxr_batch.reports import PAD, WORKLIST_COLUMNS, WORKLIST_MARGINS

    uid = "1.2.826.0.1.3680043.8.498.1" + "2" * 37  # 64 characters, the longest a UID may be
    records = [scored({"Effusion": 0.8 - i * 1e-4}, file=f"{i}.png", patient_id=str(i)) for i in range(1000)]
    records[0].ids.patient_id, records[0].ids.accession_number, records[0].report = "7" * 64, "8" * 64, uid
    info = ModelInfo("m@1", "ab" * 32, {f: 0.5 for f in FINDINGS}, bundle_evidence({}))
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), info, NOW))
    words = subprocess.run(["pdftotext", "-bbox", tmp_path / "w.pdf", "-"], capture_output=True, text=True,
                           check=True).stdout
    numbers, top, edges, bottom = [], None, None, 0.0
    for line in words.splitlines():
        match = re.search(r'xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="[\d.]+">(.*)</word>', line)
        if match is None:
            if "<page" in line:  # each page repeats the heading row; its footer is below the table
                top, bottom = None, float(re.search(r'height="([\d.]+)"', line)[1]) - WORKLIST_MARGINS["bottomMargin"]
            continue
        x0, y0, x1, text = float(match[1]), float(match[2]), float(match[3]), match[4]
        if text == "#" and edges is None:  # the heading of the first column: where the table starts
            edges = np.cumsum([x0 - PAD] + [w * mm for _, w in WORKLIST_COLUMNS])
        elif text == "Priority":
            top = y0
        elif top is not None and top < y0 < bottom and re.fullmatch(r"[\d.]+", text):  # a number in a table row
            column = int(np.searchsorted(edges, x0, side="right")) - 1
            numbers.append(text)
            assert x1 <= edges[column + 1], f"{text!r} runs from column {column} into the next"
    assert "1000" in numbers  # the last row number whole, not "100" over "0"
    assert "1.2.826.0.1.3680043.8.498." in numbers  # the UID broken after a dot


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_each_finding_row_gives_its_held_out_catch_as_the_sr_and_the_ris_get_it(tmp_path):
    """v3's report said beside an Atelectasis flag 'sens. 0.11' (out of fold) and nothing else,
    while the SR and the ORU of the same study say that flag caught 0 of 33 held-out images
    with atelectasis (Nodule 1 of 15 against 0.23; Hernia 4 of 4 against 0.35): each row of the
    findings table gives the held-out catch beside the out-of-fold figures."""
    from cxr_batch.bundle import DEFAULT_BUNDLE

    info = ModelInfo.from_bundle(load_bundle(DEFAULT_BUNDLE))
    record = scored({"Atelectasis": 0.9, "Pneumothorax": 0.9})
    (tmp_path / "r.pdf").write_bytes(study_pdf(record, GREY, {}, info, ReportOptions(), NOW))
    text = subprocess.run(["pdftotext", "-layout", tmp_path / "r.pdf", "-"], capture_output=True, text=True,
                          check=True).stdout
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "Held out" in text
    assert re.search(r"0\.11 / 0\.10\s+0 of 33", rows["Atelectasis"])
    assert re.search(r"0\.23 / 0\.12\s+1 of 15", rows["Nodule"])
    assert re.search(r"0\.35 / 0\.01\s+4 of 4", rows["Hernia"])
    assert len(PdfReader(tmp_path / "r.pdf").pages) == 1


def test_a_probability_just_under_its_threshold_never_prints_equal_to_it():
    """v3's Edema threshold is 0.06968: a study at 0.06965 is not flagged, and its row read
    "0.070 0.070 -", a probability at its threshold left unflagged (42 of the 4,382 held-out
    probability/threshold pairs print alike at 3 decimals). Where the pair prints alike it gets
    the decimals that tell them apart; so does P(any) beside the low-probability cutoff."""
    import io

    from cxr_batch.bundle import DEFAULT_BUNDLE

    info = ModelInfo.from_bundle(load_bundle(DEFAULT_BUNDLE))
    record = scored({"Edema": 0.06965, "Atelectasis": 0.05})
    record.scores.flags = (0,) * 14
    record.scores.priority, record.scores.p_any = "normal", 0.40801  # the cutoff is 0.408155
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, {}, info, ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "Edema 0.06965 0.06968 -" in txt
    assert "Atelectasis 0.050 0.137 -" in txt  # a pair that differs keeps 3 decimals
    assert "P(any finding) 0.4080, below the low-probability cutoff 0.4082" in txt


def test_the_worklist_gives_each_flag_its_held_out_catch_too():
    """The worklist (and the banner) said 'Atelectasis (sens. 0.11, PPV 0.10)' of v3's flag, which
    caught 0 of 33 held-out images with atelectasis, as the study's findings table, SR and ORU
    now say: each flag's phrase carries its held-out catch."""
    import io

    from cxr_batch.bundle import DEFAULT_BUNDLE

    info = ModelInfo.from_bundle(load_bundle(DEFAULT_BUNDLE))
    record = scored({"Atelectasis": 0.9})
    record.scores.p_any = 0.7
    wl = re.sub(r"\s+", " ", " ".join(p.extract_text() for p in PdfReader(io.BytesIO(worklist_pdf(
        [record], ReportOptions(), info, NOW))).pages))
    assert "Atelectasis (sens. 0.11, PPV 0.10; held out 0/33)" in wl, wl
    txt = re.sub(r"\s+", " ", PdfReader(io.BytesIO(study_pdf(record, GREY, {}, info, ReportOptions(), NOW)))
                 .pages[0].extract_text())
    assert "Atelectasis (sens. 0.11, PPV 0.10; held out 0/33)" in txt


def test_the_encapsulated_pdf_made_the_night_the_clock_goes_back_says_its_utc_offset(berlin, tmp_path):
    """The --dicom-pdf object's content date/time was a local time without an offset, as the SR's
    was: on the night the clock goes back, a report made at 02:15 (after) read as older than
    one made at 02:30 (before). It says the offset in force when it was made (Timezone Offset
    From UTC), and dciodvfy finds no error in it."""
    from cxr_batch.dicom_build import encapsulated_pdf
    from tests.conftest import DST_NIGHT_AFTER, DST_NIGHT_BEFORE
    from tests.dicomgen import have

    said = []
    for moment in (DST_NIGHT_BEFORE, DST_NIGHT_AFTER):
        berlin(moment)
        ds = encapsulated_pdf(b"%PDF-1.4 x", {"PatientID": "P1", "StudyInstanceUID": "1.2.3.4"}, "report")
        ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / "r.dcm")
        said.append((back.ContentDate, back.ContentTime, back.get("TimezoneOffsetFromUTC")))
        if have("dciodvfy"):
            done = subprocess.run(["dciodvfy", str(tmp_path / "r.dcm")], capture_output=True, text=True, timeout=60)
            assert not [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("Error")]
    assert said == [("20261025", "023000", "+0200"), ("20261025", "021500", "+0100")]


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_a_flag_s_held_out_catch_stays_on_one_line(tmp_path):
    """v1's report (its trust column is the held-out catch) gave Infiltration's as "0.83 (15 of
    18) /" over a "-" on a line of its own, the row twice as tall as the others; a count broken
    over two lines reads as two numbers. The cell shrinks to stay on one line, as "Held out" does."""
    info = ModelInfo.from_bundle(load_bundle(V1_BUNDLE))
    for probs in ({}, {"Infiltration": 0.9, "Pneumothorax": 0.9}):  # plain, and bold beside a heatmap
        record = scored(probs)
        maps = blob_maps(record) if probs else {}
        (tmp_path / "r.pdf").write_bytes(study_pdf(record, GREY, maps, info, ReportOptions(), NOW))
        text = subprocess.run(["pdftotext", "-layout", tmp_path / "r.pdf", "-"], capture_output=True, text=True,
                              check=True).stdout
        # the table's rows (the name, then its probability), not the banner or a map's caption
        rows = {m[1]: m[0] for m in re.finditer(r"^ *(\w+) +\d\.\d.*$", text, re.M)}
        for finding in ("Infiltration", "Pneumothorax", "Atelectasis"):
            assert re.search(r"\d\.\d\d \(\d+ of \d+\) / -", rows[finding]), (probs, rows[finding])


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_a_probability_and_threshold_that_need_six_digits_are_never_broken_inside(tmp_path):
    """A bundle calibrated with `--thresholds specificity:0.8` on 40 NIH studies moved v3's
    Pneumonia threshold to 0.0150528; a study at 0.015054 got "0.015054 0.015053" (the digits
    that tell them apart), and in that bundle's narrower Threshold column (no held-out column)
    the bold threshold broke into "0.01505" over "3": a radiologist reads 0.01505 and a 3.
    Both numbers shrink to stay whole on one line, as the other cells of the table do."""
    import dataclasses

    info = ModelInfo.from_bundle(load_bundle(REPO / "weights" / "cxr-fpn-v2"))  # no held-out column
    info = dataclasses.replace(info, thresholds={**info.thresholds, "Pneumonia": 0.0150528})
    record = scored({"Pneumonia": 0.015054})
    record.scores.flags = tuple(int(f == "Pneumonia") for f in FINDINGS)
    record.scores.priority = "abnormal"
    (tmp_path / "r.pdf").write_bytes(study_pdf(record, GREY, {}, info, ReportOptions(), NOW))
    text = subprocess.run(["pdftotext", "-layout", tmp_path / "r.pdf", "-"], capture_output=True, text=True,
                          check=True).stdout
    rows = [line for line in text.splitlines() if re.match(r"^\s*Pneumonia\s+\d", line)]
    assert len(rows) == 1 and re.search(r"\b0\.015054\s+0\.015053\s+FLAGGED\b", rows[0]), text


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_no_worklist_page_holds_only_the_closing_lines(tmp_path):
    """A worklist whose table filled its last page exactly (15 rows here, 33, 51: every 18th
    study; a 40-study NIH scan did it too) put the decision-support statement and the model line
    alone on one more page: a page to print that holds no study, read by who picks up the last
    sheet as the list's end. The closing lines keep the table's last rows with them, and a study
    not scored, listed below the table, keeps them too."""
    from cxr_batch.reports import worklist_pdf

    def pages_of(records) -> list[str]:
        (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), model_info(), NOW))
        count = len(PdfReader(tmp_path / "w.pdf").pages)
        return [subprocess.run(["pdftotext", "-layout", "-f", str(k), "-l", str(k), tmp_path / "w.pdf", "-"],
                               capture_output=True, text=True, check=True).stdout for k in range(1, count + 1)]

    for n in (14, 15, 16, 33):
        records = [scored({"Effusion": 0.2 + i / 1000}, file=f"s{i:03d}.png", patient_id=f"P{i}") for i in range(n)]
        text = pages_of(records)
        rows = [len(re.findall(r"P\(any\) 0\.\d", page)) for page in text]
        assert sum(rows) == n and all(rows), (n, rows)  # every page holds studies
        assert "Decision support only" in text[-1] and "Model m@1" in text[-1], (n, text[-1])
    failed = StudyRecord(file="bad.png", status="error", reason="could not be read")
    text = pages_of(records[:14] + [failed])
    assert "Not scored" in text[-1] and "bad.png" in text[-1] and "Decision support only" in text[-1]


def test_a_not_scored_file_with_a_very_long_path_or_reason_keeps_the_worklist(tmp_path):
    """A file not scored at a deep path (90 folders, 4,147 characters) or with a reason of
    thousands of characters made a row taller than a page: worklist_pdf raised reportlab's
    LayoutError, and the scan lost its worklist; a row just short of a page put the Not scored
    heading alone on one page and the closing lines alone on another. The worklist cuts such a
    cell in its middle (results.csv keeps it whole): its start and its end stay."""
    from cxr_batch.reports import worklist_pdf

    deep = "/".join(f"d{k:03d}_" + "x" * 40 for k in range(90)) + "/img_end.png"
    reason = " ".join(f"w{k}" for k in range(2000))
    records = [scored({"Effusion": 0.3}, file="s.png", patient_id="P1"),
               StudyRecord(file=deep, status="error", reason="could not be read"),
               StudyRecord(file="b.dcm", status="error", reason=reason)]
    (tmp_path / "w.pdf").write_bytes(worklist_pdf(records, ReportOptions(), model_info(), NOW))
    count = len(PdfReader(tmp_path / "w.pdf").pages)
    text = [subprocess.run(["pdftotext", "-f", str(k), "-l", str(k), tmp_path / "w.pdf", "-"],
                           capture_output=True, text=True, check=True).stdout for k in range(1, count + 1)]
    whole = "".join("".join(page.split()) for page in text)
    assert count == 1, count
    for kept in ("d000_", "img_end.png", "w0w1w2", "w1998w1999", "b.dcm", "couldnotberead", "Decisionsupportonly"):
        assert kept in whole, kept
