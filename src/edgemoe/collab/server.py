"""The MoE² gateway: an OpenAI-compatible HTTP front for a set of edge LLM experts.

For every request it asks the MoE² policy which experts to use (gate weights, fine-level top-k of
the enabled set, within the request's latency and energy budgets), calls them concurrently with
a per-expert timeout, and combines what comes back: for multiple choice the gate-weighted mixture
of the experts' option distributions, for chat the text of the highest-weight expert that answered.
An expert that fails or times out is left out and the weights are renormalised over the rest; the
response says so (``degraded``). Energy is a model, not a measurement: the expert's power draw
(hardware-class preset or override) times the wall time of its call.

Routes: ``POST /v1/chat/completions``, ``POST /v1/moe2/answer``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text). See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from edgemoe.collab.backends import (
    BackendConfig,
    BackendError,
    ExpertBackend,
    Message,
    build_backend,
    load_experts,
    mc_prompt,
)
from edgemoe.collab.costs import estimate_prompt_tokens, request_costs
from edgemoe.collab.data import SUBJECT_CATEGORY
from edgemoe.collab.embed import embedder_from_name
from edgemoe.collab.gate import Gate
from edgemoe.collab.policy import Route, aggregate, route_request
from edgemoe.collab.profiles import CollabConfig
from edgemoe.config import ConfigError, check_choice, check_positive, from_dict, require

LOG = logging.getLogger("edgemoe.gateway")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------- configuration


@dataclass
class ServeSettings:
    """The ``serve:`` section of collab.yaml (everything else is the MoE² core's CollabConfig).

    ``api_key_env`` names the environment variable holding the gateway's API key (unset: no key
    needed). ``run`` is a folder written by ``edgemoe collab fit`` on these experts: its gate and
    embedder weight the experts per request; without one every enabled expert gets equal weight.
    ``enabled`` is the coarse-level expert set chosen by ``edgemoe collab select`` (default: all).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    run: str | None = None
    enabled: list[str] | None = None
    default_category: str | None = None
    top_k: int | None = None
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 2048
    default_max_tokens: int = 128
    max_choices: int = 10
    log_requests: bool = True

    def __post_init__(self) -> None:
        require(
            1 <= self.port <= 65535 or self.port == 0, "serve.port", f"must be in 0..65535, got {self.port}"
        )
        for name in (
            "max_body_bytes",
            "max_messages",
            "max_prompt_chars",
            "max_tokens_limit",
            "default_max_tokens",
        ):
            check_positive(getattr(self, name), f"serve.{name}")
        require(2 <= self.max_choices <= 10, "serve.max_choices", f"must be in 2..10, got {self.max_choices}")
        require(
            self.default_max_tokens <= self.max_tokens_limit,
            "serve.default_max_tokens",
            f"must be <= max_tokens_limit ({self.max_tokens_limit})",
        )
        if self.top_k is not None:
            check_positive(self.top_k, "serve.top_k")


@dataclass
class GatewayConfig:
    collab: CollabConfig
    serve: ServeSettings
    backends: dict[str, BackendConfig] = field(default_factory=dict)


def load_gateway_config(source: str | Path | dict[str, Any]) -> GatewayConfig:
    """collab.yaml → :class:`GatewayConfig` (the ``serve`` key is ours, the rest goes to the core)."""
    collab, backends, serve_raw = load_experts(source)
    serve = from_dict(ServeSettings, serve_raw, prefix="serve")
    for name in serve.enabled or []:
        check_choice(name, "serve.enabled", collab.expert_names)
    if serve.default_category is not None:
        check_choice(serve.default_category, "serve.default_category", collab.categories)
    return GatewayConfig(collab, serve, backends)


