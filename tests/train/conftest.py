"""Shared by the ``dist`` tests: a small digits set, exact token accounting, bounded slot loops."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from edgemoe.train.data import load_dataset
from edgemoe.train.trainer import Trainer


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", train_subset=200, test_subset=60)


@pytest.fixture(scope="module")
def digits(data):
    """The same small digits set under the name the single-process tests use."""
    return data


def _exact_accounting(tr: Trainer) -> None:
    trained = np.concatenate([d.trained_ids for d in tr.decisions])
    assert len(np.unique(trained)) == len(trained) == tr.counters["trained"]
    assert tr.counters["trained"] + len(tr.table) == tr.counters["arrived"]


def _run_until(tr: Trainer, cond: Callable[[], bool], timeout_s: float = 40.0) -> None:
    """Run slot by slot until ``cond()`` holds (bounded in wall time)."""
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        tr.run(tr.slot + 1)
        time.sleep(0.05)


@pytest.fixture
def exact_accounting():
    """Every arrived token trained exactly once or still in flight, by token id."""
    return _exact_accounting


@pytest.fixture
def run_until():
    return _run_until
