"""How an image was made, as far as its file says: the acquisition data drift monitoring watches.

A detector replaced, an export setting changed (MONOCHROME1 instead of MONOCHROME2, another
bit depth, a smaller matrix) or another vendor's images routed to the model change what the
model sees without any error. These values are recorded for every study (results.csv, the
watch ledger) so that :mod:`cxr_batch.drift` can compare them with a reference. None of them
identifies a patient: no institution, station or operator name is kept.

DICOM: Modality, PhotometricInterpretation, BitsStored, Rows, Columns, PixelSpacing (else
ImagerPixelSpacing; the row spacing in mm), Manufacturer, ManufacturerModelName. PNG/JPEG: the
file's own size and sample bit depth; the rest is unknown (empty).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

TEXT_LIMIT = 64  # LO/CS values: at most 64 characters


@dataclass
class Acquisition:
    format: str = ""  # "dicom", "png" or "jpeg"
    modality: str = ""
    photometric: str = ""
    bits_stored: int | None = None
    image_rows: int | None = None
    image_columns: int | None = None
    pixel_spacing: float | None = None  # mm between rows (PixelSpacing, else ImagerPixelSpacing)
    manufacturer: str = ""
    manufacturer_model: str = ""

    def to_row(self) -> dict[str, str]:
        """results.csv cells: numbers as written by cxr-batch, text as the header had it."""
        return {f.name: _cell(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict) -> "Acquisition":
        """Back from results.csv cells (absent or unparsable values are unknown)."""
        values = {}
        for f in fields(cls):
            text = (row.get(f.name) or "").strip()
            if f.name in NUMBERS:
                values[f.name] = _number(text, NUMBERS[f.name])
            else:
                values[f.name] = text
        return cls(**values)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict | None) -> "Acquisition":
        data = data or {}
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


NUMBERS = {"bits_stored": int, "image_rows": int, "image_columns": int, "pixel_spacing": float}
NUMBER_FORMAT = ".4g"  # a float as results.csv holds it (drift compares every source at this precision)
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Acquisition))
TEXT_FIELDS = ("modality", "photometric", "manufacturer", "manufacturer_model")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, NUMBER_FORMAT)
    return str(value)


def _number(text: str, kind):
    try:
        value = kind(float(text))
    except (TypeError, ValueError, OverflowError):
        return None
    return value if value == value and value >= 0 else None  # NaN or negative: unknown


def _dicom_number(ds, keyword: str, kind, index: int | None = None):
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if index is not None:
            value = value[index] if hasattr(value, "__len__") and not isinstance(value, str) else value
        number = kind(float(value))
    except Exception:  # a malformed element is unknown, never a failed study
        return None
    return number if number == number and number > 0 else None


def from_dicom(ds) -> Acquisition:
    """The acquisition data of a DICOM header (pydicom Dataset)."""
    from .study import clean_text  # study holds the header type that carries these data

    def text(keyword: str) -> str:
        try:
            value = ds.get(keyword)
        except Exception:
            return ""
        return clean_text("" if value is None else value, TEXT_LIMIT)

    spacing = _dicom_number(ds, "PixelSpacing", float, 0) or _dicom_number(ds, "ImagerPixelSpacing", float, 0)
    return Acquisition(
        format="dicom", modality=text("Modality").upper(), photometric=text("PhotometricInterpretation").upper(),
        bits_stored=_dicom_number(ds, "BitsStored", int), image_rows=_dicom_number(ds, "Rows", int),
        image_columns=_dicom_number(ds, "Columns", int), pixel_spacing=spacing,
        manufacturer=text("Manufacturer"), manufacturer_model=text("ManufacturerModelName"),
    )


# Sample bit depth of a Pillow mode (PNG 1/2/4-bit grey opens as "1" or "L").
_MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8, "YCbCr": 8, "CMYK": 8,
              "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def from_pil(kind: str, size: tuple[int, int], mode: str) -> Acquisition:
    """A PNG/JPEG's own size (``size`` as Pillow gives it: width, height, before any reduced
    decode) and sample bit depth."""
    width, height = size
    return Acquisition(format=kind, bits_stored=_MODE_BITS.get(mode), image_rows=int(height), image_columns=int(width))
