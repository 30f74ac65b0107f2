"""DICOM reading: what is scored, patient data from the header, pixels to the model's grey scale.

Pixel decoding is pydicom's, with the pylibjpeg plugins (JPEG baseline/extended/lossless,
JPEG 2000, RLE) and pyjpegls (JPEG-LS, decoded by CharLS alone: _STRICT_DECODER) installed as
dependencies. Damaged frames the decoders would fill in are refused first (_check_codestream).
Grey scale follows the
DICOM display pipeline a viewer uses: Modality LUT (or RescaleSlope/Intercept), then the VOI LUT
or the first WindowCenter/WindowWidth pair, then MONOCHROME1 inversion, giving 8-bit
MONOCHROME2 like the NIH PNGs the model learned from. Without a VOI transform the stored bit
range is mapped when the data fill it, else the robust range of the values (see _unwindowed).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import re
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from . import acquisition
from .codestream import (CodestreamError, check_j2k_tile_parts, check_jpeg_restarts, ends_with_eoi, first_fragment,
                         frame_bytes, frame_head, j2k_frame, jpeg_frame, jpeg_restart_interval, rle_segments)
from .display import format_date
from .greyscale import robust_range, window_to_uint8
from .patient import PatientData, patient_from_values
from .study import (MAX_LENGTH, Identifiers, ReadError, ScoringRules, SkipStudy, StudyFailure, StudyHeader, StudyImage,
                    check_view)

log = logging.getLogger("cxr_batch")
# pydicom's checks of header values on reading quote the value in a warning and a log line
# ("Invalid value for VR DA: '1950-02-03'"): a birth date, a name or an ID in the log, which
# carries no patient identifier. cxr-batch's own readers check what the result depends on and
# say it in the result's notes without the value (an age that cannot be read, a date that is
# not one), and clean what they write into a DICOM object to its VR (cxr_batch.study, sr).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

DEFLATED = "1.2.840.10008.1.2.1.99"
HEADER_PROBE_BYTES = 1 << 16  # what is read to recognise a DICOM file without its preamble

# SOP classes that hold no radiograph (checked before anything else is read).
_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.66": "registration/segmentation object",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
}
_KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"

# Keywords searched, in order, for the view when ViewPosition is empty.
_VIEW_TEXT_TAGS = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription",
                   "PerformedProcedureStepDescription", "ImageComments")
_DATE_TAGS = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")
# What pydicom raises on a LUT whose descriptor and data disagree (missing data, an entry size
# it does not support, fewer entries than described).
_LUT_ERRORS = (KeyError, IndexError, ValueError, TypeError, AttributeError, NotImplementedError,
               OverflowError)  # a first mapped value no pixel of the data's type can hold


def looks_like_dicom(path: Path) -> bool:
    """True for a DICOM file without the 128-byte preamble: it starts with a group 0002 or
    0008 element (little endian) and pydicom finds an image or SOP class in it."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_PROBE_BYTES)
        if len(head) < 8 or head[1] != 0 or head[0] not in (0x02, 0x08) or head[3] != 0:
            return False
        ds = pydicom.dcmread(io.BytesIO(head), force=True, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "Modality"])
        return "SOPClassUID" in ds or "Modality" in ds
    except Exception:
        return False


def _text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element: treat as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    if isinstance(value, bytes):  # a value over defer_size pydicom hands back undecoded
        value = value.decode("latin-1")
    return str(value).strip().replace("\x00", "")


def _date(text: str) -> dt.date | None:
    """The date a header value holds, read as the identifiers read it (DA, ACR-NEMA, ISO); None
    for a range, several values or anything else (its first 8 characters are not its date)."""
    iso = format_date(text)
    return dt.date.fromisoformat(iso) if iso else None


