"""Where each scored study's results go beyond the results folder, and the queue they wait in.

A run (scan, watch, listen, pull) has up to three channels, each drained by its own
:class:`~.outbound.Sender` from the ledger's outbound queue:

- ``dicom``: C-STORE of the SR (and the Encapsulated PDF with ``dicom_pdf``) to the PACS
  (``send_to``: listen and pull);
- ``hl7``: one HL7 v2.5 ORU^R01 per scored study to the RIS over MLLP (``hl7_to``). The message
  is written to ``OUT/hl7/<MSH-10>.hl7`` when it is queued, so every retry sends the same bytes
  and the same control id;
- ``stow``: STOW-RS of the same objects as ``dicom`` to a DICOMweb archive (``stow_to``; the
  credentials come from the ``[dicomweb]`` table of the configuration file only).

:meth:`Outbox.entries` makes a batch's queue entries before its commit (the ledger queues them
in the same transaction); :meth:`Outbox.start` runs the senders beside a daemon, and
:meth:`Outbox.drain` sends in the caller's thread where no daemon runs (after a scan:
:func:`send_after_scan`; at the end of a pull). A study that cannot have an ORU (no patient ID
or accession number to match the order by) gets a note in results.csv saying so.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError
from ..files import atomic_write_bytes, private_dir
from ..ledger import Ledger, outbound_entry
from ..record import StudyRecord, log_name
from .delivery import Delivery
from .outbound import Channel, DicomChannel, Sender

log = logging.getLogger("cxr_batch")

HL7_FOLDER = "hl7"  # under the results folder: the queued ORU^R01 messages
SCAN_QUEUE = "outbound.sqlite"  # scan's queue, under OUT/.cxr-batch (scan keeps no ledger of studies)
SCAN_RETRY_MAX = 10.0  # the longest back-off while a scan's results are sent


def check_targets(cfg, where: str) -> None:
    """``hl7_to`` and ``stow_to`` of a run's configuration, checked before any work (ConfigError
    naming the key). Storing by STOW-RS needs the SRs: ``stow_to`` turns ``dicom_sr`` on."""
    from .hl7 import Endpoint

    if cfg.hl7_to:
        try:
            Endpoint.parse(cfg.hl7_to)
        except ValueError as e:
            raise ConfigError(f"{where}.hl7_to: {e}") from None
    from .hl7 import PROCESSING_IDS, hd_problem

    for key in ("hl7_sending_facility", "hl7_receiving_application", "hl7_receiving_facility"):
        if problem := hd_problem(getattr(cfg, key)):
            raise ConfigError(f"{where}.{key}: {problem}")
    if cfg.hl7_processing_id not in PROCESSING_IDS:
        raise ConfigError(f"{where}.hl7_processing_id: {cfg.hl7_processing_id!r} is not P (production), T (a test "
                          f"RIS) or D (debugging), HL7 table 0103")
    if cfg.stow_to:
        from .dicomweb import url_problem

        if problem := url_problem(cfg.stow_to):
            raise ConfigError(f"{where}.stow_to: {problem}")
        parts = urlsplit(cfg.stow_to)
        if parts.username or parts.password:
            raise ConfigError(f"{where}.stow_to: no credentials in the URL (other users can read command lines); "
                              f"put them in the [dicomweb] table of the configuration file")
        cfg.dicom_sr = True  # what is stored


class HL7Channel:
    """ORU^R01 messages to a RIS over MLLP (cxr_batch.integration.hl7)."""

    name, tls = "hl7", False

    def __init__(self, endpoint, timeout: float):
        self.endpoint, self.timeout = endpoint, timeout

    def __str__(self) -> str:
        return str(self.endpoint)

    def send(self, path: Path) -> Delivery:
        from .hl7 import send_message

        # its bytes: read as text, Python's universal newlines made every segment's CR an LF
        return send_message(path.read_bytes().decode("utf-8"), self.endpoint, timeout=self.timeout)


class StowChannel:
    """Result objects to a DICOMweb archive by STOW-RS (cxr_batch.integration.dicomweb)."""

    name = "stow"
    may_ask_to_wait = True  # an archive's Retry-After sets waits up to RETRY_AFTER_MAX (Sender)

    def __init__(self, config):
        self.config = config
        self.tls = config.url.startswith("https:")
        self._client = None

    def __str__(self) -> str:
        return self.config.url  # never holds credentials (DicomWebConfig refuses them)

    def send(self, path: Path) -> Delivery:
        from .dicomweb import StowClient

        if self._client is None:  # one HTTP session per channel, made in the sending thread
            self._client = StowClient(self.config)
        return self._client.store(path)


def send_channels(destinations: dict[str, str], ae_title: str, config_file: Path | None,
                  timeout: float = 30.0) -> list[Channel]:
    """Channels for ``cxr-batch outbound send``: {channel: destination as queued or given};
    STOW-RS credentials from ``config_file``'s ``[dicomweb]`` table. ConfigError when a
    destination cannot be read."""
    from .dicom_send import Destination
    from .dicomweb import load_dicomweb_config
    from .hl7 import Endpoint

    channels: list[Channel] = []
    try:
        if destinations.get("dicom"):
            channels.append(DicomChannel(Destination.parse(destinations["dicom"]), calling_ae=ae_title,
                                         timeout=timeout))
        if destinations.get("hl7"):
            channels.append(HL7Channel(Endpoint.parse(destinations["hl7"]), timeout))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if destinations.get("stow"):
        channels.append(StowChannel(load_dicomweb_config(config_file, url=destinations["stow"])))
    return channels


def dicomweb_config(cfg):
    """The archive of ``cfg.stow_to`` with the credentials of ``cfg.dicomweb_file``'s
    ``[dicomweb]`` table (ConfigError when they are wrong)."""
    from .dicomweb import load_dicomweb_config

    return load_dicomweb_config(cfg.dicomweb_file, url=cfg.stow_to)


def run_channels(cfg) -> list[Channel]:
    """The channels a run's configuration names: C-STORE (a node's ``send_to``), HL7, STOW-RS."""
    from .hl7 import Endpoint

    channels: list[Channel] = []
    destination = getattr(cfg, "destination", None)  # the DICOM node's and pull's send_to
    if destination is not None:
        channels.append(DicomChannel(destination, calling_ae=cfg.ae_title, timeout=cfg.send_timeout,
                                     tls=cfg.send_tls_context()))
    if cfg.hl7_to:
        channels.append(HL7Channel(Endpoint.parse(cfg.hl7_to), cfg.send_timeout))
    if cfg.stow_to:
        channels.append(StowChannel(dicomweb_config(cfg)))
    return channels


class Outbox:
    """The ``channels`` of one run over the results folder ``out`` and the queue at
    ``ledger_path``. ``retry_max``: the longest back-off; ``refused_retry``: seconds before an
    object a receiver refused is offered again; ``bundle`` and ``urgent``: the thresholds and
    urgent findings an ORU^R01 states; ``dicom_pdf``: the Encapsulated PDFs go with the SRs."""

    def __init__(self, out: Path, ledger_path: Path, channels: list[Channel], *, retry_max: float,
                 refused_retry: float, bundle=None, urgent: tuple[str, ...] = (), dicom_pdf: bool = False,
                 msh: dict[str, str] | None = None):
        self.out, self.ledger_path, self.channels = Path(out), Path(ledger_path), channels
        self.bundle, self.urgent, self.dicom_pdf = bundle, tuple(urgent), dicom_pdf
        self._trust_lines: dict[str, str] | None = None
        self.msh = dict(msh or {})  # oru_r01's MSH options (facilities, receiving application, processing id)
        self.senders = [Sender(self.ledger_path, self.out, channel, retry_max=retry_max, refused_retry=refused_retry)
                        for channel in channels]
        self.names = [c.name for c in channels]

    @classmethod
    def for_run(cls, out: Path, ledger_path: Path, bundle, cfg, retry_max: float | None = None) -> "Outbox":
        """The outbox of a scoring run configured by ``cfg`` (a RunConfig)."""
        msh = {"sending_facility": cfg.hl7_sending_facility, "receiving_application": cfg.hl7_receiving_application,
               "receiving_facility": cfg.hl7_receiving_facility, "processing_id": cfg.hl7_processing_id}
        return cls(out, ledger_path, run_channels(cfg), refused_retry=cfg.refused_retry, bundle=bundle,
                   urgent=cfg.urgent, dicom_pdf=cfg.dicom_pdf, msh=msh,
                   retry_max=getattr(cfg, "retry_max", SCAN_RETRY_MAX) if retry_max is None else retry_max)

    def __bool__(self) -> bool:
        return bool(self.channels)

    # ------------------------------------------------------------------ what a batch queues
    def entries(self, studies: list[tuple[str, str, StudyRecord, str]]) -> dict[str, list[tuple]]:
        """The queue entries of scored ``studies`` (key, name of their SR file, record,
        revision: the content hash of a changed instance replacing a result, else ""): {key:
        [outbound_entry, ...]}. HL7 messages are written here. A full disk raises OSError."""
        queued: dict[str, list[tuple]] = {}
        objects = [c for c in self.channels if c.name in ("dicom", "stow")]
        hl7 = next((c for c in self.channels if c.name == "hl7"), None)
        for key, sr_name, record, revision in studies:
            if not record.ok:
                continue
            items = []
            if objects:
                for path in self._objects(sr_name, record):
                    uid = object_uid(path)
                    rel = path.relative_to(self.out).as_posix()
                    items += [outbound_entry(uid, rel, c.name, str(c)) for c in objects]
            if hl7 is not None:
                message = self._message(record, revision)
                if message is not None:
                    control, path, digest = message
                    items.append(outbound_entry(control, path, "hl7", str(hl7), digest))
            if items:
                queued[key] = items
        return queued

    def _objects(self, sr_name: str, record: StudyRecord) -> list[Path]:
        """The study's SR and, with dicom_pdf, its Encapsulated PDF; a study without an SR (its
        notes say why) has none to send."""
        from ..sr import SR_FOLDER, sr_file_name

        files = [self.out / SR_FOLDER / sr_file_name(sr_name)]
        if self.dicom_pdf and record.report:
            files.append(self.out / "reports" / (record.report.removesuffix(".pdf") + ".dcm"))
        return [f for f in files if f.is_file()]

    def _trust(self) -> dict[str, str]:
        """Per finding, what its flag is worth, as the SR says it (the same for every message of
        the bundle: read once)."""
        if self._trust_lines is None:
            from ..findings import FINDINGS
            from ..sr import trust_lines

            self._trust_lines = dict(zip(FINDINGS, trust_lines(self.bundle)))
        return self._trust_lines

    def _message(self, record: StudyRecord, revision: str) -> tuple[str, str, str] | None:
        """The study's ORU^R01 written to OUT/hl7 (control id, path, sha256 of its bytes: the
        queue sends only those, a copy cut between two segments being a message still), or None
        with a note on the record saying why there is none."""
        from .hl7 import HL7NotMade, control_id, oru_r01

        try:
            text = oru_r01(record, thresholds=self.bundle.thresholds, urgent=self.urgent,
                           revision=revision, trust=self._trust(),
                           normal_below=self.bundle.triage_policy().normal_below, **self.msh)
        except HL7NotMade as e:
            record.add_note(f"no HL7 result: {e}")
            log.warning("%s: no HL7 result: %s", log_name(record.file), e)
            return None
        control = control_id(record, revision)
        path = private_dir(self.out / HL7_FOLDER) / f"{control}.hl7"
        data = text.encode("utf-8")
        atomic_write_bytes(path, data)
        return control, path.relative_to(self.out).as_posix(), hashlib.sha256(data).hexdigest()

    def remake_message(self, record: StudyRecord, revision: str, path: str) -> str | None:
        """The ORU^R01 queued as ``path`` (relative to the results folder) written again from
        ``record``: the same MSH-10, so a RIS that had it drops the copy. The sha256 of its new
        bytes (its time stamp is new: the queue must record it), or None when it was not."""
        made = self._message(record, revision)
        return made[2] if made is not None and made[1] == path else None

    # ------------------------------------------------------------------ sending
    def start(self) -> None:
        for sender in self.senders:
            log.info("sending %s results to %s (TLS %s)", sender.channel.name, sender.channel,
                     "on" if sender.tls else "off")
            sender.start()

    def wake(self) -> None:
        for sender in self.senders:
            sender.wake()

    def stop(self) -> None:
        for sender in self.senders:
            sender.stop()

    def drain(self, until: float) -> None:
        """Send every channel's waiting objects until none waits or ``until`` (epoch seconds)
        passes: the channels side by side (a RIS that is down does not hold the archive's
        objects back), each in a thread of its own; returns when all are done."""
        threads = [threading.Thread(target=sender.drain, args=(until,), name=f"cxr-batch-drain-{sender.channel.name}")
                   for sender in self.senders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def waiting(self, ledger: Ledger) -> int:
        """Objects still waiting on this run's channels."""
        return sum(ledger.outbound_stats(time.time(), name)["queued"] for name in self.names)

    def status(self, ledger: Ledger) -> dict:
        """status.json's queues: ``outbound`` (C-STORE), ``outbound_hl7``, ``outbound_stow``:
        the receiver, whether it answers, the waiting, refused and delivered objects and why
        they wait; a channel this run does not send on but whose objects wait is listed too."""
        now = time.time()
        status = {}
        for sender in self.senders:
            status[_status_key(sender.channel.name)] = {**sender.status(ledger),
                                                        **ledger.outbound_stats(now, sender.channel.name)}
        for name in ledger.outbound_channels():
            if name not in self.names:
                status[_status_key(name)] = {"destination": None, **ledger.outbound_stats(now, name),
                                             "note": f"not sent by this run: {_OPTION[name]} is not given"}
        return status

    def undelivered_lines(self, ledger: Ledger, out: Path) -> list[str]:
        """What waits, per channel, and how to send it later (after a scan or a pull)."""
        lines = []
        now = time.time()
        for name in ledger.outbound_channels():
            stats = ledger.outbound_stats(now, name)
            reasons = "; ".join(stats["waiting_because"]) or "not tried yet"
            lines.append(f"{stats['queued']} {_WHAT[name]} not delivered ({stats['refused']} refused by the "
                         f"receiver): {reasons}")
        if lines:
            lines.append(f"they wait in the queue: 'cxr-batch outbound list --out {out}' shows them, "
                         f"'cxr-batch outbound send --out {out}' sends them when the receiver is back")
        return lines


