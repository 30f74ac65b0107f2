"""Making test DICOMs from real NIH images: pydicom for every transfer syntax it can write,
dcmtk and gdcm command-line tools when they are installed."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_batch.dicom_build import radiograph, save

HEADER = dict(PatientID="P001", PatientName="DOE^JANE", PatientAge="057Y", PatientSex="F", ViewPosition="PA",
              StudyDate="20240301", AccessionNumber="A123")


@contextmanager
def pydicom_checking():
    """pydicom's own checks of header values, which cxr-batch turns off (cxr_batch.dicom: they
    quote the value in the log), on again for a test that shows a value it writes is invalid."""
    import pydicom

    before = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = before


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def write(path: Path, pixels: np.ndarray, transfer_syntax=None, **header) -> Path:
    ds = radiograph(pixels, **{**HEADER, **header})
    return save(ds, path, transfer_syntax) if transfer_syntax else save(ds, path)


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def run(*cmd) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120)
