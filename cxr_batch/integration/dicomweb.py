"""STOW-RS: storing a result object (SR, Encapsulated PDF) on a DICOMweb archive.

:class:`StowClient` stores one pydicom Dataset (or a DICOM file's bytes or path) with
dicomweb-client's ``store_instances`` and reports a :class:`~.delivery.Delivery` instead of
raising:

- delivered: the archive lists the instance in the response's Referenced SOP Sequence (with or
  without a warning), answers 200 without a body, or refuses it as a duplicate (0x0111): the
  SOP Instance UID is derived from the image and the bundle, so what is there is this result
  (archives that keep the first copy, Orthanc among them, answer a re-store as a success);
- retry: no connection, a timeout, 408/429/5xx (a 429/503's Retry-After kept as the Delivery's
  ``retry_after``, :func:`retry_after_seconds`), 401/403/404 (credentials or URL wrong: fixed in
  the configuration, the queued results then go), a failure reason "out of resources" (0xA7xx),
  "resource limitation" (0x0213) or "processing failure" (0x0110), as for C-STORE;
- rejected: the archive refuses this object (400, 409, 413, 415, 422 or a failure reason such
  as 0xC000 "cannot understand", 0xA9xx "does not match the SOP class", 0x0122 "SOP class not
  supported").

The answer is read in DICOM JSON or in DICOM XML (the Native DICOM Model of PS3.19, the
response type of archives that do not answer JSON), by cxr-batch itself: dicomweb-client reads
XML only with the optional keyword attributes and expands a DOCTYPE's entities.

Authentication comes from the ``[dicomweb]`` table of a configuration file only (a bearer
``token``, or ``username`` and ``password``), never from the command line, where other users
could read it in the process list; over plain ``http://`` to another machine, credentials are
refused unless ``insecure_http = true``. dicomweb-client's own retries are off: the outbound
queue retries with back-off, and a worker never sleeps inside a request.
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from ..config import ConfigError, bounded, load_dataclass, read_toml, validate
from .delivery import Delivery, connect_error, shown
# STOW-RS Failure Reasons are C-STORE statuses (PS3.18 / PS3.4): read as C-STORE reads them
from .dicom_send import DUPLICATE_SOP_INSTANCE, failure_is_transient

log = logging.getLogger("cxr_batch")

CONFIG_TABLE = "dicomweb"
# HTTP statuses that refuse this object: sending it again cannot help
REJECTING_STATUSES = {400, 409, 413, 415, 422}
# HTTP statuses whose Retry-After says when to come back (RFC 9110 15.6.4, RFC 6585 4): Too Many
# Requests, Service Unavailable
ASKING_TO_WAIT = {429, 503}
# a STOW-RS answer lists the instances stored (one here): kilobytes. A peer streaming more is no
# archive, and requests would otherwise hold all of it in memory
MAX_RESPONSE_BYTES = 16 << 20
JSON_MEDIA = ("application/dicom+json", "application/json")
XML_MEDIA = ("application/dicom+xml", "application/xml", "text/xml")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?", re.ASCII)


class UnfitAnswer(Exception):
    """An HTTP answer not read further (a redirect, a body too large); ``str(e)`` says why."""


def url_problem(url: str) -> str | None:
    """What makes ``url`` unfit as a DICOMweb root URL (no request could reach it, or it would
    not be the URL the requests go to), or None."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "Invalid IPv6 URL"
        return f"{url!r}: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL, e.g. https://pacs.example.org/dicom-web"
    try:
        port = parts.port  # ValueError: not a number, or over 65535
    except ValueError:
        port = 0
    if port == 0:
        return f"{url!r}: the port is not a number 1-65535"
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            ascii_host = host.encode("idna").decode("ascii")  # an internationalised name as DNS has it
        except UnicodeError:
            ascii_host = ""
        if not _HOST_NAME.fullmatch(ascii_host):
            return f"{url!r}: {host!r} is not a host name"
    if parts.query or parts.fragment:
        return f"{url!r}: a root URL has no query or fragment (the STOW-RS path is added to it)"
    if parts.path.rstrip("/").lower().endswith("/studies"):  # the STOW-RS endpoint pasted for the root
        return f"{url!r}: give the DICOMweb root, without /studies (cxr-batch adds it)"
    return None


