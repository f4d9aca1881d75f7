"""The gateway's wire schema: OpenAI Chat Completions (plus MoE² budget fields), the MoE² multiple
choice route, and OpenAI error objects with stable codes.

Request bodies are parsed here, not by the web framework, so every malformed body (bad JSON,
invalid UTF-8, a lone surrogate, NUL, nesting deeper than :data:`MAX_DEPTH`, a non-object) is a
400 in the OpenAI error format naming what is wrong.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemoe.collab.backends import PASS_THROUGH_PARAMS

MAX_DEPTH = 32

# HTTP status → OpenAI error ``type``.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "budget_error",
    500: "server_error",
    502: "upstream_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class RequestError(Exception):
    """A request the gateway refuses: HTTP status, message, offending field and a stable ``code``.

    Messages never hold internal URLs or errno text (those go to the log).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.headers = headers or {}
        self.code = code or {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(status)

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class ChatMessageIn(BaseModel):
    """One message; fields beyond role and content (``tool_calls``, ``tool_call_id``, ``name``) are
    kept for experts that speak the OpenAI schema."""

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

    def extra(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class BudgetFields(BaseModel):
    """MoE² extensions shared by both POST routes (all optional)."""

    model_config = ConfigDict(extra="forbid")
    category: str | None = None
    energy_budget_j: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    latency_budget_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BudgetFields):
    """``POST /v1/chat/completions``. Unknown fields are a 400 naming them (never dropped)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Passed through to the experts (PASS_THROUGH_PARAMS):
    stop: str | list[str] | None = None
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    def passthrough(self) -> dict[str, Any]:
        """The pass-through fields the client set (``n=1`` and ``logprobs=false`` are the defaults)."""
        out = {name: getattr(self, name) for name in PASS_THROUGH_PARAMS if name in self.model_fields_set}
        out = {k: v for k, v in out.items() if v is not None}
        if out.get("n") == 1:
            del out["n"]
        if out.get("logprobs") is False:
            del out["logprobs"]
        return out


class AnswerRequest(BudgetFields):
    """``POST /v1/moe2/answer``: a multiple-choice question, answered by the experts' mixture."""

    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2)
    subject: str | None = None


def _check_tree(value: Any) -> None:
    """Depth, lone surrogates and NUL characters, iteratively (no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(400, f"request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            strings = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            strings = []
            stack.extend((v, depth + 1) for v in item)
        else:
            continue
        for s in strings:
            if "\x00" in s:
                raise RequestError(400, "request body contains a NUL character")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, "request body contains a lone UTF-16 surrogate") from None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Bytes → a validated ``model`` instance, or a :class:`RequestError` (400) naming the problem."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise RequestError(400, f"request body is nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not valid UTF-8") from None
    except ValueError:
        raise RequestError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object sent with Content-Type: application/json")
    _check_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise RequestError(400, message, param) from None


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first validation problem as (message, dotted field name)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    field_ = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field (not part of the Chat Completions API or the MoE² extensions)"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{field_ or 'body'}: {msg}{more}", field_
