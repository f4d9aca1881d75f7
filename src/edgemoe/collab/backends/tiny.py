"""A tiny character-level language model built in code, and an OpenAI-compatible HTTP server for it.

It stands in for a real edge LLM wherever downloads are not allowed: tests, the gateway benchmark
and the quick start. The server speaks the parts of the OpenAI API that edge runtimes (llama.cpp
server, Ollama, vLLM) share: ``/v1/completions`` with legacy ``logprobs``, ``/v1/chat/completions``
with ``logprobs``/``top_logprobs``, ``/v1/models``. It can be told to answer slowly (``delay_s``),
to withhold logprobs, or to die: :meth:`TinyOpenAIServer.kill` drops every open connection,
including requests in flight, and refuses new ones — what a crashed edge server looks like.

Run one from a shell: ``python -m edgemoe.collab.backends.tiny --port 8101 --seed 1``.
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import string
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import nn

from edgemoe.collab.backends.base import (
    ChoiceScores,
    ExpertBackend,
    Generation,
    Message,
    Stopwatch,
    log_softmax,
    option_letters,
)

VOCAB = string.printable
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]
MAX_BODY_BYTES = 1 << 20


class TinyCharLM(nn.Module):
    """Next-character model: recency-weighted mean of character embeddings -> MLP -> logits.

    Weights come from ``seed``, so two seeds are two different "experts". ``letter_bias`` adds a
    fixed logit to chosen characters, which lets tests build experts with known preferences.
    """

    def __init__(self, dim: int = 32, seed: int = 0, letter_bias: Mapping[str, float] | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        vocab = len(VOCAB)
        self.embed_VD = nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.hidden_DD = nn.Parameter(torch.randn(dim, dim, generator=gen) / dim**0.5)
        self.out_DV = nn.Parameter(torch.randn(dim, vocab, generator=gen) / dim**0.5)
        bias_V = torch.zeros(vocab)
        for ch, value in (letter_bias or {}).items():
            bias_V[_INDEX[ch]] = float(value)
        self.register_buffer("bias_V", bias_V)
        self.requires_grad_(False)

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text] or [_UNKNOWN], dtype=torch.long)

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the character after ``ids_T``."""
        T = ids_T.shape[0]
        weight_T = torch.exp(-torch.arange(T - 1, -1, -1, dtype=torch.float32) / 8.0)
        pooled_D = (weight_T[:, None] * self.embed_VD[ids_T]).sum(0) / weight_T.sum()
        return torch.tanh(pooled_D @ self.hidden_DD) @ self.out_DV + self.bias_V

    @torch.no_grad()
    def letter_logprobs(self, prompt: str, n_options: int) -> tuple[float, ...]:
        letters = option_letters(n_options)
        logits_V = self(self.encode(prompt))
        return log_softmax(logits_V[[_INDEX[ch] for ch in letters]].tolist())

    @torch.no_grad()
    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """Greedy (``temperature == 0``) or sampled decoding, one character per token."""
        gen = torch.Generator().manual_seed(seed)
        ids_T = self.encode(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            logits_V = self(ids_T)
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits_V / temperature, -1), 1, generator=gen))
            else:
                nxt = int(logits_V.argmax())
            out.append(nxt)
            ids_T = torch.cat([ids_T, torch.tensor([nxt])])
        return out

    @torch.no_grad()
    def top_logprobs(self, prompt: str, k: int) -> dict[str, float]:
        """The ``k`` most likely next characters with their log-probabilities."""
        logp_V = torch.log_softmax(self(self.encode(prompt)), -1)
        values, idx = logp_V.topk(min(k, logp_V.shape[0]))
        return {VOCAB[i]: float(v) for v, i in zip(values.tolist(), idx.tolist())}


def chat_prompt(messages: Sequence[Message]) -> str:
    """Plain-text chat transcript ending with the assistant's turn."""
    turns = "".join(f"{m.role}: {m.content}\n" for m in messages)
    return f"{turns}assistant:"


