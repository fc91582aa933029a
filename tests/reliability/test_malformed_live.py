"""The generated malformed-input corpus against a real uvicorn: no crash, no 5xx, every crafted case its 4xx.

Mutated files sent beside the crafted ones: 300 by default, 10,000 with RELIABILITY_LONG=1 (the long form of
the reliability suite), or LGG_MALFORMED_COUNT. docs/limits.md gives the campaign's figures.
"""

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless

from tests.dicom.builders import write_phantom_models
from tests.live_server import LiveServer, live_server
from tests.reliability.malformed import (
    J2K_MAGIC,
    PREDICT,
    SERIES,
    crafted_cases,
    encapsulated,
    mutated_cases,
    send_cases,
    valid_files,
)

pytestmark = pytest.mark.slow
LONG = os.environ.get("RELIABILITY_LONG", "") not in ("", "0")
MUTATED = int(os.environ.get("LGG_MALFORMED_COUNT", "10000" if LONG else "300"))
MAX_PEAK_RSS_MIB = 1536  # issue 12's target with the default limits


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    pytest.importorskip("onnx", reason="building the phantom ONNX models needs the onnx package (.[train])")
    models = write_phantom_models(tmp_path_factory.mktemp("phantom-models"), flair_z=2.5)
    with live_server(tmp_path_factory.mktemp("logs"), model_dir=models, warmup_runs=0) as running:
        yield running


def valid_request_succeeds(server: LiveServer) -> None:
    name, data, content_type = valid_files()["dicom-jpeg-ls"]  # a compressed file: decoded by a pool worker
    response = httpx.post(f"{server.url}{PREDICT}", files=[("file", (name, data, content_type))], timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000])
def test_a_jpeg2000_that_aborts_the_decoder_costs_one_request_not_the_process(server: LiveServer, syntax: str) -> None:
    # Issue 12's reproducer: before the decoder pool, GDCM's abort() took the whole service down (SIGABRT).
    data = encapsulated(syntax, J2K_MAGIC + bytes(range(256)) * 8)
    for route, field in ((PREDICT, "file"), (SERIES, "files")):
        response = httpx.post(f"{server.url}{route}", files=[(field, ("x.dcm", data, "application/dicom"))], timeout=60)
        assert response.status_code == 400, response.text
        assert "decoder failed" in response.json()["detail"]
        assert server.process.poll() is None, server.log()
    assert "terminate called" in server.log()  # the native crash did happen, in a worker
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    valid_request_succeeds(server)


def test_concurrent_valid_decodes_are_untouched_by_crashing_ones(server: LiveServer) -> None:
    garbage = ("x.dcm", encapsulated(JPEG2000Lossless, J2K_MAGIC + bytes(range(256)) * 8), "application/dicom")
    valid = valid_files()["dicom-jpeg2000"]
    jobs = [valid, garbage] * 8

    def post(file: tuple[str, bytes, str]) -> int:
        return httpx.post(f"{server.url}{PREDICT}", files=[("file", file)], timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(post, jobs))
    assert statuses == [200, 400] * 8
    assert server.process.poll() is None, server.log()


def test_the_malformed_corpus_gets_no_5xx_and_no_crash(server: LiveServer) -> None:
    campaign = send_cases(server.url, [*crafted_cases(), *mutated_cases(MUTATED, seed=12)], server.process.pid)
    print(campaign.summary())
    assert not campaign.failures, "\n".join(campaign.failures[:20])
    assert server.process.poll() is None, server.log()
    assert campaign.peak_rss_mib < MAX_PEAK_RSS_MIB, campaign.summary()
    valid_request_succeeds(server)
