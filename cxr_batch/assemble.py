"""Study assembly: one candidate file -> its record and grey image, patient data merged once.

Patient data and identifiers come from three sources, the first that has a value winning:
the DICOM header, then a JSON sidecar beside the image, then the metadata table (``--metadata``,
matched by file name). The view check runs after the merge, since the view may come from the
sidecar or the table. A file that cannot be read or is not to be scored still gets a record
with everything that was learnt about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .discover import Candidate
from .metadata import MetadataRow, patient_from_metadata, read_sidecar
from .readers import read_study
from .record import StudyRecord
from .study import ReadError, ScoringRules, StudyFailure, StudyHeader, check_view, pixels_sha256

log = logging.getLogger("cxr_batch")


@dataclass
class AssembledStudy:
    record: StudyRecord  # status ok (to be scored), skipped or error
    grey: np.ndarray | None = None  # uint8 [H, W] for studies to score, else None

    def pixel_key(self) -> str:
        """The file's cxr_batch.provenance.pixel_key from the pixels read here, without decoding
        it again; '' when there are none (not scored) or they were decoded smaller than stored
        (a JPEG's DCT scaling, a JPEG 2000 resolution level: all the model needs), which that
        key is not of."""
        stored = self.record.acquisition
        if self.grey is None or self.grey.shape != (stored.image_rows, stored.image_columns):
            return ""
        return pixels_sha256(self.grey)


def assemble_study(cand: Candidate, rules: ScoringRules, metadata: dict[str, MetadataRow] | None = None,
                   min_side: int = 0) -> AssembledStudy:
    """Read ``cand``, merge its patient data and identifiers, and decide whether it is scored.
    ``min_side``: the short side the model needs (see readers.read_study)."""
    record = StudyRecord(file=cand.rel)
    if cand.problem:
        record.status, record.reason = cand.problem_status, cand.problem
        return AssembledStudy(record)
    header, grey, failure = StudyHeader(), None, None
    try:
        study = read_study(cand.path, rules, min_side, identity=cand.identity)
        header, grey = study.header, study.grey
    except StudyFailure as e:
        failure, header = e, e.header or StudyHeader()
    except MemoryError:  # the reading worker's memory ceiling (cxr_batch.sandbox)
        failure = ReadError("decoding needs more memory than a reading worker is allowed")
    except Exception as e:  # a reader bug must cost one row, never the scan
        log.debug("%s: reader failed", cand.rel, exc_info=True)
        failure = ReadError(f"unexpected {type(e).__name__} while reading: {e}")
    sidecar = read_sidecar(cand.path)
    if sidecar is not None:
        header.patient.fill_from(sidecar.patient)
        header.ids.fill_from(sidecar.ids)
    if metadata is not None and cand.path.name in metadata:
        row = metadata[cand.path.name]
        header.patient.fill_from(patient_from_metadata(row))
        if not header.ids.patient_id and row.patient_id:
            header.ids.patient_id = row.patient_id
    record.ids, record.patient, record.acquisition = header.ids, header.patient, header.acquisition
    if failure is None:
        try:
            check_view(header.patient, rules)  # the view may come from a sidecar or the table
        except StudyFailure as e:
            failure = e
    if failure is not None:
        record.status, record.reason = failure.status, str(failure)
        return AssembledStudy(record)
    return AssembledStudy(record, grey)
