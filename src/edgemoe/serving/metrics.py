"""What the gateway counts and logs: Prometheus text metrics (no client library) and JSON log lines.

Updated only from the event loop thread, so plain dicts suffice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

LOG = logging.getLogger("edgemoe.gateway")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


def _labels(**kv: str) -> str:
    """Prometheus label set; values escaped as the text format requires (backslash, quote, newline)."""
    table = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
    return "{" + ",".join(f'{k}="{str(v).translate(table)}"' for k, v in kv.items()) + "}"


class Metrics:
    """Requests by route and status; per expert: calls by outcome, latency, tokens, energy, up."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.request_seconds: dict[str, Histogram] = {}
        self.expert_calls: dict[tuple[str, str], int] = {}
        self.expert_seconds: dict[str, Histogram] = {}
        self.expert_tokens: dict[tuple[str, str], int] = {}
        self.energy_j: dict[str, float] = {}
        self.expert_up: dict[str, int] = {}
        self.degraded = 0
        self.budget_rejections = 0
        self.overloaded = 0
        self.in_flight = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        self.request_seconds.setdefault(route, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def expert(
        self, name: str, outcome: str, seconds: float, energy_j: float, tokens: tuple[int, int]
    ) -> None:
        self.expert_calls[(name, outcome)] = self.expert_calls.get((name, outcome), 0) + 1
        self.expert_seconds.setdefault(name, Histogram(LATENCY_BUCKETS_S)).observe(seconds)
        self.energy_j[name] = self.energy_j.get(name, 0.0) + energy_j
        for kind, n in zip(("prompt", "completion"), tokens):
            self.expert_tokens[(name, kind)] = self.expert_tokens.get((name, kind), 0) + n

    def render(self) -> str:
        lines = _counter(
            "edgemoe_requests_total",
            "Gateway requests by route and HTTP status.",
            {_labels(route=r, status=str(s)): n for (r, s), n in self.requests.items()},
        )
        lines += _histogram(
            "edgemoe_request_seconds", "Gateway request latency.", "route", self.request_seconds
        )
        lines += _counter(
            "edgemoe_expert_calls_total",
            "Expert calls by outcome (ok, failed, timeout, cancelled).",
            {_labels(expert=e, outcome=o): n for (e, o), n in self.expert_calls.items()},
        )
        lines += _histogram("edgemoe_expert_seconds", "Expert call latency.", "expert", self.expert_seconds)
        lines += _counter(
            "edgemoe_expert_tokens_total",
            "Tokens the experts processed (prompt) and generated (completion).",
            {_labels(expert=e, kind=k): n for (e, k), n in self.expert_tokens.items()},
        )
        lines += _counter(
            "edgemoe_expert_energy_joules_total",
            "Modelled expert energy (power x busy time).",
            {_labels(expert=e): f"{v:.6g}" for e, v in self.energy_j.items()},
        )
        lines += _counter(
            "edgemoe_expert_up",
            "1 if the expert's circuit breaker lets requests through, else 0.",
            {_labels(expert=e): v for e, v in self.expert_up.items()},
            kind="gauge",
        )
        for name, help_, value, kind in (
            ("edgemoe_degraded_responses_total", "Responses served without some selected expert.",
             self.degraded, "counter"),
            ("edgemoe_budget_rejections_total", "Requests no expert set could serve within budget.",
             self.budget_rejections, "counter"),
            ("edgemoe_overloaded_total", "Requests refused past the concurrency limit.", self.overloaded,
             "counter"),
            ("edgemoe_in_flight_requests", "Requests being served now.", self.in_flight, "gauge"),
        ):  # fmt: skip
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _counter(name: str, help_: str, values: dict[str, object], kind: str = "counter") -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{labels} {v}" for labels, v in sorted(values.items())]


def _histogram(name: str, help_: str, label: str, hists: dict[str, Histogram]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for key, h in sorted(hists.items()):
        for bound, count in zip(h.buckets, h.counts):
            lines.append(f"{name}_bucket{_labels(**{label: key, 'le': f'{bound:g}'})} {count}")
        lines.append(f"{name}_bucket{_labels(**{label: key, 'le': '+Inf'})} {h.n}")
        lines.append(f"{name}_sum{_labels(**{label: key})} {h.total:.6g}")
        lines.append(f"{name}_count{_labels(**{label: key})} {h.n}")
    return lines


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, any ``extra={"fields": {...}}`` and a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs on stderr for the gateway logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(level.upper())
    LOG.propagate = False