def load_fitted_gate(run: Path, names: list[str]) -> tuple[Gate, Any]:
    """The gate and embedder of a ``collab fit`` run folder, checked against the served experts."""
    if not (run / "gate.pt").is_file() or not (run / "run.yaml").is_file():
        raise ConfigError("serve.run", f"{run} is not a 'collab fit' run folder (needs gate.pt and run.yaml)")
    gate = Gate.load(run / "gate.pt")
    require(
        gate.experts == names, "serve.run", f"the run's gate is for experts {gate.experts}, serving {names}"
    )
    embedder = embedder_from_name(str(yaml.safe_load((run / "run.yaml").read_text()).get("embedder", "")))
    require(
        embedder.dim == gate.embed_dim,
        "serve.run",
        f"embedder gives {embedder.dim}-d, gate wants {gate.embed_dim}",
    )
    return gate, embedder


def gate_prompt(question: str, choices: list[str]) -> str:
    """A question as the MoE² core embeds it for the gate (``QuestionSet.prompt``'s layout)."""
    options = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCDEFGHIJ", choices))
    return f"{question}\n{options}\nAnswer:"


# ---------------------------------------------------------------- request schema


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"content[{i}]: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class BudgetFields(BaseModel):
    """MoE² extensions shared by both POST routes (all optional)."""

    category: str | None = None
    energy_budget_j: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    latency_budget_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)


class ChatRequest(BudgetFields):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


class AnswerRequest(BudgetFields):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2)
    subject: str | None = None


