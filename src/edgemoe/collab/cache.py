"""The answer cache: every expert's answer distribution over the options of every question.

On disk it is JSON Lines, one record per (question, expert)::

    {"qid": "anatomy/test/0", "expert": "orin-1b", "probs": [0.1, 0.7, 0.1, 0.1],
     "latency_s": 0.41, "energy_j": 16.2}

``latency_s`` / ``energy_j`` are optional (measured figures; null or absent when not measured).
Records are appended, so a long real-LLM run can stop and resume (:func:`done_keys`); when a key
repeats, the last record wins. In memory it is :class:`AnswerCache`, dense arrays (Q, N, O).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.config import ConfigError
from edgemoe.errors import DataError


@dataclass
class AnswerCache:
    """Dense cache: ``probs_QNO`` (rows sum to 1), measured ``latency_QN``/``energy_QN`` (NaN = none)."""

    qids: list[str]
    experts: list[str]
    probs_QNO: np.ndarray
    latency_QN: np.ndarray
    energy_QN: np.ndarray

    def __post_init__(self) -> None:
        q, n = len(self.qids), len(self.experts)
        if self.probs_QNO.shape[:2] != (q, n):
            raise ConfigError(
                "probs", f"shape {self.probs_QNO.shape} does not match {q} questions x {n} experts"
            )
        for name in ("latency_QN", "energy_QN"):
            if getattr(self, name).shape != (q, n):
                raise ConfigError(name, f"shape {getattr(self, name).shape} must be ({q}, {n})")

    @property
    def num_options(self) -> int:
        return int(self.probs_QNO.shape[2])

    def select(self, qids: list[str] | None = None, experts: list[str] | None = None) -> AnswerCache:
        """Reorder/restrict to ``qids`` and ``experts``; a clear error names the first missing one."""
        qpos = {q: i for i, q in enumerate(self.qids)}
        npos = {e: i for i, e in enumerate(self.experts)}
        qids = self.qids if qids is None else list(qids)
        experts = self.experts if experts is None else list(experts)
        for e in experts:
            if e not in npos:
                raise ConfigError("experts", f"expert {e!r} is not in the cache (has {self.experts})")
        for q in qids:
            if q not in qpos:
                raise ConfigError("qids", f"question {q!r} is not in the cache")
        qi = np.array([qpos[q] for q in qids], dtype=np.int64)
        ni = np.array([npos[e] for e in experts], dtype=np.int64)
        return AnswerCache(
            qids=qids,
            experts=experts,
            probs_QNO=self.probs_QNO[np.ix_(qi, ni)],
            latency_QN=self.latency_QN[np.ix_(qi, ni)],
            energy_QN=self.energy_QN[np.ix_(qi, ni)],
        )

    def records(self) -> Iterator[dict]:
        for i, q in enumerate(self.qids):
            for j, e in enumerate(self.experts):
                yield make_record(q, e, self.probs_QNO[i, j], self.latency_QN[i, j], self.energy_QN[i, j])

    def write(self, path: str | Path, append: bool = False) -> None:
        append_records(path, self.records(), truncate=not append)


def make_record(
    qid: str,
    expert: str,
    probs: Iterable[float],
    latency_s: float | None = None,
    energy_j: float | None = None,
) -> dict:
    """One cache record; NaN/None measurements are stored as null."""

    def opt(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return {
        "qid": qid,
        "expert": expert,
        "probs": [float(p) for p in probs],
        "latency_s": opt(latency_s),
        "energy_j": opt(energy_j),
    }


def append_records(path: str | Path, records: Iterable[dict], truncate: bool = False) -> int:
    """Append records (one JSON object per line, flushed per line); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w" if truncate else "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            n += 1
    return n


def iter_records(path: str | Path) -> Iterator[dict]:
    """Records of a cache file; a truncated last line (interrupted write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "answer cache does not exist; build it with 'edgemoe collab build-cache'")
    with path.open() as fh:
        lines = fh.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines) and not line.endswith("\n"):
                return
            raise DataError(f"{path}:{lineno}", "is not valid JSON") from None
        for key in ("qid", "expert", "probs"):
            if key not in rec:
                raise DataError(f"{path}:{lineno}", f"{key}: is required")
        yield rec


def done_keys(path: str | Path) -> set[tuple[str, str]]:
    """(qid, expert) pairs already in a cache file (empty if there is no file), for resuming."""
    if not Path(path).is_file():
        return set()
    return {(r["qid"], r["expert"]) for r in iter_records(path)}


def read_cache(
    path: str | Path, qids: list[str] | None = None, experts: list[str] | None = None
) -> AnswerCache:
    """Load a JSONL cache into dense arrays (optionally reordered/restricted; every pair must exist)."""
    table: dict[tuple[str, str], dict] = {}
    q_order: dict[str, None] = {}
    e_order: dict[str, None] = {}
    for rec in iter_records(path):
        table[(rec["qid"], rec["expert"])] = rec
        q_order.setdefault(rec["qid"])
        e_order.setdefault(rec["expert"])
    qids = list(q_order) if qids is None else list(qids)
    experts = list(e_order) if experts is None else list(experts)
    if not table:
        raise DataError(str(path), "answer cache is empty")
    num_opt = len(next(iter(table.values()))["probs"])
    probs = np.zeros((len(qids), len(experts), num_opt))
    lat = np.full((len(qids), len(experts)), np.nan)
    en = np.full((len(qids), len(experts)), np.nan)
    for i, q in enumerate(qids):
        for j, e in enumerate(experts):
            if (q, e) not in table:
                raise DataError(str(path), f"no record for question {q!r} and expert {e!r}")
            rec = table[(q, e)]
            p = np.asarray(rec["probs"], dtype=np.float64)
            if p.shape != (num_opt,) or not np.all(p >= 0) or not math.isclose(p.sum(), 1.0, abs_tol=1e-4):
                raise DataError(
                    f"{path}:{q}:{e}", f"probs: must be {num_opt} non-negative numbers summing to 1"
                )
            probs[i, j] = p / p.sum()
            lat[i, j] = np.nan if rec.get("latency_s") is None else rec["latency_s"]
            en[i, j] = np.nan if rec.get("energy_j") is None else rec["energy_j"]
    return AnswerCache(qids, experts, probs, lat, en)
