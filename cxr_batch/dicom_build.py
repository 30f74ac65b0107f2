"""Building DICOM objects with pydicom: radiographs (for examples and tests) and encapsulated
PDF reports (``--dicom-pdf``), each with proper file meta and new UIDs."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    ImplicitVRLittleEndian,
    generate_uid,
)

from . import clock

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
_SOP_BY_MODALITY = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE, "OT": SECONDARY_CAPTURE}
# Keywords copied from a study's image into a report object so the PACS files it with the study.
STUDY_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
                  "StudyDescription")


def _file_meta(sop_class: UID, sop_instance: UID, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    return meta


def radiograph(pixels: np.ndarray, *, modality: str = "DX", photometric: str = "MONOCHROME2",
               bits_stored: int | None = None, **header) -> Dataset:
    """A single-frame grey radiograph from ``pixels`` (uint8 or uint16 [rows, cols]).

    ``header`` gives any DICOM keyword (PatientID="17", PatientAge="057Y", ViewPosition="PA",
    WindowCenter=..., BodyPartExamined="CHEST", ...). Stored values are written as given:
    for MONOCHROME1 pass already inverted pixels.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError("pixels must be a 2-D uint8 or uint16 array")
    sop_class = _SOP_BY_MODALITY.get(modality, SECONDARY_CAPTURE)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    today = dt.date.today().strftime("%Y%m%d")
    ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = modality, today, 1, 1
    ds.PatientName, ds.PatientID = "ANONYMOUS^PATIENT", "UNKNOWN"
    ds.BodyPartExamined = "CHEST"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in header.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` in ``transfer_syntax``: the three uncompressed ones natively, RLE, JPEG-LS
    and JPEG 2000 through pydicom's encoders (pylibjpeg/pyjpegls plugins), 8-bit JPEG baseline
    through Pillow (quality 95; pydicom has no encoder for it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = copy.deepcopy(ds)  # the caller's dataset (file meta included) stays as it was: one dataset, many syntaxes
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax == JPEGBaseline8Bit:
        import io

        from PIL import Image
        from pydicom.encaps import encapsulate

        if ds.BitsAllocated != 8 or ds.SamplesPerPixel != 1:
            raise ValueError("JPEG baseline here takes 8-bit grey images")
        buf = io.BytesIO()
        Image.fromarray(ds.pixel_array).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax.is_compressed and transfer_syntax != DeflatedExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
               little_endian=True)
    return path


def valid_uid(value: str | None) -> UID:
    """``value`` if it is a valid UID (PS3.5 9.1: digits and dots, at most 64 characters, no
    leading zeros), else a valid one derived from it, so every object made from the same broken
    source still agrees on it; a fresh one when there is none."""
    if value and UID(value).is_valid:
        return UID(value)
    return generate_uid(entropy_srcs=[value]) if value else generate_uid()


def encapsulated_pdf(pdf: bytes, study: dict, title: str, sop_instance_uid: str | None = None,
                     series_instance_uid: str | None = None) -> Dataset:
    """An Encapsulated PDF object carrying the study's identifiers (``study``: keyword -> value;
    PatientName in DICOM PN form, FAMILY^GIVEN). Text is written as UTF-8 (ISO_IR 192), so
    names in any script survive; an invalid source StudyInstanceUID is replaced by a valid one.
    Its SOP instance and series UIDs are the given ones (derived, so that a re-send replaces)
    or new."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, UID(sop_instance_uid or generate_uid())
    ds.SeriesInstanceUID = UID(series_instance_uid or generate_uid())
    for keyword in STUDY_KEYWORDS:
        if study.get(keyword):
            setattr(ds, keyword, study[keyword])
    ds.StudyInstanceUID = valid_uid(study.get("StudyInstanceUID"))
    # at the source's offset when it says one (the study date/time copied is at it), else local
    now = clock.at_offset(clock.local_now(), study.get("TimezoneOffsetFromUTC") or "")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 999, 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # the UTC offset in force when it was made (PS3.3 C.12.1.1.8), as the SR says its own: the
    # night the clock goes back, a report made at 02:15 +0100 is later than one made at 02:30 +0200
    ds.TimezoneOffsetFromUTC = clock.utc_offset(now)
    ds.ConversionType, ds.BurnedInAnnotation = "WSD", "YES"
    ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = title[:64], "application/pdf"
    ds.SeriesDescription = "cxr-batch triage report (decision support)"
    # Type 2 of the IOD (Patient, General Study, General Equipment, Encapsulated Document):
    # present, empty where the source had no value (dciodvfy, and a strict PACS, refuse them absent)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "AcquisitionDateTime"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Manufacturer = "cxr-batch"
    ds.ConceptNameCodeSequence = []
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return ds
