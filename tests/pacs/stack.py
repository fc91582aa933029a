"""Orthanc and the service with its DICOM node, wired to each other on loopback (tests and bench/pacs_roundtrip.py).

Orthanc knows the node as modality "lgg"; the node sends its SEGs to Orthanc and accepts associations from
Orthanc (and the extra calling AE titles given).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.live_server import LiveServer, live_server
from tests.pacs.orthanc import AE_TITLE, Orthanc, free_port, orthanc

NODE_AE = "LGG-TUMOR"
NODE_MODALITY = "lgg"  # Orthanc's name for the service's node


@dataclass
class Stack:
    pacs: Orthanc
    service: LiveServer


@contextmanager
def running_stack(
    folder: Path, models_dir: Path, quiet_s: float, allowed_calling_aes: tuple[str, ...] = ()
) -> Iterator[Stack]:
    node_port = free_port()
    with (
        orthanc(folder, {NODE_MODALITY: (NODE_AE, "127.0.0.1", node_port)}) as pacs,
        live_server(
            folder,
            model_dir=models_dir,
            warmup_runs=1,
            dicom_node=True,
            dicom_ae_title=NODE_AE,
            dicom_host="127.0.0.1",
            dicom_port=node_port,
            dicom_allowed_calling_aes=",".join((AE_TITLE, *allowed_calling_aes)),
            dicom_destination=f"{AE_TITLE}@127.0.0.1:{pacs.dicom_port}",
            dicom_quiet_s=quiet_s,
            dicom_spool_dir=folder / "spool",
        ) as service,
    ):
        yield Stack(pacs, service)
