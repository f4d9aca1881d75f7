"""An OpenAI-compatible HTTP server for the tiny built-in model, with fault injection.

It speaks the parts of the OpenAI API that edge runtimes (llama.cpp server, Ollama, vLLM) share:
``/v1/completions`` with legacy ``logprobs``, ``/v1/chat/completions`` (``stream``, ``stop``,
``seed``, ``n``, ``logprobs``/``top_logprobs``, ``response_format`` JSON mode, ``tools`` with a
forced ``tool_choice``), ``/v1/models``. Every request is recorded (:attr:`TinyOpenAIServer.requests`)
so a test can check what reached the expert. Faults: answer slowly (``delay_s``), withhold
logprobs, fail with an HTTP status (``fail_status``), or die: :meth:`TinyOpenAIServer.kill` drops
every open connection, including requests in flight, and refuses new ones. A client that hangs up
while its answer is delayed is noticed and counted (:attr:`TinyOpenAIServer.abandoned`).

Run one from a shell: ``python -m edgemoe.testing --port 8101 --seed 1``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from edgemoe.collab.backends.base import Message
from edgemoe.collab.backends.tiny import VOCAB, TinyCharLM, apply_stop, chat_prompt

MAX_BODY_BYTES = 1 << 20


class _Killed(Exception):
    pass


class _Gone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TinyHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
        return

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this Nagle's algorithm holds the body
        # back until the client's delayed ACK (~40 ms per response).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.open_connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/health", ""):
            self._send(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, "request body too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._error(400, "body is not JSON")
            return
        path = self.path.rstrip("/")
        with srv.lock:
            srv.requests.append((path, dict(self.headers.items()), body))
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        route = routes.get(path)
        if route is None:
            self._error(404, f"no route {self.path}")
            return
        try:
            if srv.fail_status:
                self._wait(srv.delay_s)
                self._error(srv.fail_status, "injected failure")
                return
            payload = route(body)
            usage = payload["usage"]
            if body.get("stream") and path == "/v1/chat/completions":
                self._stream(payload, body)
                return
            self._wait(srv.delay_s + srv.prompt_token_s * usage["prompt_tokens"])
            self._wait(srv.output_token_s * usage["completion_tokens"])
        except (_Killed, _Gone):
            self.close_connection = True
            return
        except (KeyError, TypeError, ValueError) as exc:
            self._error(400, f"bad request: {exc}")
            return
        self._send(200, payload)

    def _wait(self, seconds: float) -> None:
        """Simulated compute time (sleeping, no CPU); a client that hangs up meanwhile is counted."""
        srv = self.server
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if srv.killed.wait(min(max(left, 0.0), 0.02)):
                raise _Killed
            if self._client_gone():
                with srv.lock:
                    srv.abandoned += 1
                raise _Gone
            if left <= 0:
                return

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, payload: dict[str, Any], body: dict[str, Any]) -> None:
        """Server-sent events, one character per chunk, in HTTP/1.1 chunked framing."""
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        usage = payload["usage"]
        self._wait(srv.delay_s + srv.prompt_token_s * usage["prompt_tokens"])
        for chunk in _chunks(payload, bool((body.get("stream_options") or {}).get("include_usage"))):
            self._write_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            self._wait(srv.output_token_s)
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        srv = self.server
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        max_tokens = int(body.get("max_tokens", 16))
        k = int(body.get("logprobs") or 0) if srv.offer_logprobs else 0
        ids, top = srv.decode(prompt, max_tokens, float(body.get("temperature", 0.0)), k, srv.seed)
        text = "".join(VOCAB[i] for i in ids)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        if top and ids:
            choice["logprobs"] = {
                "tokens": [text[0]],
                "token_logprobs": [top.get(text[0], min(top.values()))],
                "top_logprobs": [top],
                "text_offset": [len(prompt)],
            }
        return _reply("text_completion", srv.model_name, [choice], len(prompt), len(ids))

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        srv = self.server
        messages = [Message(str(m["role"]), str(m.get("content") or "")) for m in body["messages"]]
        prompt = chat_prompt(messages)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        k = int(body.get("top_logprobs") or 1) if srv.offer_logprobs and body.get("logprobs") else 0
        seed = int(body.get("seed", srv.seed))
        ids, top = srv.decode(prompt, max_tokens, float(body.get("temperature") or 0.0), k, seed)
        text, stopped = apply_stop("".join(VOCAB[i] for i in ids), body.get("stop"))
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = "stop" if stopped else "length"
        if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            message["content"] = json.dumps({"answer": text})
            finish = "stop"
        tool = _forced_tool(body)
        if tool is not None:
            call = {"id": f"call_{seed}", "type": "function", "function": {"name": tool, "arguments": "{}"}}
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        logprobs = None
        if top and text:
            logprobs = {
                "content": [
                    {
                        "token": text[0],
                        "logprob": top.get(text[0], min(top.values())),
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()],
                    }
                ]
            }
        n = int(body.get("n") or 1)
        choices = [
            {"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs} for i in range(n)
        ]
        completion = len(text) if stopped else len(ids)
        return _reply("chat.completion", srv.model_name, choices, len(prompt), completion * n)


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The function a request forces (``tool_choice`` naming one, or ``required``), if any."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    if choice == "required" and tools:
        return str(tools[0]["function"]["name"])
    return None


def _chunks(payload: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """A chat completion as the stream of chunks an OpenAI server sends for it."""
    head = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
            "model": payload["model"]}  # fmt: skip
    for choice in payload["choices"]:
        message, i = choice["message"], choice["index"]
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]}
        if message.get("tool_calls"):
            calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
            yield {**head, "choices": [{"index": i, "delta": {"tool_calls": calls}}]}
        for ch in message.get("content") or "":
            yield {**head, "choices": [{"index": i, "delta": {"content": ch}, "logprobs": None}]}
        yield {**head, "choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}]}
    if include_usage:
        yield {**head, "choices": [], "usage": payload["usage"]}


def _reply(obj: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """An OpenAI response envelope with its choices and token usage."""
    return {
        "id": f"{'cmpl' if obj == 'text_completion' else 'chatcmpl'}-{time.monotonic_ns()}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _TinyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], model: TinyCharLM, **settings: Any):
        super().__init__(addr, _Handler)
        self.model = model
        self.model_name: str = settings["model_name"]
        self.seed: int = settings["seed"]
        self.delay_s: float = settings["delay_s"]
        self.offer_logprobs: bool = settings["offer_logprobs"]
        self.prompt_token_s: float = settings["prompt_token_s"]
        self.output_token_s: float = settings["output_token_s"]
        self.fail_status: int | None = None
        self.decode = functools.lru_cache(maxsize=4096)(self._decode)
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.open_connections: set[socket.socket] = set()
        self.requests: collections.deque = collections.deque(maxlen=256)
        self.abandoned = 0

    def _decode(
        self, prompt: str, max_tokens: int, temperature: float, k: int, seed: int
    ) -> tuple[list[int], dict]:
        """Generated ids and the top-``k`` first-token logprobs; memoised (the model is deterministic,
        so a repeated request costs no compute, which keeps load tests about the HTTP path)."""
        ids = self.model.generate(prompt, max_tokens, temperature, seed)
        return ids, (self.model.top_logprobs(prompt, k) if k else {})

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up, or a connection dropped by :meth:`TinyOpenAIServer.kill`: not news."""
        return