def patient_from_header(ds) -> PatientData:
    """Age, sex and view from the header, each with its source and a note when unusable."""
    view_raw, view_tag = _text(ds, "ViewPosition"), "ViewPosition"
    if not view_raw:
        try:
            seq = ds.get("ViewCodeSequence")
            if seq:
                view_raw, view_tag = str(seq[0].get("CodeMeaning", "")).strip(), "ViewCodeSequence"
        except Exception:
            pass
    data = patient_from_values(_text(ds, "PatientAge") or None, _text(ds, "PatientSex") or None,
                               view_raw or None, "header")
    if data.view is not None:
        data.view_source = f"header:{view_tag}"
    else:
        for tag in _VIEW_TEXT_TAGS:
            text = _text(ds, tag)
            if not text:
                continue
            found = patient_from_values(None, None, text, f"header:{tag}")
            if found.view is not None:
                data.view, data.view_source = found.view, found.view_source
                break
    if data.age is not None:
        data.age_source = "header:PatientAge"
    else:
        birth_text = _text(ds, "PatientBirthDate")
        birth = _date(birth_text)
        on = next((d for d in (_date(_text(ds, t)) for t in _DATE_TAGS) if d), None)
        # the notes name no date: results.csv and the reports carry no birth date
        if birth and on:
            years = (on - birth).days / 365.25
            from_dates = patient_from_values(round(years, 2), None, None, "header:PatientBirthDate")
            if from_dates.age is not None:
                data.age, data.age_source = from_dates.age, from_dates.age_source
            else:
                data.notes.append("age from the birth date to the study date is implausible (negative or over "
                                  "120 years): treated as unknown")
        elif birth_text and not birth:
            data.notes.append("header birth date (PatientBirthDate) is not one date (YYYYMMDD): age treated as unknown")
        elif birth_text:
            data.notes.append("header has a birth date but no study date that is one date (YYYYMMDD) to count the "
                              "age to: treated as unknown")
    if data.sex is not None:
        data.sex_source = "header:PatientSex"
    return data


