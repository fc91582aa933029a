"""schemathesis 4 over the service's own OpenAPI document, against a real uvicorn: no server error, no status code
the document does not list, no response that breaks its schema. Bounded examples per operation by default."""

import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import LONG
from tests.reliability.harness import service

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"
MAX_EXAMPLES = 300 if LONG else 25
TIMEOUT_S = 1800 if LONG else 300


def test_schemathesis_finds_no_failure(tmp_path: Path) -> None:
    settings = {
        "warmup_runs": 0,
        "max_in_flight_slices": 64,  # schemathesis checks the API, not the shedding: nothing answered 503 for load
        "dicomweb_allowed_urls": "http://127.0.0.1:9/",  # fetching generated URLs would be a 502 (or an SSRF)
    }
    with service(tmp_path, "--no-access-log", **settings) as server:
        command = [
            str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
            "--report", "junit", "--report-dir", str(tmp_path / "report"),
        ]  # fmt: skip
        # cwd: schemathesis keeps its example database in ./.schemathesis, which must not land in the checkout.
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
        summary = result.stdout[result.stdout.rfind("SUMMARY") :]
        print(summary)
        assert result.returncode == 0, result.stdout[-6000:]
        assert "Traceback" not in server.log()
