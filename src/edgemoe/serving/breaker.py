"""Per-expert circuit breakers with active health probes (outlier ejection).

An expert whose calls fail or miss the deadline ``failures`` times in a row is ejected: the policy
stops selecting it. While ejected it is probed every ``interval_s`` with a one-token request; an
answer within ``timeout_s`` readmits it. The probe is a real generation, not a ping, so an expert
that is up but too slow stays out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from edgemoe.collab.backends import BackendError, LLMBackend
from edgemoe.serving.metrics import LOG, Metrics


@dataclass
class Breaker:
    """One expert's state: ``closed`` (serving) or ``open`` (ejected until a probe succeeds)."""

    name: str
    threshold: int
    state: str = "closed"
    failures: int = 0
    last_error: str | None = None
    opened_at: float | None = None
    ejections: int = 0

    @property
    def up(self) -> bool:
        return self.state == "closed"

    def record(self, outcome: str) -> bool:
        """Count one call's outcome (``ok``, ``failed:<kind>``, ``timeout``); True if this opened it."""
        if outcome == "ok":
            self.failures = 0
            return False
        if outcome == "cancelled":
            return False
        self.failures += 1
        self.last_error = outcome
        if self.state == "closed" and self.failures >= self.threshold:
            self.state, self.opened_at = "open", time.monotonic()
            self.ejections += 1
            return True
        return False

    def close(self) -> None:
        self.state, self.failures, self.opened_at = "closed", 0, None

    def public(self) -> dict[str, object]:
        out: dict[str, object] = {"state": self.state, "consecutive_failures": self.failures}
        if self.last_error:
            out["last_error"] = self.last_error
        if self.opened_at is not None:
            out["open_for_s"] = round(time.monotonic() - self.opened_at, 3)
        return out


class BreakerBoard:
    """Breakers for every expert and the probe loop that readmits them."""

    def __init__(
        self,
        backends: dict[str, LLMBackend],
        metrics: Metrics,
        threshold: int,
        interval_s: float,
        timeout_s: float,
    ):
        self.backends = backends
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.breakers = {n: Breaker(n, threshold) for n in backends}
        for name in backends:
            metrics.expert_up[name] = 1

    def available(self) -> set[str]:
        return {n for n, b in self.breakers.items() if b.up}

    def record(self, name: str, outcome: str) -> None:
        if self.breakers[name].record(outcome):
            self.metrics.expert_up[name] = 0
            LOG.warning("expert ejected", extra={"fields": {"expert": name, "last_error": outcome}})

    async def probe_once(self) -> None:
        """Probe every ejected expert concurrently; readmit those that answer in time."""

        async def one(name: str) -> None:
            try:
                await self.backends[name].aprobe(self.timeout_s)
            except BackendError as exc:
                LOG.info("probe failed", extra={"fields": {"expert": name, "error": str(exc)}})
                return
            self.breakers[name].close()
            self.metrics.expert_up[name] = 1
            LOG.info("expert readmitted", extra={"fields": {"expert": name}})

        await asyncio.gather(*(one(n) for n, b in self.breakers.items() if not b.up))

    async def run(self) -> None:
        """Probe forever, every ``interval_s`` (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.probe_once()
            except Exception:  # a probe bug must not end the loop; it is logged with its traceback
                LOG.exception("probe loop error")
