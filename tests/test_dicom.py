"""Real-world DICOM: codecs, grey scale, header patient data, what is scored."""

import numpy as np
import pytest
import torch
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless)

from cxr_batch.bundle import load_bundle
from cxr_batch.dicom import read_dicom
from cxr_batch.preprocess import eval_transform
from cxr_batch.readers import read_pil, read_study
from cxr_batch.study import ReadError, ScoringRules, SkipStudy

from .conftest import V1_BUNDLE
from .dicomgen import grey, have, run, write

RULES = ScoringRules()


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(V1_BUNDLE)


def probs(bundle, g, tab=(0.57, 0.0, 1.0)):
    x = eval_transform(g, bundle.preprocessing)[None]
    with torch.inference_mode():
        return torch.sigmoid(bundle.model(x, torch.tensor([tab]))).numpy()[0]


@pytest.mark.parametrize("ts", [None, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                                JPEGLSLossless, JPEG2000Lossless], ids=lambda t: "explicit" if t is None else t.name)
def test_lossless_codecs_decode_to_the_source_pixels(tmp_path, nih_images, ts):
    src = grey(nih_images[0])
    study = read_study(write(tmp_path / "im", src, ts), RULES)
    assert study.kind == "dicom" and np.array_equal(study.grey, src)
    assert (study.header.patient.age, study.header.patient.sex, study.header.patient.view) == (57.0, "F", "PA")
    assert study.header.ids.patient_id == "P001" and study.header.ids.accession_number == "A123"


def test_16_bit_and_monochrome1_give_the_png_probabilities(tmp_path, nih_images, bundle):
    src = grey(nih_images[1])
    reference = probs(bundle, read_pil(nih_images[1], RULES))
    deep = read_study(write(tmp_path / "w16", src.astype(np.uint16) * 257, WindowCenter=32767.5, WindowWidth=65536),
                      RULES).grey
    twelve = read_study(write(tmp_path / "b12", src.astype(np.uint16) * 16, bits_stored=12), RULES).grey
    mono1 = read_study(write(tmp_path / "m1", 255 - src, photometric="MONOCHROME1"), RULES).grey
    mono1_deep = read_study(write(tmp_path / "m1d", 4095 - src.astype(np.uint16) * 16, bits_stored=12,
                                  photometric="MONOCHROME1"), RULES).grey
    plain16 = read_study(write(tmp_path / "p16", src.astype(np.uint16) * 257), RULES).grey
    assert np.array_equal(mono1, src) and np.array_equal(twelve, src) and np.array_equal(plain16, src)
    assert np.array_equal(mono1_deep, src)
    assert np.abs(deep.astype(int) - src).max() <= 1
    for g in (deep, twelve, mono1, mono1_deep):
        assert np.abs(probs(bundle, g) - reference).max() < 0.01
    assert np.abs(probs(bundle, mono1_deep) - probs(bundle, twelve)).max() < 1e-6


def test_rescale_and_first_window_are_applied(tmp_path, nih_images):
    src = grey(nih_images[2])
    stored = src.astype(np.uint16) * 4 + 1000  # values 1000..2020
    path = write(tmp_path / "r", stored, RescaleSlope=0.5, RescaleIntercept=-500,
                 WindowCenter=[255.0, 0.0], WindowWidth=[511.0, 10.0])  # modality values 0..510
    out = read_study(path, RULES).grey
    assert np.abs(out.astype(int) - src).max() <= 1


def test_header_patient_data_variants(tmp_path, nih_images):
    src = grey(nih_images[0])
    s = read_study(write(tmp_path / "a", src, PatientAge=None, PatientBirthDate="19700301", StudyDate="20240301",
                        PatientSex="", ViewPosition=None, SeriesDescription="THORAX AP SUPINE"), RULES)
    assert s.header.patient.age == pytest.approx(54.0, abs=0.01) and s.header.patient.age_source == "header:PatientBirthDate"
    assert s.header.patient.sex is None and s.header.patient.sex_source == "unknown"
    assert s.header.patient.view == "AP" and s.header.patient.view_source == "header:SeriesDescription"
    s = read_study(write(tmp_path / "b", src, PatientAge="006M", PatientSex="O"), RULES)
    assert s.header.patient.age == 0.5 and s.header.patient.sex is None
    s = read_study(write(tmp_path / "c", src, PatientAge="150Y"), RULES)
    assert s.header.patient.age is None and "implausible" in s.header.patient.notes[0]


