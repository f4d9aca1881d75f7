"""An expert behind any OpenAI-compatible HTTP endpoint (llama.cpp server, Ollama, vLLM, ...).

Multiple choice asks for one token with the top logprobs and reads the option letters' values
from them; an endpoint that returns no logprobs is still usable: the letter it writes becomes a
smoothed one-hot distribution (``source == "text"``). Letters missing from the top list get half
the smallest listed probability (an upper bound on what they could have had, halved; our choice).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx

from edgemoe.collab.backends.base import (
    PASS_THROUGH_PARAMS,
    BackendError,
    ChoiceScores,
    Generation,
    LLMBackend,
    Message,
    Stopwatch,
    letter_from_text,
    log_softmax,
    smoothed_one_hot,
)
from edgemoe.collab.backends.http_pool import AsyncHTTPPool, PoolError, StatusError
from edgemoe.collab.prompts import option_letters

# Requests go out as two writes (headers, body): without TCP_NODELAY, Nagle's algorithm can hold
# the body until the server's delayed ACK, tens of milliseconds per call.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def first_token_top_logprobs(choice: dict[str, Any]) -> dict[str, float] | None:
    """``{token: logprob}`` of the first generated position, from either logprobs layout.

    Legacy completions: ``logprobs.top_logprobs[0]`` is a dict. Chat (and newer completion
    servers): ``logprobs.content[0].top_logprobs`` is a list of ``{token, logprob}``.
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    legacy = lp.get("top_logprobs")
    if isinstance(legacy, list) and legacy and isinstance(legacy[0], dict) and legacy[0]:
        return {str(k): float(v) for k, v in legacy[0].items()}
    content = lp.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        top = content[0].get("top_logprobs") or []
        out = {str(t["token"]): float(t["logprob"]) for t in top if "token" in t and "logprob" in t}
        return out or None
    return None


def letters_from_top(top: dict[str, float], letters: str) -> tuple[float, ...]:
    """Normalised log-probabilities of ``letters`` from a top-logprobs map.

    Token variants of a letter (``"A"``, ``" A"``) are summed; absent letters get half the
    smallest listed probability.
    """
    floor = min(top.values()) - math.log(2.0)
    raw = []
    for letter in letters:
        values = [v for tok, v in top.items() if tok.strip() == letter]
        raw.append(math.log(sum(math.exp(v) for v in values)) if values else floor)
    return log_softmax(raw)


def _text_of(choice: dict[str, Any]) -> str:
    if isinstance(choice.get("message"), dict):
        return str(choice["message"].get("content") or "")
    return str(choice.get("text") or "")


