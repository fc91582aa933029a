"""`python -m app.cli predict` against real uvicorn processes: masks, CSV summary, failures, exit codes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.api.schemas import BatchItem, BatchPrediction, ModelVersions, Prediction
from app.cli import EXIT_ALL_FAILED, EXIT_OK, EXIT_UNREACHABLE, main, predict_slices, row_from_result
from app.client import TumorClient
from app.core.codecs import bounding_box
from tests.client.conftest import API_KEY, SENT
from tests.client.test_client import png_array
from tests.dicom.builders import mr_series, to_bytes
from tests.live_server import LiveServer, unused_port_url
from tests.service.conftest import synthetic_slice

CLI_TIMEOUT_S = 300


def read_summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "1"
        return np.asarray(image)


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


@pytest.mark.parametrize("server_name", ["plain", "tumor"])
def test_predict_writes_a_mask_per_slice_and_a_summary(
    server_name: str, request: pytest.FixtureRequest, slices_dir: Path, tmp_path: Path
) -> None:
    server: LiveServer = request.getfixturevalue(f"{server_name}_server")
    out = tmp_path / "out"
    # The tumor server needs the key: given through the environment, as an operator would.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LGG_")}
    env |= {"LGG_API_KEY": API_KEY} if server_name == "tumor" else {}
    command = [sys.executable, "-m", "app.cli", "predict", str(slices_dir), "--url", server.url, "--out", str(out)]
    command += ["--batch-size", "2"] + (["--quiet"] if server_name == "tumor" else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)

    assert done.returncode == EXIT_OK, done.stderr
    assert "5 slices: 4 answered" in done.stdout
    assert ("5/5" in done.stderr) == (server_name == "plain")  # the progress bar, unless --quiet
    rows = read_summary(out / "summary.csv")
    assert [row["file"] for row in rows] == SENT
    [corrupt] = [row for row in rows if row["file"] == "corrupt.png"]
    assert corrupt["error"].startswith("400: ") and "decodable" in corrupt["error"]
    assert corrupt["tumor_detected"] == corrupt["area_pixels"] == ""

    written = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    expected_masks = {f"{Path(row['file']).with_suffix('').as_posix()}_mask.png" for row in rows if not row["error"]}
    assert written == expected_masks | {"summary.csv"}
    for row in rows:
        if row["error"]:
            continue
        mask = read_mask(out / f"{Path(row['file']).with_suffix('').as_posix()}_mask.png")
        assert mask.shape == image_size(slices_dir / row["file"])
        assert int(row["area_pixels"]) == mask.sum()
        assert json.loads(row["bbox"] or "null") == bounding_box(mask)
        assert 0.0 <= float(row["tumor_probability"]) <= 1.0
        assert row["tumor_detected"] in ("true", "false")
        if server_name == "tumor":  # every slice flagged, a partial mask
            assert row["tumor_detected"] == "true" and 0 < mask.sum() < mask.size


def test_predict_masks_equal_the_single_slice_route(tumor_server: LiveServer, slices_dir: Path, tmp_path: Path) -> None:
    args = ["predict", str(slices_dir), "--url", tumor_server.url, "--out", str(tmp_path), "--api-key", API_KEY]
    assert main([*args, "--batch-size", "3", "--quiet"]) == EXIT_OK
    with TumorClient(tumor_server.url, api_key=API_KEY) as client:
        for name in ("TCGA_A/TCGA_A_2.tif", "other/deeper/flair.jpg"):
            expected = png_array(client.mask_png(slices_dir / name)) > 0
            assert np.array_equal(read_mask(tmp_path / name.replace(Path(name).suffix, "_mask.png")), expected)


def test_unreachable_service_exits_3_without_a_summary(slices_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["predict", str(slices_dir), "--url", unused_port_url(), "--out", str(tmp_path / "out"), "--wait", "0"]
    assert main([*args, "--quiet"]) == EXIT_UNREACHABLE
    assert "not usable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_slice_failing_exits_1(tumor_server: LiveServer, slices_dir: Path, tmp_path: Path) -> None:
    args = ["predict", str(slices_dir), "--url", tumor_server.url, "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--api-key", "wrong"]) == EXIT_ALL_FAILED
    rows = read_summary(tmp_path / "summary.csv")
    assert len(rows) == len(SENT) and all(row["error"].startswith("401: ") for row in rows)
    assert "API key" in rows[0]["error"]


def test_folder_without_slices_exits_1_and_a_missing_folder_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "a_mask.png").write_bytes(b"")
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "out")]) == EXIT_ALL_FAILED
    assert "no slices" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2


VERSIONS = ModelVersions(card_version="v", classifier_sha256="c", segmenter_sha256="s")


def no_tumor(height: int, width: int) -> Prediction:
    return Prediction(
        tumor_detected=False,
        tumor_probability=0.1,
        mask=None,
        bbox=None,
        area_pixels=0,
        image_size=[height, width],
        models=VERSIONS,
    )


def test_no_tumor_writes_an_all_background_mask_of_the_slice_size(tmp_path: Path) -> None:
    item = BatchItem(filename="p/s_3.tif", status_code=200, prediction=no_tumor(30, 40))
    row = row_from_result(Path("p/s_3.tif"), item, tmp_path)
    mask = read_mask(tmp_path / "p" / "s_3_mask.png")
    assert mask.shape == (30, 40) and not mask.any()
    assert row.as_csv() == {
        "file": "p/s_3.tif",
        "tumor_detected": "false",
        "tumor_probability": "0.100000",
        "area_pixels": "0",
        "bbox": "",
        "error": "",
    }


def test_service_lost_mid_run_records_the_rest_as_failed(tmp_path: Path) -> None:
    """The first request is answered, then the connection is refused: no row is lost, the run stops."""
    slices = [Path(f"s_{n}.png") for n in range(1, 6)]
    for path in slices:
        (tmp_path / path).write_bytes(b"png")
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) > 1:
            raise httpx.ConnectError("connection refused", request=request)
        items = [BatchItem(filename=p.name, status_code=200, prediction=no_tumor(8, 8)) for p in slices[:2]]
        return httpx.Response(200, json=BatchPrediction(results=items, succeeded=2, failed=0, total_ms=1).model_dump())

    with TumorClient("http://service", transport=httpx.MockTransport(answer)) as client:
        rows, stopped = predict_slices(client, tmp_path, slices, tmp_path / "out", batch_size=2, quiet=True)
    assert len(calls) == 2 and "connection refused" in stopped
    assert [row.file for row in rows] == [p.name for p in slices]
    assert [bool(row.error) for row in rows] == [False, False, True, True, True]


def test_predict_sends_single_frame_dicom_slices(tumor_server: LiveServer, tmp_path: Path) -> None:
    flair = synthetic_slice(72, 56, seed=7)[..., 1]
    [instance] = mr_series(flair[None])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "IM_0001.dcm").write_bytes(to_bytes(instance))
    args = ["predict", str(tmp_path / "in"), "--url", tumor_server.url, "--out", str(tmp_path / "out")]
    assert main([*args, "--api-key", API_KEY, "--quiet"]) == EXIT_OK
    [row] = read_summary(tmp_path / "out" / "summary.csv")
    assert row["file"] == "IM_0001.dcm" and row["error"] == ""
    mask = read_mask(tmp_path / "out" / "IM_0001_mask.png")
    assert mask.shape == (72, 56) and int(row["area_pixels"]) == mask.sum() > 0
