"""Deadlines and size limits around pynetdicom's association server: no peer can stop the node.

pynetdicom 3.0 accepts connections in one thread and, with TLS, runs each handshake there
without a timeout (one idle TCP connection to the TLS port stops every other peer); its
reader then waits for the rest of a PDU on a socket without a timeout (a sender that stops
mid-PDU holds its association, and its thread, for ever: its idle and ARTIM timers are
checked only between reads) and reads as many bytes as a PDU's header declares (one header
can make the node allocate gigabytes). This module wraps it, without changing its code:

- :class:`BoundedServer` (pynetdicom's threaded server) only accepts in its accept thread, and
  hands each connection to a thread of its own at once. At most ``max_pending`` connections
  may be in their handshake together, at most ``per_host`` of one host's (counted from the
  accept: one host cannot take every place); more are closed at once (``dropped_busy``).
- :class:`BoundedRequestHandler` runs, in that thread and under one deadline from the accept
  (``handshake``): the TLS handshake, then the first PDU, which must be an A-ASSOCIATE-RQ of
  at most :data:`CONTROL_PDU_LIMIT` bytes with well-formed AE titles. Only then is pynetdicom's
  Association made: a connection that never asks holds no association slot, so idle
  connections cannot lock modalities out (``max_associations`` counts associations only).
- :class:`BoundedSocket` (pynetdicom's AssociationSocket) gives every later PDU a deadline
  from its first byte (``pdu``): a peer that stalls mid-PDU, or drips it byte by byte, is
  dropped when it passes. Each PDU's length is checked from its 6-byte header before its body
  is read: over ``max_pdu`` (a P-DATA-TF) or :data:`CONTROL_PDU_LIMIT` (any other PDU), the
  association is aborted and nothing more is read. Sends wait at most ``pdu`` too. A DIMSE
  message pynetdicom's decoder raises on, and a data set held in memory (any but a C-STORE's)
  over :data:`IN_MEMORY_DATA_SET_LIMIT`, are dropped the same way (:func:`_guarded`). A
  whole association has a bound too (every PDU in time, a trickle still held its slot for
  ever): it lasts ``association`` seconds at most and, after ``rate_grace``, must have received
  ``min_rate`` bytes for each second it has lasted (``dropped_slow``).
- :func:`stream_received_objects`: pynetdicom's own ``STORE_RECV_CHUNKED_DATASET`` mode writes
  each C-STORE's data set to a file as its PDUs arrive rather than into memory, here to a hidden
  temp file in the spool (same volume: the handler renames it into place), so memory per
  association is a few PDUs whatever the object's size.

Every drop is reported to the ``monitor`` (the node's StorageSCP), which counts it in
status.json and logs it with the peer's address. Only pynetdicom's documented extension points
are used (``make_server(server_class=..., request_handler=...)``, its request handler and
socket classes, ``_config``); the two exceptions are the temp file factory of
``pynetdicom.dimse_messages``, replaced by one that chooses the folder, and each association's
``dimse.receive_primitive``, wrapped (:func:`_guarded`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Protocol

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

A_ASSOCIATE_RQ, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x01, 0x03, 0x04, 0x07
PDU_TYPES = range(0x01, 0x08)
# Any PDU but P-DATA-TF: an A-ASSOCIATE-RQ proposing all 128 presentation contexts with a dozen
# transfer syntaxes each is about 50 KB; release and abort PDUs are 10 bytes.
CONTROL_PDU_LIMIT = 256 << 10
# A data set pynetdicom holds in memory: anything but a C-STORE-RQ's (written to disk as it
# arrives). The node answers C-ECHO, whose request has none; a pull's C-FIND identifiers and C-GET
# responses come on associations it makes, not through this server.
IN_MEMORY_DATA_SET_LIMIT = 1 << 20
RECEIVE_PREFIX = ".recv-"  # hidden (the watch loop ignores it), and removed at start like every .tmp
RECEIVE_SUFFIX = ".tmp"
# A-ABORT from the service provider, reason "invalid PDU parameter value" (PS3.8 9.3.8).
_ABORT_INVALID_PDU = struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, 2, 6)


def _reject(reason: int) -> bytes:
    """A-ASSOCIATE-RJ, rejected permanently by the service user for ``reason`` (PS3.8 9.3.4):
    3 the calling AE title, 7 the called AE title."""
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, 1, 1, reason)


# A-ASSOCIATE-RJ, rejected transiently by the service provider (presentation related): local limit
# exceeded (PS3.8 9.3.4), as pynetdicom answers one association over max_associations.
_REJECT_BUSY = struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, 2, 3, 2)


@dataclass(frozen=True)
class Limits:
    handshake: float  # seconds from accept to a complete A-ASSOCIATE-RQ (TLS handshake included)
    pdu: float  # seconds from a PDU's first byte to its last (and for each send)
    max_pdu: int  # the longest P-DATA-TF we accept (what we advertise as Maximum Length Received)
    max_pending: int  # connections in their handshake at once
    per_host: int  # associations one host (IP address) may hold at once
    association: float  # seconds an association may last, whatever it sends
    min_rate: int  # bytes per second an association must have received on average (0: no floor)...
    rate_grace: float  # ...once it has lasted this many seconds

    def pdu_limit(self, pdu_type: int) -> int:
        return self.max_pdu if pdu_type == P_DATA_TF else CONTROL_PDU_LIMIT


class Monitor(Protocol):
    """What the server reports to (cxr_batch.integration.node.StorageSCP)."""

    def dropped(self, kind: str, peer: str, reason: str) -> None: ...  # kind: timeout, oversize_pdu, ...

    def rejected_title(self, peer: str, which: str, title: bytes) -> None: ...

    # held: the host's associations; first: the first rejection since it came to its limit (logged)
    def rejected_host(self, peer: str, calling: str, held: int, first: bool) -> None: ...


class Dropped(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _read_exactly(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    """``n`` bytes from ``sock`` before ``deadline`` (monotonic); Dropped otherwise."""
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Dropped("timeout", f"{what} not complete in time ({len(data)} of {n} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(data), 65536))
        except TimeoutError:
            continue  # the loop's deadline check says so
        except OSError as e:
            raise Dropped("closed", f"connection lost during {what}: {e}") from None
        if not chunk:
            raise Dropped("closed", f"connection closed during {what}")
        data += chunk
    return bytes(data)


def _valid_title(raw: bytes) -> bool:
    """PS3.5 AE VR: the default repertoire without control characters or backslash, not blank."""
    return bool(raw.strip(b" ")) and all(0x20 <= b < 0x7F and b != 0x5C for b in raw)


def peer_host(address) -> str:
    """The host of a peer's socket address ``(host, port, ...)``, one name per host: a node
    listening on "::" sees an IPv4 peer as an IPv4-mapped IPv6 address (::ffff:10.1.2.3), named
    here as its IPv4 address, and an IPv6 address in its one canonical form. The per-host limits
    count, and the log lines name, this (normalised once, as each connection is accepted)."""
    host = str(address[0])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # not an IP address (a Unix socket, a test double): as it is
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_name(address) -> str:
    """``host:port`` of a peer (its address as :meth:`BoundedServer.get_request` gives it) for a
    log line, ``[host]:port`` for IPv6."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class BoundedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the deadlines and limits above."""

    daemon_threads = True  # handshake threads; each ends by its deadline, and shutdown cuts them short

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 limits: Limits, monitor: Monitor, receive_dir: Path, make_receive_dir):
        self.limits, self.monitor, self.receive_dir = limits, monitor, Path(receive_dir)
        self.make_receive_dir = make_receive_dir  # () -> None, OSError where it may not be made (Spool.make_again)
        self.tls = ssl_context
        self._pending: dict[socket.socket, str] = {}  # connections in their handshake -> their host
        self._pending_lock = threading.Lock()
        self._busy_logged = False
        self._pending_per_host: dict[str, int] = {}  # host -> its connections in their handshake
        self._flooding_told: set[str] = set()  # hosts refused since they came to their share of the handshakes
        self._per_host: dict[str, int] = {}  # IP address -> associations it holds (under _pending_lock)
        self._at_limit_told: set[str] = set()  # hosts rejected since they came to their limit
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
                         request_handler=BoundedRequestHandler)

    def get_request(self):
        """Accept only: the TLS handshake happens in the connection's own thread. The peer's
        address is normalised here, once (:func:`peer_host`), for the limits, our log lines and
        pynetdicom's association (its requestor's address)."""
        client, address = self.socket.accept()
        client.settimeout(self.limits.handshake)
        return client, (peer_host(address), *address[1:])

    def verify_request(self, request, client_address) -> bool:
        """A connection may start its handshake while fewer than ``max_pending`` are in theirs,
        and fewer than ``per_host`` of its host's: one host's connections that never ask took
        every handshake place, and every other host's connection was closed until their
        deadlines passed. Counted from the accept, so a flood is held to its share at once;
        a refusal is logged once a flood (the first since the host came to its share)."""
        host = client_address[0]
        with self._pending_lock:
            held = self._pending_per_host.get(host, 0)
            if len(self._pending) >= self.limits.max_pending:
                reason = "" if self._busy_logged else \
                    f"{self.limits.max_pending} connections already in their handshake (max_pending)"
                self._busy_logged = True
            elif held >= self.limits.per_host:
                reason = "" if host in self._flooding_told else \
                    (f"{host} already has {held} connections in their handshake (max_associations_per_host; further "
                     f"ones are closed at once, counted in status.json, not logged, until one of them ends)")
                self._flooding_told.add(host)
            else:
                self._pending[request] = host
                self._pending_per_host[host] = held + 1
                self._busy_logged = False
                return True
        self.monitor.dropped("busy", peer_name(client_address), reason)
        return False

    def process_request(self, request, client_address) -> None:
        # verify_request counted the connection in its host's handshake places; when its thread
        # cannot start (the thread limit) no handler counts it out: per_host of these locked the
        # host out until a restart
        try:
            super().process_request(request, client_address)  # the connection's thread, started
        except RuntimeError as e:
            self.handshake_done(request)
            self.monitor.dropped("busy", peer_name(client_address), f"no thread could be started for it ({e})")
            self.shutdown_request(request)
        except BaseException:
            self.handshake_done(request)
            raise

    def handshake_done(self, request) -> None:
        with self._pending_lock:
            host = self._pending.pop(request, None)
            if host is None:
                return
            held = self._pending_per_host.pop(host) - 1
            if held:
                self._pending_per_host[host] = held
            self._flooding_told.discard(host)

    def take_slot(self, host: str) -> tuple[int, bool]:
        """Count an association for ``host`` unless it holds ``per_host`` already; returns how
        many it held before (the slot is taken only when that is under the limit) and, for a
        refusal, whether it is the first since the host came to its limit (a flood is told once)."""
        with self._pending_lock:
            held = self._per_host.get(host, 0)
            if held < self.limits.per_host:
                self._per_host[host] = held + 1
                return held, False
            first = host not in self._at_limit_told
            self._at_limit_told.add(host)
            return held, first

    def free_slot(self, host: str) -> None:
        with self._pending_lock:
            held = self._per_host.pop(host, 1) - 1
            if held > 0:
                self._per_host[host] = held
            self._at_limit_told.discard(host)

    def server_close(self) -> None:
        """Connections still in their handshake are cut (their threads end at once)."""
        with self._pending_lock:
            pending = list(self._pending)
        for sock in pending:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()


