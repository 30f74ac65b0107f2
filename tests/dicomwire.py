"""A hostile DICOM peer on raw sockets: PDUs built by hand (PS3.8 9.3), so a test can send what
no well-behaved library would: a header that promises more than follows, a gigabyte PDU, AE
titles with control characters. Used by tests/test_node_hostile.py and benchmarks/listen_attacks.py."""

from __future__ import annotations

import socket
import ssl
import struct
import time

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x01, 0x02, 0x03, 0x04, 0x07


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(calling: bytes = b"MODALITY", called: bytes = b"CXRBATCH", abstract: bytes = VERIFICATION) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``abstract`` in implicit VR little endian; the AE titles go
    on the wire as given (padded to 16 bytes), whatever bytes they hold."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, IMPLICIT_VR_LE))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">HH", 1, 0) + called[:16].ljust(16) + calling[:16].ljust(16) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + context + user)
    return pdu_header(A_ASSOCIATE_RQ, len(body)) + body


def connect(port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
            source: str | None = None) -> socket.socket:
    """A TCP connection to the node on loopback; over TLS with ``tls`` (handshake done); from
    the loopback address ``source`` (127.0.0.2: another host, as the node sees it) if given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls is not None else sock


def tls_client(ca_file) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` (the node's self-signed certificate in tests)."""
    return ssl.create_default_context(cafile=str(ca_file))


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU; (0, b"") when the peer closed the connection."""
    header = _read(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read(sock, length)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def associate(port: int, calling: bytes = b"MODALITY", called: bytes = b"CXRBATCH",
              tls: ssl.SSLContext | None = None, source: str | None = None) -> socket.socket:
    """A connection with an established association (AssertionError if the node did not accept);
    ``source`` as for :func:`connect`."""
    sock = connect(port, tls=tls, source=source)
    sock.sendall(associate_rq(calling, called))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC, f"association not accepted (PDU type {pdu_type})"
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and discarding what it sends, an A-ABORT
    for instance), or None if it is still open after ``within`` seconds."""
    start = time.monotonic()
    end = start + within
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            return None
        except OSError:  # reset
            return time.monotonic() - start
    return None


def push(sock: socket.socket, total: int, chunk: int = 1 << 20) -> int:
    """Send up to ``total`` bytes of zeros; how many went out before the peer stopped taking them."""
    sent, block = 0, bytes(chunk)
    sock.settimeout(5.0)
    try:
        while sent < total:
            sock.sendall(block[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
    except OSError:  # reset, broken pipe, or a peer that stopped reading
        pass
    return sent


def p_data(payload: bytes, context_id: int = 1, command: bool = True, last: bool = True) -> bytes:
    """A P-DATA-TF carrying one presentation data value: ``payload`` (a fragment of a command or
    data set, PS3.8 E.2) on ``context_id``."""
    pdv = bytes([context_id, (1 if command else 0) | (2 if last else 0)]) + payload
    body = struct.pack(">L", len(pdv)) + pdv
    return pdu_header(P_DATA_TF, len(body)) + body


def command_set(**elements) -> bytes:
    """A DIMSE command set as it goes on the wire (implicit VR little endian, group length
    first) holding exactly ``elements`` (keywords of group 0000), required ones left out or not."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, ds)
    body = encoded.getvalue()
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def dimse_status(p_data_body: bytes) -> int | None:
    """The Status (0000,0900) of the DIMSE response command in a P-DATA-TF's body, or None."""
    tag = struct.pack("<HHL", 0x0000, 0x0900, 2)
    at = p_data_body.find(tag)
    return struct.unpack("<H", p_data_body[at + 8:at + 10])[0] if at >= 0 else None
