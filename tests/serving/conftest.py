"""Fixtures for the gateway tests: loopback gateways over tiny expert servers, stopped afterwards."""

from __future__ import annotations

import pytest

from edgemoe.testing import TinyOpenAIServer
from edgemoe.testing.gateway import LoopbackGateway


@pytest.fixture(scope="module")
def pair():
    """Two experts with known letter preferences (alpha → A, beta → B) behind one gateway."""
    run = LoopbackGateway(
        {
            "alpha": TinyOpenAIServer(1, letter_bias={"A": 4.0}),
            "beta": TinyOpenAIServer(2, letter_bias={"B": 4.0}),
        }
    )
    yield run
    run.close()


@pytest.fixture
def make_gateway():
    """``make_gateway(servers, **settings)`` → a running :class:`LoopbackGateway`, closed after the test."""
    running: list[LoopbackGateway] = []

    def make(servers: dict[str, TinyOpenAIServer], **kwargs) -> LoopbackGateway:
        running.append(LoopbackGateway(servers, **kwargs))
        return running[-1]

    yield make
    for run in running:
        run.close()