class RequestError(Exception):
    """A request the gateway refuses, with its HTTP status, OpenAI-style type and offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 413: "request_too_large", 422: "budget_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "upstream_error"
        )
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- metrics


@dataclass
class _Histogram:
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
    """Counters and histograms in the Prometheus text format (no client library needed).

    Updated only from the event loop thread, so plain dicts suffice.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.request_seconds: dict[str, _Histogram] = {}
        self.expert_calls: dict[tuple[str, str], int] = {}
        self.expert_seconds: dict[str, _Histogram] = {}
        self.energy_j: dict[str, float] = {}
        self.degraded = 0
        self.budget_rejections = 0
        self.in_flight = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        self.request_seconds.setdefault(route, _Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def expert(self, name: str, outcome: str, seconds: float, energy_j: float) -> None:
        self.expert_calls[(name, outcome)] = self.expert_calls.get((name, outcome), 0) + 1
        self.expert_seconds.setdefault(name, _Histogram(LATENCY_BUCKETS_S)).observe(seconds)
        self.energy_j[name] = self.energy_j.get(name, 0.0) + energy_j

    def render(self) -> str:
        lines = [
            "# HELP edgemoe_requests_total Gateway requests by route and HTTP status.",
            "# TYPE edgemoe_requests_total counter",
        ]
        lines += [
            f"edgemoe_requests_total{_labels(route=r, status=str(s))} {n}"
            for (r, s), n in sorted(self.requests.items())
        ]
        lines += self._histogram(
            "edgemoe_request_seconds", "Gateway request latency.", "route", self.request_seconds
        )
        lines += [
            "# HELP edgemoe_expert_calls_total Expert calls by outcome (ok, failed, timeout).",
            "# TYPE edgemoe_expert_calls_total counter",
        ]
        lines += [
            f"edgemoe_expert_calls_total{_labels(expert=e, outcome=o)} {n}"
            for (e, o), n in sorted(self.expert_calls.items())
        ]
        lines += self._histogram(
            "edgemoe_expert_seconds", "Expert call latency.", "expert", self.expert_seconds
        )
        lines += [
            "# HELP edgemoe_expert_energy_joules_total Modelled expert energy (power x busy time).",
            "# TYPE edgemoe_expert_energy_joules_total counter",
        ]
        lines += [
            f"edgemoe_expert_energy_joules_total{_labels(expert=e)} {v:.6g}"
            for e, v in sorted(self.energy_j.items())
        ]
        lines += [
            "# HELP edgemoe_degraded_responses_total Responses served without some selected expert.",
            "# TYPE edgemoe_degraded_responses_total counter",
            f"edgemoe_degraded_responses_total {self.degraded}",
            "# HELP edgemoe_budget_rejections_total Requests no expert set could serve within budget.",
            "# TYPE edgemoe_budget_rejections_total counter",
            f"edgemoe_budget_rejections_total {self.budget_rejections}",
            "# HELP edgemoe_in_flight_requests Requests being served now.",
            "# TYPE edgemoe_in_flight_requests gauge",
            f"edgemoe_in_flight_requests {self.in_flight}",
        ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(name: str, help_: str, label: str, hists: dict[str, _Histogram]) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for key, h in sorted(hists.items()):
            for bound, count in zip(h.buckets, h.counts):
                lines.append(f"{name}_bucket{_labels(**{label: key, 'le': f'{bound:g}'})} {count}")
            lines.append(f"{name}_bucket{_labels(**{label: key, 'le': '+Inf'})} {h.n}")
            lines.append(f"{name}_sum{_labels(**{label: key})} {h.total:.6g}")
            lines.append(f"{name}_count{_labels(**{label: key})} {h.n}")
        return lines


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        return json.dumps(out, default=str)


# ---------------------------------------------------------------- the gateway


@dataclass
class ExpertOutcome:
    name: str
    weight: float
    status: str
    latency_s: float
    energy_j: float
    result: Any = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "weight": round(self.weight, 6),
            "status": self.status,
            "latency_s": round(self.latency_s, 6),
            "energy_j": round(self.energy_j, 6),
        }
        if self.error:
            out["error"] = self.error
        return out


class Gateway:
    """Policy + backends + metrics; the FastAPI app (:func:`create_app`) is a thin layer over it."""

    def __init__(self, config: GatewayConfig, backends: dict[str, ExpertBackend] | None = None):
        self.config = config
        collab = config.collab
        self.names = collab.expert_names
        self.profiles = {e.name: e for e in collab.experts}
        self.backends = backends or {n: build_backend(n, config.backends[n]) for n in self.names}
        self.timeouts = {
            n: (config.backends[n].timeout_s if n in config.backends else 30.0) for n in self.names
        }
        serve = config.serve
        enabled = serve.enabled or self.names
        self.enabled_N = np.array([n in enabled for n in self.names])
        self.top_k = serve.top_k if serve.top_k is not None else collab.top_k
        cats = collab.categories
        self.default_category = serve.default_category or ("other" if "other" in cats else cats[0])
        self.gate: Gate | None = None
        self.embedder = None
        if serve.run:
            self.gate, self.embedder = load_fitted_gate(Path(serve.run), self.names)
        self._costs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]] = {}
        self.metrics = Metrics()
        self.started = time.time()

    # -- selection --

    def category_of(self, category: str | None, subject: str | None = None) -> str:
        if category is None and subject is not None:
            category = SUBJECT_CATEGORY.get(subject)
        category = category or self.default_category
        if category not in self.config.collab.categories:
            raise RequestError(
                400, f"unknown category {category!r}; allowed: {self.config.collab.categories}", "category"
            )
        return category

    def gate_logits(self, text: str, category: str) -> np.ndarray:
        if self.gate is None:
            return np.zeros(len(self.names))
        cat = np.array([self.config.collab.categories.index(category)])
        return self.gate.logits(self.embedder.encode([text]), cat)[0]

    def predicted_costs(self, prompt_tokens: int, output_tokens: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-expert predicted delay (s), energy (J) and the aggregation time: the core's model, memoised."""
        key = (prompt_tokens, output_tokens)
        if key not in self._costs:
            if len(self._costs) > 4096:
                self._costs.clear()
            request = dataclasses.replace(self.config.collab.request, output_tokens=output_tokens)
            costs = request_costs(self.config.collab.experts, np.array([prompt_tokens]), request)
            self._costs[key] = (costs.delay_QN[0], costs.energy_QN[0], costs.aggregation_s)
        return self._costs[key]

    def select(
        self, prompt: str, category: str, req: BudgetFields, output_tokens: int, gate_text: str | None = None
    ) -> Route:
        """Fine-level routing plus the request's own energy budget; 422 when nothing fits.

        ``gate_text`` is what the gate embeds (default ``prompt``); for multiple choice it is the
        question in the form the gate was trained on.
        """
        collab = self.config.collab
        delay_N, energy_N, aggregation_s = self.predicted_costs(
            estimate_prompt_tokens([prompt])[0], output_tokens
        )
        latency_budget = req.latency_budget_s or collab.budgets.latency_for(category)
        enabled_N = self.enabled_N.copy()
        if req.energy_budget_j is not None:
            enabled_N &= energy_N <= req.energy_budget_j
        k = req.top_k or self.top_k
        route = route_request(
            self.names, self.gate_logits(gate_text or prompt, category), enabled_N, delay_N, energy_N,
            latency_budget, aggregation_s, k,
        )  # fmt: skip
        if req.energy_budget_j is not None:
            route = _trim_to_energy(route, dict(zip(self.names, energy_N)), req.energy_budget_j)
        if not route.served:
            self.metrics.budget_rejections += 1
            on = self.enabled_N
            latency_ok = bool((on & (delay_N + aggregation_s <= latency_budget)).any())
            raise RequestError(
                422,
                f"no expert set meets the budget (category {category!r}, latency <= {latency_budget:g} s"
                + (f", energy <= {req.energy_budget_j:g} J" if req.energy_budget_j is not None else "")
                + f"): the fastest enabled expert needs {float(delay_N[on].min() + aggregation_s):.4g} s, "
                f"the most frugal {float(energy_N[on].min()):.4g} J",
                "energy_budget_j" if latency_ok else "latency_budget_s",
                "budget_infeasible",
            )
        return route

    # -- fan-out --

    async def fan_out(
        self, route: Route, call: Callable[[ExpertBackend], Awaitable[Any]]
    ) -> list[ExpertOutcome]:
        """Call every routed expert concurrently, each under its own timeout; never raises."""

        async def one(name: str, weight: float) -> ExpertOutcome:
            t0 = time.perf_counter()
            status, result, error = "ok", None, None
            try:
                result = await asyncio.wait_for(call(self.backends[name]), self.timeouts[name])
            except asyncio.TimeoutError:
                status, error = "timeout", f"no answer within {self.timeouts[name]:g} s"
            except BackendError as exc:
                status, error = "failed", str(exc)
            except Exception as exc:  # a broken backend must not take the gateway down
                LOG.exception("expert %s raised", name)
                status, error = "failed", f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t0
            energy = self.profiles[name].power * seconds
            self.metrics.expert(name, status, seconds, energy)
            return ExpertOutcome(name, weight, status, seconds, energy, result, error)

        return list(await asyncio.gather(*(one(n, w) for n, w in zip(route.experts, route.weights))))

    @staticmethod
    def survivors(outcomes: list[ExpertOutcome]) -> list[ExpertOutcome]:
        ok = [o for o in outcomes if o.status == "ok"]
        if not ok:
            detail = "; ".join(f"{o.name}: {o.error}" for o in outcomes)
            raise RequestError(502, f"every selected expert failed ({detail})", code="experts_unavailable")
        total = sum(o.weight for o in ok)
        for o in ok:
            o.weight = o.weight / total if total > 0 else 1.0 / len(ok)
        for o in outcomes:
            if o.status != "ok":
                o.weight = 0.0
        return ok

    def moe2_block(
        self, route: Route, outcomes: list[ExpertOutcome], category: str, t0: float
    ) -> dict[str, Any]:
        failed = [o.name for o in outcomes if o.status != "ok"]
        if failed:
            self.metrics.degraded += 1
        return {
            "category": category,
            "experts": [o.public() for o in outcomes],
            "degraded": bool(failed),
            "failed": failed,
            "latency_s": round(time.perf_counter() - t0, 6),
            "energy_j": round(sum(o.energy_j for o in outcomes), 6),
            "predicted": {"latency_s": round(route.delay_s, 6), "energy_j": round(route.energy_j, 6)},
        }

    # -- the two request kinds --

    async def answer(self, req: AnswerRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        serve = self.config.serve
        if len(req.choices) > serve.max_choices:
            raise RequestError(400, f"at most {serve.max_choices} choices, got {len(req.choices)}", "choices")
        prompt = mc_prompt(req.question, req.choices, req.subject)
        if len(prompt) > serve.max_prompt_chars:
            raise RequestError(
                413, f"question and choices exceed {serve.max_prompt_chars} characters", "question"
            )
        category = self.category_of(req.category, req.subject)
        route = self.select(
            prompt, category, req, output_tokens=1, gate_text=gate_prompt(req.question, req.choices)
        )
        n = len(req.choices)
        outcomes = await self.fan_out(route, lambda b: b.ascore_choices(prompt, n))
        ok = self.survivors(outcomes)
        probs_O = aggregate(np.stack([o.result.probs for o in ok]), np.array([o.weight for o in ok]))
        best = int(np.argmax(probs_O))
        return {
            "id": f"moe2-{uuid.uuid4().hex[:16]}",
            "object": "moe2.answer",
            "answer": "ABCDEFGHIJ"[best],
            "index": best,
            "probs": [round(float(p), 6) for p in probs_O],
            "moe2": self.moe2_block(route, outcomes, category, t0),
        }

    async def chat(self, req: ChatRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        serve = self.config.serve
        if req.stream:
            raise RequestError(400, "stream=true is not supported; send stream=false", "stream")
        if len(req.messages) > serve.max_messages:
            raise RequestError(
                413, f"at most {serve.max_messages} messages, got {len(req.messages)}", "messages"
            )
        messages = [Message(m.role, m.text()) for m in req.messages]
        chars = sum(len(m.content) for m in messages)
        if chars > serve.max_prompt_chars:
            raise RequestError(
                413, f"messages hold {chars} characters; the limit is {serve.max_prompt_chars}", "messages"
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or serve.default_max_tokens
        if max_tokens > serve.max_tokens_limit:
            raise RequestError(
                400, f"max_tokens must be <= {serve.max_tokens_limit}, got {max_tokens}", "max_tokens"
            )
        prompt = "\n".join(m.content for m in messages)
        category = self.category_of(req.category)
        route = self.select(prompt, category, req, output_tokens=max_tokens)
        outcomes = await self.fan_out(route, lambda b: b.agenerate(messages, max_tokens, req.temperature))
        ok = self.survivors(outcomes)
        best = max(ok, key=lambda o: o.weight)
        gen = best.result
        block = self.moe2_block(route, outcomes, category, t0)
        block["answered_by"] = best.name
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model or "edgemoe-moe2",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            },
            "moe2": block,
        }

    async def load(self) -> None:
        """Load local models (and check remote endpoints) before serving, concurrently.

        An expert that cannot load is logged and left to fail per request (the gateway degrades
        instead of refusing to start: an edge server may come up later).
        """
        loop = asyncio.get_running_loop()

        async def one(name: str, backend: ExpertBackend) -> None:
            try:
                seconds = await loop.run_in_executor(None, backend.load)
                LOG.info("expert ready", extra={"fields": {"expert": name, "load_s": round(seconds, 3)}})
            except (BackendError, ConfigError) as exc:
                LOG.warning("expert not ready", extra={"fields": {"expert": name, "error": str(exc)}})

        await asyncio.gather(*(one(n, b) for n, b in self.backends.items()))

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()


def _trim_to_energy(route: Route, energy: dict[str, float], budget_j: float) -> Route:
    """Keep experts in descending weight while the set's predicted energy fits; renormalise weights."""
    kept: list[tuple[str, float]] = []
    spent = 0.0
    for name, weight in zip(route.experts, route.weights):
        if spent + energy[name] <= budget_j:
            kept.append((name, weight))
            spent += energy[name]
    if not kept:
        return Route([], [], 0.0, 0.0, "energy", route.logits)
    total = sum(w for _, w in kept)
    return Route(
        [n for n, _ in kept], [w / total for _, w in kept], route.delay_s, spent, route.reason, route.logits
    )


# ---------------------------------------------------------------- HTTP layer


class _TooLarge(Exception):
    pass


class GatewayMiddleware:
    """Pure ASGI middleware (cheaper than Starlette's ``BaseHTTPMiddleware``) doing, per request:
    API-key check (all routes but ``/health``), body-size limit (by Content-Length or as the body
    streams in: 413), ``x-request-id``, metrics and one structured log line.
    """

    def __init__(self, app: Any, gateway: Gateway, api_key: str | None):
        self.app = app
        self.gateway = gateway
        self.api_key = api_key.encode() if api_key else None
        self.limit = gateway.config.serve.max_body_bytes
        self.log = gateway.config.serve.log_requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        metrics = self.gateway.metrics
        if self.api_key is not None and path != "/health" and not self._authorised(headers):
            err = RequestError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
            metrics.request(route, 401, 0.0)
            await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send, route)
            return
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = {"code": 500}
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        t0 = time.perf_counter()
        metrics.in_flight += 1
        try:
            await self.app(scope, limited_receive, tagged_send)
        except _TooLarge:
            await self._too_large(scope, receive, send, route)
            return
        finally:
            metrics.in_flight -= 1
        seconds = time.perf_counter() - t0
        metrics.request(route, status["code"], seconds)
        if self.log and route != "/metrics":
            fields = {"request_id": request_id, "route": route, "method": scope["method"],
                      "status": status["code"], "latency_ms": round(seconds * 1e3, 3)}  # fmt: skip
            block = (scope.get("state") or {}).get("moe2")
            if block is not None:
                fields |= {"category": block["category"], "experts": [e["name"] for e in block["experts"]],
                           "failed": block["failed"], "energy_j": block["energy_j"]}  # fmt: skip
            LOG.log(
                logging.WARNING if block and block["degraded"] else logging.INFO,
                "request",
                extra={"fields": fields},
            )

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable, route: str) -> None:
        self.gateway.metrics.request(route, 413, 0.0)
        err = RequestError(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field_ = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "request body must be a JSON object sent with Content-Type: application/json", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{field_ or 'body'}: {msg}{more}", field_


def create_app(gateway: Gateway) -> GatewayMiddleware:
    """The ASGI application: FastAPI routes around ``gateway``, wrapped in :class:`GatewayMiddleware`."""
    serve = gateway.config.serve
    api_key = os.environ.get(serve.api_key_env) if serve.api_key_env else None
    if serve.api_key_env and not api_key:
        raise ConfigError("serve.api_key_env", f"environment variable {serve.api_key_env} is not set")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.load()
        yield
        await gateway.aclose()

    app = FastAPI(title="edgemoe MoE² gateway", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(RequestError(400, message, param, "invalid_request").body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "experts": gateway.names,
            "enabled": [n for n, on in zip(gateway.names, gateway.enabled_N) if on],
            "gate": "trained" if gateway.gate is not None else "uniform",
            "uptime_s": round(time.time() - gateway.started, 3),
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "edgemoe-moe2", "object": "model", "owned_by": "edgemoe"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> JSONResponse:
        out = await gateway.chat(req)
        request.state.moe2 = out["moe2"]  # the middleware's log line reports it
        return JSONResponse(out)

    @app.post("/v1/moe2/answer")
    async def answer(req: AnswerRequest, request: Request) -> JSONResponse:
        out = await gateway.answer(req)
        request.state.moe2 = out["moe2"]
        return JSONResponse(out)

    return GatewayMiddleware(app, gateway, api_key)


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/moe2/answer")


def configure_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs on stderr for the gateway logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(level.upper())
    LOG.propagate = False


@dataclass
class RunningServer:
    """A uvicorn server on a background thread (tests, benchmarks); ``stop()`` ends it."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Run ``app`` with uvicorn on ``host:port`` (0 = ephemeral) in a thread; returns once it listens."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway failed to start")
        time.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    return RunningServer(f"http://{bound_host}:{bound_port}", server, thread)


def serve_forever(config: GatewayConfig, host: str | None = None, port: int | None = None) -> None:
    """``edgemoe serve``: build the gateway and run uvicorn in the foreground."""
    import uvicorn

    configure_logging()
    gateway = Gateway(config)
    app = create_app(gateway)
    host = host or config.serve.host
    port = port if port is not None else config.serve.port
    LOG.info("listening", extra={"fields": {"host": host, "port": port, "experts": gateway.names}})
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
