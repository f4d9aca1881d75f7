"""MoE² serving: for each request, the policy's route, the experts' calls under a hard deadline, and
the combined answer.

Selection is :class:`~edgemoe.collab.policy.MoE2Policy`'s ``route`` (the code offline evaluation
runs), restricted to the experts whose circuit breaker is closed and that honour the request's
pass-through fields. The routed experts are called concurrently; the request returns as soon as
the answers in hand are final, and the rest are cancelled:

- multiple choice: when the remaining experts' weight can no longer change the argmax of the
  gate-weighted mixture (all of them, in the usual case);
- chat: when the highest-weight expert that has not failed has answered (the others are hedges:
  if it fails, the next one's answer is already on its way);
- always at the deadline (the request's latency budget), with whatever has arrived.

Streaming relays the first-ranked expert's own chunks; the others run as hedges until it has
finished and feed the ``moe2`` block and ``usage`` of the last chunk. Energy is a model, not a
measurement: the expert's power draw times the wall time of its call.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.collab.backends import BackendError, ChoiceScores, Generation, LLMBackend, Message, build_backend
from edgemoe.collab.backends.base import stream_chunks
from edgemoe.collab.costs import estimate_prompt_tokens
from edgemoe.collab.data import SUBJECT_CATEGORY
from edgemoe.collab.policy import EnergyQueue, MoE2Policy, Route, aggregate
from edgemoe.collab.prompts import LETTERS, gate_prompt, mc_prompt
from edgemoe.errors import ConfigError
from edgemoe.serving.breaker import BreakerBoard
from edgemoe.serving.config import GatewayConfig, load_fitted_gate
from edgemoe.serving.metrics import LOG, Metrics
from edgemoe.serving.protocol import AnswerRequest, BudgetFields, ChatRequest, RequestError

MODEL_ID = "edgemoe-moe2"
# Time kept back from the latency budget to write the response.
DEADLINE_MARGIN_S = 0.005


@dataclass
class ExpertOutcome:
    """One expert's part in a request. ``error`` is a public category; details go to the log."""

    name: str
    weight: float
    status: str = "pending"
    latency_s: float = 0.0
    energy_j: float = 0.0
    result: Any = None
    error: str | None = None

    @property
    def tokens(self) -> tuple[int, int]:
        if isinstance(self.result, (Generation, ChoiceScores)):
            return self.result.prompt_tokens, self.result.completion_tokens
        return 0, 0

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


@dataclass
class Plan:
    """A routed request: its route, deadline and the ``moe2`` block's fixed parts."""

    route: Route
    category: str
    t0: float
    deadline: float
    request_id: str
    outcomes: list[ExpertOutcome] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}


