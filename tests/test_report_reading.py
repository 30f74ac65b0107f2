"""What a radiologist reads on the PDFs, checked against what the numbers mean: a finding over
its threshold in the low-probability bucket, P(any finding) beside the bucket's cutoff, a
calibrated bundle's base rates, the drift report's headline on the page."""

import io
import re

import numpy as np

from pypdf import PdfReader

from cxr_batch.evidence import bundle_evidence
from cxr_batch.findings import FINDINGS
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.reports import ModelInfo, ReportOptions, study_pdf, worklist_pdf

from .test_reports import GREY, NOW, TRIAGE_TABLE

# v3's figures: Emphysema's operating point and the low-probability bucket's cutoff
V3_EMPHYSEMA, V3_CUTOFF = 0.0552205712543702, 0.4081551028203995
V3_TABLE = {**TRIAGE_TABLE, "any_finding": {**TRIAGE_TABLE["any_finding"], "normal_below": V3_CUTOFF}}


def text_of(pdf: bytes) -> str:
    return re.sub(r"\s+", " ", " ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages))


def v3_like_info(manifest=None) -> ModelInfo:
    thresholds = {f: 0.5 for f in FINDINGS}
    thresholds["Emphysema"] = V3_EMPHYSEMA
    return ModelInfo("m@1", "0" * 64, thresholds, bundle_evidence(manifest or {"triage": V3_TABLE}))


def record(priority: str, p_any: float, probs: dict, file="a.png", patient_id="P1") -> StudyRecord:
    """A study as triage leaves it: flags only outside the low-probability bucket."""
    p = tuple(probs.get(f, 0.01) for f in FINDINGS)
    info = v3_like_info()
    flags = tuple(int(priority != "normal" and p[k] >= info.thresholds[f]) for k, f in enumerate(FINDINGS))
    r = StudyRecord(file=file, scores=Scores(p, flags, priority, p_any, p_any))
    r.ids.patient_id = patient_id
    return r


def test_a_finding_over_its_threshold_in_the_low_probability_bucket_says_why_it_is_not_flagged(tmp_path):
    """NIH 00014923_000.png with v3: P(any) 0.358, below the cutoff 0.408, so no flag; Emphysema
    0.064 over its threshold 0.055. The report printed 'Emphysema 0.064 0.055 -': a probability
    over its threshold beside no flag, unexplained, reads as a software error or as a flag missed."""
    low = record("normal", 0.358316, {"Emphysema": 0.0641})
    assert not low.findings
    txt = text_of(study_pdf(low, GREY, {}, v3_like_info(), ReportOptions(), NOW))
    assert "Emphysema 0.064 0.055 -" not in txt
    assert "Emphysema 0.064 0.055 not flagged 0.40 / 0.20" in txt
    assert "P(any finding) 0.358, below the low-probability cutoff 0.408" in txt
    assert "Over its threshold but not flagged (P(any finding) below the cutoff): Emphysema (0.064, threshold 0.055)" in txt
    # a low-probability study with nothing over a threshold says nothing of the kind
    clean_low = record("normal", 0.2, {})
    assert "not flagged" not in text_of(study_pdf(clean_low, GREY, {}, v3_like_info(), ReportOptions(),
                                                               NOW))
    # the worklist says it too, beside "none"
    wl = text_of(worklist_pdf([low, clean_low], ReportOptions(), v3_like_info(), NOW))
    assert "none (over its threshold, not flagged: Emphysema)" in wl


def test_p_any_and_the_cutoff_never_print_alike_on_either_side_of_it(tmp_path):
    """NIH 00007705_000.png with v3: P(any) 0.4088, cutoff 0.4082. The abnormal banner read
    'P(any finding) 0.41, above the normal bucket's 0.41', and the worklist gave 'P(any) 0.41'
    to it and to a low-probability study at 0.4058: the printed numbers could not tell the
    buckets apart. P(any) and the cutoff are printed as probabilities are (3 decimals)."""
    info = v3_like_info()
    above = record("abnormal", 0.408775, {}, file="a.png", patient_id="PA")
    below = record("normal", 0.405826, {}, file="b.png", patient_id="PB")
    txt = text_of(study_pdf(above, GREY, {}, info, ReportOptions(), NOW))
    assert "P(any finding) 0.409, above the low-probability cutoff 0.408" in txt
    txt = text_of(study_pdf(below, GREY, {}, info, ReportOptions(), NOW))
    assert "P(any finding) 0.406, below the low-probability cutoff 0.408" in txt
    wl = text_of(worklist_pdf([above, below], ReportOptions(), info, NOW))
    assert "P(any) 0.409" in wl and "P(any) 0.406" in wl
    assert "then low-probability studies (P(any finding) below 0.408), each by P(any finding)" in wl
    # an urgent study's order: the urgent finding's probability as its report prints it
    urgent = StudyRecord(file="c.png", scores=Scores(tuple(0.1049 if f == "Pneumothorax" else 0.01 for f in FINDINGS),
                                                     tuple(int(f == "Pneumothorax") for f in FINDINGS), "urgent",
                                                     0.1049, 0.79))
    wl = text_of(worklist_pdf([urgent], ReportOptions(), info, NOW))
    # written as P(any) beside it is: 'p 0.105' read as a p-value
    assert "P(Pneumothorax) 0.105" in wl and "p 0.105" not in wl
    # two urgent findings flagged: the one whose probability orders the study
    both = StudyRecord(file="d.png", scores=Scores(tuple({"Pneumothorax": 0.2, "Effusion": 0.7}.get(f, 0.01)
                                                         for f in FINDINGS),
                                                   tuple(int(f in ("Pneumothorax", "Effusion")) for f in FINDINGS),
                                                   "urgent", 0.7, 0.9))
    wl = text_of(worklist_pdf([both], ReportOptions(urgent=("Pneumothorax", "Effusion")), info, NOW))
    assert "P(Effusion) 0.700" in wl


def test_a_site_calibrated_bundle_does_not_attribute_the_base_bundles_rates_to_the_site():
    """calibrate --thresholds specificity:0.8 on 60 NIH studies: the worklist read 'In validation
    (cross-validated on the 60 labelled studies of this site's calibration ...) this model
    flagged 52% of studies (1.6 flags per study)': those rates are the base bundle's, out of fold
    on its 1250 development images at its own thresholds, not the site's."""
    site = "cross-validated on the 60 labelled studies of this site's calibration (specificity:0.8)"
    manifest = {"triage": {**V3_TABLE, "measured_on": site},
                "calibration": {"method": "offset", "fitted_on": {"n": 60}, "rules": {"thresholds": "specificity:0.8"}},
                "provenance": {"base": {"name": "cxr-fpn", "version": "3.0"}, "date": "2026-12-06"}}
    wl = text_of(worklist_pdf([record("abnormal", 0.6, {})], ReportOptions(), v3_like_info(manifest), NOW))
    rates = wl[wl.index("In validation"):wl.index("flagged 48% of studies")]
    assert site not in rates and "base bundle cxr-fpn@3.0" in rates and "before this site's calibration" in rates
    # a calibration that records where its study-level figures come from is taken at its word
    manifest["triage"]["any_finding"] = {**V3_TABLE["any_finding"], "measured_on": "out of fold on 1,250 images"}
    wl = text_of(worklist_pdf([record("abnormal", 0.6, {})], ReportOptions(), v3_like_info(manifest), NOW))
    assert "In validation (out of fold on 1,250 images) this model flagged 48%" in wl
    # an uncalibrated bundle: the triage table's own source, as before
    wl = text_of(worklist_pdf([record("abnormal", 0.6, {})], ReportOptions(), v3_like_info(), NOW))
    assert "In validation (out of fold on 1,250 development images) this model flagged 48%" in wl


def test_the_drift_reports_headline_stays_on_the_page(monkeypatch):
    """monitor on the 480 NIH images: 'No alarm: no quantity moved beyond its minimum shift with a
    corrected p-value below 0.001.' at 11 points was wrapped at the 9-point width and ran off the
    right edge ('... below 0.0')."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import cxr_batch.monitor as monitor
    from cxr_batch.monitor_report import summary_page

    monkeypatch.setattr(monitor, "alarm_line", lambda a: "an alarm")
    report = {"results": "/srv/results", "studies": {"scored": 480, "rows": 480}, "window": 500,
              "generated": "2026-12-06T19:38:08+00:00", "alarms": [], "problem": None, "alpha": 0.001,
              "min_studies": 20, "models": [], "notes": [],
              "method": {"windows": "w", "tests": {"continuous": "KS"}, "effect": {"continuous": "KS >= 0.3"},
                         "alarm": "a", "scope": "s"}}
    def alarm(group: str, k: int) -> dict:  # as monitor.json holds one, its longest kind of shift
        return {"group": group, "model": "m@1", "weights_sha256": "a" * 64, "quantity": f"q{k}", "label": "image intensity: 95th percentile",
                "shift": "median 0.896 -> 0.0969, mean 0.897 -> 0.0965",
                "window": {"index": 5, "first": "2026-03-26T08:00:00+00:00"}}

    report["models"] = [{"model": "m@1", "weights_sha256": "a" * 64, "n": 480, "reference": None, "notes": [],
                         "windows": [{"window": {"index": i}} for i in range(8)]}]
    for alarms in ([], [alarm("image", k) for k in range(12)], [alarm("output", 0)]):
        fig = summary_page({**report, "alarms": alarms})
        renderer = FigureCanvasAgg(fig).get_renderer()
        texts = [t for t in fig.texts if t.get_text()]
        assert any("No alarm" in t.get_text() or "ALARM" in t.get_text() for t in texts)
        for t in texts:
            box = t.get_window_extent(renderer)
            assert 0 <= box.x0 and box.x1 <= 0.97 * fig.bbox.x1, t.get_text()  # a margin on the right too


def test_calibrate_records_that_the_buckets_figures_stay_the_base_bundles():
    """A calibration that chooses new operating points writes the site's source for them; the
    study-level figures it keeps say they are the base's, at the base's thresholds, and the
    worklist prints that source."""
    from scipy.special import expit

    from cxr_batch.calibrate import calibrated_triage, choose_thresholds
    from cxr_batch.calibration import Calibration

    from .test_calibrate_safety import scores

    rng = np.random.default_rng(3)
    n = 120
    y = (rng.random((n, 14)) < 0.25).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (n, 14)))
    table = {"measured_on": "out of fold on 1,250 development images",
             "findings": {f: {"flagged": True, "sensitivity": 0.3, "specificity": 0.9, "ppv_at_nih_prevalence": 0.1,
                              "flag_rate": 0.1, "positives": 40} for f in FINDINGS},
             "any_finding": dict(V3_TABLE["any_finding"])}
    enough = np.array([f != "Pneumothorax" for f in FINDINGS])  # too few positives at the site: kept
    choice = choose_thresholds("specificity:0.8", scores(y, np.arange(n).astype(str)), p, {f: 0.2 for f in FINDINGS},
                               enough)
    new = calibrated_triage(table, Calibration.identity("offset"), choice, "specificity:0.8", n)
    assert new["measured_on"].startswith(f"cross-validated on the {n} labelled studies")
    level = new["any_finding"]["measured_on"]
    assert level == ("out of fold on 1,250 development images, at the base bundle's thresholds before this site's "
                     "calibration")
    wl = text_of(worklist_pdf([record("abnormal", 0.6, {})], ReportOptions(), v3_like_info({"triage": new}), NOW))
    assert f"In validation ({level}) this model flagged 48%" in wl
    # the finding it left alone keeps the base's figures, and says so
    kept = new["findings"]["Pneumothorax"]
    assert kept["sensitivity"] == 0.3 and kept["measured_on"].startswith(
        "the base bundle's figures (out of fold on 1,250 development images)")
    assert "measured_on" not in new["findings"]["Effusion"]


SITE = "cross-validated on the 60 labelled studies of this site's calibration (specificity:0.8)"


def site_calibrated_manifest() -> dict:
    """A manifest as calibrate --thresholds specificity:0.8 wrote it: Effusion's operating point
    chosen on the site's studies, Pneumothorax's kept (3 positives there) with the base's figures."""
    findings = {f: dict(row) for f, row in V3_TABLE["findings"].items()}
    findings["Effusion"] = {"flagged": True, "sensitivity": 0.67, "specificity": 0.8, "ppv_at_nih_prevalence": None,
                            "ppv_at_site": 0.38, "flag_rate": 0.2, "positives": 9}
    findings["Pneumothorax"] = {"flagged": True, "sensitivity": 0.23, "specificity": 0.89,
                                "ppv_at_nih_prevalence": 0.10, "flag_rate": 0.11, "positives": 43}
    return {"triage": {**V3_TABLE, "findings": findings, "measured_on": SITE + "; findings with too few positives "
                       "there: the base bundle's figures"},
            "calibration": {"method": "offset", "fitted_on": {"n": 60}, "rules": {"thresholds": "specificity:0.8"}},
            "provenance": {"base": {"name": "cxr-fpn", "version": "3.0"}, "date": "2026-12-06"}}


def test_a_site_calibrated_bundle_names_where_each_findings_figures_come_from():
    """calibrate on 60 NIH studies kept Pneumothorax's operating point (3 positives there) with
    the base bundle's figures, yet the URGENT banner read 'Pneumothorax: sensitivity 0.23 at its
    threshold (cross-validated on the 60 labelled studies of this site's calibration ...)': the
    base's 0.23 from 1250 development images, credited to the site's 60 studies."""
    info = v3_like_info(site_calibrated_manifest())
    urgent = StudyRecord(file="c.png", scores=Scores(
        tuple(0.3 if f in ("Pneumothorax", "Effusion") else 0.01 for f in FINDINGS),
        tuple(int(f in ("Pneumothorax", "Effusion")) for f in FINDINGS), "urgent", 0.3, 0.79))
    txt = text_of(study_pdf(urgent, GREY, {}, info, ReportOptions(), NOW))
    assert "Pneumothorax: sensitivity 0.23 at its threshold (the base bundle cxr-fpn@3.0's validation" in txt
    assert "Pneumothorax: sensitivity 0.23 at its threshold (cross-validated" not in txt
    # the legend names the findings whose figures are the base's, and their prevalence
    legend = txt[txt.index("A flag's sens. / PPV:"):]
    assert re.search(r"Pneumothorax[^.]*: the base bundle cxr-fpn@3\.0's validation[^.]*NIH prevalence", legend), legend
    assert not re.search(r"Effusion[^.]*: the base bundle", legend)


def evaluation_summary() -> dict:
    """The fields evaluation.pdf's first two pages read, as evaluate writes them."""
    row = {"positives": 3, "positive_patients": 3, "auroc": 0.667, "auroc_ci95": None, "threshold": 0.0668,
           "sensitivity": 0.33, "specificity": 0.76, "ppv": 0.10, "npv": 0.93, "ece": 0.031}
    buckets = {"n": 40, "urgent": 0.1, "abnormal": 0.7, "normal": 0.2}
    return {"model": "cxr-fpn@3.0", "bundle_sha256": "1" * 64, "weights_sha256": "2" * 64, "calibrated": False,
            "labels": {"file": "labels.csv", "sha256": "3" * 64}, "n_studies": 40, "n_patients": 40,
            "matching": {k: [] for k in ("scored_without_label", "labelled_not_scored", "labels_without_file",
                                         "ambiguous_names")},
            "mean_auroc": 0.6, "mean_auroc_ci95": [0.49, 0.7], "mean_auroc_findings": list(FINDINGS),
            "mean_probability": 0.058, "prevalence": 0.104, "ece_bins": 15, "ece": 0.057, "brier": 0.09,
            "brier_prevalence": 0.09, "brier_skill": -0.04, "mean_auroc_ci_note": "",
            "triage": {"buckets": {"all": buckets, "with_a_finding": buckets, "without_a_finding": buckets},
                       "studies_flagged": 0.45, "flags_per_study": 2.1, "worklist_auroc_any_finding": 0.67,
                       "worklist_auroc_pneumothorax": 0.46, "normal_below": 0.408},
            "per_finding": {f: dict(row) for f in FINDINGS},
            "definitions": {k: k for k in ("matching", "patient", "mean_auroc", "bootstrap", "ece", "brier_prevalence",
                                           "operating_point")}}


def test_evaluation_pdf_names_findings_as_the_reports_do_and_says_what_a_flag_is():
    """evaluation.pdf on 40 NIH images printed 'Pleural Thickening' where every report and the
    worklist print 'Pleural thickening', and 'Flags use the bundle's thresholds': the flags it
    measures are results.csv's, and a low-probability study carries none even over a threshold,
    so sensitivities recomputed from probabilities and thresholds would not match it."""
    from cxr_batch.evaluation_report import roc_page, summary_page

    ev = evaluation_summary()
    fig = summary_page(ev, NOW)
    texts = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    cells = [c.get_text().get_text() for ax in fig.axes for table in ax.tables for c in table.get_celld().values()]
    assert "Pleural thickening" in cells and "Pleural Thickening" not in cells
    assert "Flags use the bundle's thresholds." not in texts
    assert "none in the low-probability bucket" in texts
    y = np.tile([[0], [1]], (20, 14))  # 40 studies, every finding in half of them
    p = np.random.default_rng(0).random((40, 14))
    titles = [ax.get_title() for ax in roc_page(ev, y, p).axes]
    assert any(t.startswith("Pleural thickening") for t in titles) and not any("Pleural Thickening" in t for t in titles)


def test_the_maps_are_not_offered_as_the_findings_location():
    """benchmarks/gradcam_pointing.py: v3's maps (P3, 8 x 8 cells) put their hottest point inside
    NIH radiologists' boxes for 7 of 56 boxes, where a random point scores 0.10: they show what
    raised the score, not where a finding is. The page titled them 'Where the model looked' with
    'a zone, not a lesion's outline', which a reader takes for a location."""
    from .test_reports import blob_maps

    urgent = StudyRecord(file="c.png", scores=Scores(tuple(0.9 if f == "Pneumothorax" else 0.01 for f in FINDINGS),
                                                     tuple(int(f == "Pneumothorax") for f in FINDINGS), "urgent",
                                                     0.9, 0.95))
    txt = text_of(study_pdf(urgent, GREY, blob_maps(urgent), v3_like_info(), ReportOptions(), NOW))
    assert "not validated to locate a finding" in txt and "may point away from it" in txt


def test_a_tables_heading_row_is_printed_at_one_size():
    """On a page without maps the findings table is narrower: 'Probability', 'Threshold' and
    "A flag's sens. / PPV" each shrank to fit their cells while 'Flag' stayed full size, a
    heading row in three sizes."""
    sizes = {}

    def visit(text, cm, tm, font, size):
        if text.strip() in ("Finding", "Probability", "Threshold", "Flag"):
            sizes.setdefault(text.strip(), set()).add(round(size * tm[0], 2))

    low = record("normal", 0.2, {})
    PdfReader(io.BytesIO(study_pdf(low, GREY, {}, v3_like_info(), ReportOptions(), NOW))).pages[0].extract_text(
        visitor_text=visit)
    assert set(sizes) == {"Finding", "Probability", "Threshold", "Flag"}, sizes
    assert len(set().union(*sizes.values())) == 1, sizes


def test_a_narrow_map_caption_never_parts_a_value_from_its_name():
    """14 flagged findings put 7 maps a row: the captions wrapped 'p 0.138, threshold' / '0.085'
    and left 'map' alone on a line."""
    from .test_reports import blob_maps

    p = tuple(0.9 for _ in FINDINGS)
    full = StudyRecord(file="a.png", scores=Scores(p, (1,) * 14, "urgent", 0.9, 0.99))
    lines = []
    PdfReader(io.BytesIO(study_pdf(full, GREY, blob_maps(full), v3_like_info(), ReportOptions(), NOW))).pages[0] \
        .extract_text(visitor_text=lambda text, *_: lines.append(" ".join(text.split())))
    captions = [t for t in lines if re.match(r"(p \d|p$|threshold|strength|of the|map$)", t)]
    assert len([t for t in captions if "threshold" in t]) >= 14, captions
    for t in captions:
        assert not re.search(r"\b(threshold|strength|p)$", t) and t != "map", captions


def test_every_character_of_a_patients_name_is_one_the_report_can_draw():
    """A DICOM name 'محمد^عبد الله' (ISO_IR 192) printed 'محمد, عبد' and an empty box: the
    reshaper joined 'الله' into one ligature glyph (U+FDF2) that the report font lacks. A name
    written in kanji in its first group printed '▯▯, ▯▯': two patients' names read the same."""
    from cxr_batch.display import visual_order
    from cxr_batch.reports import _can_draw, patient_name_text

    arabic = patient_name_text("محمد^عبد الله")
    assert arabic == "محمد, عبد الله" and _can_draw(visual_order(arabic))  # drawn, letter by letter
    kanji = patient_name_text("山田^太郎=やまだ^たろう")
    assert _can_draw(kanji) and "cannot show" in kanji
    # with a group the font can draw, that group is shown
    assert patient_name_text("山田^太郎=Yamada^Taro") == "Yamada, Taro"
    assert patient_name_text("Yamada^Taro=山田^太郎") == "Yamada, Taro"
    low = record("normal", 0.2, {})
    low.ids.patient_name = "山田^太郎=やまだ^たろう"
    assert "cannot show" in text_of(study_pdf(low, GREY, {}, v3_like_info(), ReportOptions(), NOW))
    assert "cannot show" in text_of(worklist_pdf([low], ReportOptions(), v3_like_info(), NOW))


def test_a_result_whose_correction_could_not_be_read_says_so_on_the_worklist():
    """watch/listen keep a result when a later version of its instance arrives unreadable, and
    its row's notes say so; the radiologist reads the worklist, not the notes column: it says
    the result is of the earlier version there too (the others' rows say nothing of it)."""
    from cxr_batch.record import UNREAD_VERSION

    kept = record("abnormal", 0.6, {"Effusion": 0.7}, file="IM1.dcm", patient_id="FIRST")
    kept.add_note(f"{UNREAD_VERSION} (truncated), so this result is of the earlier version")
    other = record("abnormal", 0.5, {"Effusion": 0.7}, file="IM2.dcm", patient_id="OTHER")
    wl = text_of(worklist_pdf([kept, other], ReportOptions(), v3_like_info(), NOW))
    assert wl.count("a later version could not be read") == 1, wl


def _v3_info() -> ModelInfo:
    """The shipped v3 bundle's thresholds and evidence, as a scan with it prints them."""
    from cxr_batch.bundle import DEFAULT_BUNDLE, read_manifest

    manifest = read_manifest(DEFAULT_BUNDLE)
    return ModelInfo("cxr-fpn@3.0", "0" * 64, dict(manifest["thresholds"]), bundle_evidence(manifest, DEFAULT_BUNDLE))


V3_PNEUMOTHORAX = "Pneumothorax: sensitivity 0.00 at its threshold (flagged 0 of 10 held-out images that had it)"


def test_an_abnormal_banner_says_what_the_urgent_findings_catch_is_too():
    """NIH 00000050_000.png with v3: ABNORMAL for Emphysema. The banner said what the Emphysema
    flag is worth and nothing of pneumothorax, which v3 caught in 0 of 10 held-out images: the
    URGENT and LOW banners say so, the ABNORMAL one left a reader to take 'not urgent' for 'no
    pneumothorax' (the model card: an unflagged study is not a study without a pneumothorax).
    The same for an abnormal study with no single finding flagged (NIH 00018019_000 with v3)."""
    info = _v3_info()
    probs = {f: 0.01 for f in FINDINGS}
    emphysema = record("abnormal", 0.641, {**probs, "Emphysema": 0.2})
    emphysema.scores.flags = tuple(int(f == "Emphysema") for f in FINDINGS)
    none_flagged = record("abnormal", 0.600, probs)
    for study in (emphysema, none_flagged):
        txt = text_of(study_pdf(study, GREY, {}, info, ReportOptions(), NOW))
        assert "ABNORMAL: read with priority" in txt
        assert V3_PNEUMOTHORAX in txt


def test_the_worklist_says_what_the_urgent_bucket_catches():
    """The worklist orders the reading: its URGENT rows printed v3's pneumothorax flag as 'sens.
    0.23, PPV 0.10' (out of fold) and nothing said that v3 caught 0 of 10 held-out
    pneumothoraces, so a pneumothorax lower on the list read as ruled out. The header says the
    urgent findings' catch, held out too, as the study reports' banners do."""
    info = _v3_info()
    probs = {f: 0.01 for f in FINDINGS}
    studies = [record("abnormal", 0.641, probs, file="a.png", patient_id="PA"),
               record("normal", 0.2, probs, file="b.png", patient_id="PB")]
    wl = text_of(worklist_pdf(studies, ReportOptions(), info, NOW))
    assert f"The urgent bucket's catch: {V3_PNEUMOTHORAX}" in wl
    assert "A study below it may still have pneumothorax." in wl
    # no urgent finding (urgent = [] in a config table): nothing to say
    assert "urgent bucket's catch" not in text_of(worklist_pdf(studies, ReportOptions(urgent=()), info, NOW))


def test_a_scan_without_an_urgent_bucket_says_no_urgent_findings_catch():
    """urgent = [] (no urgent bucket): the low-probability banner ended 'fell in this bucket. .'
    (the urgent findings' sentence, empty); no banner names an urgent finding then."""
    info, options = _v3_info(), ReportOptions(urgent=())
    for study in (record("normal", 0.2, {}), record("abnormal", 0.6, {})):
        txt = text_of(study_pdf(study, GREY, {}, info, options, NOW))
        assert ". ." not in txt and "Pneumothorax: sensitivity" not in txt


def test_cross_validated_counts_are_not_called_held_out():
    """v2.1 has no held-out test (its evidence: 'out of fold, 5-fold cross-validation ... counts
    at thresholds chosen on the same out-of-fold predictions'), yet its URGENT banner read
    'flagged 10 of 34 held-out images that had it'. The catch says where it was counted."""
    from cxr_batch.bundle import read_manifest
    from cxr_batch.sr import trust_lines
    from tests.conftest import REPO

    v2 = REPO / "weights" / "cxr-fpn-v2"
    ev = bundle_evidence(read_manifest(v2), v2)
    assert ev.sensitivity("Pneumothorax") == ("Pneumothorax: sensitivity 0.29 at its threshold (flagged 10 of 34 "
                                              "out-of-fold images that had it; no held-out test)")

    class V2:  # what trust_lines reads of a bundle
        manifest, path = read_manifest(v2), v2
        thresholds = read_manifest(v2)["thresholds"]
    line = trust_lines(V2)[FINDINGS.index("Pneumothorax")]
    assert "held-out images" not in line and "flagged 10 of 34 out-of-fold images that had it" in line
    # v3's held-out test is called so
    assert V3_PNEUMOTHORAX in _v3_info().evidence.sensitivity("Pneumothorax")


def test_a_v1_report_gives_its_table_the_held_out_catch_its_banner_quotes():
    """v1 has no triage table, only the held-out counts of its training run: the banner read
    'Pneumothorax: sensitivity 0.20 at its threshold (flagged 1 of 5 held-out images that had
    it)' above a table whose 'A flag's sens. / PPV' said 'not measured' on every row, Pneumothorax's
    included. The table gives the same sensitivity, with its counts, and says the PPV is not
    measured."""
    from cxr_batch.bundle import read_manifest
    from tests.conftest import V1_BUNDLE

    manifest = read_manifest(V1_BUNDLE)
    info = ModelInfo("cxr-fpn@1", "0" * 64, manifest["thresholds"], bundle_evidence(manifest, V1_BUNDLE))
    assert not info.evidence.operating_points and info.evidence.counts["Pneumothorax"].positives == 5
    p = tuple(0.116 if f == "Pleural_Thickening" else 0.005 for f in FINDINGS)
    flags = tuple(int(f == "Pleural_Thickening") for f in FINDINGS)
    study = StudyRecord(file="a.png", scores=Scores(p, flags, "abnormal", 0.452, 0.452))
    txt = text_of(study_pdf(study, GREY, {}, info, ReportOptions(), NOW))
    assert "Pneumothorax: sensitivity 0.20 at its threshold (flagged 1 of 5 held-out images that had it)" in txt
    assert "Pneumothorax 0.005 0.100 - 0.20 (1 of 5) / -" in txt, txt
    assert "Pleural thickening 0.116 0.100 FLAGGED 0.23 (3 of 13) / -" in txt, txt
    assert "not measured" not in txt.split("A flag's sens.")[0].split("Finding Probability")[1]
    assert "A flag's sens.: of the held-out images that had the finding, the share it flagged" in txt, txt
    assert "its PPV was not measured for these weights" in txt


def test_a_v1_worklist_gives_each_flag_the_held_out_catch_its_reports_quote():
    """The v1 worklist's flags column was headed '(sens. / PPV not measured)' beside a line
    quoting v1's held-out counts, while the study report's table gives 'Pleural thickening 0.23
    (3 of 13)': the worklist's flags carry the same held-out sensitivity, and the heading says
    what is and is not measured."""
    from cxr_batch.bundle import read_manifest
    from tests.conftest import V1_BUNDLE

    manifest = read_manifest(V1_BUNDLE)
    info = ModelInfo("cxr-fpn@1", "0" * 64, manifest["thresholds"], bundle_evidence(manifest, V1_BUNDLE))
    p = tuple(0.116 if f == "Pleural_Thickening" else 0.005 for f in FINDINGS)
    flags = tuple(int(f == "Pleural_Thickening") for f in FINDINGS)
    study = StudyRecord(file="a.png", scores=Scores(p, flags, "abnormal", 0.452, 0.452))
    wl = " ".join(text_of(worklist_pdf([study], ReportOptions(), info, NOW)).split())
    assert "sens. / PPV not measured" not in wl, wl
    assert "Pleural thickening (held-out sens. 0.23, 3 of 13)" in wl, wl
    assert "held-out sens.; PPV not measured" in wl, wl


def test_a_v2_worklist_calls_its_cross_validated_catch_out_of_fold():
    """v2.1's counts come from its cross-validation, not a held-out test: its worklist says so."""
    from cxr_batch.bundle import read_manifest
    from tests.conftest import V1_BUNDLE

    v2 = V1_BUNDLE.parent / "cxr-fpn-v2"
    manifest = read_manifest(v2)
    info = ModelInfo("cxr-fpn@2.1", "0" * 64, manifest["thresholds"], bundle_evidence(manifest, v2))
    assert info.evidence.how and not info.evidence.operating_points
    flags = tuple(int(f == "Effusion") for f in FINDINGS)
    study = StudyRecord(file="a.png", scores=Scores(tuple(0.9 * x + 0.01 for x in flags), flags, "abnormal", 0.9, 0.9))
    wl = " ".join(text_of(worklist_pdf([study], ReportOptions(), info, NOW)).split())
    assert "out-of-fold sens.; PPV not measured" in wl and "Effusion (out-of-fold sens. 0." in wl, wl
    assert "held-out sens." not in wl, wl


def test_the_worklist_says_above_its_list_that_studies_are_held_back_not_triaged():
    """A hostile or unlucky sender files one image of another patient into an urgent study: the
    study is held back (two patients, cxr_batch.integration.patients), not triaged. The worklist
    counted its images among the 'skipped' (laterals, files that are no X-ray) and named them on
    its last page, under Not scored: the radiologist read a list without the urgent study and no
    word above it that one was missing. Now the summary counts them apart and a line under it
    says they are not triaged and why."""
    from cxr_batch.integration.patients import held_reason

    held = [StudyRecord(file=f"a{i}.dcm") for i in range(2)]
    for r in held:
        r.hold_back(held_reason("1.2.3", "patient IDs 'P-A' and 'P-B'", "correct or remove the misfiled image"))
    lateral = StudyRecord(file="lat.dcm", status="skipped", reason="lateral view: not scored")
    scored = record("normal", 0.2, {}, file="c.png")
    txt = text_of(worklist_pdf([scored, *held, lateral], ReportOptions(), v3_like_info(), NOW))
    assert "3 skipped (2 held back: two patients in one study)" in txt, txt
    above = txt[:txt.index("Not scored")]
    assert "2 files held back, not triaged" in above and "two patients" in above, above
