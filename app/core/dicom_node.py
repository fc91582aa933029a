"""The service as a DICOM node (pynetdicom): C-ECHO and C-STORE of MR images in, the DICOM SEG out by C-STORE.

A PACS or a modality sends a series to this AE. Each instance is written to the spool (app/core/dicom_spool.py)
before C-STORE answers success, so nothing acknowledged is lost. A series is due once none of its instances
arrived for `dicom_quiet_s`; it then runs through the same steps as POST /v1/series?output=seg
(app/core/analysis.py: read_series -> models -> build_segmentation), and its SEG is sent by C-STORE to
`dicom_destination`. Sent: its instances leave the spool. Failed: they stay with the error, are counted in
`lgg_dicom_series_total{outcome="failed"}` and `lgg_dicom_spool_series{state="failed"}`, logged by spool key
(never a UID or patient attribute), listed by GET /v1/dicom-node/failed and retried by POST .../retry.
"""

import asyncio
import io
import logging
import time
from dataclasses import dataclass

import pydicom
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, SegmentationStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from app.core.admission import Overloaded
from app.core.analysis import segment_dicom, series_limits
from app.core.codecs import ImageRejected
from app.core.config import Settings
from app.core.deadline import Deadline
from app.core.dicom_spool import DicomSpool
from app.core.series import Upload
from app.core.service import InferenceService, NotReady

log = logging.getLogger(__name__)

