"""Expert profiles, request categories and budgets for MoE² (typed config, loaded from YAML).

An expert is an LLM on an edge server. Its profile says how fast it computes (prefill and decode
rates, or measured per-token latencies), how much power it draws while busy, and how fast its link
is. Hardware-class presets fill in whatever the user leaves out; every preset value can be
overridden per expert. The ``skill`` block only feeds the profile-driven answer generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from edgemoe.config import (
    ConfigError,
    check_choice,
    check_positive,
    check_range,
    from_dict,
    load_yaml,
    require,
)

MMLU_CATEGORIES: tuple[str, ...] = ("stem", "humanities", "social_sciences", "other")


@dataclass(frozen=True)
class HardwarePreset:
    """Typical figures of one hardware class, for a reference model of ``ref_params_b`` billion params.

    Prefill/decode throughput scale inversely with model size (memory- and compute-bound alike).
    """

    power_w: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ref_params_b: float = 1.0


# Our own round figures (fp16 1B-parameter model, batch 1): Jetson AGX Orin in its 50 W mode,
# RTX 4090 under LLM load (well below its 450 W TDP at batch 1).
HARDWARE_PRESETS: dict[str, HardwarePreset] = {
    "jetson-agx-orin": HardwarePreset(power_w=40.0, prefill_tokens_per_s=2000.0, decode_tokens_per_s=45.0),
    "jetson-orin-nano": HardwarePreset(power_w=12.0, prefill_tokens_per_s=500.0, decode_tokens_per_s=15.0),
    "rtx-4090": HardwarePreset(power_w=300.0, prefill_tokens_per_s=20000.0, decode_tokens_per_s=250.0),
}
HARDWARE_CLASSES: tuple[str, ...] = (*HARDWARE_PRESETS, "custom")


@dataclass
class SkillProfile:
    """Simulated accuracy of an expert: ``base`` accuracy plus a per-category offset (generator only)."""

    base: float = 0.55
    categories: dict[str, float] = field(default_factory=dict)
    subject_jitter: float = 0.08
    sharpness: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.base, "skill.base", 0.0, 1.0)
        for cat, off in self.categories.items():
            check_range(off, f"skill.categories.{cat}", -1.0, 1.0)
        check_positive(self.subject_jitter, "skill.subject_jitter", allow_zero=True)
        check_positive(self.sharpness, "skill.sharpness")


@dataclass
class ExpertProfile:
    """One edge LLM expert.

    Speed comes from, in order of precedence: measured latencies (``latency_per_prompt_token_s``,
    ``latency_per_output_token_s``), explicit rates (``prefill_tokens_per_s``, ``decode_tokens_per_s``),
    or the hardware preset scaled by ``params_b``. ``model`` and ``backend`` are free-form settings for
    real-LLM backends; the simulator ignores them.
    """

    name: str
    hardware: str = "jetson-agx-orin"
    params_b: float = 1.0
    power_w: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    latency_per_prompt_token_s: float | None = None
    latency_per_output_token_s: float | None = None
    fixed_latency_s: float = 0.0
    link_mbps: float = 100.0
    link_rtt_s: float = 0.005
    tx_power_w: float = 0.0
    skill: SkillProfile = field(default_factory=SkillProfile)
    model: str | None = None
    backend: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and self.name != "", "name", "must be a non-empty string")
        check_choice(self.hardware, "hardware", HARDWARE_CLASSES)
        check_positive(self.params_b, "params_b")
        for fname in (
            "power_w",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "latency_per_prompt_token_s",
            "latency_per_output_token_s",
        ):
            value = getattr(self, fname)
            if value is not None:
                check_positive(value, fname, allow_zero=fname.startswith("latency"))
        check_positive(self.fixed_latency_s, "fixed_latency_s", allow_zero=True)
        check_positive(self.link_mbps, "link_mbps")
        check_positive(self.link_rtt_s, "link_rtt_s", allow_zero=True)
        check_positive(self.tx_power_w, "tx_power_w", allow_zero=True)
        if self.hardware == "custom":
            require(self.power_w is not None, "power_w", "is required when hardware is 'custom'")
            has_speed = self.prefill_tokens_per_s is not None or self.latency_per_prompt_token_s is not None
            has_speed = has_speed and (
                self.decode_tokens_per_s is not None or self.latency_per_output_token_s is not None
            )
            require(
                has_speed,
                "prefill_tokens_per_s",
                "hardware 'custom' needs prefill/decode rates or measured per-token latencies",
            )

    @property
    def preset(self) -> HardwarePreset | None:
        return HARDWARE_PRESETS.get(self.hardware)

    @property
    def power(self) -> float:
        """Power draw while computing (W)."""
        if self.power_w is not None:
            return float(self.power_w)
        p = self.preset
        assert p is not None  # __post_init__ requires power_w for hardware without a preset
        return float(p.power_w)

    @property
    def seconds_per_prompt_token(self) -> float:
        if self.latency_per_prompt_token_s is not None:
            return float(self.latency_per_prompt_token_s)
        if self.prefill_tokens_per_s is not None:
            return 1.0 / self.prefill_tokens_per_s
        p = self.preset
        assert p is not None  # __post_init__ requires a speed for hardware without a preset
        return self.params_b / (p.ref_params_b * p.prefill_tokens_per_s)

    @property
    def seconds_per_output_token(self) -> float:
        if self.latency_per_output_token_s is not None:
            return float(self.latency_per_output_token_s)
        if self.decode_tokens_per_s is not None:
            return 1.0 / self.decode_tokens_per_s
        p = self.preset
        assert p is not None  # __post_init__ requires a speed for hardware without a preset
        return self.params_b / (p.ref_params_b * p.decode_tokens_per_s)


@dataclass
class RequestModel:
    """How a request turns into bytes and tokens (for the delay model)."""

    output_tokens: int = 1
    bytes_per_token: float = 4.0
    response_bytes: float = 64.0
    aggregation_s: float = 0.002
    output_tokens_by_category: dict[str, int] = field(default_factory=dict)

    def output_tokens_for(self, category: str) -> int:
        """Output tokens of a request of ``category`` (its own setting, else ``output_tokens``)."""
        return int(self.output_tokens_by_category.get(category, self.output_tokens))

    def __post_init__(self) -> None:
        check_positive(self.output_tokens, "output_tokens")
        for cat, n in self.output_tokens_by_category.items():
            check_positive(n, f"request.output_tokens_by_category.{cat}")
        check_positive(self.bytes_per_token, "bytes_per_token")
        check_positive(self.response_bytes, "response_bytes", allow_zero=True)
        check_positive(self.aggregation_s, "aggregation_s", allow_zero=True)


@dataclass
class Budgets:
    """Average energy per request (J) and per-category latency per request (s).

    A category missing from ``latency_s`` gets ``default_latency_s``; ``None`` means unconstrained.
    """

    energy_j: float | None = None
    latency_s: dict[str, float] = field(default_factory=dict)
    default_latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.energy_j is not None:
            check_positive(self.energy_j, "energy_j", allow_zero=True)
        for cat, t in self.latency_s.items():
            check_positive(t, f"latency_s.{cat}")
        if self.default_latency_s is not None:
            check_positive(self.default_latency_s, "default_latency_s")

    def latency_for(self, category: str) -> float:
        """Latency budget of one category (inf when unconstrained)."""
        t = self.latency_s.get(category, self.default_latency_s)
        return float("inf") if t is None else float(t)


@dataclass
class CollabConfig:
    """A whole MoE² deployment: experts, categories, request model, budgets and fine-level top-k."""

    experts: list[ExpertProfile]
    categories: list[str] = field(default_factory=lambda: list(MMLU_CATEGORIES))
    request: RequestModel = field(default_factory=RequestModel)
    budgets: Budgets = field(default_factory=Budgets)
    top_k: int | None = None
    objective: str = "accuracy"
    energy: str = "reserved"
    energy_queue_v: float | None = None

    def __post_init__(self) -> None:
        require(len(self.experts) > 0, "experts", "needs at least one expert")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "experts", f"expert names must be unique; repeated: {dup}")
        require(len(self.categories) > 0, "categories", "needs at least one category")
        for cat in self.budgets.latency_s:
            check_choice(cat, f"budgets.latency_s.{cat}", self.categories)
        if self.budgets.latency_s and self.budgets.default_latency_s is None:
            for cat in self.categories:
                require(
                    cat in self.budgets.latency_s,
                    f"budgets.latency_s.{cat}",
                    "this category has no latency budget; add one or set budgets.default_latency_s",
                )
        for cat in self.request.output_tokens_by_category:
            check_choice(cat, f"request.output_tokens_by_category.{cat}", self.categories)
        check_choice(self.energy, "energy", ("reserved", "routed"))
        if self.energy_queue_v is not None:
            check_positive(self.energy_queue_v, "energy_queue_v")
        for e in self.experts:
            for cat in e.skill.categories:
                check_choice(cat, f"experts.{e.name}.skill.categories.{cat}", self.categories)
        if self.top_k is not None:
            check_positive(self.top_k, "top_k")
        check_choice(self.objective, "objective", ("accuracy", "log_likelihood"))

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]


def _prefixed(exc: ConfigError, prefix: str) -> ConfigError:
    msg = str(exc).split(": ", 1)[-1]
    return ConfigError(f"{prefix}.{exc.field}" if not exc.field.startswith(prefix) else exc.field, msg)


def load_collab_config(source: str | Path | Mapping[str, Any]) -> CollabConfig:
    """Build a :class:`CollabConfig` from a YAML file or a mapping; errors name the bad field.

    Expert fields are reported as ``experts[i].field`` so a user can find them in the file.
    """
    data = dict(load_yaml(source) if isinstance(source, (str, Path)) else source)
    experts = data.get("experts")
    require(isinstance(experts, list), "experts", "must be a list of expert profiles")
    parsed = []
    for i, raw in enumerate(cast(list, experts)):
        require(isinstance(raw, Mapping), f"experts[{i}]", "must be a mapping")
        try:
            parsed.append(from_dict(ExpertProfile, raw))
        except ConfigError as exc:
            raise _prefixed(exc, f"experts[{i}]") from None
    rest = {k: v for k, v in data.items() if k != "experts"}
    return from_dict(CollabConfig, {**rest, "experts": parsed})