def test_age_from_the_birth_date_reads_dates_as_the_identifiers_do(tmp_path, nih_images):
    """An ACR-NEMA or ISO birth date gives the age, as those dates are read for the study date
    (they gave no age, without a word); a range, several values or a birth date after the study
    give none, with a note that names no date (results.csv carries no birth date)."""
    src = grey(nih_images[0])

    def patient(name, **header):
        return read_study(write(tmp_path / name, src, PatientAge=None, **header), RULES).header.patient

    for name, birth, on in (("acr", "1970.03.01", "2024.03.01"), ("iso", "1970-03-01", "2024-03-01")):
        p = patient(name, PatientBirthDate=birth, StudyDate=on)
        assert p.age == pytest.approx(54.0, abs=0.01) and p.age_source == "header:PatientBirthDate", name
    for name, birth in (("range", "19700101-19701231"), ("several", "19700301\\19800301"), ("after", "20250101")):
        p = patient(name, PatientBirthDate=birth, StudyDate="20240301")
        assert p.age is None and p.age_source == "unknown", name
        assert any("birth date" in n for n in p.notes), (name, p.notes)
        assert not any(y in n for n in p.notes for y in ("1970", "1980", "2025", "2024")), (name, p.notes)
    p = patient("range-study", PatientBirthDate="19700301", StudyDate="20240101-20240131")  # no study date
    assert p.age is None and any("birth date" in n for n in p.notes)


def test_an_identifier_too_long_for_its_vr_reads_as_text_not_as_bytes(tmp_path, nih_images):
    """A value over 64 KB (a hostile header) is read as the bytes pydicom defers: cut to the
    VR's maximum as text, never as Python's bytes form (b'XXXX...) in results.csv."""
    with pytest.warns(UserWarning, match="exceeds the size of 64 kByte"):  # pydicom, writing the hostile file
        path = write(tmp_path / "long", grey(nih_images[0]), PatientID="X" * 70_000)
    s = read_study(path, RULES)
    assert s.header.ids.patient_id == "X" * 64


def test_view_code_sequence(tmp_path, nih_images):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10214", "SRT", "postero-anterior"
    s = read_study(write(tmp_path / "v", grey(nih_images[0]), ViewPosition=None, ViewCodeSequence=Sequence([code])),
                   RULES)
    assert s.header.patient.view == "PA" and s.header.patient.view_source == "header:ViewCodeSequence"


@pytest.mark.parametrize("header, reason", [
    (dict(ViewPosition="LL"), "lateral"),
    (dict(BodyPartExamined="KNEE"), "body part KNEE"),
    (dict(Modality="CT"), "modality CT"),
    (dict(NumberOfFrames=2), "multi-frame"),
    # an oblique or decubitus view was 'unrecognised view': unknown, scored, and given a chest report
    # (decubitus was called a lateral view)
    (dict(ViewPosition="OBL"), "oblique view"),
    (dict(ViewPosition=None, SeriesDescription="CHEST RAO"), "oblique view"),
    (dict(ViewPosition="LLD"), "decubitus view"),
    # no BodyPartExamined, the study named a knee: it was scored as a chest radiograph
    (dict(BodyPartExamined=None, StudyDescription="XR KNEE 2 VIEWS"), "StudyDescription names KNEE"),
    (dict(BodyPartExamined=None, SeriesDescription="Hand AP"), "SeriesDescription names HAND"),
])
def test_objects_not_meant_for_the_model_are_skipped(tmp_path, nih_images, header, reason):
    src = grey(nih_images[0])
    if "NumberOfFrames" in header:
        src = np.concatenate([src, src])
    with pytest.raises(SkipStudy, match=reason):
        read_dicom(write(tmp_path / "x", src, **header), RULES)


