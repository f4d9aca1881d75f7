"""A gateway over tiny expert servers, all on loopback ports: the harness of the gateway's tests,
benchmark and documentation examples."""

from __future__ import annotations

from typing import Any

import httpx

from edgemoe.serving.config import load_gateway_config
from edgemoe.serving.launcher import start_in_thread
from edgemoe.testing.fake_openai import TinyOpenAIServer

SAMPLE_QUESTION = {"question": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus", "Earth"]}
HARDWARE = ["jetson-orin-nano", "jetson-agx-orin", "rtx-4090"]


def collab_dict(
    urls: dict[str, str], timeout_s: float = 5.0, budget_s: float = 5.0, **serve: Any
) -> dict[str, Any]:
    """A collab config: one OpenAI-backend expert per ``name: url``, hardware classes in turn."""
    experts = [
        {
            "name": name,
            "hardware": HARDWARE[i % 3],
            "params_b": 0.2,
            "backend": {"kind": "openai", "url": url, "timeout_s": timeout_s, "top_logprobs": 100},
        }
        for i, (name, url) in enumerate(urls.items())
    ]
    return {"experts": experts, "budgets": {"default_latency_s": budget_s}, "serve": serve}


class LoopbackGateway:
    """Tiny expert servers (started here) + a gateway in a thread; ``close()`` stops them all."""

    def __init__(
        self,
        servers: dict[str, TinyOpenAIServer],
        timeout_s: float = 5.0,
        budget_s: float = 5.0,
        **serve: Any,
    ):
        self.servers = {n: s.start() for n, s in servers.items()}
        urls = {n: s.url for n, s in self.servers.items()}
        self.config = load_gateway_config(collab_dict(urls, timeout_s, budget_s, **serve))
        self.http = start_in_thread(self.config)
        self.service = self.http.service
        self.url = self.http.url
        self.client = httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    def close(self) -> None:
        self.client.close()
        self.http.stop()
        for s in self.servers.values():
            s.kill()

    def __enter__(self) -> LoopbackGateway:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def metric(text: str, sample: str) -> float:
    """The value of the Prometheus sample ``sample`` (name and labels) in ``text``; 0 if absent."""
    hit = [x for x in text.splitlines() if x.startswith(sample + " ")]
    return float(hit[0].rsplit(" ", 1)[1]) if hit else 0.0