def usage_sum(outcomes: list[ExpertOutcome]) -> dict[str, int]:
    """Tokens of every expert that answered (a cancelled call's partial work is not reported)."""
    prompt = sum(o.tokens[0] for o in outcomes)
    completion = sum(o.tokens[1] for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class MoE2Service:
    """Policy + backends + breakers + metrics; the HTTP app (:mod:`edgemoe.serving.app`) is a thin
    layer over it."""

    def __init__(self, config: GatewayConfig, backends: dict[str, LLMBackend] | None = None):
        self.config = config
        collab, serve = config.collab, config.serve
        self.names = collab.expert_names
        self.profiles = {e.name: e for e in collab.experts}
        self.backends = backends or {n: build_backend(n, config.backends[n]) for n in self.names}
        self.timeouts = {
            n: (config.backends[n].timeout_s if n in config.backends else 30.0) for n in self.names
        }
        gate = embedder = None
        if serve.run:
            gate, embedder = load_fitted_gate(Path(serve.run), self.names)
        queue = (
            EnergyQueue(serve.energy_budget_j, serve.energy_queue_v)
            if serve.energy_budget_j is not None
            else None
        )
        self.policy = MoE2Policy(collab, gate, embedder, serve.enabled or self.names, energy_queue=queue)
        self.top_k = serve.top_k if serve.top_k is not None else collab.top_k
        cats = collab.categories
        self.default_category = serve.default_category or ("other" if "other" in cats else cats[0])
        self.metrics = Metrics()
        self.breakers = BreakerBoard(
            self.backends, self.metrics, serve.breaker_failures, serve.probe_interval_s, serve.probe_timeout_s
        )
        self.started = time.time()

    @property
    def trained(self) -> bool:
        return self.policy.gate is not None

    def enabled(self) -> list[str]:
        return [n for n, on in zip(self.names, self.policy.enabled_N) if on]

    def can_serve(self) -> bool:
        return bool(self.breakers.available() & set(self.enabled()))

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

    def _candidates(self, params: Mapping[str, Any], model: str | None) -> set[str]:
        """Experts that can take this request now: breaker closed, every pass-through field honoured."""
        pool = {model} if model in self.backends else set(self.enabled())
        up = pool & self.breakers.available()
        if not up:
            who = f"expert {model!r} is" if model in self.backends else "every enabled expert is"
            raise RequestError(
                503,
                f"{who} ejected by its circuit breaker (failing or too slow); retry later",
                code="experts_unavailable",
                headers={"Retry-After": str(max(1, round(self.config.serve.probe_interval_s)))},
            )
        for name in params:
            if not any(name in self.backends[n].supported_params for n in up):
                raise RequestError(
                    400, f"{name}: no selected expert can honour this field (experts: {sorted(up)})", name,
                    "unsupported_parameter",
                )  # fmt: skip
        able = {n for n in up if set(params) <= self.backends[n].supported_params}
        if not able:
            fields = sorted(params)
            raise RequestError(400, f"no selected expert honours all of {fields} together", fields[0],
                               "unsupported_parameter")  # fmt: skip
        return able

    def plan(
        self,
        req: BudgetFields,
        prompt: str,
        category: str,
        output_tokens: int,
        request_id: str,
        gate_text: str | None = None,
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        t0: float | None = None,
    ) -> Plan:
        """The policy's route for this request and its deadline (from ``t0``, when the request
        arrived; default now); 422 when no expert set fits."""
        t0 = time.perf_counter() if t0 is None else t0
        budget = req.latency_budget_s or self.config.collab.budgets.latency_for(category)
        available = self._candidates(params or {}, model)
        if model in self.backends:
            route = Route([model], [1.0], 0.0, 0.0)
        else:
            route = self.policy.route(
                prompt,
                category,
                gate_text=gate_text,
                output_tokens=output_tokens,
                latency_budget_s=budget,
                energy_budget_j=req.energy_budget_j,
                top_k=req.top_k or self.top_k,
                available=available,
            )
        if not route.served:
            self._infeasible(prompt, category, req, output_tokens, budget, available)
        deadline = t0 + budget - DEADLINE_MARGIN_S
        plan = Plan(route, category, t0, deadline, request_id)
        plan.outcomes = [ExpertOutcome(n, w) for n, w in zip(route.experts, route.weights)]
        return plan

    def _infeasible(
        self,
        prompt: str,
        category: str,
        req: BudgetFields,
        output_tokens: int,
        budget: float,
        available: set[str],
    ) -> None:
        self.metrics.budget_rejections += 1
        delay_N, energy_N, aggregation_s = self.policy.costs(
            int(estimate_prompt_tokens([prompt])[0]), output_tokens
        )
        on = self.policy.enabled_N & np.array([n in available for n in self.names])
        latency_ok = bool((on & (delay_N + aggregation_s <= budget)).any())
        raise RequestError(
            422,
            f"no expert set meets the budget (category {category!r}, latency <= {budget:g} s"
            + (f", energy <= {req.energy_budget_j:g} J" if req.energy_budget_j is not None else "")
            + f"): the fastest available expert needs {float(delay_N[on].min() + aggregation_s):.4g} s, "
            f"the most frugal {float(energy_N[on].min()):.4g} J",
            "energy_budget_j" if latency_ok else "latency_budget_s",
            "budget_infeasible",
        )

    # -- fan-out under the deadline --

    def _settle(self, o: ExpertOutcome, task: asyncio.Task | None, status: str, t_start: float) -> None:
        """Fill in one outcome (from its finished task, or as timeout/cancelled) and count it."""
        error: str | None = None
        if task is not None and status == "done":
            exc = task.exception()
            if exc is None:
                status, o.result = "ok", task.result()
            elif isinstance(exc, BackendError):
                status, error = ("timeout" if exc.kind == "timeout" else "failed"), exc.kind
                LOG.warning("expert failed", extra={"fields": {"expert": o.name, "error": str(exc)}})
            else:
                status, error = "failed", "internal_error"
                LOG.error("expert raised", exc_info=exc, extra={"fields": {"expert": o.name}})
        elif status == "timeout":
            error = "deadline"
        o.status, o.error = status, error
        o.latency_s = time.perf_counter() - t_start
        o.energy_j = self.profiles[o.name].power * o.latency_s
        self.metrics.expert(o.name, status, o.latency_s, o.energy_j, o.tokens)

    def _record(self, plan: Plan, o: ExpertOutcome) -> None:
        """Tell the expert's breaker. A missed deadline counts against an expert only when it is an
        outlier: a peer in the same request answered, or it was asked alone. When every expert of a
        request misses, the budget or the gateway's own load is the likelier cause."""
        outcome = o.status if o.status in ("ok", "cancelled") else f"failed:{o.error}"
        if o.status == "timeout":
            alone = len(plan.outcomes) == 1
            outcome = "timeout" if alone or any(p.status == "ok" for p in plan.outcomes) else "cancelled"
        self.breakers.record(o.name, outcome)

    async def fan_out(
        self,
        plan: Plan,
        call: Callable[[LLMBackend, float], Awaitable[Any]],
        final: Callable[[list[ExpertOutcome]], bool],
        skip: set[str] | None = None,
        deadline: float | None = None,
    ) -> list[ExpertOutcome]:
        """Call every routed expert (but ``skip``) concurrently until ``final`` holds or the deadline
        (default the plan's) passes; the rest are cancelled. Never raises for an expert's failure; a
        cancelled request (client gone) cancels every call."""
        deadline = plan.deadline if deadline is None else deadline
        t_start = time.perf_counter()
        tasks: dict[asyncio.Task, ExpertOutcome] = {}
        for o in plan.outcomes:
            if skip and o.name in skip:
                continue
            timeout = min(self.timeouts[o.name], max(deadline - t_start, 0.0))
            tasks[asyncio.ensure_future(self._call(call, o.name, timeout))] = o
        pending = set(tasks)
        try:
            while pending and not final(plan.outcomes):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._settle(tasks[task], task, "done", t_start)
        finally:
            late = time.perf_counter() >= deadline
            for task in pending:
                task.cancel()
                self._settle(tasks[task], None, "timeout" if late else "cancelled", t_start)
            for o in tasks.values():
                self._record(plan, o)
        return plan.outcomes

    async def _call(
        self, call: Callable[[LLMBackend, float], Awaitable[Any]], name: str, timeout: float
    ) -> Any:
        """One expert call under ``timeout`` (the call is created inside the task, so a task cancelled
        before it starts leaves no coroutine unawaited)."""
        return await _as_backend_error(
            asyncio.wait_for(call(self.backends[name], timeout), timeout), name, timeout
        )

    @staticmethod
    def survivors(outcomes: list[ExpertOutcome]) -> list[ExpertOutcome]:
        """The experts that answered, weights renormalised over them; 502/504 when none did."""
        ok = [o for o in outcomes if o.status == "ok"]
        if not ok:
            if any(o.status == "timeout" for o in outcomes):
                raise RequestError(504, "no selected expert answered within the latency budget",
                                   "latency_budget_s", "deadline_exceeded")  # fmt: skip
            detail = "; ".join(f"{o.name}: {o.error}" for o in outcomes if o.status == "failed")
            raise RequestError(502, f"every selected expert failed ({detail})", code="experts_unavailable")
        total = sum(o.weight for o in ok)
        for o in outcomes:
            o.weight = (o.weight / total if total > 0 else 1.0 / len(ok)) if o.status == "ok" else 0.0
        return ok

    def moe2_block(self, plan: Plan) -> dict[str, Any]:
        outcomes = plan.outcomes
        failed = [o.name for o in outcomes if o.status in ("failed", "timeout")]
        if failed:
            self.metrics.degraded += 1
        energy_j = sum(o.energy_j for o in outcomes)
        self.policy.observe(energy_j)
        return {
            "category": plan.category,
            "experts": [o.public() for o in outcomes],
            "degraded": bool(failed),
            "failed": failed,
            "latency_s": round(time.perf_counter() - plan.t0, 6),
            "energy_j": round(energy_j, 6),
            "predicted": {
                "latency_s": round(plan.route.delay_s, 6),
                "energy_j": round(plan.route.energy_j, 6),
            },
        }

    # -- multiple choice --

    async def answer(self, req: AnswerRequest, request_id: str, t0: float | None = None) -> dict[str, Any]:
        serve = self.config.serve
        if len(req.choices) > serve.max_choices:
            raise RequestError(400, f"at most {serve.max_choices} choices, got {len(req.choices)}", "choices")
        prompt = mc_prompt(req.question, req.choices, req.subject)
        if len(prompt) > serve.max_prompt_chars:
            raise RequestError(413, f"question and choices exceed {serve.max_prompt_chars} characters",
                               "question", "prompt_too_long")  # fmt: skip
        category = self.category_of(req.category, req.subject)
        plan = self.plan(
            req, prompt, category, 1, request_id, gate_text=gate_prompt(req.question, req.choices), t0=t0
        )
        n = len(req.choices)
        await self.fan_out(plan, lambda b, _t: b.ascore_choices(prompt, n, plan.headers), _answer_decided)
        ok = self.survivors(plan.outcomes)
        probs_O = aggregate(np.stack([o.result.probs for o in ok]), np.array([o.weight for o in ok]))
        best = int(np.argmax(probs_O))
        return {
            "id": f"moe2-{uuid.uuid4().hex[:16]}",
            "object": "moe2.answer",
            "answer": LETTERS[best],
            "index": best,
            "probs": [round(float(p), 6) for p in probs_O],
            "usage": usage_sum(plan.outcomes),
            "moe2": self.moe2_block(plan),
        }

    # -- chat --

    def _chat_inputs(self, req: ChatRequest) -> tuple[list[Message], int, dict[str, Any]]:
        serve = self.config.serve
        if len(req.messages) > serve.max_messages:
            raise RequestError(413, f"at most {serve.max_messages} messages, got {len(req.messages)}",
                               "messages", "too_many_messages")  # fmt: skip
        messages = [Message(m.role, m.text(), m.extra()) for m in req.messages]
        chars = sum(len(m.content) for m in messages)
        if chars > serve.max_prompt_chars:
            raise RequestError(413, f"messages hold {chars} characters; the limit is {serve.max_prompt_chars}",
                               "messages", "prompt_too_long")  # fmt: skip
        max_tokens = req.max_completion_tokens or req.max_tokens or serve.default_max_tokens
        if max_tokens > serve.max_tokens_limit:
            field_ = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise RequestError(400, f"{field_} must be <= {serve.max_tokens_limit}, got {max_tokens}", field_)
        if req.n > serve.max_n:
            raise RequestError(400, f"n must be <= {serve.max_n}, got {req.n}", "n")
        return messages, max_tokens, req.passthrough()

    def plan_chat(
        self, req: ChatRequest, request_id: str, t0: float | None = None
    ) -> tuple[Plan, list[Message], int, dict[str, Any]]:
        messages, max_tokens, params = self._chat_inputs(req)
        prompt = "\n".join(m.content for m in messages)
        category = self.category_of(req.category)
        plan = self.plan(req, prompt, category, max_tokens, request_id, params=params, model=req.model, t0=t0)
        return plan, messages, max_tokens, params

    async def chat(self, req: ChatRequest, request_id: str, t0: float | None = None) -> dict[str, Any]:
        plan, messages, max_tokens, params = self.plan_chat(req, request_id, t0)
        temperature = req.temperature or 0.0

        def call(b: LLMBackend, _timeout: float) -> Awaitable[Generation]:
            return b.agenerate(messages, max_tokens, temperature, params, plan.headers)

        await self.fan_out(plan, call, _chat_decided)
        ok = self.survivors(plan.outcomes)
        best = max(ok, key=lambda o: o.weight)
        block = self.moe2_block(plan)
        block["answered_by"] = best.name
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model or MODEL_ID,
            "choices": best.result.openai_choices(),
            "usage": usage_sum(plan.outcomes),
            "moe2": block,
        }

    async def chat_stream(
        self, req: ChatRequest, request_id: str, state: dict[str, Any], t0: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Server-sent events for ``req`` (OpenAI chunk format, ``[DONE]`` last).

        Everything that can be refused is refused before the first byte (routing; the first-ranked
        expert's first chunk, or the best hedge's answer if it fails within the deadline), so errors
        keep their HTTP status. The deadline bounds the time to the first token.
        """
        plan, messages, max_tokens, params = self.plan_chat(req, request_id, t0)
        temperature = req.temperature or 0.0
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model or MODEL_ID}  # fmt: skip
        primary = plan.outcomes[0]
        # Hedges run full generations, so they get each backend's own timeout, not the first-token deadline.
        hedges = asyncio.ensure_future(
            self.fan_out(
                plan,
                lambda b, _t: b.agenerate(messages, max_tokens, temperature, params, plan.headers),
                lambda outs: primary.status != "pending" and _chat_decided(outs),
                skip={primary.name},
                deadline=plan.t0 + max(self.timeouts.values()),
            )
        )
        t_start = time.perf_counter()
        stream = self.backends[primary.name].astream(messages, max_tokens, temperature, params, plan.headers)
        first: list[dict[str, Any]] | None = None
        fallback: ExpertOutcome | None = None
        try:
            left = max(plan.deadline - t_start, 0.0)
            try:
                first = await _as_backend_error(asyncio.wait_for(anext(stream), left), primary.name, left)
            except (BackendError, StopAsyncIteration) as exc:
                await stream.aclose()
                self._fail_primary(
                    primary, exc.kind if isinstance(exc, BackendError) else "bad_reply", t_start, exc
                )
                await asyncio.wait([hedges], timeout=max(plan.deadline - time.perf_counter(), 0.0))
                await _cancel(hedges)
                self._record(plan, primary)
                fallback = max(self.survivors(plan.outcomes), key=lambda o: o.weight)
        except BaseException:
            hedges.cancel()
            await stream.aclose()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._relay(plan, head, first, stream, hedges, fallback, t_start, include_usage, state)

    def _fail_primary(self, primary: ExpertOutcome, kind: str, t_start: float, exc: BaseException) -> None:
        primary.status = "timeout" if kind == "timeout" else "failed"
        primary.error = kind
        primary.latency_s = time.perf_counter() - t_start
        primary.energy_j = self.profiles[primary.name].power * primary.latency_s
        self.metrics.expert(primary.name, primary.status, primary.latency_s, primary.energy_j, (0, 0))
        LOG.warning("expert failed", extra={"fields": {"expert": primary.name, "error": str(exc)}})

    def _finish_primary(self, primary: ExpertOutcome, usage: dict[str, int] | None, t_start: float) -> None:
        seconds = time.perf_counter() - t_start
        usage = usage or {}
        primary.status = "ok"
        primary.result = Generation(
            "", int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), seconds
        )
        primary.latency_s = seconds
        primary.energy_j = self.profiles[primary.name].power * seconds
        self.metrics.expert(primary.name, "ok", seconds, primary.energy_j, primary.tokens)
        self.breakers.record(primary.name, "ok")

    async def _relay(
        self,
        plan: Plan,
        head: dict[str, Any],
        first: list[dict[str, Any]] | None,
        stream: AsyncGenerator[list[dict[str, Any]], None],
        hedges: asyncio.Future,
        fallback: ExpertOutcome | None,
        t_start: float,
        include_usage: bool,
        state: dict[str, Any],
    ) -> AsyncGenerator[bytes, None]:
        primary = plan.outcomes[0]
        try:
            if fallback is not None:
                yield b"".join(
                    _sse({**head, "choices": c["choices"]}) for c in stream_chunks(fallback.result)
                )
            else:
                usage: dict[str, int] | None = None
                batch: list[dict[str, Any]] | None = first
                while batch is not None:
                    for chunk in batch:
                        usage = chunk.get("usage") or usage
                    data = b"".join(
                        _sse({**head, "choices": c["choices"]}) for c in batch if c.get("choices")
                    )
                    if data:
                        yield data
                    # The whole stream gets the expert's timeout: a stalled stream ends as a failure.
                    left = max(t_start + self.timeouts[primary.name] - time.perf_counter(), 0.0)
                    batch = await _as_backend_error(
                        asyncio.wait_for(anext(stream, None), left), primary.name, left
                    )
                self._finish_primary(primary, usage, t_start)
                await _cancel(hedges)
            block = self.moe2_block(plan)
            block["answered_by"] = fallback.name if fallback is not None else primary.name
            state["moe2"] = block
            last: dict[str, Any] = {**head, "choices": [], "moe2": block}
            if include_usage:
                last["usage"] = usage_sum(plan.outcomes)
            yield _sse(last)
            yield b"data: [DONE]\n\n"
        except BackendError as exc:
            self._fail_primary(primary, exc.kind, t_start, exc)
            self._record(plan, primary)
            error = RequestError(502, "the answering expert failed mid-stream", code="stream_interrupted")
            yield _sse(error.body())
            yield b"data: [DONE]\n\n"
        finally:
            hedges.cancel()
            await stream.aclose()

    async def load(self) -> None:
        """Load local models (and check remote endpoints) before serving, concurrently.

        An expert that cannot load is logged and left to fail per request (the gateway degrades
        instead of refusing to start: an edge server may come up later).
        """
        loop = asyncio.get_running_loop()

        async def one(name: str, backend: LLMBackend) -> None:
            try:
                seconds = await loop.run_in_executor(None, backend.load)
                LOG.info("expert ready", extra={"fields": {"expert": name, "load_s": round(seconds, 3)}})
            except (BackendError, ConfigError) as exc:
                LOG.warning("expert not ready", extra={"fields": {"expert": name, "error": str(exc)}})

        await asyncio.gather(*(one(n, b) for n, b in self.backends.items()))

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()


async def _cancel(task: asyncio.Future) -> None:
    """Cancel ``task`` and wait until it has finished (without raising its outcome)."""
    task.cancel()
    await asyncio.wait([task])


async def _as_backend_error(aw: Awaitable[Any], name: str, timeout: float) -> Any:
    """``aw``, with a timeout turned into a :class:`BackendError` of kind ``timeout``."""
    try:
        return await aw
    except asyncio.TimeoutError as exc:
        raise BackendError(f"expert {name!r}: no answer within {timeout:.3g} s", "timeout") from exc


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate from an expert becomes U+FFFD instead of a 500."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _answer_decided(outcomes: list[ExpertOutcome]) -> bool:
    """Multiple choice is final when the pending experts' weight cannot change the mixture's argmax."""
    pending = sum(o.weight for o in outcomes if o.status == "pending")
    if pending == 0:
        return True
    ok = [o for o in outcomes if o.status == "ok"]
    if not ok:
        return False
    mass_O = sum(o.weight * o.result.probs for o in ok)
    top2 = np.sort(mass_O)[-2:]
    return bool(top2[1] - top2[0] > pending)


def _chat_decided(outcomes: list[ExpertOutcome]) -> bool:
    """Chat is final when the highest-weight expert that has not failed has answered."""
    for o in sorted(outcomes, key=lambda o: -o.weight):
        if o.status == "ok":
            return True
        if o.status == "pending":
            return False
    return True
