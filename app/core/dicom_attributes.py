"""Defensive, typed access to DICOM attributes: the one place where untrusted headers are read.

A DICOM file can carry any value anywhere: an empty or multi-valued SamplesPerPixel, a functional-group
sequence whose items are strings, bytes that pydicom's reader cannot parse (struct.error on access).
Every getter here checks presence, type and value multiplicity and turns whatever goes wrong into
ImageRejected(400) naming the attribute, never its value (values may identify the patient).

Optional geometry (positions, spacings) is lenient: an unreadable value reads as absent (None), and the
callers decide what absent means. Attributes the pixel data depend on are strict: unreadable = 400.
"""

import math

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from app.core.limits import ImageRejected


def malformed(keyword: str, why: str = "unreadable") -> ImageRejected:
    return ImageRejected(400, f"the DICOM file is malformed: {keyword} is {why}")


def value_of(dataset: Dataset, keyword: str) -> object | None:
    """The attribute's value, None when absent or empty; reader errors (struct.error, ...) become a 400."""
    try:
        value = dataset.get(keyword)
    # pydicom converts raw elements on first access and raises many types on corrupt bytes.
    except Exception as error:
        raise malformed(keyword) from error
    if value is None or (isinstance(value, str | bytes) and not value):
        return None
    return value


def values_of(dataset: Dataset, keyword: str) -> list:
    """All values of the attribute ([] when absent or empty)."""
    value = value_of(dataset, keyword)
    if value is None:
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def integer(
    dataset: Dataset, keyword: str, default: int | None = None, *, allowed: range | tuple[int, ...] | None = None
) -> int | None:
    """A single-valued integer attribute (US, IS, ...), `default` when absent; 400 unless one value in `allowed`."""
    found = values_of(dataset, keyword)
    if not found:
        return default
    if len(found) != 1:
        raise malformed(keyword, f"multi-valued ({len(found)} values) where one is required")
    try:
        number = float(found[0])
    except (TypeError, ValueError) as error:
        raise malformed(keyword, "not a number") from error
    if not math.isfinite(number) or number != int(number):
        raise malformed(keyword, "not an integer")
    if allowed is not None and int(number) not in allowed:
        raise malformed(keyword, "out of its valid range")
    return int(number)


def text(dataset: Dataset, keyword: str, default: str = "") -> str:
    """A single string value (CS, UI, LO...), the first when several; `default` when absent."""
    found = values_of(dataset, keyword)
    return str(found[0]).strip() if found else default


def first_number(value: object) -> float | None:
    """DS/IS values, possibly multi-valued or empty -> the first as a finite float (None when absent or unreadable)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        number = None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def numbers(value: object, count: int) -> tuple[float, ...] | None:
    """A multi-valued DS with exactly `count` finite numbers, else None."""
    if not isinstance(value, MultiValue | list | tuple):
        return None
    try:
        result = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return result if len(result) == count and all(math.isfinite(v) for v in result) else None


def items(dataset: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items ([] when absent); 400 when the attribute is not a sequence of datasets."""
    value = value_of(dataset, keyword)
    if value is None:
        return []
    if not isinstance(value, Sequence | list) or not all(isinstance(item, Dataset) for item in value):
        raise malformed(keyword, "not a sequence of items")
    return list(value)


def frame_attribute(
    dataset: Dataset, frame_index: int, group: str, keyword: str, top_level: bool = True
) -> object | None:
    """An attribute of one frame: its per-frame functional group, the shared one, then (if asked) the top level."""
    lookups = (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0))
    for groups_keyword, index in lookups:
        groups = items(dataset, groups_keyword)
        if len(groups) <= index:
            continue
        group_items = items(groups[index], group)
        if group_items:
            found = value_of(group_items[0], keyword)
            if found is not None:
                return found
    return value_of(dataset, keyword) if top_level else None


def parse_everything(dataset: Dataset) -> None:
    """Convert every element now (pydicom defers it), so corrupt bytes anywhere are a 400 here, not a 500 later."""
    try:
        for _ in dataset.iterall():
            pass
    except Exception as error:
        raise ImageRejected(400, "the DICOM file is truncated or corrupt: an element cannot be read") from error
