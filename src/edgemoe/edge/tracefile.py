"""Arrival-count trace files: token counts per slot recorded as CSV.

A file-format reader with no other ``edge`` dependency, so both the spec (``ArrivalSpec.mean_rate``)
and the arrival processes (``TraceArrivals``) can use it without importing each other.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from edgemoe.errors import DataError


def read_trace_csv(path: str | Path) -> np.ndarray:
    """Arrival counts per slot from CSV: the ``tokens`` column if there is a header, else the first column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            str(path), "arrival trace (arrivals.trace) does not exist; give a CSV of counts per slot"
        )
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and r[0].strip()]
    if not rows:
        raise DataError(str(path), "arrival trace (arrivals.trace) has no rows")
    col = 0
    try:
        float(rows[0][0])
    except ValueError:
        header = [h.strip() for h in rows[0]]
        col = header.index("tokens") if "tokens" in header else 0
        rows = rows[1:]
    try:
        counts = np.array([float(r[col]) for r in rows])
    except (ValueError, IndexError) as exc:
        raise DataError(
            str(path), f"every row of arrivals.trace needs a numeric token count ({exc})"
        ) from None
    if len(counts) == 0 or (counts < 0).any() or not np.isfinite(counts).all():
        raise DataError(str(path), "arrivals.trace counts must be finite and >= 0 (and at least one row)")
    return np.rint(counts).astype(np.int64)
