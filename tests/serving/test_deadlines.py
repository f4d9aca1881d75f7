"""Deadlines that hold, circuit breakers that eject and readmit, and hang-ups that cancel."""

from __future__ import annotations

import socket
import time

import httpx
import openai

from edgemoe.testing import TinyOpenAIServer
from edgemoe.testing.gateway import SAMPLE_QUESTION as QUESTION
from edgemoe.testing.gateway import metric

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
FAST = {"probe_interval_s": 0.2, "probe_timeout_s": 0.3, "breaker_failures": 2}


def wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_slow_expert_is_answered_around_within_the_budget_then_ejected_and_readmitted(make_gateway):
    run = make_gateway(
        {"a": TinyOpenAIServer(1), "b": TinyOpenAIServer(2), "slow": TinyOpenAIServer(3, delay_s=3.0)},
        budget_s=0.5,
        **FAST,
    )
    for _ in range(2):
        t0 = time.perf_counter()
        r = run.client.post("/v1/moe2/answer", json=QUESTION)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        status = {e["name"]: e["status"] for e in r.json()["moe2"]["experts"]}
        assert status == {"a": "ok", "b": "ok", "slow": "timeout"}
        assert elapsed < 0.5 + 0.3, f"answered after {elapsed:.3f} s with a 0.5 s budget"
    # Two misses in a row eject it: it is no longer selected, and health and metrics say so.
    health = run.client.get("/health").json()
    assert health["status"] == "ok" and health["experts"]["slow"]["state"] == "open"
    assert metric(run.client.get("/metrics").text, 'edgemoe_expert_up{expert="slow"}') == 0
    t0 = time.perf_counter()
    r = run.client.post("/v1/moe2/answer", json=QUESTION)
    assert [e["name"] for e in r.json()["moe2"]["experts"]] == ["a", "b"] and time.perf_counter() - t0 < 0.4
    # Probes keep it out while it is slow and readmit it once it answers in time.
    time.sleep(0.5)
    assert run.client.get("/health").json()["experts"]["slow"]["state"] == "open"
    run.servers["slow"].delay_s = 0.0
    assert wait_for(lambda: run.client.get("/health").json()["experts"]["slow"]["state"] == "closed")
    assert len(run.client.post("/v1/moe2/answer", json=QUESTION).json()["moe2"]["experts"]) == 3


def test_chat_returns_when_the_first_ranked_expert_answers_and_cancels_the_rest(make_gateway):
    run = make_gateway(
        {"quick": TinyOpenAIServer(1), "stuck": TinyOpenAIServer(2, delay_s=5.0)}, budget_s=2.0
    )
    t0 = time.perf_counter()
    r = run.client.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
    block = r.json()["moe2"]
    assert (
        block["answered_by"] == "quick"
        and {e["name"]: e["status"] for e in block["experts"]}["stuck"] == "cancelled"
    )
    assert wait_for(lambda: run.servers["stuck"].abandoned == 1)  # the expert saw the hang-up


def test_no_expert_within_the_deadline_is_a_504_and_all_ejected_is_a_503(make_gateway):
    run = make_gateway({"slow": TinyOpenAIServer(1, delay_s=3.0)}, budget_s=0.3, **FAST)
    r = run.client.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    run.client.post("/v1/chat/completions", json=HELLO)
    health = run.client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    r = run.client.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 503 and r.json()["error"]["code"] == "experts_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def test_client_hang_up_cancels_the_expert_calls(make_gateway):
    run = make_gateway({"a": TinyOpenAIServer(1, delay_s=3.0), "b": TinyOpenAIServer(2, delay_s=3.0)})
    host, port = run.url.removeprefix("http://").split(":")
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.3)
    assert wait_for(lambda: run.servers["a"].abandoned == 1 and run.servers["b"].abandoned == 1, 2.0)
    text = run.client.get("/metrics").text
    assert metric(text, 'edgemoe_expert_calls_total{expert="a",outcome="cancelled"}') == 1
    assert metric(text, 'edgemoe_requests_total{route="/v1/chat/completions",status="499"}') == 1


def test_stream_hang_up_cancels_the_stream(make_gateway):
    run = make_gateway({"a": TinyOpenAIServer(1, output_token_s=0.2)})
    client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=HELLO["messages"], max_tokens=50, stream=True)
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: run.servers["a"].abandoned == 1, 3.0)


def test_request_id_is_propagated_to_the_experts(pair):
    r = pair.client.post("/v1/chat/completions", json=HELLO, headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert any(h.get("x-request-id") == "trace-42" for _, h, _ in pair.servers["alpha"].requests)
    fresh = httpx.post(pair.url + "/v1/chat/completions", json=HELLO, trust_env=False)
    assert len(fresh.headers["x-request-id"]) == 16


def test_stream_falls_back_to_a_hedge_when_the_first_ranked_expert_fails(make_gateway):
    run = make_gateway({"first": TinyOpenAIServer(1), "hedge": TinyOpenAIServer(2)})
    run.servers["first"].fail_status = 500
    client = openai.OpenAI(base_url=run.url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="m", messages=HELLO["messages"], max_tokens=4, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    block = chunks[-1].model_extra["moe2"]
    assert len(text) == 4 and block["answered_by"] == "hedge" and block["failed"] == ["first"]
    direct = client.chat.completions.create(model="hedge", messages=HELLO["messages"], max_tokens=4)
    assert text == direct.choices[0].message.content


def test_a_stream_that_stalls_ends_with_an_error_event_within_the_expert_timeout(make_gateway):
    run = make_gateway({"a": TinyOpenAIServer(1, output_token_s=5.0)}, timeout_s=0.6)
    t0 = time.perf_counter()
    with run.client.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as r:
        body = r.read().decode()
    assert r.status_code == 200 and time.perf_counter() - t0 < 3.0
    assert '"code":"stream_interrupted"' in body and body.endswith("data: [DONE]\n\n")
