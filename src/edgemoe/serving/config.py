"""The gateway's settings: the ``serve:`` section of collab.yaml, its API key and its fitted gate."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgemoe.collab.backends import BackendConfig, load_experts
from edgemoe.collab.embed import Embedder, embedder_from_name
from edgemoe.collab.gate import Gate
from edgemoe.collab.profiles import CollabConfig
from edgemoe.config import check_choice, check_positive, from_dict, require
from edgemoe.errors import ConfigError


@dataclass
class ServeSettings:
    """The ``serve:`` section of collab.yaml (everything else is the MoE² core's CollabConfig).

    ``api_key_env`` names the environment variable holding the gateway's API key; it is required
    when ``host`` is not a loopback address. ``run`` is a folder written by ``edgemoe collab fit``
    on these experts (its gate and embedder weight the experts per request; without one every
    enabled expert gets equal weight). ``enabled`` is the coarse-level expert set chosen by
    ``edgemoe collab select`` (default: all).

    Limits: ``max_concurrency`` requests in flight (more get 503 with ``Retry-After``);
    ``header_timeout_s`` / ``body_timeout_s`` to receive a request's headers / body (408).
    Breaker: ``breaker_failures`` consecutive failures or timeouts open an expert's breaker; it is
    probed every ``probe_interval_s`` (one answer within ``probe_timeout_s`` closes it).

    ``energy_budget_j``: a long-run mean energy per request (J) that the gateway holds on its own
    request stream with MoE²'s online energy queue (the policy prices energy into each request's
    top-k by the queue's backlog; ``energy_queue_v`` weighs the gate's preference against it, in
    units of the budget). Unset: no queue (per-request budgets still apply).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    run: str | None = None
    enabled: list[str] | None = None
    default_category: str | None = None
    top_k: int | None = None
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 2048
    default_max_tokens: int = 128
    max_choices: int = 10
    max_n: int = 8
    max_concurrency: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    breaker_failures: int = 3
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 1.0
    log_requests: bool = True
    energy_budget_j: float | None = None
    energy_queue_v: float = 4.0

    def __post_init__(self) -> None:
        require(
            1 <= self.port <= 65535 or self.port == 0, "serve.port", f"must be in 0..65535, got {self.port}"
        )
        for name in (
            "max_body_bytes",
            "max_messages",
            "max_prompt_chars",
            "max_tokens_limit",
            "default_max_tokens",
            "max_n",
            "max_concurrency",
            "header_timeout_s",
            "body_timeout_s",
            "breaker_failures",
            "probe_interval_s",
            "probe_timeout_s",
            "energy_queue_v",
        ):
            check_positive(getattr(self, name), f"serve.{name}")
        require(2 <= self.max_choices <= 10, "serve.max_choices", f"must be in 2..10, got {self.max_choices}")
        require(
            self.default_max_tokens <= self.max_tokens_limit,
            "serve.default_max_tokens",
            f"must be <= max_tokens_limit ({self.max_tokens_limit})",
        )
        if self.top_k is not None:
            check_positive(self.top_k, "serve.top_k")
        if self.energy_budget_j is not None:
            check_positive(self.energy_budget_j, "serve.energy_budget_j")


@dataclass
class GatewayConfig:
    collab: CollabConfig
    serve: ServeSettings
    backends: dict[str, BackendConfig] = field(default_factory=dict)


def load_gateway_config(source: str | Path | dict[str, Any]) -> GatewayConfig:
    """collab.yaml → :class:`GatewayConfig` (the ``serve`` key is ours, the rest goes to the core)."""
    collab, backends, serve_raw = load_experts(source)
    serve = from_dict(ServeSettings, serve_raw, prefix="serve")
    for name in serve.enabled or []:
        check_choice(name, "serve.enabled", collab.expert_names)
    if serve.default_category is not None:
        check_choice(serve.default_category, "serve.default_category", collab.categories)
    return GatewayConfig(collab, serve, backends)


def load_fitted_gate(run: Path, names: list[str]) -> tuple[Gate, Embedder]:
    """The gate and embedder of a ``collab fit`` run folder, checked against the served experts."""
    if not (run / "gate.pt").is_file() or not (run / "run.yaml").is_file():
        raise ConfigError("serve.run", f"{run} is not a 'collab fit' run folder (needs gate.pt and run.yaml)")
    gate = Gate.load(run / "gate.pt")
    require(
        gate.experts == names, "serve.run", f"the run's gate is for experts {gate.experts}, serving {names}"
    )
    embedder = embedder_from_name(str(yaml.safe_load((run / "run.yaml").read_text()).get("embedder", "")))
    require(
        embedder.dim == gate.embed_dim,
        "serve.run",
        f"embedder gives {embedder.dim}-d, gate wants {gate.embed_dim}",
    )
    return gate, embedder


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(serve: ServeSettings, host: str | None = None) -> str | None:
    """The gateway's API key from ``serve.api_key_env``; a clear error when it is needed but unset.

    Binding anything but loopback without a key is refused: the gateway would be an open relay to
    the experts.
    """
    host = host or serve.host
    if serve.api_key_env:
        key = os.environ.get(serve.api_key_env)
        if not key:
            raise ConfigError(
                "serve.api_key_env",
                f"environment variable {serve.api_key_env} is not set; export {serve.api_key_env}=<key> "
                "(clients send it as 'Authorization: Bearer <key>')",
            )
        return key
    if not is_loopback(host):
        raise ConfigError(
            "serve.api_key_env",
            f"binding {host} (not loopback) needs an API key: set serve.api_key_env to the name of an "
            "environment variable holding it, or bind 127.0.0.1",
        )
    return None