@dataclass(frozen=True)
class DicomWebConfig:
    """A DICOMweb archive to store to (``[dicomweb]`` in ``--config FILE.toml``; ``url`` may
    come from ``--stow-to`` instead)."""

    url: str = ""
    token: str = field(default="", repr=False)  # bearer token
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = bounded(30.0, gt=0, max=3600, help="seconds for connecting and for each answer")
    ca_bundle: str = ""  # PEM file of the CAs to trust for https (default: the system's)
    insecure_http: bool = False  # allow credentials over plain http to another machine

    def __post_init__(self):
        validate(self, CONFIG_TABLE)
        if problem := url_problem(self.url):
            raise ConfigError(f"dicomweb.url: {problem}")
        parts = urlsplit(self.url)
        if parts.username or parts.password:
            raise ConfigError("dicomweb.url: no credentials in the URL; use username/password in the configuration")
        if self.token and (self.username or self.password):
            raise ConfigError("dicomweb: either a bearer token or username/password, not both")
        if bool(self.username) != bool(self.password):
            raise ConfigError("dicomweb: username and password go together")
        if self.has_credentials and parts.scheme == "http" and not _loopback(parts.hostname) \
                and not self.insecure_http:
            raise ConfigError(f"dicomweb: credentials would cross the network in clear to {parts.hostname}; "
                              "use https (or insecure_http = true)")
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise ConfigError(f"dicomweb.ca_bundle: {self.ca_bundle}: no such file")
        if self.ca_bundle:
            try:  # a key, a DER file or another file named by mistake: said now, not at every send
                ssl.create_default_context(cafile=self.ca_bundle)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(f"dicomweb.ca_bundle: {self.ca_bundle}: no PEM certificate to trust in it "
                                  f"({type(e).__name__}: {e})") from None

    @property
    def has_credentials(self) -> bool:
        return bool(self.token or self.username)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_dicomweb_config(path: Path | str | None, url: str | None = None) -> DicomWebConfig:
    """The archive of ``--stow-to URL`` (``url``) with the ``[dicomweb]`` table of the
    configuration file ``path`` (credentials, timeout, CA bundle); ConfigError names what is
    wrong. A file holding credentials that other users can read is named in the log."""
    table = {}
    if path is not None:
        data = read_toml(path)
        table = data.get(CONFIG_TABLE, {})
        if table and _readable_by_others(path) and any(table.get(k) for k in ("token", "password")):
            log.warning("%s holds DICOMweb credentials and other users can read it (chmod 600)", path)
    return load_dataclass(DicomWebConfig, table, CONFIG_TABLE, url=url)


