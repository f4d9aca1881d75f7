"""The one interface every LLM expert implements, whatever runs it.

An expert answers two kinds of request:

- ``score_choices``: a multiple-choice question, answered as a log-probability per option letter
  (from the next-token logits of a local model, or the logprobs an HTTP endpoint returns);
- ``generate``: free text for a chat.

Both have an async twin used by the gateway's concurrent fan-out. Local backends (one model in
this process) run their blocking calls on a private single-thread executor, so calls to one model
are serialised and never block the event loop; HTTP backends override the async methods natively.

``astream`` yields OpenAI chat-completion chunks; backends that cannot stream yield the whole answer
as one chunk. Every async call takes ``headers`` (the gateway's ``x-request-id``), which HTTP
backends forward and local ones ignore.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

# Chat Completions request fields an expert may be asked to honour, beyond messages, max_tokens and
# temperature. Each backend lists the ones it honours (``supported_params``); the gateway refuses a
# field that no selected expert honours instead of dropping it.
PASS_THROUGH_PARAMS = (
    "stop",
    "top_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "n",
    "user",
)


class BackendError(RuntimeError):
    """An expert could not answer (unreachable, crashed, malformed reply).

    ``kind`` is the stable, public category (``unreachable``, ``timeout``, ``http_error``,
    ``bad_reply``, ``failed``); the message may hold internal detail (URLs, errno text) and only
    goes to the log.
    """

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ChoiceScores:
    """Answer to a multiple-choice question.

    ``logprobs`` holds one normalised log-probability per option (log-softmax over the option
    letters). ``source`` says where they came from: ``logits`` (local model), ``logprobs`` (HTTP
    endpoint's top logprobs) or ``text`` (endpoint without logprobs; a smoothed one-hot of the
    letter it wrote).
    """

    logprobs: tuple[float, ...]
    source: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int = 1

    @property
    def probs(self) -> np.ndarray:
        return np.exp(np.asarray(self.logprobs, dtype=np.float64))

    @property
    def answer(self) -> int:
        return int(np.argmax(self.logprobs))


@dataclass(frozen=True)
class Generation:
    """Free-text answer with the token counts the profiler and energy model need.

    ``choices`` are the expert's OpenAI ``choices`` as it returned them (message with tool calls,
    logprobs, one per ``n``); empty for a backend that only produces text.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str = "stop"
    choices: tuple[dict[str, Any], ...] = ()

    def openai_choices(self) -> list[dict[str, Any]]:
        """The answer as OpenAI ``choices`` (the expert's own when it sent them)."""
        if self.choices:
            return [dict(c) for c in self.choices]
        message = {"role": "assistant", "content": self.text}
        return [{"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}]


@dataclass(frozen=True)
class Message:
    """One chat message; ``extra`` keeps the fields beyond role and content (``tool_calls``,
    ``tool_call_id``, ``name``) for backends that speak the OpenAI schema."""

    role: str
    content: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def openai(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **self.extra}


def log_softmax(x: Sequence[float]) -> tuple[float, ...]:
    a = np.asarray(x, dtype=np.float64)
    a = a - a.max()
    return tuple(float(v) for v in a - math.log(float(np.exp(a).sum())))


def letter_from_text(text: str, letters: str) -> int | None:
    """Index of the first option letter standing alone at the start of ``text`` (``"B."``, ``" (C)"``)."""
    stripped = text.strip().lstrip("(*[ ").upper()
    if stripped and stripped[0] in letters and (len(stripped) == 1 or not stripped[1].isalpha()):
        return letters.index(stripped[0])
    return None


def smoothed_one_hot(index: int | None, n: int, eps: float = 0.05) -> tuple[float, ...]:
    """Distribution for an answer known only as text: 1 - eps on the letter, eps spread on the rest.

    With no recognisable letter the distribution is uniform.
    """
    if index is None:
        return tuple([-math.log(n)] * n)
    p = np.full(n, eps / (n - 1))
    p[index] = 1.0 - eps
    return tuple(float(v) for v in np.log(p))


@dataclass
class LLMBackend(abc.ABC):
    """Base class: blocking ``score_choices``/``generate`` plus their async twins.

    ``supported_params`` lists the :data:`PASS_THROUGH_PARAMS` this backend honours in
    ``generate(params=...)``.
    """

    name: str
    _executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    supported_params: ClassVar[frozenset[str]] = frozenset()
    streams: ClassVar[bool] = False

    @abc.abstractmethod
    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        """Log-probabilities of the first ``n_options`` letters as the next token after ``prompt``."""

    @abc.abstractmethod
    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        """Chat completion; ``params`` holds pass-through fields (only ``supported_params``)."""

    @abc.abstractmethod
    def complete(self, prompt: str, max_tokens: int) -> Generation:
        """Greedy raw-text continuation of ``prompt`` (no chat template): what decode rates are timed on."""

    def load(self) -> float:
        """Load weights / open connections; returns the seconds it took (0 if nothing to load)."""
        return 0.0

    async def aprobe(self, timeout_s: float) -> None:
        """Health probe: raises :class:`BackendError` unless the expert answers a one-token request."""
        try:
            await asyncio.wait_for(self.agenerate([Message("user", "ping")], 1), timeout_s)
        except asyncio.TimeoutError as exc:
            raise BackendError(
                f"expert {self.name!r}: probe got no answer within {timeout_s:g} s", "timeout"
            ) from exc

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _run(self, fn, *args):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-{self.name}")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def ascore_choices(
        self, prompt: str, n_options: int, headers: Mapping[str, str] | None = None
    ) -> ChoiceScores:
        return await self._run(self.score_choices, prompt, n_options)

    async def agenerate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Generation:
        return await self._run(self.generate, messages, max_tokens, temperature, params)

    async def astream(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """OpenAI chat-completion chunks in batches (the chunks that arrived together); the last chunk
        carries ``usage``. Default: the whole answer as one batch."""
        gen = await self.agenerate(messages, max_tokens, temperature, params, headers)
        yield [*stream_chunks(gen), {"choices": [], "usage": usage_of(gen)}]

    async def aclose(self) -> None:
        self.close()


def stream_chunks(gen: Generation) -> list[dict[str, Any]]:
    """A finished answer as the stream chunks that would have carried it (one delta per choice)."""
    out = []
    for choice in gen.openai_choices():
        message = {k: v for k, v in (choice.get("message") or {}).items() if v is not None}
        if "tool_calls" in message:  # stream deltas index their tool calls
            message["tool_calls"] = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
        index = choice.get("index", 0)
        out.append({"choices": [{"index": index, "delta": message, "logprobs": choice.get("logprobs")}]})
        out.append(
            {
                "choices": [
                    {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}
                ]
            }
        )
    return out


def usage_of(gen: Generation | ChoiceScores) -> dict[str, int]:
    completion = gen.completion_tokens
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
    }


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