MR_STORAGE = (MRImageStorage, EnhancedMRImageStorage)
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
LOOK_EVERY_S = 0.2  # how often due series are looked for
ASSOCIATION_TIMEOUT_S = 30
SERIES_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> "Destination":
        """'AE_TITLE@host:port' -> Destination; ValueError with the expected form otherwise."""
        try:
            ae_title, address = value.split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title.strip(), host.strip(), int(port))
        except ValueError as error:
            raise ValueError(f"LGG_DICOM_DESTINATION must be AE_TITLE@host:port, got {value!r}") from error


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry, spool: DicomSpool) -> None:
        self.instances = Counter(
            "lgg_dicom_instances_received_total", "C-STORE requests to the DICOM node, by outcome.",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.series = Counter(
            "lgg_dicom_series_total", "Series the DICOM node processed, by outcome (sent or failed).",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.series_seconds = Histogram(
            "lgg_dicom_series_seconds", "From a series being due to its SEG being stored at the destination.",
            buckets=SERIES_BUCKETS, registry=registry,
        )  # fmt: skip
        spool_bytes = Gauge("lgg_dicom_spool_bytes", "Bytes held in the DICOM spool.", registry=registry)
        spool_bytes.set_function(lambda: spool.bytes)
        spool_series = Gauge(
            "lgg_dicom_spool_series", "Series in the DICOM spool by state.", ["state"], registry=registry
        )
        for state in ("incoming", "processing", "failed"):
            spool_series.labels(state).set_function(lambda state=state: spool.counts()[state])


def series_of(data: bytes) -> str:
    """The SeriesInstanceUID only, to group arrivals ("" when unreadable); pixels are decoded later, by
    read_series, like every other input."""
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(header.get("SeriesInstanceUID") or "")
    except Exception:  # a corrupt header: pydicom raises many types
        return ""


def send_seg(seg: bytes, destination: Destination, calling_ae_title: str) -> None:
    """C-STORE the SEG to the destination AE; raises RuntimeError with the reason when it is not stored."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ASSOCIATION_TIMEOUT_S
    ae.add_requested_context(SegmentationStorage)
    dataset = pydicom.dcmread(io.BytesIO(seg))
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not association.is_established:
        raise RuntimeError(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    code = getattr(status, "Status", None)
    if code != SUCCESS:
        raise RuntimeError(f"{destination.ae_title} answered C-STORE status {code if code is None else hex(code)}")


class DicomNode:
    def __init__(self, settings: Settings, service: InferenceService, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.service = service
        self.destination = Destination.parse(settings.dicom_destination)
        self.spool = DicomSpool(settings.dicom_spool_dir, settings.dicom_spool_max_bytes)
        self.metrics = NodeMetrics(registry, self.spool)
        self.ae = AE(ae_title=settings.dicom_ae_title)
        self.ae.require_calling_aet = [a.strip() for a in settings.dicom_allowed_calling_aes.split(",") if a.strip()]
        self.ae.add_supported_context(Verification)
        for sop_class in MR_STORAGE:
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.server: ThreadedAssociationServer | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def port(self) -> int:
        """The port listened on (the free one picked when dicom_port is 0)."""
        assert self.server is not None
        return self.server.server_address[1]

    def handle_store(self, event: Event) -> int:
        """pynetdicom's thread: write the instance to the spool before answering success."""
        data = event.encoded_dataset(include_meta=True)
        series_uid, sop_uid = series_of(data), str(event.request.AffectedSOPInstanceUID or "")
        if not series_uid or not sop_uid:
            self.metrics.instances.labels("unreadable").inc()
            return CANNOT_UNDERSTAND
        if not self.spool.store(series_uid, sop_uid, data):
            self.metrics.instances.labels("spool_full").inc()
            log.warning("DICOM spool full (%d bytes): C-STORE refused with 'out of resources'", self.spool.bytes)
            return OUT_OF_RESOURCES
        self.metrics.instances.labels("stored").inc()
        return SUCCESS

    async def start(self) -> None:
        self.server = self.ae.start_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle_store)],
        )
        self._watcher = asyncio.create_task(self.watch(), name="dicom-node")
        log.info("DICOM node %s listening on port %d", self.settings.dicom_ae_title, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.shutdown)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def watch(self) -> None:
        while True:
            try:
                for batch in self.spool.take_due(self.settings.dicom_quiet_s):
                    await self.process(batch)
            except OSError:  # the spool's disk (full, unmounted): keep the node alive, the files stay where they are
                log.exception("DICOM spool error; looking again shortly")
                await asyncio.sleep(1.0)
            await asyncio.sleep(LOOK_EVERY_S)

    async def process(self, batch: str) -> None:
        started = time.perf_counter()
        files = self.spool.files(batch)
        uploads = [Upload(f"instance {n + 1}", path.read_bytes(), "application/dicom") for n, path in enumerate(files)]
        try:
            # One unit of admission while the series runs, as the HTTP middleware holds one per request:
            # service.predict takes the rest, one per further slice.
            self.service.admission.acquire(1)
            try:
                # The HTTP requests' time budget bounds a series too (it fails, retryable, when it runs out).
                deadline = Deadline(self.settings.request_timeout_s, self.service.metrics.timed_out.inc)
                analysis, seg = await segment_dicom(self.service, uploads, series_limits(self.settings), deadline)
            finally:
                self.service.admission.release(1)
            segmented = time.perf_counter()
            await asyncio.to_thread(send_seg, seg, self.destination, self.settings.dicom_ae_title)
        except (NotReady, Overloaded):
            self.spool.requeue(batch)  # not a failure: the models are still loading, or HTTP traffic holds the bound
            await asyncio.sleep(1.0)
            return
        except Exception as error:  # anything else: the series stays in the spool with its reason
            reason = error.detail if isinstance(error, ImageRejected) else f"{type(error).__name__}: {error}"
            self.metrics.series.labels("failed").inc()  # counted before it is listed: no listing without count
            self.spool.fail(batch, reason)
            log.error("DICOM series %s failed (%d instances), kept in the spool: %s", batch, len(files), reason)
            return
        self.spool.done(batch)
        self.metrics.series.labels("sent").inc()
        self.metrics.series_seconds.observe(time.perf_counter() - started)
        log.info(
            "DICOM series %s: %d slices, %d tumor voxels; read, models and SEG %.2f s, SEG sent to %s in %.2f s",
            batch, len(analysis.masks), analysis.tumor_voxels, segmented - started, self.destination.ae_title,
            time.perf_counter() - segmented,
        )  # fmt: skip


async def start_dicom_node(
    settings: Settings, service: InferenceService, registry: CollectorRegistry
) -> DicomNode | None:
    """The running node when LGG_DICOM_NODE is on, else None."""
    if not settings.dicom_node:
        return None
    node = DicomNode(settings, service, registry)
    await node.start()
    return node