def _readable_by_others(path: Path | str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


class StowClient:
    """Stores result objects on one archive (one HTTP session, reused)."""

    def __init__(self, config: DicomWebConfig):
        from dicomweb_client.api import DICOMwebClient  # imported only where results are stored

        self.config = config
        session = _session(config.ca_bundle)
        if config.token:
            session.headers["Authorization"] = f"Bearer {config.token}"
        elif config.username:
            session.auth = (config.username, config.password)
        self.last_response = None  # what the archive answered last (one sender thread per client)
        self.xml_body: bytes | None = None  # its body when DICOM XML, read here rather than by dicomweb-client
        session.hooks["response"].append(self._keep)
        self.client = DICOMwebClient(url=config.url.rstrip("/"), session=session, timeout=config.timeout)
        self.client.set_http_retry_params(retry=False)
        # the Host header dicomweb-client sets itself: its host without the port, '[' for an IPv6
        # address, which a server checking the header (nginx, Apache in front) answers 400, a
        # refusal of every object. The URL's own host and port (it holds no credentials).
        self.client.host = urlsplit(config.url).netloc

    def store(self, dataset: Dataset | bytes | Path | str) -> Delivery:
        """STOW-RS of one object; never raises for network, HTTP or archive failures."""
        import requests

        try:
            dataset = _as_dataset(dataset)
        except Exception as e:  # not a DICOM file: nothing to send, ever
            return Delivery.rejected(f"not a DICOM object: {type(e).__name__}: {e}")
        uid = str(dataset.get("SOPInstanceUID", ""))
        self.last_response, self.xml_body = None, None
        try:
            answer = self.client.store_instances([dataset])
        except UnfitAnswer as e:
            return self._failed(uid, Delivery.retry(str(e)))
        except requests.HTTPError as e:
            return self._refused(uid, e.response)
        except requests.exceptions.SSLError as e:  # the archive's certificate (or TLS) refused
            said = re.search(r"\[[A-Z0-9_]+: [^\]]*\][^'\"(]*", str(e))  # the reason, without requests' wrapping
            return self._failed(uid, Delivery.retry(
                f"TLS with {self._where} failed: {said[0].strip() if said else e} (is its CA the [dicomweb] "
                f"ca_bundle?)"))
        except requests.Timeout:
            return self._failed(uid, Delivery.retry(f"no answer from {self._where} within {self.config.timeout:g} s"))
        except requests.RequestException as e:  # connection refused, DNS, TLS
            return self._failed(uid, Delivery.retry(f"cannot reach {self._where}: "
                                                    f"{unreachable(e, urlsplit(self.config.url).hostname)}",
                                                    unsent=never_connected(e)))
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # a body dicomweb-client cannot read
            return self._failed(uid, Delivery.retry(f"unreadable STOW-RS response: {type(e).__name__}: {e}"))
        status = self.last_response.status_code if self.last_response is not None else 200
        if not 200 <= status < 300:  # requests raises for 4xx and 5xx only: a 3xx stored nothing
            return self._failed(uid, Delivery.retry(f"HTTP {status}: not a STOW-RS answer (check the URL)"))
        if self.xml_body is not None:
            try:
                answer = native_dicom_dataset(self.xml_body)
            except ValueError as e:
                return self._failed(uid, Delivery.retry(f"unreadable STOW-RS response (DICOM XML): {e}"))
        elif not answer and self.last_response is not None and self.last_response.content:
            # dicomweb-client reads only an exact 'application/dicom+json' (or XML) body and
            # answers an empty dataset for anything else: a login page, or DICOM JSON with a
            # charset, would pass for "200 without a body", i.e. delivered.
            response = self.last_response
            media = _media(response)
            if media not in JSON_MEDIA:
                return self._failed(uid, Delivery.retry(
                    f"not a STOW-RS answer (HTTP {response.status_code}, Content-Type {media or 'none'}): is a proxy "
                    f"or a login page in front of the archive? (check the URL)"))
            try:
                answer = Dataset.from_json(response.json())
            except Exception as e:
                return self._failed(uid, Delivery.retry(f"unreadable STOW-RS response: {type(e).__name__}: {e}"))
        return self._answered(uid, answer)

    def _keep(self, response, *args, **kwargs):
        """requests' response hook: runs before a redirect is followed or the body is read."""
        self.last_response = response
        if response.is_redirect:
            # requests would follow it, a 307/308 posting the result (patient data) again to
            # whatever host the Location names: the configured URL is what the operator trusts
            response.close()
            raise UnfitAnswer(f"{self._where} answered with a redirect (HTTP {response.status_code}) to "
                              f"{shown(response.headers.get('Location', ''), 200)}: configure that URL if it is "
                              f"the archive")
        declared = response.headers.get("Content-Length", "")
        body, deadline = bytearray(), time.monotonic() + self.config.timeout
        if not (declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES):
            for piece in response.iter_content(64 * 1024):  # requests' own errors, as for .content
                body += piece
                if len(body) > MAX_RESPONSE_BYTES:
                    break
                if time.monotonic() > deadline:  # each read waits up to the timeout: a drip never ends
                    response.close()
                    raise UnfitAnswer(f"no whole answer from {self._where} within {self.config.timeout:g} s")
            else:
                response._content = bytes(body)  # what requests and dicomweb-client read as .content
                if _media(response) in XML_MEDIA:
                    # hidden from dicomweb-client, which would expand a DOCTYPE's entities and
                    # fail on an answer without the (optional) keyword attributes: read in store()
                    self.xml_body, response._content = response._content, b""
                return
        response.close()
        raise UnfitAnswer(f"{self._where} answered HTTP {response.status_code} with a body larger than "
                          f"{MAX_RESPONSE_BYTES} bytes: not a STOW-RS answer")

    @property
    def _where(self) -> str:
        parts = urlsplit(self.config.url)
        return f"{parts.scheme}://{parts.netloc}"

    def _answered(self, uid: str, answer: Dataset) -> Delivery:
        """A 2xx response: this instance referenced (delivered) or listed as failed."""
        for item in answer.get("FailedSOPSequence", []) or []:
            if item.get("ReferencedSOPInstanceUID") == uid:
                return self._failed(uid, _failure(item.get("FailureReason")))
        for item in answer.get("ReferencedSOPSequence", []) or []:
            if item.get("ReferencedSOPInstanceUID") == uid:
                warning = item.get("WarningReason")
                log.debug("stored %s on %s", uid, self._where)
                if warning is None:
                    return Delivery.delivered()
                code = _status_code(warning)
                # stored all the same: a warning the archive wrote oddly ('nan', text) is shown, not read
                return Delivery.delivered(f"warning 0x{code:04X}" if code is not None else
                                          f"warning {shown(str(warning), 40)!r} (not a status)")
        if not answer:  # 200 without a body
            return Delivery.delivered()
        return self._failed(uid, Delivery.retry("the STOW-RS response does not mention the instance"))

    def _refused(self, uid: str, response) -> Delivery:
        """A 4xx/5xx response; its body may say why for this instance."""
        status = response.status_code if response is not None else 0
        body = _response_dataset(response, self.xml_body)
        for item in (body.get("FailedSOPSequence", []) or []) if body is not None else []:
            if item.get("ReferencedSOPInstanceUID") == uid:
                delivery = _failure(item.get("FailureReason"))
                return self._failed(uid, Delivery(delivery.outcome, f"HTTP {status}, {delivery.reason}"))
        reason = f"HTTP {status} {getattr(response, 'reason', '') or ''}".strip()
        if status in REJECTING_STATUSES:
            return self._failed(uid, Delivery.rejected(f"{reason}: the archive refused the object"))
        hint = " (check the [dicomweb] credentials)" if status in (401, 403) else \
            " (check the URL)" if status in (404, 405) else ""
        asked = None
        if status in ASKING_TO_WAIT and (said := response.headers.get("Retry-After")) is not None:
            asked = retry_after_seconds(said, answered_at(response.headers.get("Date")))
            hint += f"; Retry-After {shown(said, 40)!r}" + (" not understood" if asked is None else "")
        return self._failed(uid, Delivery.retry(reason + hint, retry_after=asked))

    def _failed(self, uid: str, delivery: Delivery) -> Delivery:
        if delivery.ok:
            log.debug("stored %s on %s (%s)", uid, self._where, delivery.reason)
        else:
            log.warning("not stored %s on %s: %s", uid, self._where, delivery.reason)
        return delivery


def never_connected(e: BaseException) -> bool:
    """Whether requests failed before any connection was made (refused, a name nothing resolves):
    the object never reached the archive, so the queue keeps its order (as C-STORE and HL7 do)."""
    from urllib3.exceptions import NewConnectionError  # NameResolutionError is one too

    cause, seen = e, set()
    while cause is not None and id(cause) not in seen:  # requests wraps it in MaxRetryError
        if isinstance(cause, NewConnectionError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
    return False


def unreachable(e: BaseException, host: str, limit: int = 200) -> str:
    """Why requests reached no archive at ``host``, in a few words: the system's own error under
    requests' and urllib3's wrapping (``ConnectionRefusedError: Connection refused``, not
    "HTTPConnectionPool(host=..., port=...): Max retries exceeded with url: ... (Caused by
    NewConnectionError(...", cut mid-word by the reason's length limit), a host name nothing
    resolves as :func:`~.delivery.connect_error` says it; else requests' text, cut between
    words to ``limit`` characters. The caller names the archive's host and port."""
    import socket

    cause, seen, system = e, set(), None
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, socket.gaierror):
            return connect_error(cause, host)
        if isinstance(cause, OSError) and type(cause).__module__ == "builtins":
            system = cause  # the innermost is the system's word
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if system is not None:
        return f"{type(system).__name__}: {system.strerror or system}"
    text = f"{type(e).__name__}: {e}"
    if len(text) <= limit:
        return text
    return text[:limit - 4].rsplit(" ", 1)[0] + " ..."


def answered_at(date: str | None) -> float:
    """When an answer was made, by the clock of the server that made it (its Date header), else
    by ours, in epoch seconds: a Retry-After date is of that clock, and ours may be an hour off it
    (the date was gone by and the archive was asked again at once, or an hour late)."""
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(date or "")
    except (TypeError, ValueError, IndexError, OverflowError):
        return time.time()
    if when.tzinfo is None:  # asctime-date names no zone: HTTP dates are GMT
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def retry_after_seconds(value: str, now: float) -> float | None:
    """Seconds from ``now`` (epoch seconds) that an HTTP Retry-After ``value`` asks a client to
    wait (RFC 9110 10.2.3): delay-seconds (digits only) or an HTTP-date in any of its three
    forms (IMF-fixdate, the obsolete RFC 850 and asctime dates; always GMT); a date gone by is
    0. None when it is neither (the queue's own back-off then)."""
    from email.utils import parsedate_to_datetime

    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime-date names no zone: HTTP dates are GMT
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - now)


