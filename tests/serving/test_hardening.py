"""Hostile and broken requests: every one gets an OpenAI error object, is logged and counted, and
nothing internal leaks."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest

from edgemoe.serving.config import ServeSettings
from edgemoe.testing import TinyOpenAIServer
from edgemoe.testing.gateway import metric

HELLO = b'[{"role": "user", "content": "hi"}]'


def chat_body(extra: bytes = b"") -> bytes:
    return b'{"messages": ' + HELLO + extra + b"}"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"model": "\\ud800", "messages": ' + HELLO + b"}", "surrogate"),
        (b'{"model": "a\\u0000b", "messages": ' + HELLO + b"}", "NUL"),
        (b'{"messages": ' + HELLO + b', "user": "\xff"}', "UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nested"),
        (b'{"messages": ' + HELLO + b', "metadata": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "nested"),
        (b"", "JSON"),
    ],
)
def test_malformed_bodies_are_400_error_objects(pair, body, words):
    r = pair.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_chunked_over_size_body_is_413(pair):
    limit = ServeSettings().max_body_bytes

    def chunks():
        yield chat_body()[:-1] + b', "user": "'
        for _ in range(limit // 4096 + 2):
            yield b"x" * 4096

    r = pair.client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_routes_methods_and_internal_errors_are_error_objects(pair, monkeypatch):
    r = pair.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = pair.client.delete("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"

    async def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail at http://10.0.0.1:9")

    monkeypatch.setattr(pair.service, "chat", boom)
    r = pair.client.post("/v1/chat/completions", content=chat_body())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "10.0.0.1" not in r.text and "secret" not in r.text
    text = pair.client.get("/metrics").text
    assert metric(text, 'edgemoe_requests_total{route="/v1/chat/completions",status="500"}') == 1
    assert metric(text, 'edgemoe_requests_total{route="other",status="404"}') >= 1


def test_concurrency_limit_answers_503_with_retry_after(make_gateway):
    run = make_gateway({"a": TinyOpenAIServer(1, delay_s=0.6)}, max_concurrency=2)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(lambda _: run.client.post("/v1/chat/completions", content=chat_body()), range(4))
        )
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 1 and 503 in codes
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
    assert metric(run.client.get("/metrics").text, "edgemoe_overloaded_total") == codes.count(503)


def test_slow_headers_and_slow_bodies_are_cut_off(make_gateway):
    run = make_gateway({"a": TinyOpenAIServer(1)}, header_timeout_s=0.3, body_timeout_s=0.3)
    host, port = run.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        t0 = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 2.0
        assert sock.recv(4096) == b""  # closed
    assert metric(run.client.get("/metrics").text, 'edgemoe_requests_total{route="other",status="408"}') == 1
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b'"code":"body_timeout"' in reply


def test_no_internal_address_in_any_reply(make_gateway):
    run = make_gateway({"up": TinyOpenAIServer(1), "down": TinyOpenAIServer(2)})
    run.servers["down"].kill()
    r = run.client.post("/v1/moe2/answer", json={"question": "q", "choices": ["a", "b"]})
    assert r.status_code == 200 and r.json()["moe2"]["failed"] == ["down"]
    for text in (r.text, run.client.get("/health").text, run.client.get("/v1/models").text):
        assert "127.0.0.1" not in text and "Errno" not in text and "refused" not in text