class BoundedRequestHandler(RequestHandler):
    """Runs in the connection's own thread: the handshake under its deadline, then pynetdicom's
    association on a :class:`BoundedSocket`."""

    server: BoundedServer

    def handle(self) -> None:
        server, raw = self.server, self.request
        peer = peer_name(self.client_address)
        deadline = time.monotonic() + server.limits.handshake
        sock = raw
        try:
            try:
                if server.tls is not None:
                    sock = self._tls_handshake(raw, deadline)
                self.first_pdu = self._association_request(sock, deadline, peer)
            finally:
                server.handshake_done(raw)
        except Dropped as e:
            if e.kind != "closed":  # a port scan or a health check is not news
                server.monitor.dropped(e.kind, peer, e.reason)
            _close(sock)
            return
        except Exception as e:  # a bug must not end the accept thread's pool or print to stderr
            server.monitor.dropped("protocol", peer, f"unexpected {type(e).__name__} during the handshake")
            _close(sock)
            return
        # One host may hold only its share of the association slots: twenty threads of C-ECHOs
        # from one host held all of them, and every modality was rejected while they went on.
        host = self.client_address[0]
        held, first = server.take_slot(host)
        if held >= server.limits.per_host:
            server.monitor.rejected_host(peer, self.first_pdu[26:42].decode("ascii").strip(), held, first)
            try:
                sock.settimeout(1.0)
                sock.sendall(_REJECT_BUSY)
            except OSError:
                pass
            _close(sock)
            return
        try:
            self.request = sock
            super().handle()  # pynetdicom's: the association (on a BoundedSocket), EVT_CONN_OPEN, start
            self.assoc.join()  # this thread holds the host's slot until the association ends
        finally:
            server.free_slot(host)

    def _tls_handshake(self, raw: socket.socket, deadline: float) -> ssl.SSLSocket:
        left = deadline - time.monotonic()
        try:
            tls = self.server.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls.settimeout(max(left, 0.001))  # do_handshake applies it to the whole handshake
            tls.do_handshake()
            return tls
        except TimeoutError:
            raise Dropped("timeout", f"TLS handshake not complete within {self.server.limits.handshake:g} s") from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:  # the peer left
            raise Dropped("closed", f"connection closed during the TLS handshake: {e}") from None
        except ssl.SSLError as e:
            raise Dropped("tls", f"TLS handshake failed: {e.reason or e}") from None
        except OSError as e:
            raise Dropped("closed", f"connection lost during the TLS handshake: {e}") from None

    def _association_request(self, sock: socket.socket, deadline: float, peer: str) -> bytes:
        """The first PDU, checked: an A-ASSOCIATE-RQ, not too long, AE titles well formed."""
        header = _read_exactly(sock, 6, deadline, "the association request")
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != A_ASSOCIATE_RQ:
            raise Dropped("protocol", f"the first PDU is not an association request (type 0x{pdu_type:02X})")
        if length > CONTROL_PDU_LIMIT or length < 68:
            raise Dropped("oversize_pdu" if length > CONTROL_PDU_LIMIT else "protocol",
                          f"an association request of {length:,} bytes (at most {CONTROL_PDU_LIMIT:,})")
        body = _read_exactly(sock, length, deadline, "the association request")
        # Checked here so that pynetdicom, which logs a title it cannot decode as it is, never
        # sees one: a newline or ESC in a title would forge log lines.
        for which, raw, reason in (("called", body[4:20], 7), ("calling", body[20:36], 3)):
            if not _valid_title(raw):
                self.server.monitor.rejected_title(peer, which, raw)
                try:
                    sock.settimeout(1.0)
                    sock.sendall(_reject(reason))
                except OSError:
                    pass
                raise Dropped("closed", "")  # counted and logged as a rejected association
        return header + body

    def _create_association(self):
        """pynetdicom's association, its socket replaced by a BoundedSocket holding the request
        already read (adopting the plain one's state: the transport event is queued once)."""
        assoc = super()._create_association()
        plain = assoc.dul.socket
        bounded = BoundedSocket.adopt(plain, self.first_pdu, self.server.limits, self.server.monitor,
                                      peer_name(self.client_address))
        assoc.dul.socket = bounded
        assoc.dimse.receive_primitive = _guarded(assoc.dimse, bounded)
        self.assoc = assoc
        return assoc


