"""Configuration of a Stable-MoE training run (YAML via :func:`edgemoe.config.from_dict`).

Every field is validated on load; errors name the dotted field and the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from edgemoe.config import ConfigError, check_choice, check_positive, from_dict, require
from edgemoe.edge import NetworkSpec, load_scenario
from edgemoe.edge.controllers import CONTROLLER_NAMES
from edgemoe.edge.spec import SCENARIOS, spec_from_dict
from edgemoe.train.data import DATASETS
from edgemoe.train.model import ModelConfig


@dataclass
class DataConfig:
    """Which dataset, where its files are, and optional class-balanced subsets for speed."""

    name: str = "digits"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    label: Literal["fine", "coarse"] = "fine"

    def __post_init__(self) -> None:
        check_choice(self.name, "data.name", DATASETS)
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, int) and value > 0),
                f"data.{name}",
                f"must be a positive integer or null, got {value!r}",
            )


@dataclass
class FaultConfig:
    """Server ``server`` fails at the start of slot ``slot``.

    ``offline``: marked offline, queue re-routed, back after ``duration`` slots (0 = never).
    ``kill``: the server's process is killed (``dist``; in-process it behaves like ``offline`` with its
    queue lost). ``slow``: the server stalls ``stall_s`` wall seconds, misses its deadline and goes
    offline for ``transport.rejoin_after`` slots.
    """

    server: int
    slot: int
    kind: Literal["offline", "kill", "slow"] = "offline"
    duration: int = 0
    stall_s: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.kind, "faults.kind", ("offline", "kill", "slow"))
        require(self.slot >= 0, "faults.slot", f"must be >= 0, got {self.slot}")
        require(self.duration >= 0, "faults.duration", f"must be >= 0 (0 = permanent), got {self.duration}")
        check_positive(self.stall_s, "faults.stall_s")


@dataclass
class TransportConfig:
    """How the router reaches the servers.

    ``inproc``: all servers in this process, simulated time. ``dist``: torch.distributed, rank 0 is
    the router, ranks 1..J the servers; ``workers`` local processes are spawned on 127.0.0.1 unless
    the run is already under ``torchrun``. ``time_scale`` > 0 makes each server take
    ``time_scale * served * C_j / f_j`` wall seconds per slot (frequency emulation). A server whose
    slot takes longer than ``deadline`` wall seconds is marked offline for ``rejoin_after`` slots.
    """

    kind: Literal["inproc", "dist"] = "inproc"
    workers: int | None = None
    backend: Literal["gloo", "nccl"] = "gloo"
    time_scale: float = 0.0
    deadline: float | None = None
    rejoin_after: int = 5
    port: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_choice(self.kind, "transport.kind", ("inproc", "dist"))
        check_choice(self.backend, "transport.backend", ("gloo", "nccl"))
        check_positive(self.time_scale, "transport.time_scale", allow_zero=True)
        if self.deadline is not None:
            check_positive(self.deadline, "transport.deadline")
        require(self.rejoin_after >= 1, "transport.rejoin_after", f"must be >= 1, got {self.rejoin_after}")
        require(
            self.workers is None or self.workers >= 1,
            "transport.workers",
            f"must be >= 1, got {self.workers}",
        )
        check_positive(self.timeout_s, "transport.timeout_s")


@dataclass
class TrainConfig:
    """A full training run: data, model, network scenario, controller, transport, faults, cadence.

    ``scale`` shrinks the scenario for small machines: arrival rates and every server's tokens per
    slot are multiplied by it (cycles per token divided), and V too, so queues and the V/Q trade-off
    keep their shape in smaller units. ``gate_prior: scenario`` applies the scenario's expert
    popularity skew (``scores.skew``/``popular``) to the controller's view of the gate scores only;
    the model and inference never see it.
    """

    seed: int = 0
    slots: int = 200
    eval_every: int = 20
    checkpoint_every: int = 0
    policy: str = "stable-moe"
    controller: dict[str, Any] = field(default_factory=dict)
    scenario: str = "paper"
    network: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    k: int | None = None
    buffer: int | None = None
    gate_prior: Literal["scenario", "none"] = "scenario"
    lr: float = 2e-3
    expert_lr: float = 2e-3
    record_scores: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    faults: list[FaultConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.slots >= 1, "slots", f"must be >= 1, got {self.slots}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        require(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            f"must be >= 0 (0 = off), got {self.checkpoint_every}",
        )
        check_choice(self.policy, "policy", CONTROLLER_NAMES)
        check_choice(self.scenario, "scenario", sorted(SCENARIOS))
        require(
            isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and 0 < self.scale <= 1e3,
            "scale",
            f"must be a number in (0, 1000], got {self.scale!r}",
        )
        require(self.buffer is None or self.buffer >= 1, "buffer", f"must be >= 1 or null, got {self.buffer}")
        check_choice(self.gate_prior, "gate_prior", ("scenario", "none"))
        check_positive(self.lr, "lr")
        check_positive(self.expert_lr, "expert_lr")
        spec = self.network_spec()
        J = spec.num_servers
        require(
            self.transport.workers is None or self.transport.workers == J,
            "transport.workers",
            f"must equal the number of edge servers J={J} (one worker per server), got {self.transport.workers}",
        )
        for i, fault in enumerate(self.faults):
            require(0 <= fault.server < J, f"faults[{i}].server", f"must be in [0, {J}), got {fault.server}")

    def network_spec(self) -> NetworkSpec:
        """The scenario with ``network`` overrides, ``k`` and ``scale`` applied (validated)."""
        overrides = dict(self.network)
        if self.k is not None:
            overrides["k"] = self.k
        try:
            spec = load_scenario(self.scenario, overrides)
        except ConfigError as exc:
            field_name = exc.field if exc.field in ("k", "scenario") else f"network.{exc.field}"
            raise ConfigError(field_name, str(exc).split(": ", 1)[-1]) from None
        if self.scale == 1.0:
            return spec
        data = spec.to_dict()
        for server in data["servers"]:
            server["cycles_per_token"] /= self.scale
        arrivals = data["arrivals"]
        arrivals["rate"] *= self.scale
        arrivals["rates"] = [r * self.scale for r in arrivals["rates"]]
        data["controller"]["V"] *= self.scale
        return spec_from_dict(data)

    def controller_params(self) -> dict[str, Any]:
        params = dict(self.controller)
        if "V" in params:
            params["V"] = float(params["V"]) * self.scale
        params.setdefault("seed", self.seed)
        return params


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain mapping."""
    return from_dict(TrainConfig, data)
