"""Regenerate the DICOM example studies from the bundled example radiographs (real NIH images).

    python examples/make_dicom_examples.py

Writes examples/studies/dicom/<patient>/<study>/<series>/<instance> files without extensions,
as PACS exports do, in three transfer syntaxes, with realistic (fictitious) headers. The
pixels come from NIH ChestX-ray14 PNGs in ../shared/data/nih/full_res (or examples/source/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxr_batch.dicom_build import radiograph, save  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCES = [HERE.parent.parent / "shared" / "data" / "nih" / "full_res", HERE / "source"]
COMMON = dict(InstitutionName="Example General Hospital", StudyDescription="XR CHEST", BodyPartExamined="CHEST",
              ReferringPhysicianName="SMITH^ANNA")


def source(name: str) -> np.ndarray:
    for folder in SOURCES:
        if (folder / name).exists():
            return np.asarray(Image.open(folder / name).convert("L"))
    raise SystemExit(f"{name} not found in {SOURCES}")


def main() -> None:
    out = HERE / "studies" / "dicom"
    # 1. DX, 12 bits stored in 16, with a window, JPEG 2000 lossless
    img = source("00000574_000.png").astype(np.uint16) * 16
    ds = radiograph(img, modality="DX", bits_stored=12, PatientName="DOE^JANE", PatientID="NIH00574",
                    PatientAge="063Y", PatientSex="F", ViewPosition="PA", StudyDate="20240312",
                    AccessionNumber="ACC240312001", WindowCenter=2048, WindowWidth=4096, **COMMON)
    save(ds, out / "NIH00574" / "STUDY1" / "SERIES1" / "IM0001", JPEG2000Lossless)
    # 2. CR, 8 bit, MONOCHROME1 (stored inverted), RLE lossless, age only from the birth date,
    #    view only in the series description
    img = 255 - source("00001511_000.png")
    ds = radiograph(img, modality="CR", photometric="MONOCHROME1", PatientName="ROE^RICHARD", PatientID="NIH01511",
                    PatientBirthDate="19980105", StudyDate="20240402", PatientSex="M",
                    SeriesDescription="CHEST AP PORTABLE", AccessionNumber="ACC240402017", **COMMON)
    save(ds, out / "NIH01511" / "STUDY1" / "SERIES1" / "IM0001", RLELossless)
    # 3. DX, 8 bit, JPEG-LS lossless, with a .dcm name
    ds = radiograph(source("00000100_000.png"), modality="DX", PatientName="POE^EDGAR", PatientID="NIH00100",
                    PatientAge="060Y", PatientSex="M", ViewPosition="PA", StudyDate="20240415",
                    AccessionNumber="ACC240415003", **COMMON)
    save(ds, out / "NIH00100" / "STUDY1" / "SERIES1" / "IM0001.dcm", JPEGLSLossless)
    print(f"wrote DICOM examples under {out}")


if __name__ == "__main__":
    main()
