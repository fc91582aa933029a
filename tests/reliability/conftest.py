"""The reliability suite (`pytest -m reliability`, or scripts/reliability.sh): every test here is marked.

Bounded by default (a few minutes in all, part of scripts/test.sh); RELIABILITY_LONG=1 runs the long form
(larger corpora, longer loads; scripts/reliability.sh --long).
"""

import os
from pathlib import Path

import pytest

LONG = os.environ.get("RELIABILITY_LONG", "") not in ("", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)