class TinyOpenAIServer:
    """OpenAI-compatible server for a :class:`TinyCharLM` on a background thread.

    ``port=0`` takes an ephemeral port; :attr:`url` is the base URL to give a client.
    ``delay_s``, ``prompt_token_s`` and ``output_token_s`` make each answer take
    ``delay_s + prompt_token_s·prompt_tokens + output_token_s·output_tokens`` seconds longer: the
    timing of an edge LLM with known prefill and decode rates (sleeping, so it costs no CPU).
    ``delay_s`` and ``fail_status`` can be changed while it runs. Use as a context manager, or
    call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        letter_bias: Mapping[str, float] | None = None,
        delay_s: float = 0.0,
        prompt_token_s: float = 0.0,
        output_token_s: float = 0.0,
        offer_logprobs: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
    ):
        self.model = TinyCharLM(seed=seed, letter_bias=letter_bias)
        self._httpd = _TinyHTTPServer(
            (host, port),
            self.model,
            model_name=model_name or f"tiny-{seed}",
            seed=seed,
            delay_s=delay_s,
            prompt_token_s=prompt_token_s,
            output_token_s=output_token_s,
            offer_logprobs=offer_logprobs,
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    @property
    def delay_s(self) -> float:
        return self._httpd.delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._httpd.delay_s = value

    @property
    def fail_status(self) -> int | None:
        return self._httpd.fail_status

    @fail_status.setter
    def fail_status(self, value: int | None) -> None:
        self._httpd.fail_status = value

    @property
    def requests(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        """(path, headers, JSON body) of the POSTs received, oldest first (the last 256)."""
        with self._httpd.lock:
            return list(self._httpd.requests)

    @property
    def abandoned(self) -> int:
        """Requests whose client hung up before the answer was ready."""
        return self._httpd.abandoned

    def start(self) -> TinyOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def kill(self) -> None:
        """Die like a crashed server: abort requests in flight, drop connections, refuse new ones."""
        httpd = self._httpd
        httpd.killed.set()
        with httpd.lock:
            conns = list(httpd.open_connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def __enter__(self) -> TinyOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a tiny built-in model over the OpenAI API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--prompt-token-s", type=float, default=0.0, help="seconds added per prompt token")
    parser.add_argument("--output-token-s", type=float, default=0.0, help="seconds added per output token")
    parser.add_argument("--no-logprobs", action="store_true", help="behave like an endpoint without logprobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    server = TinyOpenAIServer(
        args.seed,
        delay_s=args.delay,
        prompt_token_s=args.prompt_token_s,
        output_token_s=args.output_token_s,
        offer_logprobs=not args.no_logprobs,
        host=args.host,
        port=args.port,
    )
    print(f"tiny OpenAI-compatible expert on {server.url}", flush=True)
    server.serve_forever()
    return 0
