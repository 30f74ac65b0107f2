"""A real PACS for the tests: Orthanc (Debian's ``orthanc``, with ``orthanc-dicomweb`` for
DICOMweb) started on loopback from its own JSON configuration, with its storage in a temporary
folder, on free ports; stopped when the test is done.

    with Orthanc(tmp_path / "pacs") as pacs:          # or the ``orthanc`` fixture (conftest)
        pacs.dicomweb_url                             # http://127.0.0.1:PORT/dicom-web/
        pacs.dicom_port, pacs.aet                     # its DICOM SCP (C-STORE, C-FIND, C-MOVE, C-GET)
        pacs.instances()                              # REST: the stored instances' Orthanc ids
        pacs.sop_instance_uids()                      # ... and their SOP Instance UIDs

Options: ``modalities`` ({name: (AE title, host, port)}: the peers Orthanc knows, which a C-MOVE
destination must be), ``users`` ({user: password}: HTTP basic authentication on), ``extra``
(any other Orthanc option), ``environment`` (variables for its process: ``TCP_NODELAY=1`` makes
its DICOM server, DCMTK's, turn Nagle's algorithm off; by default each DIMSE answer waits for the
peer's delayed ACK). The fixtures ``orthanc`` and ``make_orthanc`` (import them into a
test module: ``from tests.orthanc import make_orthanc, orthanc  # noqa: F401``) start them per
test and skip cleanly where Orthanc is absent. :func:`orthanc_missing` says why Orthanc cannot run here (the tests
skip with that reason). Orthanc keeps the first copy of a SOP Instance UID (``OverwriteInstances``
false, its default), as most archives do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.watchkit import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 60.0


def orthanc_missing(dicomweb: bool = True) -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb and not DICOMWEB_PLUGIN.is_file():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN})"
    return None


class Orthanc:
    def __init__(self, root: Path, *, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
                 users: dict[str, str] | None = None, dicomweb: bool = True, extra: dict | None = None,
                 environment: dict[str, str] | None = None):
        self.root = Path(root)
        self.environment = dict(environment or {})
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.users = dict(users or {})
        self.config = {
            "Name": f"cxr-batch test PACS {aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # loopback clients only
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
            "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": self.dicom_port,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
            "UnknownSopClassAccepted": False,
            "OverwriteInstances": False,
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpTimeout": 20,
            "DicomScpTimeout": 20,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "EnableWado": False},
            **(extra or {}),
        }
        self._process: subprocess.Popen | None = None
        self._log = None

    # ---------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web/"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    # ---------------------------------------------------------------- REST
    def rest(self, method: str, path: str, **kwargs):
        auth = next(iter(self.users.items()), None)
        response = requests.request(method, self.url + path, auth=auth, timeout=20, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def instances(self) -> list[str]:
        return self.rest("GET", "/instances")

    def sop_instance_uids(self) -> list[str]:
        return [self.rest("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()]

    def instance_file(self, orthanc_id: str) -> bytes:
        auth = next(iter(self.users.items()), None)
        response = requests.get(f"{self.url}/instances/{orthanc_id}/file", auth=auth, timeout=20)
        response.raise_for_status()
        return response.content

    # ---------------------------------------------------------------- life
    def start(self) -> "Orthanc":
        missing = orthanc_missing(bool(self.config["Plugins"]))
        if missing:
            raise RuntimeError(missing)
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config, indent=2))
        self._log = open(self.log_path, "wb")
        self._process = subprocess.Popen(["Orthanc", str(config)], stdout=self._log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.environment})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._close_log()
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}: {self.log_tail()}")
            try:
                self.rest("GET", "/system")
                if not self.config["Plugins"] or requests.get(self.dicomweb_url + "studies", timeout=5,
                                                              auth=next(iter(self.users.items()), None)).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT:g} s: {self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def make_orthanc(tmp_path_factory):
    """Start Orthancs with options (``make_orthanc(users={...}, modalities={...})``); each is
    stopped after the test; the test skips where Orthanc cannot run."""
    started: list[Orthanc] = []

    def make(**options) -> Orthanc:
        missing = orthanc_missing(options.get("dicomweb", True))
        if missing:
            pytest.skip(missing)
        pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), **options).start()
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


@pytest.fixture
def orthanc(make_orthanc) -> Orthanc:
    """One Orthanc with DICOMweb, no authentication, for the test."""
    return make_orthanc()
