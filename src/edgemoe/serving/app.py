"""The gateway's HTTP app: FastAPI routes over :class:`~edgemoe.serving.service.MoE2Service`, wrapped
in one pure-ASGI middleware that does what every request needs.

Routes: ``POST /v1/chat/completions`` (``stream`` too), ``POST /v1/moe2/answer``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``. Every error, including 404, 405, parse
errors and 500s, is an OpenAI error object with a stable ``code`` (docs/serving.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from edgemoe.serving.metrics import LOG
from edgemoe.serving.protocol import AnswerRequest, ChatRequest, RequestError, parse_body
from edgemoe.serving.service import MODEL_ID, MoE2Service, dumps

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/moe2/answer")
POST_ROUTES = ("/v1/chat/completions", "/v1/moe2/answer")
CLIENT_GONE = 499  # nginx's status for "client closed the request": logged and counted, never sent


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


class EventStream(Response):
    """Server-sent events written straight to ASGI ``send`` (no task group per response, unlike
    Starlette's ``StreamingResponse``); the middleware cancels it if the client leaves."""

    def __init__(self, events: AsyncGenerator[bytes, None]):  # no Content-Length: the body is open-ended
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            await self.events.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def error_response(err: RequestError) -> JSON:
    return JSON(err.body(), status_code=err.status, headers=err.headers or None)


def _request_id(raw: bytes) -> str:
    """The client's ``x-request-id`` if it is short printable ASCII, else a fresh one."""
    text = raw.decode("latin-1")
    if text and len(text) <= 64 and text.isprintable() and text.isascii():
        return text
    return uuid.uuid4().hex[:16]


class GatewayMiddleware:
    """Pure ASGI middleware (cheaper than Starlette's ``BaseHTTPMiddleware``). Per request:
    ``x-request-id`` (taken or made, echoed, forwarded to experts), API key (all routes but
    ``/health``), the concurrency limit (503 + ``Retry-After``), the whole body read under a time
    limit (408) and a size limit (413, chunked bodies too), cancellation when the client hangs up,
    a 500 error object for anything unexpected, then one metric and one log line.
    """

    def __init__(self, app: Any, service: MoE2Service, api_key: str | None):
        self.app = app
        self.service = service
        serve = service.config.serve
        self.api_key = api_key.encode() if api_key else None
        self.limit = serve.max_body_bytes
        self.body_timeout_s = serve.body_timeout_s
        self.max_concurrency = serve.max_concurrency
        self.log = serve.log_requests
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        headers = dict(scope.get("headers") or [])
        request_id = _request_id(headers.get(b"x-request-id", b""))
        scope.setdefault("state", {}).update(request_id=request_id, t0=t0)
        sent = {"status": 0}

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        counted = scope["method"] == "POST" and path in POST_ROUTES
        try:
            err = self._refuse(path, headers, counted)
            if err is not None:
                await error_response(err)(scope, receive, tagged_send)
                return
            if counted:
                self.active += 1
                self.service.metrics.in_flight += 1
            try:
                await self._serve(scope, receive, tagged_send, headers)
            finally:
                if counted:
                    self.active -= 1
                    self.service.metrics.in_flight -= 1
        except Exception:
            LOG.exception("unhandled error", extra={"fields": {"request_id": request_id, "route": route}})
            if not sent["status"]:
                err = RequestError(500, f"internal error (request {request_id})", code="internal_error")
                with contextlib.suppress(Exception):
                    await error_response(err)(scope, receive, tagged_send)
        finally:
            self._record(scope, route, sent["status"] or CLIENT_GONE, time.perf_counter() - t0, request_id)

    def _refuse(self, path: str, headers: dict[bytes, bytes], counted: bool) -> RequestError | None:
        if self.api_key is not None and path != "/health" and not self._authorised(headers):
            return RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if counted and self.active >= self.max_concurrency:
            self.service.metrics.overloaded += 1
            return RequestError(503, f"the gateway is at its limit of {self.max_concurrency} requests in flight",
                                code="overloaded", headers={"Retry-After": "1"})  # fmt: skip
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return RequestError(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        """Read the whole body first (limits), then run the app, cancelling it if the client leaves."""
        body = b""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            except asyncio.TimeoutError:
                err = RequestError(408, f"request body not received within {self.body_timeout_s:g} s",
                                   code="body_timeout")  # fmt: skip
                await error_response(err)(scope, receive, send)
                return
            except _TooLarge:
                err = RequestError(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
                await error_response(err)(scope, receive, send)
                return
            except _Gone:
                return
        gone = asyncio.Event()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        app_task = asyncio.ensure_future(self.app(scope, replay, send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not app_task.done():
                        app_task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server itself is cancelling us
        finally:
            watcher.cancel()

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return self.api_key is not None and hmac.compare_digest(given, self.api_key)

    def _record(self, scope: Scope, route: str, status: int, seconds: float, request_id: str) -> None:
        self.service.metrics.request(route, status, seconds)
        if not self.log or route == "/metrics":
            return
        fields = {"request_id": request_id, "route": route, "method": scope["method"], "status": status,
                  "latency_ms": round(seconds * 1e3, 3)}  # fmt: skip
        block = (scope.get("state") or {}).get("moe2")
        if block is not None:
            fields |= {"category": block["category"], "experts": [e["name"] for e in block["experts"]],
                       "failed": block["failed"], "energy_j": block["energy_j"]}  # fmt: skip
        degraded = bool(block and block["degraded"]) or status >= 500
        LOG.log(logging.WARNING if degraded else logging.INFO, "request", extra={"fields": fields})


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


def _model_card(name: str, created: int, kind: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "edgemoe", "kind": kind}


def create_app(service: MoE2Service, api_key: str | None = None) -> GatewayMiddleware:
    """The ASGI application: FastAPI routes around ``service``, wrapped in :class:`GatewayMiddleware`.

    ``api_key``: the key clients must send (see :func:`edgemoe.serving.config.resolve_api_key`).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.load()
        probes = asyncio.ensure_future(service.breakers.run())
        yield
        probes.cancel()
        await service.aclose()

    app = FastAPI(title="edgemoe MoE² gateway", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)  # fmt: skip

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        err = RequestError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        # Starlette sends this, then re-raises to the middleware, which logs the traceback.
        rid = request.state.request_id
        return error_response(RequestError(500, f"internal error (request {rid})", code="internal_error"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(RequestError(400, "invalid request"))

    @app.get("/health")
    async def health() -> Response:
        ok = service.can_serve()
        body = {
            "status": "ok" if ok else "unavailable",
            "experts": {n: b.public() for n, b in service.breakers.breakers.items()},
            "enabled": service.enabled(),
            "gate": "trained" if service.trained else "uniform",
            "uptime_s": round(time.time() - service.started, 3),
        }
        return JSON(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    def cards() -> list[dict[str, Any]]:
        created = int(service.started)
        return [_model_card(MODEL_ID, created, "moe2")] + [
            _model_card(n, created, "expert") for n in service.names
        ]

    @app.get("/v1/models")
    async def models() -> Response:
        return JSON({"object": "list", "data": cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        for card in cards():
            if card["id"] == model_id:
                return JSON(card)
        raise RequestError(
            404, f"model {model_id!r} does not exist; see GET /v1/models", "model", "model_not_found"
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse_body(await request.body(), ChatRequest)
        rid = request.state.request_id
        if req.stream:
            state = request.scope["state"]
            events = await service.chat_stream(req, rid, state, request.state.t0)
            return EventStream(events)
        out = await service.chat(req, rid, request.state.t0)
        request.state.moe2 = out["moe2"]  # the middleware's log line reports it
        return JSON(out)

    @app.post("/v1/moe2/answer")
    async def answer(request: Request) -> Response:
        req = parse_body(await request.body(), AnswerRequest)
        out = await service.answer(req, request.state.request_id, request.state.t0)
        request.state.moe2 = out["moe2"]
        return JSON(out)

    return GatewayMiddleware(app, service, api_key)