@pytest.mark.parametrize("description", ["XR CHEST PA", "CHEST AND ABDOMEN AP", "THORAX 1 VIEW", "DX PA"])
def test_a_description_naming_the_chest_or_no_body_part_is_scored(tmp_path, nih_images, description):
    s = read_dicom(write(tmp_path / "x", grey(nih_images[0]), BodyPartExamined=None, StudyDescription=description),
                   RULES)
    assert s.grey.ndim == 2


@pytest.mark.parametrize("header", [
    dict(StudyDescription=d) for d in (
        "CHEST PA AND LATERAL", "XR CHEST 1 VIEW PORTABLE", "THORAX AP", "TORAX", "RIBS", "PORTABLE AP SUPINE",
        "ICU PORTABLE", "CXR", "XR CHEST/ABDOMEN", "BABYGRAM", "LUNG", "PA CHEST", "xr chest portable",
        "THORAX P.A.", "Rö Thorax", "RADIO PULMONAIRE", "TORAX PA", "LEGACY PROTOCOL",
        # the chest in another language beside a word of English's list
        "RX TÓRAX Y ABDOMEN", "RX TORACE E ADDOME", "BABYGRAM ABDOMEN")] + [
    # a protocol or series that names the bed's head, a hand-held detector or the patient's
    # position was 'ProtocolName names HEAD: not the chest', though the study says CHEST
    dict(StudyDescription="XR CHEST PORTABLE", ProtocolName="HEAD OF BED 30 DEG"),
    dict(StudyDescription="XR CHEST 1 VIEW", SeriesDescription="AP SUPINE HAND HELD"),
    dict(StudyDescription="ICU PORTABLE", ProtocolName="HAND HELD PORTABLE"),
    dict(StudyDescription="PORTABLE AP", SeriesDescription="HEAD UP 45", ProtocolName="HEAD FIRST SUPINE"),
    dict(SeriesDescription="AP", ProtocolName="HANDHELD DETECTOR"),
])
def test_a_chest_radiograph_whose_descriptions_name_another_word_is_still_scored(tmp_path, nih_images, header):
    """Without BodyPartExamined a description naming another body part is skipped, and a chest
    radiograph wrongly skipped is an urgent study nobody is told of: the chest named in any of
    the descriptions (in Spanish, Italian, with accents) keeps it scored, and 'HEAD OF BED',
    'HAND HELD' or 'HEAD FIRST' name no body part."""
    s = read_dicom(write(tmp_path / "x", grey(nih_images[0]), BodyPartExamined=None, **header), RULES)
    assert s.grey.ndim == 2


def test_scoring_rules_are_configurable(tmp_path, nih_images):
    path = write(tmp_path / "x", grey(nih_images[0]), BodyPartExamined="KNEE", ViewPosition=None)
    assert read_dicom(path, ScoringRules(body_parts=("KNEE",))).header.patient.view is None
    with pytest.raises(SkipStudy, match="view position unknown"):
        read_dicom(path, ScoringRules(body_parts=("KNEE",), allow_unknown_view=False))


def test_encapsulated_pdf_is_skipped_as_not_an_image(tmp_path):
    from cxr_batch.dicom_build import encapsulated_pdf, save

    ds = encapsulated_pdf(b"%PDF-1.4 test", {"PatientID": "P1"}, "report")
    with pytest.raises(SkipStudy, match="encapsulated document"):
        read_study(save(ds, tmp_path / "pdf"), RULES)


def test_undecodable_transfer_syntax_is_named(tmp_path, nih_images):
    path = write(tmp_path / "x", grey(nih_images[0]), JPEGLSLossless)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"  # a private, unknown syntax
    ds.save_as(tmp_path / "private", enforce_file_format=False)
    with pytest.raises(ReadError, match=r"transfer syntax 1\.2\.3\.4\.5\.6\.7\.8\.9 \(unknown or private\)"):
        read_study(tmp_path / "private", RULES)