def _session(ca_bundle: str):
    """A requests session verifying certificates against ``ca_bundle`` (else the system's CAs):
    requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, set machine-wide on many hospital
    servers, take the place of the bundle the configuration names."""
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, *args, **kwargs):
            settings = super().merge_environment_settings(*args, **kwargs)
            if ca_bundle:
                settings["verify"] = ca_bundle
            return settings

    session = Session()
    session.verify = ca_bundle or True
    return session


def _failure(reason) -> Delivery:
    """What a Failed SOP Sequence item's Failure Reason means for the queue."""
    if reason is None:
        return Delivery.retry("failed without a reason")
    code = _status_code(reason)
    if code is None:  # 'nan', '1e999', text: as a failure without a reason
        return Delivery.retry(f"failure reason {shown(str(reason), 40)!r} (not a status)")
    text = f"failure reason 0x{code:04X}"
    if code == DUPLICATE_SOP_INSTANCE:
        return Delivery.delivered(f"{text}: already stored")
    if failure_is_transient(code):
        return Delivery.retry(text)
    return Delivery.rejected(text)


def _status_code(value) -> int | None:
    """A Warning or Failure Reason as the 16-bit status it must be (US), else None: an archive's
    answer may hold any VR and text there ('nan' read as a DS, '1e999' as an FD, a sequence)."""
    try:
        code = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return code if code == value and 0 <= code <= 0xFFFF else None