def identifiers(ds) -> Identifiers:
    return Identifiers(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),  # PN form (FAMILY^GIVEN...): DICOM outputs keep it
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        institution=_text(ds, "InstitutionName"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        patient_age=_text(ds, "PatientAge"),
        study_time=_text(ds, "StudyTime"),
        study_id=_text(ds, "StudyID"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        other_patient_ids=other_patient_ids(ds),
        timezone_offset=_text(ds, "TimezoneOffsetFromUTC"),
        acquisition_datetime=_text(ds, "AcquisitionDateTime") or (
            _text(ds, "AcquisitionDate") + _text(ds, "AcquisitionTime") if _text(ds, "AcquisitionDate") else ""),
        **issuer_qualifiers(ds),
    )


def issuer_qualifiers(ds) -> dict[str, str]:
    """The first IssuerOfPatientIDQualifiersSequence item's universal ID, its type and the
    identifier's type (the sequence holds one item); none from a sequence that cannot be read."""
    try:
        items = ds.get("IssuerOfPatientIDQualifiersSequence") or []
        item = items[0] if len(items) else None
        if item is None or not hasattr(item, "get"):
            return {}
        return {"issuer_universal_id": _text(item, "UniversalEntityID"),
                "issuer_universal_id_type": _text(item, "UniversalEntityIDType"),
                "patient_id_type": _text(item, "IdentifierTypeCode")}
    except Exception:  # a broken sequence in a hostile header: the ID goes without its qualifiers
        return {}


def other_patient_ids(ds) -> str:
    """The header's Other Patient IDs, "\\"-joined: each OtherPatientIDsSequence item's PatientID,
    then the retired OtherPatientIDs; none from a value that cannot be read."""
    ids = []
    try:
        for item in ds.get("OtherPatientIDsSequence") or []:
            if hasattr(item, "get"):
                ids.append(_text(item, "PatientID"))
    except Exception:  # a broken sequence in a hostile header: the ID goes without the others
        pass
    ids += _text(ds, "OtherPatientIDs").split("\\")
    return "\\".join(dict.fromkeys(i.strip() for i in ids if i.strip()))


def check_scored(ds, rules: ScoringRules) -> None:
    """Raise SkipStudy for objects the model is not meant for."""
    sop_class = _text(ds, "SOPClassUID")
    for prefix, what in _NON_IMAGE_PREFIXES.items():
        if sop_class.startswith(prefix) or sop_class == _KEY_OBJECT_SELECTION:
            raise SkipStudy(f"not an image: {what} ({UID(sop_class).name})")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        name = UID(sop_class).name if sop_class else "no SOP class"
        raise SkipStudy(f"not an image: no pixel data ({name})")
    modality = _text(ds, "Modality").upper()
    if modality and modality not in rules.modalities:
        raise SkipStudy(f"modality {modality} is not a projection radiograph (scored: {', '.join(rules.modalities)})")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise SkipStudy(f"multi-frame object ({frames} frames); only single radiographs are scored")
    body = _text(ds, "BodyPartExamined").upper()
    if body and body not in rules.body_parts:
        raise SkipStudy(f"body part {body} is not the chest")
    if not body and not rules.allow_missing_body_part:
        raise SkipStudy("body part not stated (scoring without BodyPartExamined is turned off)")
    if not body:
        _check_described_body_part(ds, rules)


# Body parts a description may name that are never a chest radiograph (DICOM PS3.16 CID 4031
# terms and their common short forms). Ribs, shoulders and clavicles are left out: their
# studies are taken over the chest and their descriptions often name it.
_OTHER_BODY_PARTS = re.compile(
    r"\b(SKULL|HEAD|SINUS(?:ES)?|FACE|MANDIBLE|C-?SPINE|T-?SPINE|L-?SPINE|SPINE|PELVIS|HIPS?|SACRUM|KNEES?|ANKLES?|"
    r"FOOT|FEET|TOES?|HANDS?|FINGERS?|WRISTS?|ELBOWS?|FOREARM|HUMERUS|FEMUR|TIBIA|FIBULA|LEG|ABDOMEN|KUB|BREAST)\b")
# The chest in English and the languages of the descriptions met (accents removed first: TÓRAX);
# a babygram is a neonate's chest and abdomen on one film
_CHEST_WORDS = re.compile(r"\b(CHEST|THORAX|THORACIC|TORAX|TORACE|PECHO|LUNGS?|LUNGE|PULMONAIRE|CXR|BABYGRAM)\b")
# Words of the lists above that name no body part in these phrases: the bed's head raised for a
# supine film, a hand-held detector, the patient's position on the table ('HEAD FIRST SUPINE')
_NOT_A_BODY_PART = re.compile(r"\b(HEAD (OF (THE )?BED|UP|DOWN|ELEVATED|RAISED|FIRST)|FEET FIRST|"
                              r"FOOT OF (THE )?BED|HAND ?HELD)\b")
_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def _description(ds, keyword: str) -> str:
    """A description for the body-part words: upper case, accents and separators removed."""
    text = unicodedata.normalize("NFKD", _text(ds, keyword).upper())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _NOT_A_BODY_PART.sub(" ", re.sub(r"[_/\\^]+", " ", text))


def _check_described_body_part(ds, rules: ScoringRules) -> None:
    """No BodyPartExamined: descriptions naming another body part and none the chest ('XR KNEE 2
    VIEWS') are not scored. A knee exported without the attribute got a chest triage report. A
    chest radiograph skipped is an urgent study nobody is told of: the chest named in any of
    the descriptions (the study's, while the protocol says 'HEAD ...') keeps it scored."""
    allowed = {part.upper() for part in rules.body_parts}
    texts = {keyword: _description(ds, keyword) for keyword in _DESCRIPTIONS}
    if any(_CHEST_WORDS.search(text) for text in texts.values()):
        return
    for keyword, text in texts.items():
        other = _OTHER_BODY_PARTS.search(text)
        if other and other.group(1) not in allowed:
            raise SkipStudy(f"body part not stated, and {keyword} names {other.group(1)}: not the chest")


def _check_size(ds, rules: ScoringRules) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ReadError("header lacks a valid Rows/Columns: not a readable image") from None
    if rows <= 0 or cols <= 0:
        raise ReadError(f"header claims an empty image ({rows} x {cols})")
    if rows * cols * samples > rules.max_pixels:
        raise ReadError(f"header claims a {cols} x {rows} image, over the limit of {rules.max_pixels:,} pixels")


_ENCAPSULATED_KINDS = {
    "1.2.840.10008.1.2.5": "rle",
    "1.2.840.10008.1.2.4.50": "jpeg", "1.2.840.10008.1.2.4.51": "jpeg", "1.2.840.10008.1.2.4.57": "jpeg",
    "1.2.840.10008.1.2.4.70": "jpeg", "1.2.840.10008.1.2.4.80": "jpeg", "1.2.840.10008.1.2.4.81": "jpeg",
    "1.2.840.10008.1.2.4.90": "j2k", "1.2.840.10008.1.2.4.91": "j2k", "1.2.840.10008.1.2.4.201": "j2k",
    "1.2.840.10008.1.2.4.202": "j2k", "1.2.840.10008.1.2.4.203": "j2k",
}
# Every transfer syntax the reader decodes: the uncompressed ones (explicit/implicit VR little
# endian, deflated, the retired explicit big endian) and the compressed ones above. The DICOM
# node (cxr_batch.integration.node) accepts exactly these.
ENCAPSULATED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(_ENCAPSULATED_KINDS)
DECODED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    *_ENCAPSULATED_KINDS,
)


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _check_codestream(ds, rules: ScoringRules) -> None:
    """For compressed pixel data: the frame size the codestream declares must be the header's
    Rows x Columns, and within max_pixels, before any decoder allocates for it."""
    kind = _ENCAPSULATED_KINDS.get(_transfer_syntax(ds))
    if kind is None:
        return
    try:
        head = frame_head(ds.PixelData)  # across fragments: a small first one may not hold the frame header
        if kind == "rle":
            segments = rle_segments(head)
            expected = int(ds.get("SamplesPerPixel", 1) or 1) * max(1, int(ds.get("BitsAllocated", 8) or 8) // 8)
            if segments != expected:
                raise ReadError(f"RLE pixel data declare {segments} segments where the header implies {expected}")
            return
        info = jpeg_frame(head) if kind == "jpeg" else j2k_frame(head)
    except CodestreamError as e:
        raise ReadError(f"compressed pixel data are malformed: {e}") from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if info.rows * info.columns * max(1, info.components) > rules.max_pixels:
        raise ReadError(f"{info.kind} codestream declares a {info.columns} x {info.rows} image, over the limit "
                        f"of {rules.max_pixels:,} pixels: refused before decoding")
    if (info.rows, info.columns) != (rows, cols):
        raise ReadError(f"{info.kind} codestream declares a {info.columns} x {info.rows} image but the header says "
                        f"{cols} x {rows}: refused before decoding")
    if kind == "j2k":
        try:
            check_j2k_tile_parts(frame_bytes(ds.PixelData))
        except CodestreamError as e:
            raise ReadError(f"{info.kind} codestream is corrupt or truncated ({e}): refused, as openjpeg would fill "
                            "in the missing part of the image") from None
    if kind == "jpeg" and not ends_with_eoi(ds.PixelData):
        raise ReadError(f"{info.kind} codestream is truncated (no end-of-image marker): refused, as its decoder "
                        "would fill the missing part of the image")
    if info.kind == "JPEG" and jpeg_restart_interval(head):  # the whole frame is read only when there are markers
        try:
            check_jpeg_restarts(frame_bytes(ds.PixelData))
        except CodestreamError as e:
            raise ReadError(f"JPEG codestream is corrupt or truncated ({e}): refused, as its decoder would fill in "
                            "the damaged part of the image") from None


def reduction(rows: int, cols: int, min_side: int, most: int) -> int:
    """The largest k <= ``most`` whose 1/2^k image still has ``min_side`` pixels on its short
    side (0: decode at full size)."""
    if min_side <= 0:
        return 0
    k = 0
    while k < most and -(-min(rows, cols) // 2 ** (k + 1)) >= min_side:
        k += 1
    return k


def realign(grey: np.ndarray, shift: float) -> np.ndarray:
    """``grey`` resampled ``shift`` pixels down and right (bilinear, edges repeated). A JPEG 2000
    resolution level k holds the image at full-size positions 2^k m, where a downsampled image
    is expected at the centres of 2^k-pixel blocks, 2^k m + (2^k - 1) / 2: left as it is, the
    picture sits (2^k - 1) / 2^(k+1) of its own pixels off (measured: 0.4 at k = 2 and 3), and
    the model sees a shifted radiograph."""
    if shift <= 0:
        return grey
    g = grey.astype(np.float32)
    down = np.concatenate([g[1:], g[-1:]], axis=0)
    g = (1 - shift) * g + shift * down
    right = np.concatenate([g[:, 1:], g[:, -1:]], axis=1)
    g = (1 - shift) * g + shift * right
    return np.clip(g + 0.5, 0, 255).astype(np.uint8)


def _decode_reduced(ds, min_side: int) -> tuple[np.ndarray, float] | None:
    """Stored values at the smallest size the model can use, when the codestream gives it for
    free: a JPEG 2000 resolution level (each wavelet level halves the size) or a JPEG's DCT
    scaling (1/2, 1/4, 1/8), both through Pillow. Returns the stored values and the shift that
    :func:`realign` must apply once they are grey (JPEG 2000 only: a scaled IDCT is centred).
    None when the file's coding does not allow it (signed or multi-component data, other
    transfer syntaxes) or the decoder refuses: the caller then decodes the whole image."""
    kind = _ENCAPSULATED_KINDS.get(_transfer_syntax(ds))
    if kind not in ("j2k", "jpeg") or min_side <= 0 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    from PIL import Image

    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        fragment = first_fragment(ds.PixelData, limit=1 << 62)
        if kind == "j2k":
            info = j2k_frame(fragment)
            k = reduction(rows, cols, min_side, info.levels)
            if k == 0 or info.signed or info.precision > 16:
                return None
            with Image.open(io.BytesIO(fragment), formats=["JPEG2000"]) as im:
                im.reduce = k
                im.load()
                arr = np.asarray(im)
            if im.mode.startswith("I;16") and info.precision < 16:
                arr = arr >> (16 - info.precision)  # Pillow widens the samples to 16 bits
            shift = (2 ** k - 1) / 2 ** (k + 1)
        else:
            if int(ds.get("BitsAllocated", 8) or 8) != 8 or jpeg_frame(fragment).kind != "JPEG":
                return None
            k = reduction(rows, cols, min_side, 3)
            if k == 0:
                return None
            with Image.open(io.BytesIO(fragment), formats=["JPEG"]) as im:
                im.draft("L", (-(-cols // 2 ** k), -(-rows // 2 ** k)))
                arr = np.asarray(im.convert("L") if im.mode != "L" else im)
            shift = 0.0
    except Exception as e:  # any doubt: the full decode decides
        log.debug("reduced decode not used: %s: %s", type(e).__name__, e)
        return None
    return (arr, shift) if arr.ndim == 2 else None


def _decode(ds, min_side: int = 0) -> tuple[np.ndarray, float]:
    """Stored pixel values, and the shift :func:`realign` applies to their grey image."""
    reduced = _decode_reduced(ds, min_side)
    if reduced is not None:
        return reduced
    return _decode_full(ds), 0.0


# Transfer syntaxes whose first decoder in pydicom's order fills in a damaged frame without a
# word, while another installed one refuses it: pydicom tries its plugins in turn and keeps the
# first image it gets, so the strict decoder alone is used. JPEG-LS: libjpeg (pylibjpeg)
# decodes a frame with zeroed bytes, flipped bits or a lost fragment to a plausible image;
# CharLS (pyjpegls) checks that the encoded bits end where the frame ends.
_STRICT_DECODER = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}


def _decode_full(ds) -> np.ndarray:
    ts = _transfer_syntax(ds)
    try:
        strict = _STRICT_DECODER.get(ts)
        if strict:
            from pydicom.pixels import get_decoder

            if strict in get_decoder(UID(ts)).available_plugins:
                ds.pixel_array_options(decoding_plugin=strict)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except MemoryError:
        raise ReadError("pixel data need more memory than decoding is allowed") from None
    except (NotImplementedError, RuntimeError) as e:
        msg = str(e)
        log.debug("decoder: %s: %s", type(e).__name__, msg)
        if "exceptions were raised by all available plugins" in msg:  # decoders there, the data broken
            raise ReadError("pixel data cannot be decoded (corrupt or truncated)") from None
        if ts and ("decod" in msg.lower() or "not supported" in msg.lower() or "plugin" in msg.lower()):
            name = UID(ts).name
            what = f"{name} ({ts})" if name != ts else f"{ts} (unknown or private)"
            raise ReadError(f"cannot decode transfer syntax {what}: no decoder for it") from None
        raise ReadError("pixel data cannot be decoded (corrupt or truncated)") from None
    except Exception as e:  # short pixel data, corrupt codestreams, bad attributes
        log.debug("decoder: %s: %s", type(e).__name__, e)
        raise ReadError("pixel data cannot be decoded (corrupt, truncated or inconsistent with the header)") from None
    except BaseException as e:
        # A decoder written in Rust (pylibjpeg-rle) panics on run lengths that overrun the
        # frame (zeroed bytes): pyo3's PanicException is a BaseException, which no handler
        # for one study catches, and it ended the whole scan (it cannot even be pickled back
        # from a reading worker). It is one damaged file.
        if type(e).__name__ != "PanicException":
            raise
        log.debug("decoder panicked: %s", e)
        raise ReadError("pixel data cannot be decoded (corrupt or truncated: the decoder failed on them)") from None


def to_display_grey(ds, arr: np.ndarray) -> np.ndarray:
    """Stored pixel values -> uint8 MONOCHROME2 the way a viewer displays them."""
    from pydicom.pixels import apply_voi

    photometric = _text(ds, "PhotometricInterpretation").upper() or "MONOCHROME2"
    if arr.ndim == 3:
        if photometric.startswith("MONOCHROME"):
            raise ReadError(f"unexpected pixel array shape {arr.shape} for {photometric}")
        spread = np.abs(arr.astype(np.int32) - arr.astype(np.int32).mean(axis=2, keepdims=True)).max()
        if spread > 8:
            raise ReadError(f"colour image ({photometric}); a radiograph is grey")
        arr, photometric = arr[..., 0], "MONOCHROME2"
    elif not photometric.startswith("MONOCHROME"):
        raise ReadError(f"unsupported photometric interpretation {photometric}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # Float Pixel Data may hold NaN or inf
        raise ReadError("pixel data hold values that are not finite numbers (NaN or infinity)")
    values = _modality(ds, arr)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        try:
            out = apply_voi(values, ds, index=0)
            bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        except _LUT_ERRORS as e:
            log.debug("VOI LUT: %s: %s", type(e).__name__, e)
            raise ReadError("the header's VOI LUT is malformed (no data, or data its descriptor does not describe)"
                            ) from None
        grey = window_to_uint8(out, 0, max(1, 2**bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        grey = _window(ds, values)
        if grey.size and grey.min() == grey.max() and values.min() != values.max():  # else check_image: blank
            raise ReadError("the header's VOI window (WindowCenter/WindowWidth) leaves every pixel at one grey level, "
                            "though the pixel values vary: the window does not fit this image; nothing to score as "
                            "displayed")
    else:
        grey = _unwindowed(ds, arr, values)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _modality(ds, arr: np.ndarray) -> np.ndarray:
    """The Modality LUT stage. A rescale is applied in float32 (exact for the integer slopes
    and intercepts detectors write, and half the memory of pydicom's float64 on a 40-megapixel
    image); a Modality LUT Sequence goes through pydicom."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(arr, ds)
        except _LUT_ERRORS as e:
            log.debug("Modality LUT: %s: %s", type(e).__name__, e)
            raise ReadError("the header's Modality LUT is malformed (no data, or data its descriptor does not "
                            "describe)") from None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == 0:
        return arr
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if not math.isfinite(value):
            raise ReadError(f"the header's {name} is not a finite number: no grey scale can be made")
    if arr.size and max(abs(slope * float(arr.min()) + intercept), abs(slope * float(arr.max()) + intercept)) \
            >= float(np.finfo(np.float32).max):  # compared as Python floats: numpy would warn on the cast
        raise ReadError("the header's rescale (RescaleSlope, RescaleIntercept) takes the pixel values beyond any "
                        "finite number: no grey scale can be made")
    values = arr.astype(np.float32)
    values *= np.float32(slope)
    values += np.float32(intercept)
    return values


def _unwindowed(ds, stored: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Grey scale without a VOI transform. The stored bit range is mapped linearly when the
    data fill it (8-bit data always; deeper data whose maximum reaches the upper half of
    BitsStored, e.g. 8-bit images scaled to 12 or 16 bits, which then come back unchanged);
    otherwise, e.g. 14-bit detector values in 16 stored bits, the robust range of the values."""
    bits = int(ds.get("BitsStored", 8) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    levels = 2**bits
    if (not signed and slope > 0 and (bits <= 8 or stored.max() >= levels // 2)
            and "ModalityLUTSequence" not in ds):
        if slope == 1 and intercept == 0 and np.issubdtype(stored.dtype, np.unsignedinteger):
            # the same floor, in integers: no float copy of a large image (fewer than 8 bits are
            # scaled up: 7-bit data came back at half brightness)
            if bits < 8:
                return np.minimum(np.minimum(stored, 255).astype(np.uint16) << (8 - bits), 255).astype(np.uint8)
            return np.minimum(stored >> (bits - 8), 255).astype(np.uint8)
        # floor(v * 256 / 2^bits): exactly undoes 8-bit data scaled by 2^(bits-8) (x * 16 in
        # 12 bits) and by 257 (x * 257 in 16 bits), and is the identity on 8-bit data
        scaled = np.floor((values.astype(np.float64) - intercept) * (256.0 / (slope * levels)))
        return np.clip(scaled, 0, 255).astype(np.uint8)
    return window_to_uint8(values, *robust_range(values))


def _window(ds, values: np.ndarray) -> np.ndarray:
    def first(v):
        return float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return window_to_uint8(values, *robust_range(values))
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    linear = function not in ("SIGMOID", "LINEAR_EXACT")  # LINEAR, and what no viewer knows, as LINEAR
    # no usable window: a width under 1, or a linear one exactly 1 wide, which is a threshold
    # (PS3.3 C.11.2.1.2.1: black and white, no grey scale) and an empty range below
    if width < 1 or not (math.isfinite(center) and math.isfinite(width)) or (linear and width == 1):
        return window_to_uint8(values, *robust_range(values))
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (values.astype(np.float32) - center) / width))
        return np.clip(y + 0.5, 0, 255).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return window_to_uint8(values, center - width / 2, center + width / 2)
    # PS3.3 C.11.2.1.2.1: the linear window spans center - 0.5 +- (width - 1) / 2.
    return window_to_uint8(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


CORRUPT_LENGTH_BELOW = 32 << 20  # a quarter of the smallest reading allowance (read_memory_mb 128)


def read_dicom(path: Path, rules: ScoringRules, min_side: int = 0) -> StudyImage:
    """Read a DICOM file: scoring rules, header data, then pixels. Raises ReadError/SkipStudy.
    ``min_side``: the short side the caller needs; compressed images whose coding allows it are
    decoded at the smallest resolution that still has it (0: full resolution)."""
    check_inflated_size(path, inflate_limit(rules))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size=1 << 16)
    except MemoryError:
        # Elements over 64 KiB are deferred, so a small file's header cannot honestly need the
        # reading allowance (128 MB at least): an element claims more bytes than the file holds.
        # Said so, or the row reads as a limit to raise (the same file read in-process, workers 0,
        # gets "no data elements").
        if path.stat().st_size < CORRUPT_LENGTH_BELOW:
            raise ReadError("DICOM header cannot be parsed (truncated or corrupt: an element claims more bytes "
                            "than the file holds)") from None
        raise ReadError("DICOM header needs more memory than reading is allowed") from None
    except Exception as e:  # pydicom's messages name byte offsets and the file's path: logged only
        log.debug("header: %s: %s", type(e).__name__, e)
        raise ReadError("DICOM header cannot be parsed (truncated or corrupt)") from None
    if len(ds) == 0:
        raise ReadError("DICOM file holds no data elements (preamble only, or truncated)")
    header = StudyHeader(identifiers(ds), patient_from_header(ds), acquisition.from_dicom(ds))
    if _text(ds, "AccessionNumber") and not header.ids.accession_number:
        # left out, never cut (Identifiers): said, or the row and the log ("no accession number")
        # read as if the header had none, while the PACS shows the study with one
        header.patient.notes.append(f"header accession number is over {MAX_LENGTH['accession_number']} "
                                    "characters: left out (cut, it could be another order's; no HL7 result)")
    try:
        check_scored(ds, rules)
        check_view(header.patient, rules)
        _check_size(ds, rules)
        _check_codestream(ds, rules)
        stored, shift = _decode(ds, min_side)
        grey = realign(to_display_grey(ds, stored), shift)
        if grey.ndim != 2:
            raise ReadError(f"unexpected decoded shape {grey.shape}")
    except StudyFailure as e:
        raise e.with_header(header)  # so the row still says which study it was
    except MemoryError:
        raise ReadError("pixel data need more memory than decoding is allowed").with_header(header) from None
    return StudyImage(grey=grey, kind="dicom", header=header)


def inflate_limit(rules: ScoringRules) -> int:
    """The most bytes a deflated data set may inflate to: the largest image allowed (two bytes
    a pixel) plus room for a generous header."""
    return 2 * rules.max_pixels + (64 << 20)


def read_file_meta(f) -> tuple[dict, int]:
    """The file meta group (0002) of a DICOM file with a preamble: {keyword: value} and the
    offset where the data set starts. Group 0002 is always explicit VR little endian."""
    f.seek(0)
    head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return {}, 0
    meta, pos = {}, 132
    while True:
        f.seek(pos)
        tag = f.read(8)
        if len(tag) < 8:
            break
        group, element, vr = struct.unpack("<HH2s", tag[:6])
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (length,) = struct.unpack("<I", f.read(4))
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", tag[6:8])
            start = pos + 8
        if length > 1 << 16:  # a file meta group this large is not a real one
            break
        f.seek(start)
        value = f.read(length)
        if (group, element) == (0x0002, 0x0010):
            meta["TransferSyntaxUID"] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        elif (group, element) == (0x0002, 0x0003):
            meta["MediaStorageSOPInstanceUID"] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return meta, pos


def check_inflated_size(path: Path, limit: int) -> None:
    """For a Deflated Explicit VR Little Endian file: inflate it once as a stream, keeping
    nothing, and refuse it when it inflates beyond ``limit`` bytes (a deflate bomb of a few MB
    can hold gigabytes). Other transfer syntaxes return at once."""
    with open(path, "rb") as f:
        meta, start = read_file_meta(f)
        if meta.get("TransferSyntaxUID") != DEFLATED:
            return
        f.seek(start)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        step = 1 << 22  # inflated bytes held at a time
        for chunk in iter(lambda: f.read(1 << 20), b""):
            total += len(inflater.decompress(chunk, step))
            while inflater.unconsumed_tail and total <= limit:
                total += len(inflater.decompress(inflater.unconsumed_tail, step))
            if total > limit:
                raise ReadError(f"deflated data set inflates beyond {limit:,} bytes: refused as a deflate bomb")
