"""Measure each expert on this machine: load time, prefill rate, decode rate.

- load time: ``backend.load()`` from cold (for an HTTP expert: until ``/v1/models`` answers);
- prefill: the latency of scoring a long multiple-choice prompt (one forward over the prompt,
  no decoding), median of ``repeats``; rate = prompt tokens / latency;
- decode: two raw continuations of the same prompt (no chat template, so chat models that would end
  their turn at once keep going), 1 token and ``decode_tokens`` tokens; rate = extra tokens / extra
  time, so prompt processing and network overhead cancel out.

The measured per-token latencies are written into the expert's profile
(``latency_per_prompt_token_s``, ``latency_per_output_token_s``), which the MoE² core's delay model
then prefers over hardware presets. Energy stays a model, not a measurement: the expert's power
(its hardware-class preset or ``power_w`` override) times its busy time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from edgemoe.collab.backends import LLMBackend
from edgemoe.collab.profiles import ExpertProfile
from edgemoe.collab.prompts import mc_prompt

_FILLER = (
    "Edge servers differ in memory, compute and power; a request routed to a slow server waits longer, "
    "and one routed to a power-hungry server costs more energy. "
)
# A raw continuation every model keeps going with (chat models may stop at once on a chat turn).
DECODE_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@dataclass
class ProfileResult:
    """What one expert measured like; rates in tokens/s, times in s, energies in J (modelled)."""

    name: str
    hardware: str
    power_w: float
    load_s: float
    prompt_tokens: int
    prefill_s: float
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_s: float
    decode_tokens_per_s: float
    energy_per_prompt_token_j: float
    energy_per_output_token_j: float

    def row(self) -> dict[str, Any]:
        return asdict(self)


def long_prompt(approx_chars: int) -> str:
    """A multiple-choice prompt of roughly ``approx_chars`` characters (≈ chars/4 tokens)."""
    reps = max(1, approx_chars // len(_FILLER))
    question = _FILLER * reps + "Which server should answer a latency-critical request?"
    return mc_prompt(question, ["the slowest", "the fastest that fits", "a random one", "all of them"])


def profile_backend(
    backend: LLMBackend,
    profile: ExpertProfile,
    *,
    prompt_chars: int = 1024,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> ProfileResult:
    """Measure one expert (see module doc). Raises :class:`BackendError` if it cannot answer."""
    load_s = backend.load()
    prompt = long_prompt(prompt_chars)
    backend.score_choices(prompt, 4)  # warm-up: caches, first-call allocations, connections
    runs = [backend.score_choices(prompt, 4) for _ in range(repeats)]
    prefill_s = statistics.median(r.latency_s for r in runs)
    prompt_tokens = runs[0].prompt_tokens or max(1, len(prompt) // 4)
    short = [backend.complete(DECODE_PROMPT, 1) for _ in range(repeats)]
    long = [backend.complete(DECODE_PROMPT, decode_tokens) for _ in range(repeats)]
    extra_tokens = statistics.median(g.completion_tokens for g in long) - statistics.median(
        g.completion_tokens for g in short
    )
    extra_s = statistics.median(g.latency_s for g in long) - statistics.median(g.latency_s for g in short)
    decode_rate = extra_tokens / extra_s if extra_tokens > 0 and extra_s > 0 else float("nan")
    power = profile.power
    prefill_rate = prompt_tokens / prefill_s
    return ProfileResult(
        name=profile.name,
        hardware=profile.hardware,
        power_w=power,
        load_s=load_s,
        prompt_tokens=prompt_tokens,
        prefill_s=prefill_s,
        prefill_tokens_per_s=prefill_rate,
        decode_tokens=int(extra_tokens),
        decode_s=extra_s,
        decode_tokens_per_s=decode_rate,
        energy_per_prompt_token_j=power / prefill_rate,
        energy_per_output_token_j=power / decode_rate,
    )


def profiled_expert(raw: dict[str, Any], result: ProfileResult) -> dict[str, Any]:
    """The expert's YAML mapping with the measured per-token latencies filled in."""
    out = dict(raw)
    out["latency_per_prompt_token_s"] = float(f"{1.0 / result.prefill_tokens_per_s:.6g}")
    if result.decode_tokens_per_s == result.decode_tokens_per_s:  # not NaN
        out["latency_per_output_token_s"] = float(f"{1.0 / result.decode_tokens_per_s:.6g}")
    return out
