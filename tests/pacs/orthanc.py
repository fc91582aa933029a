"""A real Orthanc PACS (Debian's `orthanc` and `orthanc-dicomweb`) on free loopback ports, for the tests.

    with orthanc(tmp_path, modalities={"lgg": ("LGG-TUMOR", "127.0.0.1", 11112)}) as pacs:
        pacs.rest("POST", "/instances", content=dicom_bytes)

Its config is written for the test: own storage folder, no authentication, only loopback HTTP, the DICOMweb
plugin at /dicom-web/, the given modalities (AE title, host, port) it may send to. Every wait is bounded;
the process is stopped on exit and its log is kept for failure messages.
"""

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.live_server import stop, wait_for

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb"
AE_TITLE = "ORTHANC"
START_TIMEOUT_S = 60.0
POLL_S = 0.02  # the SEG's arrival time is measured with this resolution


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if ORTHANC is None:
        return f"Orthanc not installed (Debian: {INSTALL}; scripts/test.sh installs it as root)"
    if not DICOMWEB_PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin not installed ({DICOMWEB_PLUGIN}; Debian: {INSTALL})"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Orthanc:
    url: str  # REST API
    dicom_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rest(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        response = httpx.request(method, f"{self.url}{path}", timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def find(self, level: str, **query: str) -> list[str]:
        """Orthanc ids of the resources at `level` whose DICOM tags match `query`."""
        return self.rest("POST", "/tools/find", json={"Level": level, "Query": query}).json()

    def store(self, files: list[bytes]) -> str:
        """Store DICOM files of one series; Orthanc's id of that series."""
        ids = {self.rest("POST", "/instances", content=data).json()["ParentSeries"] for data in files}
        if len(ids) != 1:
            raise ValueError(f"the files make {len(ids)} series in Orthanc, not one")
        return ids.pop()

    def wait_for_new_seg(self, known: set[str], timeout_s: float) -> str:
        """The Orthanc id of a SEG instance not among `known`, as soon as one is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            new = set(self.find("Instance", Modality="SEG")) - known
            if new:
                return new.pop()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new SEG in Orthanc after {timeout_s:g} s")
            time.sleep(POLL_S)

    def instance_file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file").content


@contextmanager
def orthanc(folder: Path, modalities: dict[str, tuple[str, str, int]]) -> Iterator[Orthanc]:
    http_port, dicom_port = free_port(), free_port()
    storage = folder / "storage"
    config = {
        "Name": "lgg-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {name: list(modality) for name, modality in modalities.items()},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 1,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = folder / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    pacs = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, process, log_path)
    try:
        wait_for(pacs, "/system", START_TIMEOUT_S)
        yield pacs
    finally:
        stop(process)