@dataclass
class TinyBackend(ExpertBackend):
    """The tiny model run in this process (no network), for local smoke runs and tests."""

    seed: int = 0
    letter_bias: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = TinyCharLM(seed=self.seed, letter_bias=self.letter_bias)

    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        with Stopwatch() as sw:
            logprobs = self.model.letter_logprobs(prompt, n_options)
        return ChoiceScores(logprobs, "logits", sw.seconds, len(prompt))

    def generate(self, messages: Sequence[Message], max_tokens: int, temperature: float = 0.0) -> Generation:
        return self._continue(chat_prompt(messages), max_tokens, temperature)

    def complete(self, prompt: str, max_tokens: int) -> Generation:
        return self._continue(prompt, max_tokens, 0.0)

    def _continue(self, prompt: str, max_tokens: int, temperature: float) -> Generation:
        with Stopwatch() as sw:
            ids = self.model.generate(prompt, max_tokens, temperature, self.seed)
        return Generation("".join(VOCAB[i] for i in ids), len(prompt), len(ids), sw.seconds, "length")


class _Killed(Exception):
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
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, "request body too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._error(400, "body is not JSON")
            return
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._error(404, f"no route {self.path}")
            return
        try:
            status, payload = route(body)
            usage = payload["usage"]
            self._wait_delay(usage["prompt_tokens"], usage["completion_tokens"])
        except _Killed:
            self.close_connection = True
            return
        except (KeyError, TypeError, ValueError) as exc:
            self._error(400, f"bad request: {exc}")
            return
        self._send(status, payload)

    def _wait_delay(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Simulated compute time: fixed + per prompt token + per output token (0 = none)."""
        srv = self.server
        delay = srv.delay_s + srv.prompt_token_s * prompt_tokens + srv.output_token_s * completion_tokens
        if srv.killed.wait(delay) if delay > 0 else srv.killed.is_set():
            raise _Killed

    def _completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        srv = self.server
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        max_tokens = int(body.get("max_tokens", 16))
        k = int(body.get("logprobs") or 0) if srv.offer_logprobs else 0
        ids, top = srv.decode(prompt, max_tokens, float(body.get("temperature", 0.0)), k)
        text = "".join(VOCAB[i] for i in ids)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        if top and ids:
            choice["logprobs"] = {
                "tokens": [text[0]],
                "token_logprobs": [top.get(text[0], min(top.values()))],
                "top_logprobs": [top],
                "text_offset": [len(prompt)],
            }
        return 200, _reply("text_completion", srv.model_name, choice, len(prompt), len(ids))

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        srv = self.server
        messages = [Message(str(m["role"]), str(m["content"])) for m in body["messages"]]
        prompt = chat_prompt(messages)
        max_tokens = int(body.get("max_tokens") or 16)
        k = int(body.get("top_logprobs") or 1) if srv.offer_logprobs and body.get("logprobs") else 0
        ids, top = srv.decode(prompt, max_tokens, float(body.get("temperature", 0.0)), k)
        text = "".join(VOCAB[i] for i in ids)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
            "logprobs": None,
        }
        if top and ids:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": text[0],
                        "logprob": top.get(text[0], min(top.values())),
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()],
                    }
                ]
            }
        return 200, _reply("chat.completion", srv.model_name, choice, len(prompt), len(ids))


def _reply(obj: str, model: str, choice: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict:
    """An OpenAI response envelope with one choice and its token usage."""
    return {
        "id": f"{'cmpl' if obj == 'text_completion' else 'chatcmpl'}-{time.monotonic_ns()}",
        "object": obj,
        "model": model,
        "choices": [choice],
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
        self.decode = functools.lru_cache(maxsize=4096)(self._decode)
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.open_connections: set[socket.socket] = set()

    def _decode(self, prompt: str, max_tokens: int, temperature: float, k: int) -> tuple[list[int], dict]:
        """Generated ids and the top-``k`` first-token logprobs; memoised (the model is deterministic,
        so a repeated request costs no compute, which keeps load tests about the HTTP path)."""
        ids = self.model.generate(prompt, max_tokens, temperature, self.seed)
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
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
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
        return f"http://{host}:{port}"

    @property
    def delay_s(self) -> float:
        return self._httpd.delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._httpd.delay_s = value

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
    try:
        server._httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