def _guarded(dimse, sock: "BoundedSocket"):
    """pynetdicom's decoding of each P-DATA into DIMSE messages (``dimse.receive_primitive``),
    with the drops it lacks:

    - its exceptions: its decoder raises on a command set that lacks a required element (a
      C-STORE-RQ without an Affected SOP Instance UID), which ended the reader thread, so the
      peer got no A-ABORT and the object's temp file stayed in the spool;
    - a command, or a fragment on another presentation context, in the middle of a data set;
    - a data set held in memory past :data:`IN_MEMORY_DATA_SET_LIMIT`: only a C-STORE-RQ's
      goes to disk, and fragments with no command before them, or after a C-ECHO-RQ that says a
      data set follows, were kept until max_file_bytes (1 GiB per association)."""
    receive_primitive = dimse.receive_primitive

    def receive(primitive) -> None:
        message = dimse.message
        if message is not None and message.context_id is not None:  # its command is in: its data set arrives
            for context_id, fragment in primitive.presentation_data_value_list:
                # PS3.7 E.2, PS3.8 9.3.5.1: a message's data set follows its command whole, on its
                # presentation context. A new command here made pynetdicom open a second temp file
                # and leave the first, up to max_file_bytes, in the spool.
                if fragment[:1] and fragment[0] & 1 or context_id != message.context_id:
                    sock.drop_interleaved("a command" if context_id == message.context_id else
                                          "a fragment on another presentation context")
                    return
        try:
            receive_primitive(primitive)
        except OSError as e:  # this side's disk: the data set's temp file in the spool (OUT a file, full)
            sock.drop_unstorable(f"{type(e).__name__}: {e.strerror or e}")
            return
        except Exception as e:
            # the type only: a decoder's message may quote the peer's bytes
            sock.drop_undecodable(type(e).__name__)
            return
        message = dimse.message  # the one still arriving, if any
        held = getattr(message, "data_set", None)
        if getattr(message, "_data_set_file", None) is None and held is not None \
                and held.tell() > IN_MEMORY_DATA_SET_LIMIT:
            sock.drop_in_memory(held.tell())

    return receive


