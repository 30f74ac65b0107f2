"""``cxr-batch listen``: a DICOM node. Modalities and PACS C-STORE images to it; it scores them
with the watch daemon's machinery and C-STOREs each result back as a DICOM SR.

- Receiving (:class:`StorageSCP`, pynetdicom): C-ECHO, and C-STORE for every standard storage
  SOP class in every transfer syntax the readers decode. The handler only writes the object,
  as received, into a spool (:class:`Spool`: temp file, fsync, rename, mode 0640, named from
  a valid SOPInstanceUID and the content's hash, never from raw header text) and answers
  success; a failed write (disk full, I/O error) answers 0xA700 "out of resources" so the
  sender retries later. The model never runs in a network thread.
- Processing (:class:`Node`, a :class:`~cxr_batch.watch.Watcher` on the spool): the ledger,
  batching, reports, SRs, exactly-once across SIGKILL, degraded mode, the lock and status.json
  are the watch daemon's. Spool files leave once their study is committed: deleted, or moved to
  ``archive_dir`` (``quarantine_dir`` for failures) when configured, so the disk stays bounded.
- Sending back (``send_to``): each scored image's SR (and Encapsulated PDF with ``dicom_pdf``)
  is queued in the ledger with its study's commit and sent by cxr_batch.integration.outbound
  (the daemon's outbox, cxr_batch.integration.outbox, with HL7 and STOW-RS when configured).
- Safe by default: binds 127.0.0.1; the called AE title must be ours; an optional calling-AE
  allow-list; TLS when a certificate is configured; association count, PDU size, timeouts and
  the size of one object bounded; logs name SOP Instance UIDs and AE titles, never patients.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import RE_VALID_UID

from ..config import ConfigError, bounded
from ..display import CONTROL_ESCAPES, plural
from ..dicom import DECODED_TRANSFER_SYNTAXES
from .dicom_send import Destination, check_ae_title, tcp_no_delay
from ..files import FILE_MODE, atomic_write_bytes, private_dir
from ..folderlock import FolderLock, WatchedFolderClaim
from ..record import log_name
from ..watch import STATE_DIR, WatchConfig, Watcher

log = logging.getLogger("cxr_batch")
SPOOL = "spool"  # under RESULTS_DIR/.cxr-batch
# The listener's counters in status.json: objects received and refused, associations rejected
# or aborted for an oversize object, connections dropped (cxr_batch.integration.bounded), and
# identifiers from the network that had to be escaped before they could be logged.
COUNTS = ("received", "refused", "rejected_associations", "aborted_oversize", "dropped_timeout",
          "dropped_oversize_pdu", "dropped_protocol", "dropped_tls", "dropped_busy", "dropped_slow", "dropped_spool",
          "escaped_identifiers")
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): stored; refused, out of resources (the sender retries
# later); processing failure; invalid SOP instance; SOP class not supported.
STORED, OUT_OF_RESOURCES, PROCESSING_FAILURE, INVALID_SOP_INSTANCE = 0x0000, 0xA700, 0x0110, 0x0117
SOP_CLASS_NOT_SUPPORTED = 0x0122


class NodeError(Exception):
    """The node cannot start: its address cannot be bound."""


@dataclass
class ListenConfig(WatchConfig):
    """The ``[listen]`` table of ``--config`` (and ``[scoring]``): the watch daemon's options,
    some defaults changed for a spool, and the node's own. Command-line options win."""

    settle: float = bounded(0.0, min=0.0)  # spool files are complete when they appear (renamed)
    broken_deadline: float = bounded(0.0, min=0.0)  # ...so an unreadable one will not get better
    port: int = bounded(11112, min=1, max=65535)
    ae_title: str = "CXRBATCH"  # ours: an association calling another title is rejected
    host: str = "127.0.0.1"  # the address to listen on; "0.0.0.0" or "::" for every interface
    allow: tuple[str, ...] = ()  # calling AE titles allowed to associate (empty: any)
    send_to: str | None = None  # AE@HOST:PORT receiving each scored image's SR
    min_free_mb: int = bounded(1024, min=0)  # below this much free disk, C-STOREs are refused (0xA700)
    max_associations: int = bounded(10, min=1, max=1000)  # at once; more are rejected (transient)
    max_associations_per_host: int = bounded(5, min=1, max=1000)  # of those, held by one IP address at once
    max_pdu: int = bounded(65536, min=4096, max=1 << 26)  # the largest PDU we accept, in bytes
    acse_timeout: float = bounded(30.0, gt=0.0)  # association negotiation and release
    dimse_timeout: float = bounded(60.0, gt=0.0)  # waiting for a DIMSE message
    network_timeout: float = bounded(60.0, gt=0.0)  # a silent peer is dropped after this long
    handshake_timeout: float = bounded(10.0, gt=0.0)  # accept -> complete association request (TLS included)
    pdu_timeout: float = bounded(30.0, gt=0.0)  # a PDU's first byte -> its last (and each send)
    max_pending: int = bounded(64, min=1, max=10_000)  # connections in their handshake at once; more are closed
    # A sender whose every PDU arrives in time may still trickle: a data set a few bytes at a
    # time, a C-ECHO every minute. After min_rate_grace (as long as network_timeout lets a silent
    # peer wait: nothing is dropped for slowness sooner than for silence) an association must
    # have received min_rate bytes for each second it has lasted, and none lasts past
    # association_timeout. 4 KiB/s is 32 kbit/s: a 30 MB CR over a 256 kbit/s link comes at 8
    # times that and takes 16 minutes; an hour lets it through down to 67 kbit/s.
    association_timeout: float = bounded(3600.0, gt=0.0)  # an association's whole life, seconds
    min_rate: int = bounded(4096, min=0)  # bytes per second received, on average since it began; 0: no floor
    min_rate_grace: float = bounded(60.0, min=1.0)  # seconds before min_rate applies (0 would cut at the first pause)
    tls_certificate: str | None = None  # PEM certificate (chain): the node speaks TLS only
    tls_key: str | None = None  # its PEM private key
    tls_ca: str | None = None  # PEM CA bundle: peers must present a certificate it signed
    send_tls_ca: str | None = None  # PEM CA bundle: send_to is reached over TLS, its certificate checked
    send_tls_certificate: str | None = None  # our client certificate for send_to (with send_tls_key)
    send_tls_key: str | None = None

    def __post_init__(self):
        super().__post_init__()
        where = self.table
        try:
            self.ae_title = check_ae_title(self.ae_title)
            self.allow = tuple(check_ae_title(title) for title in self.allow)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if self.send_to:
            try:
                Destination.parse(self.send_to)
            except ValueError as e:
                raise ConfigError(f"{where}.send_to: {e}") from None
            self.dicom_sr = True  # what is sent back
        if bool(self.tls_certificate) != bool(self.tls_key):
            raise ConfigError(f"{where}: tls_certificate and tls_key are given together")
        if self.tls_ca and not self.tls_certificate:
            raise ConfigError(f"{where}.tls_ca: verifying peers needs the node's own tls_certificate and tls_key")
        if bool(self.send_tls_certificate) != bool(self.send_tls_key):
            raise ConfigError(f"{where}: send_tls_certificate and send_tls_key are given together")
        if self.send_tls_certificate and not self.send_tls_ca:
            raise ConfigError(f"{where}.send_tls_certificate: TLS to send_to needs send_tls_ca, the CAs to check "
                              f"the PACS's certificate against")

    @property
    def destination(self) -> Destination | None:
        return Destination.parse(self.send_to) if self.send_to else None

    def tls_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context (TLS 1.2 or later), or None without a certificate;
        ConfigError when the files cannot be loaded."""
        if not self.tls_certificate:
            return None
        return self._tls(ssl.PROTOCOL_TLS_SERVER, self.tls_certificate, self.tls_key, self.tls_ca)

    def send_tls_context(self) -> ssl.SSLContext | None:
        """The sender's TLS context (the PACS's certificate and host name checked), or None
        without ``send_tls_ca``."""
        if not self.send_tls_ca:
            return None
        return self._tls(ssl.PROTOCOL_TLS_CLIENT, self.send_tls_certificate, self.send_tls_key, self.send_tls_ca)

    def _tls(self, protocol, certificate: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)  # a client context checks host names and certificates
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if certificate:
                context.load_cert_chain(certificate, key)
            if ca:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{self.table}: a TLS certificate, key or CA cannot be loaded: {e}") from None
        return context


def printable(text: str | bytes, limit: int = 64) -> str:
    """Text from the network, fit for one log line: cut to ``limit`` characters, then anything
    but printable ASCII escaped as Python would (``\\n``, ``\\x1b``), backslashes doubled, so
    no value can end a log line or forge one, and the escape is unambiguous."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return str(text)[:limit].translate(_ESCAPES).encode("ascii", "backslashreplace").decode("ascii")


