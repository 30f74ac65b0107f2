"""PDF reports and worklist, read back with a PDF text extractor; Grad-CAM per finding."""

import datetime as dt
import shutil
import stat
import subprocess

import numpy as np
import pydicom
import pytest
import torch
from pypdf import PdfReader

from cxr_batch.bundle import load_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.gradcam import gradcam
from cxr_batch.patient import PatientData
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.reports import ReportOptions, report_name, study_pdf, worklist_pdf
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan

from .conftest import REPO

EXAMPLES = REPO / "examples"


def pdf_text(path) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


@pytest.fixture(scope="module")
def example_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    summary = run_scan(EXAMPLES / "studies", out, ScanConfig(
        metadata=str(EXAMPLES / "metadata.csv"), device="cpu", batch_size=4, workers=0, progress=False,
        institution="Example General Hospital", dicom_pdf=True))
    return out, summary, read_results(out / "results.csv")


def test_one_report_per_study_with_identifiers_findings_and_priority(example_scan):
    out, summary, rows = example_scan
    assert summary.counts["ok"] == 6
    for row in rows:
        path = out / "reports" / row["report"]
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o640
        txt = pdf_text(path)
        assert row["patient_id"] in txt
        for f in FINDINGS:
            assert f.replace("_", " ") in txt
        assert {"urgent": "URGENT", "abnormal": "ABNORMAL", "normal": "NO FINDING FLAGGED"}[row["priority"]] in txt
        assert "Decision support only" in txt and row["weights_sha256"] in txt.replace("\n", "")
        flagged_in_pdf = txt.count("FLAGGED") - txt.count("NO FINDING FLAGGED")  # table rows marked FLAGGED
        assert flagged_in_pdf == len([f for f in row["findings"].split(";") if f])
    dicom_row = next(r for r in rows if r["file"].startswith("dicom/NIH00574"))
    txt = pdf_text(out / "reports" / dicom_row["report"])
    assert "DOE JANE" in txt and "ACC240312001" in txt and "header:PatientAge" in txt
    assert not list((out / "reports").glob("*.tmp")) and not list((out / "reports").glob(".*"))


def test_worklist_orders_by_priority_then_score(example_scan):
    out, _, rows = example_scan
    txt = pdf_text(out / "reports" / "worklist.pdf")
    assert "6 scored" in txt and "Page 1" in txt
    positions = sorted(rows, key=lambda r: txt.index(r["report"][:20]))
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


def test_failures_are_listed_apart_in_the_worklist(tmp_path, studies, small_bundle):
    (studies / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run_scan(studies, tmp_path / "o", ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=0,
                                                 progress=False, heatmaps=False))
    txt = pdf_text(tmp_path / "o" / "reports" / "worklist.pdf")
    assert "Not scored" in txt and "broken.png" in txt and "1 failed" in txt
    assert len(list((tmp_path / "o" / "reports").glob("*.pdf"))) == 7


def test_heatmap_comes_from_that_findings_output(nih_images):
    from cxr_batch.preprocess import eval_transform
    from cxr_batch.readers import read_pil
    from cxr_batch.study import ScoringRules

    bundle = load_bundle()
    model = bundle.model.float()
    image = eval_transform(read_pil(nih_images[0], ScoringRules()), bundle.preprocessing)
    tab = torch.tensor([0.5, 0.0, 1.0])
    c1, c2 = FINDINGS.index("Effusion"), FINDINGS.index("Cardiomegaly")
    maps = gradcam(model, image, tab, [c1, c2])
    assert maps[c1].shape == image.shape[1:] and 0 <= maps[c1].min() and maps[c1].max() == pytest.approx(1.0)
    assert np.abs(maps[c1] - maps[c2]).max() > 0.05
    # recompute class c1 by hand: gradient of its logit only
    x = image[None].clone()
    levels = model.pyramid(x)
    feat = levels["p4"]
    logit = model.head_from_pyramid(levels, tab[None])[0, c1]
    (grad,) = torch.autograd.grad(logit, feat)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feat).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    assert np.allclose(maps[c1], (cam / cam.max()).detach().numpy(), atol=1e-5)


def urgent_record(file: str, **ids) -> StudyRecord:
    """A scored record with Pneumothorax flagged (0.9) and every other finding at 0.01."""
    probs = tuple(0.9 if f == "Pneumothorax" else 0.01 for f in FINDINGS)
    record = StudyRecord(file=file, scores=Scores(probs, tuple(int(p >= 0.5) for p in probs), "urgent", 0.5))
    for key, value in ids.items():
        setattr(record.ids, key, value)
    return record


def test_hostile_names_and_missing_values_render(tmp_path):
    row = urgent_record("../x.png", patient_id="../../etc/passwd",
                        patient_name="Zoë Ångström-Łukasiewicz " + "W" * 300)
    row.patient = PatientData(view="AP", view_source="sidecar", notes=["<b>not markup</b>"])
    info = {"label": "m@1", "sha256": "0" * 64, "thresholds": {f: 0.5 for f in FINDINGS}}
    pdf = study_pdf(row, np.random.default_rng(0).random((64, 64)), {}, info, ReportOptions(), dt.datetime.now())
    (tmp_path / "r.pdf").write_bytes(pdf)
    txt = pdf_text(tmp_path / "r.pdf")
    assert "Zoë Ångström-Łukasiewicz" in txt and "imputed" in txt and "URGENT" in txt and "<b>not markup</b>" in txt
    name = report_name(row.file)
    assert "/" not in name and not name.startswith(".") and ".." not in name and "passwd" not in name
    row.report = "r.pdf"
    assert worklist_pdf([row], ReportOptions(), info, dt.datetime.now())[:5] == b"%PDF-"


@pytest.mark.skipif(not shutil.which("pdftoppm"), reason="poppler-utils not installed")
def test_page_one_renders_with_a_red_urgent_banner(tmp_path):
    row = urgent_record("a.png", patient_id="P1")
    info = {"label": "m@1", "sha256": "0" * 64, "thresholds": {f: 0.5 for f in FINDINGS}}
    grey = np.tile(np.linspace(0, 1, 128), (128, 1))
    (tmp_path / "r.pdf").write_bytes(study_pdf(row, grey, {7: grey.T}, info, ReportOptions(), dt.datetime.now()))
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "1", str(tmp_path / "r.pdf"), str(tmp_path / "p")],
                   check=True)
    from PIL import Image

    page = np.asarray(Image.open(next(tmp_path.glob("p*.png"))).convert("RGB")).astype(int)
    red = (page[..., 0] > 170) & (page[..., 1] < 80) & (page[..., 2] < 80)
    assert red[: page.shape[0] // 4].sum() > 500  # the banner sits in the top quarter