def _media(response) -> str:
    """The media type of an HTTP answer, without its parameters (``; charset=utf-8``)."""
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _response_dataset(response, xml_body: bytes | None = None) -> Dataset | None:
    """The DICOM JSON or XML body of an error response, when there is one (Orthanc 1.10 sends
    its 400 body without a Content-Type)."""
    try:
        if xml_body is not None:
            return native_dicom_dataset(xml_body)
        if response is None or not response.content or _media(response) not in (*JSON_MEDIA, ""):
            return None
        return Dataset.from_json(response.json())
    except Exception:  # a body that is not DICOM JSON or XML: the status alone decides
        return None


_INTEGER_VRS = {"IS", "SL", "SS", "SV", "UL", "US", "UV"}
_DECIMAL_VRS = {"DS", "FD", "FL"}
_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def native_dicom_dataset(body: bytes) -> Dataset:
    """A DICOM XML body (PS3.19 Native DICOM Model: ``NativeDicomModel`` of ``DicomAttribute``
    elements, their ``Value``, ``Item`` and ``PersonName`` children) as a Dataset; ValueError
    says what is wrong. The keyword attributes are optional (the tag decides); a DOCTYPE is
    refused before any entity is declared (a 'billion laughs' expands to gigabytes), as
    defusedxml does; binary values are left out (no status is binary)."""
    from xml.etree.ElementTree import TreeBuilder
    from xml.parsers import expat

    def refuse(*args):
        raise ValueError("it has a DOCTYPE (refused: its entities could expand without bound)")

    def local(name: str) -> str:  # the name without its namespace (namespace_separator below)
        return name.rpartition("}")[2]

    builder = TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = lambda name, attributes: builder.start(local(name), attributes)
    parser.EndElementHandler = lambda name: builder.end(local(name))
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(body, True)
    except expat.ExpatError as e:
        raise ValueError(f"not well-formed XML: {e}") from None
    except LookupError as e:  # an XML declaration's encoding Python has no text codec for ('rot13')
        raise ValueError(f"an encoding that cannot be read: {e}") from None
    root = builder.close()
    if root.tag != "NativeDicomModel":
        raise ValueError(f"<{shown(root.tag, 40)}> is not a NativeDicomModel")
    try:
        return Dataset.from_json(_native_json(root))
    except ValueError:
        raise
    except Exception as e:  # pydicom refusing a value
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _numbered(element, name: str) -> list:
    """``element``'s children called ``name`` in the order of their ``number`` attribute."""
    children = [child for child in element if child.tag == name]
    try:
        return sorted(children, key=lambda child: int(child.get("number", "0")))
    except ValueError:
        raise ValueError(f"a {name} whose number is not a number") from None