class BoundedSocket(AssociationSocket):
    """An AssociationSocket whose reads have a deadline per PDU and a length limit per PDU."""

    @classmethod
    def adopt(cls, plain: AssociationSocket, first_pdu: bytes, limits: Limits, monitor: Monitor,
              peer: str) -> "BoundedSocket":
        bounded = cls.__new__(cls)
        bounded.__dict__.update(vars(plain))
        bounded._buffer = bytearray(first_pdu)  # read by the handshake; pynetdicom reads it again from here
        bounded._limits, bounded._monitor, bounded._peer = limits, monitor, peer
        bounded._left = 0  # bytes of the current PDU still to come; 0: the next read is a header
        bounded._deadline = 0.0
        bounded._dropped = False
        bounded._started, bounded._received = time.monotonic(), len(first_pdu)
        if bounded.socket is not None:
            bounded.socket.settimeout(limits.pdu)  # sends too
        return bounded

    @property
    def ready(self) -> bool:
        """Asked by pynetdicom's reactor every few milliseconds, so a trickle is cut at its time
        even while the peer is silent between PDUs."""
        if not self._dropped and time.monotonic() >= self._pace_deadline():
            self._drop_slow()  # the socket reads as closed: pynetdicom ends the association
        if self._buffer and not self._dropped:
            return True
        return super().ready

    def _pace_deadline(self) -> float:
        """When the association must end unless more bytes come: it lasts ``association``
        seconds at most, and after ``rate_grace`` each byte received buys it 1/``min_rate`` s."""
        limits = self._limits
        allowed = limits.association
        if limits.min_rate:
            allowed = min(allowed, max(limits.rate_grace, self._received / limits.min_rate))
        return self._started + allowed

    def _drop_slow(self) -> None:
        lasted, limits = time.monotonic() - self._started, self._limits
        if lasted >= limits.association:
            why = f"open for {limits.association:g} s (association_timeout)"
        else:
            why = (f"that received {self._received:,} bytes in {lasted:.0f} s, under {limits.min_rate:,} bytes/s "
                   f"(min_rate, after min_rate_grace {limits.rate_grace:g} s)")
        self._drop("slow", f"an association {why}: aborted", abort=True)

    def recv(self, nr_bytes: int) -> bytearray:
        if self._dropped:
            return bytearray()  # pynetdicom sees a connection closed mid-PDU and ends the association
        header = self._left == 0
        if header:  # a new PDU: its deadline runs from its first byte
            self._deadline = time.monotonic() + self._limits.pdu
        data = self._read(nr_bytes)
        if header and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            limit = self._limits.pdu_limit(pdu_type)
            if pdu_type in PDU_TYPES and length > limit:
                self._drop("oversize_pdu", f"a PDU declaring {length:,} bytes (at most {limit:,}: max_pdu)",
                           abort=True)
                return data
            self._left = length
        elif not header:
            self._left = max(0, self._left - len(data))
        return data

    def _read(self, n: int) -> bytearray:
        data = self._buffer[:n]
        del self._buffer[:n]
        while len(data) < n and not self._dropped:
            now = time.monotonic()
            if now >= self._pace_deadline():
                self._drop_slow()
                break
            left = min(self._deadline, self._pace_deadline()) - now
            if left <= 0:
                self._drop("timeout", f"a PDU not complete within {self._limits.pdu:g} s (pdu_timeout)")
                break
            try:
                self.socket.settimeout(left)
                chunk = self.socket.recv(min(n - len(data), 65536))
            except TimeoutError:
                continue
            except (OSError, AttributeError):  # reset, or closed under us
                break
            finally:
                if self.socket is not None:
                    self.socket.settimeout(self._limits.pdu)
            if not chunk:
                break
            data += chunk
            self._received += len(chunk)
        return data

    def drop_undecodable(self, error: str) -> None:
        """A DIMSE message pynetdicom could not decode (``error``: the exception's type): the
        association is aborted and the connection closed, which ends it as any drop does."""
        self._drop("protocol", f"a DIMSE message that cannot be decoded ({error}): association aborted",
                   abort=True)

    def drop_unstorable(self, error: str) -> None:
        """A C-STORE's data set that the spool cannot take (``error``: this side's file system)
        where no status can be answered (a spool that cannot hold its temp file is answered
        0xA700: :meth:`_ReceiveFile.refused`): aborted, so the sender keeps the object and sends
        it again."""
        self._drop("spool", f"the spool cannot be written ({error}): association aborted, the sender keeps "
                            f"the object to send again", abort=True)

    def drop_interleaved(self, what: str) -> None:
        """``what`` arrived in the middle of a data set."""
        self._drop("protocol", f"{what} in the middle of a data set: association aborted", abort=True)

    def drop_in_memory(self, size: int) -> None:
        """A data set growing in memory past :data:`IN_MEMORY_DATA_SET_LIMIT` (``size`` bytes
        so far): not a C-STORE's, which goes to disk."""
        self._drop("protocol", f"a data set of over {size:,} bytes that is not a C-STORE's (at most "
                               f"{IN_MEMORY_DATA_SET_LIMIT:,}): association aborted", abort=True)

    def _drop(self, kind: str, reason: str, abort: bool = False) -> None:
        self._dropped = True
        self._left = 0
        self._monitor.dropped(kind, self._peer, reason)
        sock = self.socket
        if sock is None:
            return
        try:
            if abort:
                sock.settimeout(1.0)
                sock.sendall(_ABORT_INVALID_PDU)
            sock.shutdown(socket.SHUT_RDWR)  # pynetdicom closes it when it ends the association
        except OSError:
            pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------- receiving to disk
