"""A 30-slice series from C-STORE to its DICOM SEG back in a real Orthanc PACS, through the service's DICOM node.

Each run stores a fresh series (new UIDs) in Orthanc, asks Orthanc to send it to the node (REST
/modalities/lgg/store, synchronous C-STORE), and waits until the SEG the node sends back is in Orthanc
(polled every 20 ms). The node processes a series once it has been quiet for --quiet-s; that wait is part of
the measured time and is reported beside it. One warm-up run first (highdicom's import, first sessions).

    python -m bench.pacs_roundtrip            # needs Debian's orthanc and orthanc-dicomweb
"""

import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import bench_arguments, finish_report, print_table, start_report
from tests.pacs import lgg_series
from tests.pacs.orthanc import missing
from tests.pacs.stack import NODE_MODALITY, running_stack

WAIT_S = 300.0


def node_series(service_url: str) -> tuple[int, float]:
    """lgg_dicom_series_seconds' count and sum: the node's time from a series being due to its SEG in Orthanc."""
    text = httpx.get(f"{service_url}/metrics", timeout=30).text
    count, total = (
        re.search(rf"^lgg_dicom_series_seconds_{name} (\S+)$", text, re.MULTILINE) for name in ("count", "sum")
    )
    return int(float(count.group(1))), float(total.group(1))


def node_seconds_of_next_series(service_url: str, before: tuple[int, float]) -> float:
    """The node observes its time just after Orthanc acknowledged the SEG: wait for that observation."""
    deadline = time.monotonic() + WAIT_S
    while (now := node_series(service_url))[0] == before[0]:
        if time.monotonic() > deadline:
            raise TimeoutError("the node never recorded the series")
        time.sleep(0.01)
    return now[1] - before[1]


def main() -> None:
    parser = bench_arguments("pacs_roundtrip", __doc__)
    parser.add_argument("--runs", type=int, default=5, help="measured runs after one warm-up (default 5)")
    parser.add_argument("--quiet-s", type=float, default=1.0, help="the node's quiet time (LGG_DICOM_QUIET_S)")
    args = parser.parse_args()
    if reason := missing():
        raise SystemExit(reason)
    report = start_report("pacs_roundtrip", args.quick)
    volume = lgg_series.load_volume()
    models = lgg_series.BUNDLED_MODELS if lgg_series.real_data() else args.models
    report["series"] = {
        "slices": len(volume),
        "size": list(volume.shape[1:3]),
        "source": f"LGG {lgg_series.PATIENT}" if lgg_series.real_data() else "synthetic phantom",
        "quiet_s": args.quiet_s,
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder, running_stack(Path(folder), models, args.quiet_s) as stack:
        pacs = stack.pacs
        for run in range(1 + (1 if args.quick else args.runs)):
            series_id = pacs.store(lgg_series.series_files(volume))
            known = set(pacs.find("Instance", Modality="SEG"))
            before = node_series(stack.service.url)
            started = time.perf_counter()
            pacs.rest(
                "POST", f"/modalities/{NODE_MODALITY}/store", json={"Resources": [series_id], "Synchronous": True}
            )
            sent = time.perf_counter()
            pacs.wait_for_new_seg(known, WAIT_S)
            arrived = time.perf_counter()
            rows.append(
                {
                    "run": "warm-up" if run == 0 else run,
                    "c_store_s": sent - started,
                    "total_s": arrived - started,
                    "without_quiet_s": arrived - started - args.quiet_s,
                    "node_s": node_seconds_of_next_series(stack.service.url, before),
                }
            )
    measured = rows[1:]
    rows.append({"run": "median"} | {k: statistics.median(r[k] for r in measured) for k in measured[0] if k != "run"})
    report["rows"] = rows
    print(f"{len(volume)} slices of {volume.shape[1]}x{volume.shape[2]} ({report['series']['source']}), "
          f"quiet time {args.quiet_s:g} s")  # fmt: skip
    print_table(
        rows,
        [
            ("run", "run"),
            ("c_store_s", "Orthanc -> node C-STORE (s)"),
            ("node_s", "node: read, models, SEG, C-STORE back (s)"),
            ("without_quiet_s", "C-STORE start -> SEG in Orthanc, minus quiet time (s)"),
            ("total_s", "C-STORE start -> SEG in Orthanc (s)"),
        ],
    )
    finish_report(report, args.results_dir)


if __name__ == "__main__":
    main()
