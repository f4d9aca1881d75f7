"""The MoE² gateway over real loopback HTTP: tiny experts behind OpenAI-compatible servers."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from edgemoe.collab.backends.openai_http import OpenAIBackend
from edgemoe.collab.prompts import gate_prompt, mc_prompt
from edgemoe.config import ConfigError
from edgemoe.serving.config import ServeSettings, load_gateway_config, resolve_api_key
from edgemoe.serving.service import MoE2Service
from edgemoe.testing import TinyOpenAIServer
from edgemoe.testing.gateway import SAMPLE_QUESTION as QUESTION
from edgemoe.testing.gateway import collab_dict, metric


def direct_probs(url: str, body: dict) -> np.ndarray:
    backend = OpenAIBackend("ref", url=url, top_logprobs=100)
    try:
        return backend.score_choices(mc_prompt(body["question"], body["choices"]), len(body["choices"])).probs
    finally:
        backend.close()


def test_answer_is_the_weighted_mixture_of_the_experts(pair):
    r = pair.client.post("/v1/moe2/answer", json={**QUESTION, "category": "stem"})
    assert r.status_code == 200, r.text
    out = r.json()
    block = out["moe2"]
    assert {e["name"] for e in block["experts"]} == {"alpha", "beta"}
    assert all(e["status"] == "ok" and e["latency_s"] > 0 and e["energy_j"] > 0 for e in block["experts"])
    assert not block["degraded"] and block["failed"] == []
    weights = {e["name"]: e["weight"] for e in block["experts"]}
    assert sum(weights.values()) == pytest.approx(1.0)
    # The reference: the gate-weighted mixture of the two experts called directly.
    ref = sum(weights[n] * direct_probs(pair.servers[n].url, QUESTION) for n in ("alpha", "beta"))
    np.testing.assert_allclose(out["probs"], ref, atol=1e-5)
    assert out["answer"] == "ABCD"[int(np.argmax(ref))]
    assert block["energy_j"] == pytest.approx(sum(e["energy_j"] for e in block["experts"]), rel=1e-4)


def test_chat_completion_speaks_the_openai_schema(pair):
    body = {"model": "edgemoe", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6}
    r = pair.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "edgemoe"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"]) == 6
    block = out["moe2"]
    best = max(block["experts"], key=lambda e: e["weight"])
    assert block["answered_by"] == best["name"]
    # usage sums every expert that answered (a cancelled hedge reports nothing).
    answered = [e for e in block["experts"] if e["status"] == "ok"]
    assert out["usage"]["completion_tokens"] == 6 * len(answered)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 6 * len(answered)
    # Content parts (the format newer OpenAI clients send) are accepted too.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}], "max_tokens": 6}
    assert pair.client.post("/v1/chat/completions", json=parts).json()["choices"] == out["choices"]


def test_fan_out_is_concurrent(make_gateway):
    run = make_gateway({"slow1": TinyOpenAIServer(1, delay_s=0.6), "slow2": TinyOpenAIServer(2, delay_s=0.6)})
    t0 = time.perf_counter()
    r = run.client.post("/v1/moe2/answer", json=QUESTION)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200
    assert [e["status"] for e in r.json()["moe2"]["experts"]] == ["ok", "ok"]
    assert elapsed < 1.15, f"two 0.6 s experts took {elapsed:.2f} s: not called concurrently"


def test_expert_killed_mid_request_degrades_and_says_so(make_gateway):
    run = make_gateway(
        {
            "steady": TinyOpenAIServer(1, letter_bias={"C": 6.0}, delay_s=0.3),
            "doomed": TinyOpenAIServer(2, letter_bias={"B": 6.0}, delay_s=3.0),
        }
    )
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(r=run.client.post("/v1/moe2/answer", json=QUESTION))
    )
    worker.start()
    time.sleep(0.15)  # both requests are in flight now
    run.servers["doomed"].kill()
    worker.join(timeout=10)
    r = result["r"]
    assert r.status_code == 200, r.text
    block = r.json()["moe2"]
    assert block["degraded"] and block["failed"] == ["doomed"]
    status = {e["name"]: e for e in block["experts"]}
    # The public error is a category: no URL, no errno text.
    assert status["doomed"]["status"] == "failed" and status["doomed"]["error"] == "unreachable"
    assert status["doomed"]["weight"] == 0
    assert status["steady"]["weight"] == pytest.approx(1.0)
    assert r.json()["answer"] == "C"
    # The dead expert keeps failing fast; the gateway keeps answering.
    again = run.client.post("/v1/moe2/answer", json=QUESTION).json()["moe2"]
    assert again["failed"] == ["doomed"]
    metrics = run.client.get("/metrics").text
    assert 'edgemoe_expert_calls_total{expert="doomed",outcome="failed"} 2' in metrics
    assert "edgemoe_degraded_responses_total 2" in metrics
    # With every expert gone the answer is a clear 5xx naming no internal address.
    run.servers["steady"].kill()
    gone = run.client.post("/v1/moe2/answer", json=QUESTION)
    assert gone.status_code == 502 and gone.json()["error"]["code"] == "experts_unavailable"
    assert "127.0.0.1" not in gone.text and "Errno" not in gone.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "colour": "blue"},
            "colour",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 3}, "top_p"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": 9},
            "temperature",
        ),
        ("/v1/moe2/answer", {**QUESTION, "energy_budget_j": -1}, "energy_budget_j"),
        ("/v1/moe2/answer", {**QUESTION, "latency_budget_s": 0}, "latency_budget_s"),
        ("/v1/moe2/answer", {**QUESTION, "latency_budget_s": "soon"}, "latency_budget_s"),
        ("/v1/moe2/answer", {**QUESTION, "top_k": 0}, "top_k"),
        ("/v1/moe2/answer", {**QUESTION, "category": "astrology"}, "category"),
        ("/v1/moe2/answer", {"question": "q", "choices": ["only one"]}, "choices"),
        ("/v1/moe2/answer", {"question": "q", "choices": [str(i) for i in range(11)]}, "choices"),
        ("/v1/moe2/answer", {**QUESTION, "colour": "blue"}, "colour"),
        ("/v1/moe2/answer", {"choices": ["a", "b"]}, "question"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(pair, path, body, param):
    r = pair.client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_and_oversized_bodies(pair):
    r = pair.client.post(
        "/v1/moe2/answer", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = pair.client.post("/v1/moe2/answer", content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    for bad in (float("inf"), float("nan")):
        body = json.dumps({**QUESTION, "energy_budget_j": bad})
        r = pair.client.post("/v1/moe2/answer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "energy_budget_j"
    limit = ServeSettings().max_body_bytes
    r = pair.client.post("/v1/moe2/answer", json={**QUESTION, "question": "x" * (limit + 1)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    many = {"messages": [{"role": "user", "content": "x"}] * (ServeSettings().max_messages + 1)}
    assert pair.client.post("/v1/chat/completions", json=many).status_code == 413
    long = {"messages": [{"role": "user", "content": "y" * (ServeSettings().max_prompt_chars + 1)}]}
    assert pair.client.post("/v1/chat/completions", json=long).status_code == 413


def test_budgets_choose_experts_or_refuse_with_422(pair):
    ok = pair.client.post("/v1/moe2/answer", json={**QUESTION, "top_k": 1}).json()["moe2"]
    assert len(ok["experts"]) == 1 and ok["experts"][0]["weight"] == pytest.approx(1.0)
    r = pair.client.post("/v1/moe2/answer", json={**QUESTION, "latency_budget_s": 1e-6})
    assert r.status_code == 422
    err = r.json()["error"]
    assert (
        err["code"] == "budget_infeasible"
        and err["param"] == "latency_budget_s"
        and "fastest" in err["message"]
    )
    r = pair.client.post("/v1/moe2/answer", json={**QUESTION, "energy_budget_j": 1e-9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "energy_budget_j"
    # The policy's predicted energy of both experts, then a budget that fits only one of them.
    both = pair.client.post("/v1/moe2/answer", json=QUESTION).json()["moe2"]
    prompt = mc_prompt(QUESTION["question"], QUESTION["choices"])
    full = pair.service.policy.route(prompt, "other", gate_text=gate_prompt(**QUESTION), output_tokens=1)
    assert both["predicted"]["energy_j"] == pytest.approx(full.energy_j, rel=1e-4)
    budget = full.energy_j * 0.99
    one = pair.client.post("/v1/moe2/answer", json={**QUESTION, "energy_budget_j": budget}).json()["moe2"]
    assert len(one["experts"]) == 1 and one["predicted"]["energy_j"] <= budget
    assert one["experts"][0]["weight"] == pytest.approx(1.0)


def test_api_key_is_required_when_set_or_off_loopback(monkeypatch, make_gateway):
    monkeypatch.setenv("EDGEMOE_TEST_KEY", "s3cret")
    run = make_gateway({"one": TinyOpenAIServer(1)}, api_key_env="EDGEMOE_TEST_KEY")
    assert run.client.get("/health").status_code == 200
    r = run.client.post("/v1/moe2/answer", json=QUESTION)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    bad = {"Authorization": "Bearer nope"}
    assert run.client.post("/v1/moe2/answer", json=QUESTION, headers=bad).status_code == 401
    assert run.client.get("/metrics").status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert run.client.post("/v1/moe2/answer", json=QUESTION, headers=good).status_code == 200
    assert (
        run.client.post("/v1/moe2/answer", json=QUESTION, headers={"x-api-key": "s3cret"}).status_code == 200
    )
    # 401s are counted like any other answer.
    assert (
        'edgemoe_requests_total{route="/v1/moe2/answer",status="401"} 2'
        in run.client.get("/metrics", headers=good).text
    )
    monkeypatch.delenv("EDGEMOE_TEST_KEY")
    serve = ServeSettings(api_key_env="EDGEMOE_TEST_KEY")
    with pytest.raises(ConfigError, match="EDGEMOE_TEST_KEY is not set"):
        resolve_api_key(serve)
    # Binding beyond loopback without a key is refused; loopback is fine.
    with pytest.raises(ConfigError, match=r"serve\.api_key_env.*0\.0\.0\.0"):
        resolve_api_key(ServeSettings(), host="0.0.0.0")
    assert resolve_api_key(ServeSettings(), host="127.0.0.1") is None
    assert resolve_api_key(ServeSettings(), host="::1") is None


def test_health_metrics_and_defaults(pair):
    health = pair.client.get("/health").json()
    assert (
        health["status"] == "ok"
        and list(health["experts"]) == ["alpha", "beta"]
        and health["gate"] == "uniform"
    )
    assert health["experts"]["alpha"]["state"] == "closed"
    before = pair.client.get("/metrics").text
    pair.client.post("/v1/moe2/answer", json=QUESTION)
    text = pair.client.get("/metrics").text
    assert "# TYPE edgemoe_requests_total counter" in text
    key = 'edgemoe_requests_total{route="/v1/moe2/answer",status="200"}'
    assert metric(text, key) == metric(before, key) + 1
    assert metric(text, 'edgemoe_expert_calls_total{expert="alpha",outcome="ok"}') >= 1
    assert metric(text, 'edgemoe_expert_tokens_total{expert="alpha",kind="prompt"}') > 0
    assert metric(text, 'edgemoe_expert_up{expert="alpha"}') == 1
    assert ServeSettings().host == "127.0.0.1"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"experts\[0\]\.backend\.url"):
        load_gateway_config({"experts": [{"name": "x", "backend": {"kind": "openai", "url": "ftp://x"}}]})
    with pytest.raises(ConfigError, match=r"experts\[0\]\.backend\.kind.*'llama_cpp', 'openai'"):
        load_gateway_config({"experts": [{"name": "x", "backend": {"kind": "ollama"}}]})
    with pytest.raises(ConfigError, match=r"experts\[0\]\.backend"):
        load_gateway_config({"experts": [{"name": "x"}]})
    with pytest.raises(ConfigError, match=r"serve\.enabled"):
        load_gateway_config(
            {"experts": [{"name": "x", "backend": {"kind": "tiny"}}], "serve": {"enabled": ["y"]}}
        )
    with pytest.raises(ConfigError, match=r"serve\.max_body_bytes"):
        load_gateway_config(
            {"experts": [{"name": "x", "backend": {"kind": "tiny"}}], "serve": {"max_body_bytes": 0}}
        )


def test_fitted_gate_weights_the_experts(tmp_path, make_gateway):
    """With a ``collab fit`` run the weights are the gate's softmax for the question, not uniform."""
    import torch
    import yaml

    from edgemoe.collab.embed import HashingEmbedder
    from edgemoe.collab.gate import Gate, GateConfig

    cats = ["stem", "humanities", "social_sciences", "other"]
    gate = Gate(128, ["alpha", "beta"], cats, GateConfig(hidden=8))
    with torch.no_grad():
        gate.mlp[-1].bias.copy_(torch.tensor([0.0, 1.5]))  # beta favoured, by a known margin
    run = tmp_path / "fit"
    gate.save(run / "gate.pt")
    (run / "run.yaml").write_text(yaml.safe_dump({"embedder": "hashing-128"}))
    servers = {"alpha": TinyOpenAIServer(1), "beta": TinyOpenAIServer(2)}
    run_gw = make_gateway(servers, run=str(run))
    out = run_gw.client.post("/v1/moe2/answer", json={**QUESTION, "category": "humanities"}).json()
    logits = gate.logits(HashingEmbedder(128).encode([gate_prompt(**QUESTION)]), [1])[0]
    expected = np.exp(logits) / np.exp(logits).sum()
    weights = {e["name"]: e["weight"] for e in out["moe2"]["experts"]}
    np.testing.assert_allclose([weights["alpha"], weights["beta"]], expected, atol=1e-6)
    assert weights["beta"] > weights["alpha"]
    top1 = run_gw.client.post("/v1/moe2/answer", json={**QUESTION, "top_k": 1}).json()["moe2"]["experts"]
    assert [e["name"] for e in top1] == ["beta"]
    assert run_gw.client.get("/health").json()["gate"] == "trained"
    urls = {n: s.url for n, s in servers.items()}
    with pytest.raises(ConfigError, match="serve.run"):
        MoE2Service(load_gateway_config(collab_dict(urls, run=str(tmp_path))))  # not a run folder


def test_energy_queue_holds_the_streams_mean_energy(make_gateway):
    """With ``serve.energy_budget_j`` the gateway prices energy by its own stream's backlog: once the
    realised energy overshoots a budget no set can meet, only the best-ranked expert serves."""
    servers = {n: TinyOpenAIServer(i + 1) for i, n in enumerate(("a", "b", "c"))}
    free = make_gateway(servers)
    three = free.client.post("/v1/moe2/answer", json=QUESTION).json()["moe2"]
    assert len(three["experts"]) == 3 and free.service.policy.energy_queue is None
    servers = {n: TinyOpenAIServer(i + 1) for i, n in enumerate(("a", "b", "c"))}
    run = make_gateway(servers, energy_budget_j=1e-9)
    sizes = [
        len(run.client.post("/v1/moe2/answer", json=QUESTION).json()["moe2"]["experts"]) for _ in range(4)
    ]
    queue = run.service.policy.energy_queue
    assert sizes[0] == 3 and sizes[1:] == [1, 1, 1]
    assert queue.requests == 4 and queue.backlog_j > 0 and queue.mean_energy_j > 0
    with pytest.raises(ConfigError, match="serve.energy_budget_j"):
        ServeSettings(energy_budget_j=-1.0)