def _native_json(element) -> dict:
    """The DICOM JSON (PS3.18 F.2) of a NativeDicomModel or Item element."""
    out = {}
    for attribute in element:
        if attribute.tag != "DicomAttribute":
            continue
        tag, vr = attribute.get("tag", ""), attribute.get("vr", "")
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag, re.ASCII):
            raise ValueError(f"a DicomAttribute whose tag is {shown(tag, 20)!r}")
        if not vr:
            try:
                vr = dictionary_VR(int(tag, 16))
            except KeyError:
                raise ValueError(f"DicomAttribute {tag} has no vr") from None
        if vr == "SQ":
            values = [_native_json(item) for item in _numbered(attribute, "Item")]
        elif vr == "PN":
            values = [{group.tag: "^".join(_text(group, part) for part in _NAME_PARTS).rstrip("^")
                       for group in name if group.tag in ("Alphabetic", "Ideographic", "Phonetic")}
                      for name in _numbered(attribute, "PersonName")]
        else:
            values = [(value.text or "").strip() or None for value in _numbered(attribute, "Value")]
            if vr in _INTEGER_VRS | _DECIMAL_VRS:
                convert = int if vr in _INTEGER_VRS else float
                try:
                    values = [None if v is None else convert(v) for v in values]
                except ValueError:
                    # left out, not the whole answer: one odd count or vendor value made it
                    # unreadable, a retry that stored the object again at every try (a status
                    # left out reads as none: a warning unsaid, a failure tried again)
                    log.debug("STOW-RS answer: DicomAttribute %s (%s) is no number: left out", tag, vr)
                    continue
        out[tag.upper()] = {"vr": vr, **({"Value": values} if values else {})}
    return out


def _text(group, part: str) -> str:
    child = next((c for c in group if c.tag == part), None)
    return (child.text or "").strip() if child is not None else ""


def _as_dataset(obj: Dataset | bytes | Path | str) -> Dataset:
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return pydicom.dcmread(io.BytesIO(obj))
    return pydicom.dcmread(obj)


def store_dataset(dataset: Dataset | bytes | Path | str, config: DicomWebConfig) -> Delivery:
    """One STOW-RS with a client of its own (the queue keeps a :class:`StowClient` instead)."""
    return StowClient(config).store(dataset)