_failed_receives: dict[str, OSError] = {}  # temp file name -> why it could not be written
_failed_lock = threading.Lock()
# id(association) -> its temp files not yet handed to the C-STORE handler (under _failed_lock)
_unhanded: dict[int, set[str]] = {}


class _ReceiveFile:
    """pynetdicom's temp file for a data set as it arrives (it calls write, file.flush, name
    and close), made safe for a full disk: the first failing write empties the file, later
    ones are dropped, and :func:`receive_error` tells the C-STORE handler, which answers
    "out of resources" (pynetdicom would let the error end the association's reader thread)."""

    def __init__(self, inner):
        self._inner, self.name, self.file = inner, inner.name, self

    @classmethod
    def refused(cls, name: str, error: OSError) -> "_ReceiveFile":
        """No file at all (``error``: the spool could not hold one, e.g. OUT replaced by a file
        or made unwritable): the data set is read and dropped, and the C-STORE handler answers
        "out of resources" as for a full disk. Aborting the association instead left the
        sender without a status, and a modality may take that as a failure for good."""
        refused = cls.__new__(cls)
        refused._inner, refused.name, refused.file = None, name, refused
        with _failed_lock:  # said as this side's fault, not the full disk's alone
            _failed_receives[name] = OSError(error.errno, f"the spool cannot be written ({error.strerror or error})")
        return refused

    def write(self, data) -> int:
        if self.name not in _failed_receives:
            try:
                return self._inner.write(data)
            except OSError as e:
                self._failed(e)
        return len(data)

    def flush(self) -> None:
        if self.name not in _failed_receives:
            try:
                self._inner.file.flush()
            except OSError as e:
                self._failed(e)

    def close(self) -> None:
        if self._inner is None:
            return
        try:
            self._inner.close()
        except OSError:  # what was buffered cannot be written: the object is refused anyway
            pass

    def _failed(self, error: OSError) -> None:
        with _failed_lock:
            _failed_receives[self.name] = error
        try:
            os.truncate(self.name, 0)  # give the space back now
        except OSError:
            pass