@dataclass
class OpenAIBackend(LLMBackend):
    """Client for one OpenAI-compatible endpoint.

    ``url`` is the server's base (``http://host:8080``; a trailing ``/v1`` is accepted).
    ``mc_endpoint`` picks ``/v1/completions`` (raw prompt, best for logprobs) or
    ``/v1/chat/completions`` (servers that only offer chat, such as some Ollama setups).
    """

    url: str = ""
    model: str = "default"
    api_key: str | None = None
    timeout_s: float = 30.0
    mc_endpoint: Literal["completions", "chat"] = "completions"
    use_logprobs: bool = True
    top_logprobs: int = 20
    max_connections: int = 256
    supported_params: ClassVar[frozenset[str]] = frozenset(PASS_THROUGH_PARAMS)
    streams: ClassVar[bool] = True

    def __post_init__(self) -> None:
        base = self.url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self._client: httpx.Client | None = None
        self._pool: AsyncHTTPPool | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client_args(self, transport: type) -> dict[str, Any]:
        n = self.max_connections
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        return {
            "transport": transport(limits=limits, socket_options=NODELAY),
            "base_url": self.base_url,
            "headers": self._headers(),
            "timeout": self.timeout_s,
            "trust_env": False,
        }

    # -- request building and parsing, shared by the sync and async paths --

    def _mc_request(self, prompt: str, n_options: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if self.mc_endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            if self.use_logprobs:
                body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        if self.use_logprobs:
            body["logprobs"] = self.top_logprobs
        return "/v1/completions", body

    def _parse_mc(self, data: dict[str, Any], n_options: int, seconds: float) -> ChoiceScores:
        letters = option_letters(n_options)
        choice = self._first_choice(data)
        top = first_token_top_logprobs(choice) if self.use_logprobs else None
        prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        if top:
            return ChoiceScores(letters_from_top(top, letters), "logprobs", seconds, prompt_tokens)
        index = letter_from_text(_text_of(choice), letters)
        return ChoiceScores(smoothed_one_hot(index, n_options), "text", seconds, prompt_tokens)

    def _chat_request(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        body = {
            **(params or {}),
            "model": self.model,
            "messages": [m.openai() for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        return "/v1/chat/completions", body

    def _parse_chat(self, data: dict[str, Any], seconds: float) -> Generation:
        choice = self._first_choice(data)
        usage = data.get("usage") or {}
        choices = tuple(c for c in data["choices"] if isinstance(c, dict))
        return Generation(
            _text_of(choice),
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            seconds,
            str(choice.get("finish_reason") or "stop"),
            choices if "message" in choice else (),
        )

    def _first_choice(self, data: Any) -> dict[str, Any]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise BackendError(f"expert {self.name!r}: reply has no choices: {str(data)[:200]}", "bad_reply")
        return choices[0]

    def _check(self, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            raise BackendError(
                f"expert {self.name!r}: HTTP {resp.status_code}: {resp.text[:200]}", "http_error"
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise BackendError(f"expert {self.name!r}: reply is not JSON", "bad_reply") from exc

    # -- blocking --

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        if self._client is None:
            self._client = httpx.Client(**self._client_args(httpx.HTTPTransport))
        with Stopwatch() as sw:
            try:
                resp = self._client.post(path, json=body)
            except httpx.HTTPError as exc:
                raise BackendError(
                    f"expert {self.name!r} at {self.base_url}: {type(exc).__name__}: {exc}", "unreachable"
                ) from exc
            data = self._check(resp)
        return data, sw.seconds

    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        data, seconds = self._post(*self._mc_request(prompt, n_options))
        return self._parse_mc(data, n_options, seconds)

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        data, seconds = self._post(*self._chat_request(messages, max_tokens, temperature, params))
        return self._parse_chat(data, seconds)

    def complete(self, prompt: str, max_tokens: int) -> Generation:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        data, seconds = self._post("/v1/completions", body)
        return self._parse_chat(data, seconds)

    def load(self) -> float:
        """Time until the endpoint answers ``/v1/models`` (the model is loaded server-side)."""
        if self._client is None:
            self._client = httpx.Client(**self._client_args(httpx.HTTPTransport))
        with Stopwatch() as sw:
            try:
                self._check(self._client.get("/v1/models"))
            except httpx.HTTPError as exc:
                raise BackendError(f"expert {self.name!r} at {self.base_url}: {exc}", "unreachable") from exc
        return sw.seconds

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        super().close()

    # -- async (the gateway's fan-out): the lean pool of http_pool.py, not httpx (see there) --

    def _pool_for_async(self) -> AsyncHTTPPool:
        if self._pool is None:
            self._pool = AsyncHTTPPool(self.base_url, self._headers(), self.max_connections)
        return self._pool

    async def _apost(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> tuple[dict[str, Any], float]:
        pool = self._pool_for_async()
        with Stopwatch() as sw:
            try:
                status, data = await asyncio.wait_for(
                    pool.request("POST", path, body, headers), self.timeout_s
                )
            except PoolError as exc:
                raise BackendError(f"expert {self.name!r} at {self.base_url}: {exc}", "unreachable") from exc
            except asyncio.TimeoutError as exc:
                raise BackendError(
                    f"expert {self.name!r}: no reply within {self.timeout_s:g} s", "timeout"
                ) from exc
            if status >= 400:
                raise BackendError(f"expert {self.name!r}: HTTP {status}: {str(data)[:200]}", "http_error")
            if not isinstance(data, dict):
                raise BackendError(f"expert {self.name!r}: reply is not a JSON object", "bad_reply")
        return data, sw.seconds

    async def ascore_choices(
        self, prompt: str, n_options: int, headers: Mapping[str, str] | None = None
    ) -> ChoiceScores:
        data, seconds = await self._apost(*self._mc_request(prompt, n_options), headers)
        return self._parse_mc(data, n_options, seconds)

    async def agenerate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Generation:
        request = self._chat_request(messages, max_tokens, temperature, params)
        data, seconds = await self._apost(*request, headers)
        return self._parse_chat(data, seconds)

    async def astream(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """The endpoint's own server-sent events, parsed, batched per network read; usage is always
        requested."""
        path, body = self._chat_request(messages, max_tokens, temperature, params)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        buffer, done = b"", False
        try:
            # Read to the end of the body (past ``[DONE]``) so the connection goes back to the pool.
            async for data in self._pool_for_async().stream("POST", path, body, headers):
                buffer += data
                batch = []
                while b"\n\n" in buffer and not done:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.splitlines():
                        payload = line[5:].strip() if line.startswith(b"data:") else b""
                        if payload == b"[DONE]":
                            done = True
                        elif payload:
                            try:
                                chunk = json.loads(payload)
                            except ValueError as exc:
                                raise BackendError(
                                    f"expert {self.name!r}: bad stream event", "bad_reply"
                                ) from exc
                            if isinstance(chunk, dict):
                                batch.append(chunk)
                if batch:
                    yield batch
        except PoolError as exc:
            raise BackendError(f"expert {self.name!r} at {self.base_url}: {exc}", "unreachable") from exc
        except StatusError as exc:
            raise BackendError(f"expert {self.name!r}: {exc}", "http_error") from exc

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        self.close()