# Control characters (as every console line shows them) and the backslash itself, so the escape is
# unambiguous; backslashreplace then escapes what is not ASCII.
_ESCAPES = {**CONTROL_ESCAPES, 0x5C: "\\\\"}


class EscapedLibraryLog(logging.Filter):
    """A library's log records with their text escaped (:func:`printable`): pynetdicom logs
    values from the network (an undecodable AE title, for one) as they came."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.name):
            text = record.getMessage()
            if not text.strip() and record.exc_info and record.exc_info[1] is not None:
                # LOGGER.exception(exc) of an exception without a message: its type, not a blank line
                text = type(record.exc_info[1]).__name__
            # a library's traceback (a PACS dropping the connection) only with --debug: the
            # line above says what happened
            if record.exc_info and not record.exc_text and logging.getLogger().isEnabledFor(logging.DEBUG):
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            record.msg, record.args, record.exc_info, record.exc_text = printable(text, 4000), (), None, None
        return True


def escape_library_log(name: str) -> None:
    """Install :class:`EscapedLibraryLog` for ``name`` on the root logger's handlers (a logger's
    own filters do not see its children's records), once per handler."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, EscapedLibraryLog) and f.name == name for f in handler.filters):
            handler.addFilter(EscapedLibraryLog(name))


def valid_uid(text: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zero in a component, 64 characters at most."""
    return 0 < len(text) <= 64 and RE_VALID_UID.match(text) is not None


class Spool:
    """Received objects waiting to be scored, one file each in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = private_dir(Path(folder))
        # OUT/.cxr-batch/spool: whether OUT is a share's mount point
        self.results_mount = os.path.ismount(self.folder.parent.parent)

    def make_again(self) -> None:
        """The spool made again after someone removed it (with the results folder, if that went
        too: the daemon fills it again from its ledger), but never where the folder the results
        folder was in is gone, nor in a results folder that was a mount point and is not now (a
        share unmounted: on the disk below it, hidden when the share is back); OSError then."""
        results = self.folder.parent.parent
        if not results.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the folder of the results folder is gone", str(results.parent))
        if self.results_mount and not os.path.ismount(results):
            raise FileNotFoundError(errno.ENOENT, "the results folder is no longer a mount point (its share "
                                                  "unmounted?)", str(results))
        private_dir(self.folder)

    @staticmethod
    def file_name(uid: str, digest: str) -> str:
        """``<SOPInstanceUID>.<content hash>.dcm``, the UID only when it is a valid UID (else
        the hash alone): a header never steers the path. The hash (``digest``, sha256 hex of the
        content) keeps a changed re-send of an instance apart from the copy being processed,
        which is deleted after its commit."""
        return f"{uid}.{digest[:16]}.dcm" if valid_uid(uid) else f"{digest[:40]}.dcm"

    @staticmethod
    def uid_of(name: str) -> str:
        """The SOPInstanceUID in a spool file's name (:meth:`file_name`), else how to find the
        object: its name (an object without a valid UID)."""
        stem = name.removesuffix(".dcm")
        uid = stem.rsplit(".", 1)[0] if "." in stem else ""
        return uid if valid_uid(uid) else f"(no valid SOPInstanceUID: spool file {name})"

    def write(self, uid: str, data: bytes) -> Path:
        """Write a received object atomically (temp file, fsync, rename, fsync of the folder):
        once this returns, the object survives a crash or a power cut. Raises OSError."""
        path = self.folder / self.file_name(uid, hashlib.sha256(data).hexdigest())
        try:
            atomic_write_bytes(path, data)
        except FileNotFoundError:  # someone removed the spool folder: made again (rescans find it)
            self.make_again()
            atomic_write_bytes(path, data)
        self._sync_folder()
        return path

    def take(self, uid: str, received: Path) -> Path:
        """A received object that pynetdicom wrote to ``received`` as it arrived (a temp file
        in this folder): hashed, fsynced and renamed into place, as durable as :meth:`write`.
        A file elsewhere (another volume) is copied in first. Raises OSError."""
        received = Path(received)
        if received.parent != self.folder:
            private_dir(self.folder)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out, open(received, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            received = Path(tmp)
        digest = hashlib.sha256()
        with open(received, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            os.fsync(f.fileno())
        path = self.folder / self.file_name(uid, digest.hexdigest())
        os.chmod(received, FILE_MODE)
        os.replace(received, path)
        self._sync_folder()
        return path

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable before the peer hears "stored"
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        """Space left for unprivileged writers on the spool's volume."""
        folder = self.folder
        while not folder.exists():  # removed under us: write() makes it again
            folder = folder.parent
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize

    def remove_temp(self) -> int:
        """Temp files of writes a crash interrupted (never answered as stored): removed."""
        removed = 0
        for p in self.folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


class KeyedLock:
    """A lock per key: holders of one key take turns, holders of different keys do not wait for
    each other. A key's lock lives while it is held or waited for."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (its lock, holders and waiters)

    @contextmanager
    def hold(self, key: str):
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]


class StorageSCP:
    """The listening side: a pynetdicom AE for C-ECHO and C-STORE into ``spool``;
    ``on_stored(path)`` is told about every object written (called in the network thread)."""

    def __init__(self, cfg: ListenConfig, spool: Spool, on_stored, tls: ssl.SSLContext | None = None):
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        self.cfg, self.spool, self.on_stored, self.tls = cfg, spool, on_stored, tls
        self.max_object = cfg.scoring.max_file_bytes  # anything larger would get an error row anyway
        self.min_free = cfg.min_free_mb << 20
        self.low_on_space = False
        # why the spool could not be written and how many C-STOREs were refused since it was
        # logged: a sender retrying a study while it stays so is not logged once per image
        self.unwritable: tuple[str, int] | None = None
        self.unwritable_lock = threading.Lock()
        ae = AE(ae_title=cfg.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(cfg.allow)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(DECODED_TRANSFER_SYNTAXES))
        self.ae = ae
        self.server = None
        self.counts = {name: 0 for name in COUNTS}
        self._lock = threading.Lock()
        self._bytes: dict[int, int] = {}  # bytes received per association since its last C-STORE
        self._aborted: set[int] = set()  # associations aborted for an oversize object
        # refusal(event) -> None, or (why an arriving object is not wanted, whether to log it): here an
        # object that is another instance than announced; a pull takes only what it asked for, and says
        # the first few it refuses in one retrieval;
        # taken(uid): told once one is stored, before another copy of that instance is looked at
        self.refusal = another_instance
        self.taken = None
        self.receiving = KeyedLock()  # SOP Instance UIDs being checked and stored

    def start(self):
        from pynetdicom import evt

        from .bounded import BoundedServer, Limits, stream_received_objects

        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_DATA_RECV, self.on_data),
                    (evt.EVT_REJECTED, self.on_rejected), (evt.EVT_CONN_CLOSE, self.on_close),
                    (evt.EVT_CONN_OPEN, tcp_no_delay)]
        stream_received_objects()
        escape_library_log("pynetdicom")
        limits = Limits(handshake=self.cfg.handshake_timeout, pdu=self.cfg.pdu_timeout, max_pdu=self.cfg.max_pdu,
                        max_pending=self.cfg.max_pending, association=self.cfg.association_timeout,
                        min_rate=self.cfg.min_rate, rate_grace=self.cfg.min_rate_grace,
                        per_host=min(self.cfg.max_associations_per_host, self.cfg.max_associations))
        try:
            server = self.ae.make_server((self.cfg.host, self.cfg.port), ssl_context=self.tls, evt_handlers=handlers,
                                         server_class=BoundedServer, limits=limits, monitor=self,
                                         receive_dir=self.spool.folder, make_receive_dir=self.spool.make_again)
        except OSError as e:
            raise NodeError(f"cannot listen on {self.address}: {e.strerror or e}") from None
        # As AE.start_server(block=False) does: serve in a thread, listed with the AE's servers.
        threading.Thread(target=server.serve_forever, name="cxr-batch-listener", daemon=True).start()
        self.ae._servers.append(server)
        self.server = server
        return server

    def stop(self) -> None:
        """Stop listening and abort associations in progress (their objects were not answered
        as stored, so the peers send them again). Only established ones: pynetdicom's
        ``AE.shutdown`` aborted every association thread still alive, one being rejected too
        (PS3.8 state 13, waiting for its connection to close), where an abort is an invalid
        event that kills its thread with a traceback on stderr; that one ends by itself."""
        for assoc in self.ae.active_associations:
            if assoc.is_established:
                assoc.abort()
        if self.server is not None:
            self.server.shutdown()  # also takes it off the AE's servers
        self.server = None

    @property
    def address(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"{host}:{self.cfg.port}"

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def shown(self, text: str | bytes, limit: int = 64) -> str:
        """An identifier from the network as it may be logged (:func:`printable`); one that
        needed escaping is counted (``escaped_identifiers``)."""
        safe = printable(text, limit)
        original = text.decode("latin-1") if isinstance(text, bytes) else str(text)
        if safe != original[:limit]:
            self._count("escaped_identifiers")
        return safe

    def status(self) -> dict:
        with self._lock:
            counts = dict(self.counts)
        return {"address": self.address, "ae_title": self.cfg.ae_title, "tls": self.tls is not None,
                "allow": list(self.cfg.allow), **counts}

    # ------------------------------------------------------------------ reported by the server (cxr_batch.integration.bounded)
    def dropped(self, kind: str, peer: str, reason: str) -> None:
        """A connection dropped before or during its association: a deadline passed (timeout),
        a PDU over its limit (oversize_pdu), not DICOM (protocol), TLS failed, too many
        handshakes at once (busy). An empty ``reason`` is counted, not logged (a flood)."""
        self._count(f"dropped_{kind}")
        if reason:
            log.warning("connection from %s dropped: %s", peer, reason)

    def rejected_title(self, peer: str, which: str, title: bytes) -> None:
        self._count("rejected_associations")
        log.warning("association from %s rejected: the %s AE title %s is not a valid AE title", peer, which,
                    f"'{self.shown(title.rstrip(b' '), 16)}'")

    def rejected_host(self, peer: str, calling: str, held: int, first: bool) -> None:
        self._count("rejected_associations")
        if not first:  # counted; the line was written when the host came to its limit
            return
        host = peer.rsplit(":", 1)[0]
        log.warning("association from %s at %s rejected (transient, local limit exceeded): %s already holds %d "
                    "associations (max_associations_per_host); the other slots are kept for other hosts (further "
                    "rejections are counted in status.json, not logged, until one of its associations ends)",
                    calling, peer, host, held)

    # ------------------------------------------------------------------ event handlers (network threads)
    def on_store(self, event) -> int:
        from .bounded import receive_error

        self._bytes[id(event.assoc)] = 0
        try:
            received = event.dataset_path  # streamed to disk as it arrived (cxr_batch.integration.bounded)
        except AttributeError:
            received = None
        # why it could not be written (disk full, low space), asked on every path so it is forgotten
        failed = receive_error(received) if received else None
        uid = str(event.request.AffectedSOPInstanceUID or "")
        shown = uid if valid_uid(uid) else f"an object with an invalid SOP Instance UID ({self.shown(uid, 20)}...)"
        # the peer that sends: the requestor, or (C-GET, cxr_batch.integration.pull) the PACS we called
        peer = self.shown((event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor).ae_title, 16)
        sop_class = str(event.request.AffectedSOPClassUID or "")
        if sop_class != str(event.context.abstract_syntax):
            # PS3.7 9.1.1.1: the SOP class of a C-STORE is that of its presentation context; one on
            # the Verification context was stored in a transfer syntax negotiated for no image
            self._count("refused")
            log.warning("%s from %s refused (0x0122, SOP class not supported): a C-STORE of %s on the presentation "
                        "context for %s", shown, peer, self.shown(sop_class), self.shown(event.context.abstract_syntax))
            return SOP_CLASS_NOT_SUPPORTED
        if self.spool.free_bytes() < self.min_free:
            # Received objects must not fill the disk the results, reports and ledger are written
            # to: the peer is told to try later (it keeps the object meanwhile).
            self._count("refused")
            if not self.low_on_space:
                log.error("less than %d MiB free for the spool: C-STOREs answered 0xA700 (out of resources) until "
                          "there is", self.cfg.min_free_mb)
            self.low_on_space = True
            return OUT_OF_RESOURCES
        # Copies of one instance arriving on several associations at once take turns from the
        # check to the store: each passed a pull's "sent again?" check while the other read its
        # header, and the image was stored and scored twice.
        with self.receiving.hold(uid):
            return self._store(event, uid, shown, peer, received, failed)

    def _store(self, event, uid: str, shown: str, peer: str, received, failed) -> int:
        """The C-STORE once its instance is ours alone: refused, or written to the spool."""
        if self.refusal is not None and (refused := self.refusal(event)):
            why, said = refused
            self._count("refused")
            if said:
                log.warning("%s from %s refused: %s", shown, peer, why)
            return INVALID_SOP_INSTANCE
        if self.low_on_space:
            log.info("disk space for the spool again: storing")
            self.low_on_space = False
        try:
            if failed is not None:
                raise failed  # the disk filled, or came below min_free_mb, while it arrived
            path = self.spool.take(uid, received) if received else self.spool.write(uid, event.encoded_dataset())
        except OSError as e:
            self._count("refused")
            why = str(e.strerror or e)
            with self.unwritable_lock:
                again = self.unwritable is not None and self.unwritable[0] == why
                self.unwritable = (why, self.unwritable[1] + 1 if again else 0)
            if not again:
                log.error("%s from %s not stored: %s; answered 0xA700 (out of resources): the sender retries (further "
                          "C-STOREs refused for this reason are counted in status.json, not logged)", shown, peer, why)
            return OUT_OF_RESOURCES
        except Exception as e:  # a bug: the peer is told, and may retry
            self._count("refused")
            log.error("%s from %s not stored: unexpected %s", shown, peer, type(e).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return PROCESSING_FAILURE
        with self.unwritable_lock:
            refused, self.unwritable = self.unwritable, None
        if refused is not None:
            log.info("the spool can be written again: storing (%d more C-STOREs were refused meanwhile)", refused[1])
        self._count("received")
        log.info("received %s from %s", shown, peer)
        if self.taken is not None:
            self.taken(uid)
        self.on_stored(path)
        return STORED

    def on_data(self, event) -> None:
        """Every PDU received: an object growing past ``max_object`` bytes (written to the spool
        as it arrives) aborts its association, so one sender cannot fill the disk or hold a
        slot for ever; one arriving while the spool's volume has less than ``min_free`` left
        stops being written and is answered 0xA700 when complete. The free space checked only
        then let objects arriving together (up to max_associations x max_file_bytes) take the
        disk the results and ledger are written to from min_free_mb to full."""
        from .bounded import refuse_partial_object

        key = id(event.assoc)
        if self.min_free and self.spool.free_bytes() < self.min_free:
            refuse_partial_object(event.assoc, OSError(errno.ENOSPC, f"less than {self.cfg.min_free_mb} MiB free "
                                                                     f"for the spool"))
        if key in self._aborted:
            return  # PDUs already read before the abort took effect
        size = self._bytes.get(key, 0) + len(event.data)
        self._bytes[key] = size
        if size > self.max_object:
            del self._bytes[key]
            self._aborted.add(key)
            self._count("aborted_oversize")
            log.warning("association from %s aborted: an object over %d bytes (scoring.max_file_bytes)",
                        self.shown(event.assoc.requestor.ae_title, 16), self.max_object)
            event.assoc.abort()

    def on_rejected(self, event) -> None:
        self._count("rejected_associations")
        rsp = event.assoc.acceptor.primitive
        reason = getattr(rsp, "reason_str", "") if rsp is not None else ""
        log.warning("association from %s at %s rejected: %s%s", self.shown(event.assoc.requestor.ae_title, 16),
                    self.shown(event.assoc.requestor.address), reason or "refused",
                    self._rejection_hint(reason, event.assoc.requestor.primitive))

    def _rejection_hint(self, reason: str, request) -> str:
        """What to change for the two rejections an operator's configuration causes; for a wrong
        called title, the one the sender called (dcmtk's storescu without -aec calls ANY-SCP)."""
        reason = reason.lower()
        if "calling ae title" in reason:
            return (f" (not in the allow-list (--allow, allow): {', '.join(self.cfg.allow)}; add the sender's "
                    f"title there, or have it call as one of those)")
        if "called ae title" in reason:
            called = getattr(request, "called_ae_title", None)
            said = f"it called {self.shown(called, 16)}: " if called else ""
            return f" ({said}the sender must call us as {self.cfg.ae_title} (--ae-title))"
        return ""

    def on_close(self, event) -> None:
        from .bounded import discard_partial_object

        discard_partial_object(event.assoc)  # an object cut off mid-way: its temp file in the spool
        self._bytes.pop(id(event.assoc), None)
        self._aborted.discard(id(event.assoc))


def another_instance(event) -> tuple[str, bool] | None:
    """Why a C-STORE whose data set is another SOP instance than it announces is refused: it is
    keyed by the announced UID and its result named by the header's, so an image sent under
    another image's UID got a second result for that UID, and an SR with the UID derived from it
    (the PACS kept one of the two and answered the other "duplicate"). None when they agree, or
    the header cannot be read or names no instance (its row says so)."""
    import pydicom

    announced = str(event.request.AffectedSOPInstanceUID or "")
    try:
        try:
            path = event.dataset_path
        except AttributeError:  # held in memory
            path = None
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]) if path \
            else event.dataset
        said = str(header.get("SOPInstanceUID", "") or "")
    except Exception:
        return None
    if not said or said == announced:  # none: read, its row says why (it names no other image)
        return None
    return (f"its data set is instance {printable(said)}, not the one its C-STORE announces (not stored: its "
            f"result would be filed under another image's UID)", True)


def check_address(host: str, port: int) -> None:
    """Refuse (NodeError) an address the node could not listen on, a port another program
    holds, before the model loads and before the results folder is made. The listener binds
    it again when the node starts (as pynetdicom does: SO_REUSEADDR, so a port left in
    TIME_WAIT by a stopped node is free)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise NodeError(f"cannot listen on {shown}: {e.strerror or e} (another program, or another cxr-batch "
                        f"listen, may hold the port: stop it or choose another --port)") from None


class Node(Watcher):
    """The watch daemon on the spool of a :class:`StorageSCP`; its outbox sends the results."""

    command = "listen"
    folder_name = "the spool"

    def __init__(self, out: Path, cfg: ListenConfig, stop=None):
        tls = cfg.tls_context()  # bad files stop the start before the model loads
        cfg.send_tls_context()
        # a results folder in use first: a second node on the same configuration (a systemd unit
        # and a manual run) found the port taken and could not say by whom
        FolderLock(Path(out), self.command).check_free()
        if self.receives_on_port(cfg):
            check_address(cfg.host, cfg.port)  # ...and so does a port in use, before any folder is made
        super().__init__(Path(out) / STATE_DIR / SPOOL, out, cfg, stop)
        self.spool = Spool(self.watch_dir)
        if self.claim._fd is None:  # the spool made just now: claimed once it is there
            try:
                self.claim = self.claim_watched_folder()
            except BaseException:
                self.lock.release()
                raise
        # Objects answered as stored and not yet committed (spool file names; added by network
        # threads): if OUT goes with them, each is moved to the new spool or named (not_scored).
        self.acknowledged = {p.name for p in self.watch_dir.iterdir() if not p.name.startswith(".")}
        self.acknowledged_lock = threading.Lock()
        self.not_scored: list[str] = []  # SOPInstanceUIDs of objects acknowledged and lost with OUT
        self.spool_fd = os.open(self.watch_dir, os.O_RDONLY | os.O_DIRECTORY)  # follows the spool if OUT moves
        self.scp = StorageSCP(cfg, self.spool, self.stored, tls)

    def stored(self, path: Path) -> None:
        """An object answered as stored (called in a network thread)."""
        with self.acknowledged_lock:
            self.acknowledged.add(Path(path).name)
        self.events.put(str(path))

    def receives_on_port(self, cfg: ListenConfig) -> bool:
        """Whether objects arrive on ``cfg.port`` (so it must be free); a pull by C-GET says no."""
        return True

    # ------------------------------------------------------------------ lifecycle hooks
    def claim_watched_folder(self) -> WatchedFolderClaim:
        """The spool alone, as a daemon that empties its folder: another node is kept away by
        the results folder's lock, but a watch daemon pointed at the spool ran beside the node,
        scoring its studies elsewhere as the node deleted them."""
        return WatchedFolderClaim(self.watch_dir, moves=True, what=self.command).acquire()

    def check_folders(self) -> None:
        """The spool lies inside the results folder by design; archive and quarantine folders
        must be apart from it."""
        self.check_moves("the spool")

    def cleanup_temp(self) -> None:
        super().cleanup_temp()
        n = self.spool.remove_temp()  # nothing is receiving yet
        if n:
            log.info("removed %s (never answered as stored)", plural(n, "incomplete received object"))

    def moves_handled_files(self) -> bool:
        return True  # the spool is emptied: committed objects are deleted when not archived

    def moves_held_files(self) -> bool:
        return True  # held objects too

    def check_watch_dir(self) -> None:
        """The spool is the node's own folder: one removed by someone (a clean-up of
        OUT/.cxr-batch) is made again at the next heartbeat, as a C-STORE makes it again, not
        left to read "degraded" until a modality happens to send."""
        if not self.watch_missing and not self.watch_dir.is_dir():
            try:
                self.spool.make_again()
                log.warning("the spool %s was removed: made again", self.watch_dir)
            except OSError as e:
                log.error("the spool %s was removed and cannot be made again: %s", self.watch_dir, e.strerror or e)
        super().check_watch_dir()

    def loop(self) -> None:
        self.listen()
        try:
            super().loop()
        finally:
            self.scp.stop()
            os.close(self.spool_fd)

    def remake_results_dir(self) -> None:
        """The results folder made again (moved or removed under the node), then the objects
        acknowledged but not yet scored taken into its spool (:meth:`rescue_spool`)."""
        super().remake_results_dir()
        self.rescue_spool()

    def rescue_spool(self) -> None:
        """Objects answered as stored that waited in the spool of a results folder moved away
        (``mv OUT OUT.old``): moved into the new spool (found through the folder the node holds
        open, wherever it went on that file system), so they are scored. Those gone (``rm -rf
        OUT``, or OUT moved to another file system: a copy, then the folder deleted) are named by
        SOPInstanceUID in the log and status.json (``not_scored``): never lost unsaid."""
        self.spool.make_again()
        fd = os.open(self.watch_dir, os.O_RDONLY | os.O_DIRECTORY)
        old, self.spool_fd = self.spool_fd, fd
        moved = 0
        try:
            if not os.path.samestat(os.fstat(old), os.fstat(fd)):
                for name in os.listdir(old):  # none in a folder that was deleted
                    if name.startswith("."):  # an object still arriving: never answered as stored
                        continue
                    try:
                        os.rename(name, name, src_dir_fd=old, dst_dir_fd=fd)
                        moved += 1
                    except OSError as e:
                        log.error("%s could not be moved to the new spool: %s", log_name(name), e.strerror or e)
        finally:
            os.close(old)
        if moved:
            log.warning("%d object(s) received and not yet scored moved from the old results folder's spool to %s: "
                        "scored there", moved, self.watch_dir)
        with self.acknowledged_lock:  # listed under it: an object stored meanwhile is either here or not yet added
            here = set(os.listdir(fd))
            lost = sorted(self.acknowledged - here)
            self.acknowledged &= here
        if lost:
            uids = [Spool.uid_of(name) for name in lost]
            self.not_scored += uids
            log.error("%d object(s) answered as stored went with the old results folder and are not scored (send "
                      "them again): %s", len(uids), ", ".join(uids))

    def listen(self) -> None:
        """Start the storage SCP."""
        self.scp.start()
        allowed = ", ".join(self.cfg.allow) if self.cfg.allow else "any"
        log.info("listening on %s as %s (TLS %s; calling AE titles: %s)", self.scp.address, self.cfg.ae_title,
                 "on" if self.scp.tls else "off", allowed)

    # ------------------------------------------------------------------ hooks of the daemon
    def move(self, rel: str, status: str, taken: tuple[int, int] | None = None) -> None:
        """A spool file whose study is committed: moved to archive_dir (quarantine_dir for a
        failure) when configured, else deleted; the ledger and results.csv keep the result."""
        with self.acknowledged_lock:
            self.acknowledged.discard(rel)  # committed: its result is in the ledger
        if self.cfg.quarantine_dir if status == "error" else self.cfg.archive_dir:
            super().move(rel, status, taken)
            return
        try:
            (self.watch_dir / rel).unlink(missing_ok=True)
        except OSError as e:
            log.error("could not remove %s from the spool: %s", log_name(rel), e.strerror or e)

    def fail_batch(self, rels: list[str], reason: str) -> None:
        super().fail_batch(rels, reason)
        with self.acknowledged_lock:
            self.acknowledged.difference_update(rels)  # committed as errors: reported

    def held_remedy(self, files: list, for_log: bool, scored: int = 0) -> str:
        """A study held back (:meth:`Watcher.held_back`) is resolved in the PACS: its spool files
        are named by nothing a person knows."""
        return "resolve the study in the PACS (split or merge it) and send its images again"

    def extra_status(self) -> dict:
        lost = {"not_scored": self.not_scored} if self.not_scored else {}
        return {"listen": self.scp.status(), **lost, **super().extra_status()}


def patient_header(path: Path):
    """(Study Instance UID, :class:`~.patients.Patient`) of a received object's header, as its
    record will have them; ("", empty) when it cannot be read (its row will say why). A DICOM
    file without the 128-byte preamble, which scan and watch score (cxr_batch.dicom reads with
    force), is read too: left out, its study's second patient went unseen. Only a regular file is
    read, through one open file: a FIFO swapped in since the file was read would block the scan or
    the daemon for ever."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ..dicom import identifiers, looks_like_dicom
    from ..readers import open_regular, pinned
    from .patients import Patient

    def read(f, force: bool):
        f.seek(0)
        return pydicom.dcmread(f, force=force, stop_before_pixels=True,
                               specific_tags=["SpecificCharacterSet", "StudyInstanceUID", "PatientID",
                                              "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                              "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDs",
                                              "OtherPatientIDsSequence"])

    try:
        with open_regular(path) as f:
            try:
                ds = read(f, force=False)
            except InvalidDicomError:  # no preamble: forced only for what the scan takes for DICOM, not a PNG
                if not looks_like_dicom(pinned(path, f)):
                    return "", Patient()
                ds = read(f, force=True)
        ids = identifiers(ds)
    except Exception:  # RecursionError included: a header nested past reading
        return "", Patient()
    return ids.study_uid, Patient.of_ids(ids)