def receive_error(path) -> OSError | None:
    """Why the data set received into ``path`` could not be written, or None (forgotten once
    asked). Asked by the C-STORE handler: the file is handed over (taken or refused)."""
    with _failed_lock:
        for names in _unhanded.values():
            names.discard(str(path))
        return _failed_receives.pop(str(path), None)


def refuse_partial_object(assoc, error: OSError) -> bool:
    """Stop writing the data set arriving on ``assoc``: its temp file is emptied, the rest of it
    dropped as it comes, and its C-STORE handler finds ``error`` (:func:`receive_error`) and
    answers "out of resources". False when no data set is arriving or it is refused already."""
    partial = getattr(getattr(getattr(assoc, "dimse", None), "message", None), "_data_set_file", None)
    if not isinstance(partial, _ReceiveFile):
        return False
    with _failed_lock:
        if partial.name in _failed_receives:
            return False
    partial._failed(error)
    return True


def _receive_file(*args, **kwargs):
    """pynetdicom's temp file for a C-STORE data set as it arrives: in the receiving server's
    ``receive_dir`` (the spool) when the association is one of a BoundedServer, hidden."""
    assoc = getattr(threading.current_thread(), "assoc", None)  # the DUL thread decodes the PDUs
    server = getattr(assoc, "_server", None)
    folder = getattr(server, "receive_dir", None)
    if folder is not None:
        # removed by an operator: made again as the spool makes itself again, never on the disk
        # below an unmounted share (the temp file then cannot be made: the C-STORE is refused)
        if not os.path.isdir(folder):
            try:
                server.make_receive_dir()
            except OSError:
                pass
        kwargs.update(dir=folder, prefix=RECEIVE_PREFIX, suffix=RECEIVE_SUFFIX)
    try:
        received = _ReceiveFile(NamedTemporaryFile(*args, **kwargs))
    except OSError as e:
        if folder is None:
            raise
        # the name only keys the error for the handler; no file is made under it
        received = _ReceiveFile.refused(os.path.join(folder, f"{RECEIVE_PREFIX}unwritable-{uuid.uuid4().hex}"
                                                             f"{RECEIVE_SUFFIX}"), e)
    if folder is not None:
        with _failed_lock:
            _unhanded.setdefault(id(assoc), set()).add(received.name)
    return received


def stream_received_objects() -> None:
    """C-STORE data sets go to disk as they arrive, for every SCP of this process (pynetdicom's
    setting is global; other SCPs get the system temp folder and the same events)."""
    from pynetdicom import _config, dimse_messages

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _receive_file


def discard_partial_object(assoc) -> None:
    """The temp files of an association that ended, never handed to the C-STORE handler: a
    data set cut off (aborted, dropped), or one complete that pynetdicom never passed on (a
    C-STORE-RQ without a Message ID gets no answer and no handler). pynetdicom removes one only
    after a complete C-STORE's handler."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        partial.close()
    with _failed_lock:
        names = _unhanded.pop(id(assoc), set())
        for name in names:
            _failed_receives.pop(name, None)
    for name in names:
        try:
            Path(name).unlink(missing_ok=True)
        except OSError:  # the spool's next start removes it (a hidden .tmp)
            pass
