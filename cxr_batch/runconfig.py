"""What every command that scores studies is told (scan, watch): model, device, batching,
urgency, reports and scoring rules. Each command's configuration extends it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import ConfigError, bounded, validate
from .findings import DEFAULT_URGENT, check_findings
from .inference import BatchOptions
from .sandbox import ReadLimits
from .study import ScoringRules


@dataclass
class RunConfig:
    weights: str | None = None  # bundle folder (default: the bundled weights)
    metadata: str | None = None  # NIH Data_Entry-style CSV with patient data
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = bounded(16, min=1, max=4096)
    workers: int | None = bounded(None, min=0, max=64)  # reading processes; None: chosen for this machine
    read_memory_mb: int = bounded(1024, min=128)  # memory reading one file may take (cxr_batch.sandbox)
    read_timeout: float = bounded(120.0, gt=0.0)  # seconds reading one file may take
    follow_links: bool = False  # follow symbolic links that leave the scanned folder
    urgent: tuple[str, ...] = DEFAULT_URGENT
    pdf: bool = True
    heatmaps: bool = True
    dicom_pdf: bool = False
    dicom_sr: bool = False  # a DICOM SR (TID 1500) per scored DICOM image, in OUT/dicom
    title: str = "Chest X-ray triage report"
    institution: str = ""
    scoring: ScoringRules = field(default_factory=ScoringRules)
    # Results sent on, each through the ledger's outbound queue until the receiver has it
    # (cxr_batch.integration.outbox): an HL7 ORU^R01 per scored study to the RIS, and the SRs
    # (Encapsulated PDFs with dicom_pdf) to a DICOMweb archive by STOW-RS.
    hl7_to: str | None = None  # HOST:PORT of the RIS's MLLP listener
    # the ORU's MSH, as the RIS or an interface engine routes and checks it (HD: NAME, or
    # NAME^OID^ISO): MSH-4, MSH-5, MSH-6, and MSH-11 (P production, T a test RIS, D debugging)
    hl7_sending_facility: str = ""
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""
    hl7_processing_id: str = "P"
    stow_to: str | None = None  # DICOMweb root URL; credentials only in the [dicomweb] table of a config file
    dicomweb_file: str | None = None  # that file (set from --config when it has a [dicomweb] table)
    send_timeout: float = bounded(30.0, gt=0.0)  # seconds each network step of a send may take
    refused_retry: float = bounded(900.0, gt=0.0)  # seconds before an object a receiver refused is offered again
    send_wait: float = bounded(60.0, min=0.0)  # scan, pull: seconds to go on delivering once scoring is done

    def __post_init__(self):
        where = self.table
        validate(self, where)
        try:
            self.urgent = tuple(check_findings(self.urgent))  # as the user typed them, any case: canonical names
        except ValueError as e:
            raise ConfigError(f"{where}.urgent: {e}") from None
        from .integration.outbox import check_targets

        check_targets(self, where)

    @property
    def table(self) -> str:
        """The configuration file's table for this command (``[scan]``, ``[watch]``)."""
        return type(self).__name__.removesuffix("Config").lower()

    def batch_options(self, progress: bool = False) -> BatchOptions:
        return BatchOptions(batch_size=self.batch_size, workers=self.workers, urgent=self.urgent,
                            rules=self.scoring, limits=ReadLimits(self.read_memory_mb, self.read_timeout),
                            progress=progress)

    def report_options(self):
        """The reports' slice of the configuration, or None with ``pdf`` off."""
        if not self.pdf:
            return None
        from .reports import ReportOptions  # reportlab is imported only when reports are made

        return ReportOptions(title=self.title, institution=self.institution, heatmaps=self.heatmaps,
                             dicom_pdf=self.dicom_pdf, urgent=tuple(self.urgent))