def _cut_frame(tmp_path, src, ts, keep: float):
    """The image in ``ts`` with its compressed frame cut to ``keep`` of its bytes (a transfer
    that stopped, a disk that filled): the header is intact, the codestream is not."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(write(tmp_path / "whole", src, ts))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[:int(len(frame) * keep)]
    ds.PixelData = encapsulate([cut + b"\x00" * (len(cut) % 2)])
    ds.save_as(tmp_path / "cut", enforce_file_format=True)
    return tmp_path / "cut"


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSLossless])
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_a_cut_jpeg_codestream_is_an_error_not_a_scored_guess(tmp_path, nih_images, ts, keep):
    """libjpeg and CharLS decode a JPEG or JPEG-LS frame that stops short without an error,
    filling the rest (half a radiograph: 30 grey levels off on average), and the study was
    scored on it. A frame without its end-of-image marker is refused, naming why."""
    src = grey(nih_images[0])[::2, ::2].copy()
    with pytest.raises(ReadError, match="truncated"):
        read_study(_cut_frame(tmp_path, src, ts, keep), RULES)
    for side in (0, 64):  # the reduced decode (JPEG DCT scaling) too
        with pytest.raises(ReadError, match="truncated"):
            read_study(_cut_frame(tmp_path, src, ts, keep), RULES, min_side=side)


def _refragmented(tmp_path, src, ts, fragments):
    """The image in ``ts`` with its one frame stored as ``fragments(frame)`` returns: the
    fragment layouts and trailing padding that encoders in the wild write."""
    import struct

    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(write(tmp_path / "whole", src, ts))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\x00")
    items = [struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in [b"", *fragments(frame)]]
    ds.PixelData = b"".join(items) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    ds.save_as(tmp_path / "refragmented", enforce_file_format=True)
    return tmp_path / "refragmented"


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSLossless])
@pytest.mark.parametrize("layout", [
    lambda f: [f[i:i + 4096] for i in range(0, len(f), 4096)],  # many fragments (dcmcjpeg +fs)
    lambda f: [f + b"\x00" * (len(f) % 2)],  # one 00 to even length (PS3.5 A.4)
    lambda f: [f + b"\xff" * (2 - len(f) % 2)],  # padded with FF fill bytes, not 00
    lambda f: [f + b"\x00" * (4 - len(f) % 4)],  # padded to a multiple of 4
    lambda f: [f + b"\x00" * (len(f) % 2), b""],  # an empty fragment after the frame
], ids=["fragments", "pad00", "padFF", "pad4", "empty-last"])
def test_a_whole_jpeg_frame_is_read_whatever_its_fragments_and_padding(tmp_path, nih_images, ts, layout):
    """The end-of-image check looks past what follows the marker in the frame's last bytes:
    padding (00 or FF fill, more than one byte) and an empty last fragment are not a cut frame."""
    src = grey(nih_images[0])[::2, ::2].copy()
    whole = read_study(write(tmp_path / "plain", src, ts), RULES).grey
    assert np.array_equal(read_study(_refragmented(tmp_path, src, ts, layout), RULES).grey, whole)


@pytest.mark.parametrize("ts", [JPEG2000Lossless, RLELossless])
def test_a_cut_codestream_the_decoder_refuses_is_called_corrupt_not_undecodable(tmp_path, nih_images, ts):
    """Every installed decoder failing on a damaged frame said 'no decoder for it', sending the
    operator to install codecs for a file that is broken."""
    src = grey(nih_images[0])[::2, ::2].copy()
    with pytest.raises(ReadError, match="corrupt or truncated") as caught:
        read_study(_cut_frame(tmp_path, src, ts, 0.5), RULES)
    assert "no decoder" not in str(caught.value)


def _with_raw(path, old: bytes, new: bytes):
    """Replace a header value in the file's bytes (same length): values pydicom will not write.
    ``old`` must be bytes no UID can hold (a '+' or '-'): the UIDs are new at each run."""
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warning would reach the user's stderr
@pytest.mark.parametrize("keyword, value", [("RescaleSlope", b"NaN "), ("RescaleSlope", b"inf "),
                                            ("RescaleIntercept", b"nan "), ("RescaleSlope", b"1e38")])
def test_a_rescale_that_is_not_a_finite_number_is_named(tmp_path, nih_images, keyword, value):
    """A NaN or infinite rescale (or one whose product overflows) made every value NaN: the row
    said 'unexpected ValueError while reading: invalid grey range [nan, nan]'."""
    stored = grey(nih_images[0]).astype(np.uint16) * 16
    path = write(tmp_path / "r", stored, RescaleSlope="+1.5", RescaleIntercept="-7.5")  # '+' and '-': never in a UID
    _with_raw(path, b"+1.5" if keyword == "RescaleSlope" else b"-7.5", value)
    with pytest.raises(ReadError, match=f"{keyword} is not a finite number|rescale .* finite number"):
        read_study(path, RULES)


def test_a_window_that_is_not_a_finite_number_is_not_used(tmp_path, nih_images):
    """A NaN or infinite WindowCenter/WindowWidth is no usable window, as a width under 1 is
    (the image's own range is shown), not refused as 'invalid grey range [nan, nan]'."""
    stored = grey(nih_images[0]).astype(np.uint16) * 16
    plain = read_study(write(tmp_path / "plain", stored, bits_stored=12, WindowCenter=2048, WindowWidth=0.5),
                       RULES).grey
    for centre, width in ((b"nan ", b"nan "), (b"2048", b"inf "), (b"-inf", b"4096")):
        # values whose bytes no generated UID holds ("2222" was in one now and then)
        path = write(tmp_path / "w", stored, bits_stored=12, WindowCenter="+111", WindowWidth="+222")
        _with_raw(_with_raw(path, b"+111", centre), b"+222", width)
        assert np.array_equal(read_study(path, RULES).grey, plain), (centre, width)


def test_a_window_saturating_most_pixels_is_read_and_one_leaving_none_is_named(tmp_path, nih_images):
    """A narrow VOI window that saturates most of the image still leaves a radiograph to score;
    a window entirely outside the pixel values leaves one grey level, refused as before, but
    was called a 'blank image' when the pixels themselves vary: the header's window is why."""
    stored = grey(nih_images[0]).astype(np.uint16) * 16
    most = read_study(write(tmp_path / "most", stored, bits_stored=12, WindowCenter=200, WindowWidth=100), RULES)
    assert (most.grey == 255).mean() > 0.9 and most.grey.min() < 255
    with pytest.raises(ReadError, match="window .*leaves every pixel") as caught:
        read_study(write(tmp_path / "none", stored, bits_stored=12, WindowCenter=50000, WindowWidth=100), RULES)
    assert "blank" not in str(caught.value)
    with pytest.raises(ReadError, match="blank image"):  # a truly blank image is still called blank
        read_study(write(tmp_path / "blank", np.full_like(stored, 700), bits_stored=12, WindowCenter=2048,
                         WindowWidth=4096), RULES)


def test_a_malformed_lut_is_named(tmp_path, nih_images):
    """A VOI LUT without data or with an unsupported entry size, a Modality LUT shorter than its
    descriptor: 'unexpected KeyError/NotImplementedError/IndexError while reading' before."""
    from pydicom.dataset import Dataset

    stored = grey(nih_images[0]).astype(np.uint16) * 16

    def lut(descriptor, data=None):
        item = Dataset()
        item.LUTDescriptor = descriptor
        if data is not None:
            item.LUTData = data
            item["LUTData"].VR = "US"
        return [item]

    for name, header in (("no-data", dict(VOILUTSequence=lut([4096, 0, 12]))),
                         ("40-bit", dict(VOILUTSequence=lut([0, 0, 40], [1, 2, 3]))),
                         ("short", dict(ModalityLUTSequence=lut([10, 0, 16], [1, 2])))):
        if "ModalityLUTSequence" in header:
            header["ModalityLUTSequence"][0].ModalityLUTType = "OD"
        with pytest.raises(ReadError, match="LUT .*malformed") as caught:
            read_study(write(tmp_path / name, stored, bits_stored=12, **header), RULES)
        assert "unexpected" not in str(caught.value), name


def test_fewer_than_8_stored_bits_fill_the_grey_scale_whatever_the_rescale(tmp_path, nih_images):
    """7-bit data (BitsStored 7 of 8) came back at half brightness (0..127) with no rescale,
    and at full brightness with RescaleSlope 1.0000001: the integer shortcut did not scale up."""
    src = grey(nih_images[2])
    plain = read_study(write(tmp_path / "b7", src >> 1, bits_stored=7), RULES).grey
    rescaled = read_study(write(tmp_path / "b7r", src >> 1, bits_stored=7, RescaleSlope="1.0000001",
                                RescaleIntercept="0"), RULES).grey
    assert np.array_equal(plain, (src >> 1) << 1)  # floor(v * 256 / 2^7), as the 12- and 16-bit cases
    assert np.abs(plain.astype(int) - rescaled).max() <= 1


def test_a_window_one_wide_and_a_modality_lut_starting_beyond_the_pixels_are_no_unexpected_errors(tmp_path,
                                                                                                   nih_images):
    """WindowWidth 1 (legal: a linear window that is a threshold, PS3.3 C.11.2.1.2.1) was an
    'unexpected ValueError while reading: invalid grey range [2047.5, 2047.5]'; a Modality LUT
    whose first mapped value (65000) no 8-bit pixel can hold an 'unexpected OverflowError'."""
    from pydicom.dataset import Dataset

    stored = grey(nih_images[0]).astype(np.uint16) * 16
    own_range = read_study(write(tmp_path / "w0", stored, bits_stored=12, WindowCenter=2048, WindowWidth=0.5),
                           RULES).grey
    threshold = read_study(write(tmp_path / "w1", stored, bits_stored=12, WindowCenter=2048, WindowWidth=1), RULES)
    assert np.array_equal(threshold.grey, own_range)  # no grey scale in it: shown as with no usable window
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [256, 65000, 16], "US"
    item.LUTData = list(range(256))
    item["LUTData"].VR = "US"
    with pytest.raises(ReadError, match="Modality LUT is malformed"):
        read_study(write(tmp_path / "lut", grey(nih_images[1]), ModalityLUTSequence=[item]), RULES)


@pytest.mark.skipif(not have("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmdjpeg"), reason="dcmtk not installed")
@pytest.mark.parametrize("tool, option", [("dcmcjpeg", "+e1"), ("dcmcjpeg", "+el"), ("dcmcjpls", "+el"),
                                          ("dcmcrle", "")])
def test_dcmtk_lossless_codecs(tmp_path, nih_images, tool, option):
    src = grey(nih_images[3])
    plain = write(tmp_path / "plain.dcm", src)
    args = [tool, option, plain, tmp_path / "out.dcm"] if option else [tool, plain, tmp_path / "out.dcm"]
    run(*args)
    assert np.array_equal(read_study(tmp_path / "out.dcm", RULES).grey, src)


@pytest.mark.skipif(not have("img2dcm"), reason="dcmtk not installed")
def test_dcmtk_img2dcm_jpeg_baseline_matches_png_probabilities(tmp_path, nih_images, bundle):
    from PIL import Image

    Image.open(nih_images[4]).convert("L").save(tmp_path / "x.jpg", quality=95)
    run("img2dcm", "-k", "PatientAge=045Y", "-k", "PatientSex=M", "-k", "ViewPosition=PA",
        tmp_path / "x.jpg", tmp_path / "x.dcm")
    study = read_study(tmp_path / "x.dcm", RULES)
    assert study.header.patient.age == 45.0
    reference = probs(bundle, read_pil(nih_images[4], RULES))
    assert np.abs(probs(bundle, study.grey) - reference).max() < 0.02  # lossy JPEG, quality 95


@pytest.mark.skipif(not have("gdcmconv"), reason="gdcm not installed")
@pytest.mark.parametrize("option", ["--j2k", "--jpegls", "--rle", "--deflated", "--jpeg"])
def test_gdcm_codecs(tmp_path, nih_images, option):
    src = grey(nih_images[5])
    run("gdcmconv", option, write(tmp_path / "plain.dcm", src), tmp_path / "out.dcm")
    out = read_study(tmp_path / "out.dcm", RULES).grey
    # gdcm's --jpeg and --j2k default to lossless for 8-bit input
    assert np.abs(out.astype(int) - src).max() <= (2 if option == "--jpeg" else 0)