_OPTION = {"dicom": "--send-to", "hl7": "--hl7-to", "stow": "--stow-to"}
_WHAT = {"dicom": "DICOM object(s) for C-STORE", "hl7": "HL7 message(s)", "stow": "DICOM object(s) for STOW-RS"}


def _status_key(channel: str) -> str:
    return "outbound" if channel == "dicom" else f"outbound_{channel}"


def object_uid(path: Path) -> str:
    """The SOPInstanceUID of a DICOM file we wrote, from its file meta group."""
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


# ---------------------------------------------------------------------- after a scan
def scan_queue_path(out: Path) -> Path:
    from ..watch import STATE_DIR

    return Path(out) / STATE_DIR / SCAN_QUEUE


def send_after_scan(out: Path, cfg, studies: Path | None = None) -> list[str]:
    """After ``cxr-batch scan --hl7-to/--stow-to``: queue each scored study's results (from
    results.csv; a result delivered before is not queued again) in OUT/.cxr-batch/outbound.sqlite
    and send them for at most ``cfg.send_wait`` seconds. ``studies``: the scanned folder, whose
    DICOM headers give the ORUs the patient's name, birth date and sex (results.csv keeps none).
    Returns the lines saying what could not be delivered and how to send it later (empty:
    everything was delivered)."""
    from ..bundle import load_bundle
    from ..folderlock import FolderLock
    from ..results import read_records

    out = Path(out)
    outbox = Outbox.for_run(out, scan_queue_path(out), load_bundle(cfg.weights), cfg)
    if not outbox:
        return []
    with FolderLock(out, "scan"):
        ledger = open_queue(outbox.ledger_path)
        try:
            queued_studies = []
            # queued read-first first (a row without a rank, an error, last): the RIS gets the
            # urgent studies before the others, and what send_wait leaves waiting is the least urgent
            records = sorted(read_records(out / "results.csv"),
                             key=lambda r: (r.worklist_rank is None, r.worklist_rank or 0))
            for record in records:
                key = f"uid:{record.ids.sop_uid}" if record.ids.sop_uid else f"file:{record.file}"
                if studies is not None and record.ok and any(c.name == "hl7" for c in outbox.channels):
                    _patient_from_header(record, studies)
                queued_studies.append((key, record.file, record, ""))
            try:
                entries = outbox.entries(queued_studies)
                queued = ledger.queue_outbound([(key, entry) for key, items in entries.items() for entry in items])
            except (OSError, sqlite3.Error) as e:  # a full disk: nothing queued, results.csv whole
                said = f"{e.strerror or e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
                log.error("results not queued for sending: %s", said)
                return [f"the results were not queued for sending ({said}); results.csv is complete: once the "
                        f"disk has room, the same scan with --resume queues and sends them"]
            log.info("%d result(s) queued for %s", queued, ", ".join(str(c) for c in outbox.channels))
            outbox.drain(time.time() + cfg.send_wait)
            return outbox.undelivered_lines(ledger, out)
        finally:
            ledger.close()


