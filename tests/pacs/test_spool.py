"""The DICOM node's spool: bounded, nothing lost across a restart, failures kept with their error and retried."""

import asyncio
from pathlib import Path

from app.core.dicom_spool import DicomSpool

SERIES = "1.2.826.0.1.3680043.8.498.1"


def test_the_spool_refuses_what_would_pass_its_cap(tmp_path: Path) -> None:
    spool = DicomSpool(tmp_path, max_bytes=250)
    assert spool.store(SERIES, "1.1", b"x" * 100) and spool.store(SERIES, "1.2", b"x" * 100)
    assert not spool.store(SERIES, "1.3", b"x" * 100)  # 300 > 250: refused, nothing written
    assert spool.store(SERIES, "1.2", b"y" * 120)  # the same instance again replaces itself: 220
    assert spool.bytes == 220 and len(list((tmp_path / "incoming").rglob("*.dcm"))) == 2


def test_due_series_survive_a_restart_and_failures_keep_their_error(tmp_path: Path) -> None:
    spool = DicomSpool(tmp_path, max_bytes=10_000)
    spool.store(SERIES, "1.1", b"a" * 10)
    spool.store("2.25.2", "2.1", b"b" * 10)
    assert spool.take_due(quiet_s=3600) == []  # not quiet yet
    [batch, other] = sorted(spool.take_due(quiet_s=0))
    restarted = DicomSpool(tmp_path, max_bytes=10_000)  # a crash while both were processing
    assert sorted(restarted.take_due(quiet_s=3600)) == sorted([batch, other]) and restarted.bytes == 20
    restarted.fail(batch, "400: the slices have different orientations")
    restarted.done(other)
    [failed] = restarted.list_failed()
    assert (failed.batch, failed.instances, failed.attempts) == (batch, 1, 1) and "orientations" in failed.error
    assert SERIES not in str(failed) and restarted.bytes == 10
    assert restarted.retry(batch) and not restarted.retry("../incoming") and not restarted.retry("nope")
    assert restarted.take_due(quiet_s=3600) == [batch]
    restarted.fail(batch, "again")
    assert [f.attempts for f in restarted.list_failed()] == [2]
    assert restarted.counts() == {"incoming": 0, "processing": 0, "failed": 1}


def test_a_node_series_waits_while_http_traffic_holds_the_admission_bound(tmp_path: Path) -> None:
    """The node holds a unit of admission per series, as the HTTP middleware does per request: with the bound
    full, the series goes back to the queue untouched instead of running (or failing) past the bound."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from app.core.admission import Admission
    from app.core.config import Settings
    from app.core.dicom_node import DicomNode

    admission = Admission(2, lambda _: None, lambda: None)
    admission.acquire(2)  # two HTTP requests in flight: the bound is full
    service = SimpleNamespace(admission=admission)  # the models are never reached
    settings = Settings(dicom_destination="PACS@127.0.0.1:4242", dicom_spool_dir=tmp_path, warmup_runs=0)
    node = DicomNode(settings, service, CollectorRegistry())  # type: ignore[arg-type]
    node.spool.store(SERIES, "1.1", b"not even DICOM")
    [batch] = node.spool.take_due(quiet_s=0)
    asyncio.run(node.process(batch))
    assert node.spool.take_due(quiet_s=0) == [batch]  # requeued, not failed
    assert not list(node.spool.failed_dir.iterdir())
    assert admission.in_flight == 2  # nothing taken, nothing leaked