def _patient_from_header(record: StudyRecord, studies: Path) -> None:
    """The name, birth date, sex and the patient ID's issuer of a scan's ``record`` (from
    results.csv, which keeps none) from its file's header, when the file still holds the same
    instance. Without them PID-5
    would be HL7's explicit null, which tells a receiver updating its records to delete the name
    (HL7 v2.5 2.5.3), and a RIS matching the name with the order's would refuse the result."""
    import os
    import stat

    import pydicom

    from ..dicom import identifiers

    def without(why: str) -> None:  # said, as the file's log name: the ORU's PID-5 is empty
        log.warning("%s: the ORU names no patient: %s", log_name(record.file), why)

    if not (record.ids.accession_number and record.ids.patient_id):
        return  # no ORU is made for it (oru_r01 says why): nothing to name
    if not record.ids.sop_uid:  # nothing tells the scanned instance from another patient's
        return without("the scanned file has no SOP Instance UID to find it again by")
    try:
        # not blocking: a FIFO put in the file's place waited for a writer for ever
        fd = os.open(Path(studies) / record.file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return without(f"its file cannot be opened since the scan ({e.strerror})")
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return without("its file is no longer a regular file")
            header = identifiers(pydicom.dcmread(f, stop_before_pixels=True, defer_size=1 << 16))
    except Exception as e:  # replaced by a non-DICOM, unreadable: the ORU goes without them
        return without(f"its file cannot be read since the scan ({type(e).__name__})")
    # another instance since the scan, or the same one now filed under another patient (a merge
    # at the PACS): its name beside the scanned patient's ID would name the wrong person
    if header.sop_uid != record.ids.sop_uid or header.patient_id != record.ids.patient_id:
        return without("its file holds another instance or patient since the scan")
    for name in ("patient_name", "patient_birth_date", "patient_sex", "issuer_of_patient_id", "issuer_universal_id",
                 "issuer_universal_id_type", "patient_id_type", "study_time", "timezone_offset",
                 "acquisition_datetime"):  # the times: OBR-7 and OBX-14
        if not getattr(record.ids, name):
            setattr(record.ids, name, getattr(header, name))


def send_queue(out: Path, channels: list[Channel], until: float, refused_retry: float = 900.0) -> list[str]:
    """``cxr-batch outbound send``: the waiting objects of a results folder no daemon runs on
    (its ledger, or a scan's queue) sent to ``channels`` until ``until`` (epoch seconds); the
    lines saying what still waits. FolderBusy while a daemon holds the folder."""
    from ..folderlock import FolderLock

    out = Path(out)
    lines = []
    # a daemon there sends its queue itself: stopping it would stop the studies coming in too
    with FolderLock(out, "outbound send", advice="a daemon running there sends its queue itself; "
                    f"'cxr-batch outbound retry --out {out}' makes what waits due now"):
        for path in queue_paths(out):
            ledger = open_queue(path)
            try:
                outbox = Outbox(out, path, channels, retry_max=SCAN_RETRY_MAX, refused_retry=refused_retry)
                ledger.outbound_send_now()  # an operator asked: back-offs end now
                outbox.drain(until)
                lines += outbox.undelivered_lines(ledger, out)
            finally:
                ledger.close()
    return lines


def open_queue(path: Path) -> Ledger:
    """The outbound queue at ``path``: a daemon's ledger or a scan's queue. LedgerError when it
    cannot be read, saying what to do; a scan has no daemon to rebuild its queue."""
    from ..ledger import LedgerError, NewerLedger

    try:
        return Ledger(path)
    except LedgerError as e:
        if Path(path).name != SCAN_QUEUE or isinstance(e, NewerLedger) or \
                isinstance(e.__context__, sqlite3.OperationalError):
            raise  # a daemon's ledger, a newer release's queue, or one that cannot be opened now (a full disk): as it is
        raise LedgerError(f"{path} is not a readable queue ({e.__context__ or e}). results.csv is kept as it is; "
                          f"move it aside, then the same scan with --resume queues and sends its results again "
                          f"(a RIS drops a message it had by its MSH-10, an archive keeps one copy of an SR)") from None


def queue_paths(out: Path) -> list[Path]:
    """The outbound queues of a results folder: a daemon's ledger, a scan's queue."""
    from ..watch import STATE_DIR

    return [p for p in (Path(out) / STATE_DIR / "ledger.sqlite", scan_queue_path(out)) if p.is_file()]


def recorded_destinations(out: Path) -> dict[str, str]:
    """{channel: destination} of the objects waiting in ``out``'s queues (the most recently
    queued one's, where they differ)."""
    found: dict[str, tuple[float, str]] = {}
    for path in queue_paths(out):
        ledger = open_queue(path)
        try:
            for row in ledger.outbound_rows():
                if row["destination"] and row["queued_at"] >= found.get(row["channel"], (0.0, ""))[0]:
                    found[row["channel"]] = (row["queued_at"], row["destination"])
        finally:
            ledger.close()
    return {channel: destination for channel, (_, destination) in found.items()}
