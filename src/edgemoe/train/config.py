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
from edgemoe.train.data import DATASETS, ImageDataset, load_dataset
from edgemoe.train.model import ModelConfig


@dataclass
class DataConfig:
    """Which dataset, where its files are, and optional class-balanced subsets for speed."""

    name: str = "digits"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    label: Literal["fine", "coarse"] = "fine"

    def build(self, seed: int) -> ImageDataset:
        """Load the dataset (seeded class-balanced subsets), refusing subsets larger than the data."""
        data = load_dataset(
            self.name,
            self.data_dir,
            train_subset=self.train_subset,
            test_subset=self.test_subset,
            seed=seed,
            label=self.label,
        )
        check_subsets(self, data)
        return data

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
    ``kill``: the server's process is killed (``dist``: SIGKILL, then restarted with backoff; both
    transports restore its expert and optimizer from the router's latest copy); its queue is
    re-routed; back after ``duration`` slots, or once it answers if that is later (0 = never).
    ``slow``: the server stalls ``stall_s`` wall seconds; past ``transport.deadline`` it is late.
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

    ``inproc``: all servers in this process, simulated time. ``dist``: one process per server, each
    connected to the router over TCP (``host:port``; port 0 = any free port). The router starts the
    servers in ``local_servers`` itself (null = all) and restarts any that die; the others connect
    from other machines (``edgemoe worker --connect HOST:PORT --servers ...``). ``time_scale`` > 0
    makes each server take ``time_scale * served * C_j / f_j`` wall seconds per slot (frequency
    emulation). A server that has not answered ``deadline`` wall seconds (router's clock) after a call
    is late; after ``max_misses`` late slots in a row it goes offline, and it rejoins once it answers
    again and at least ``rejoin_after`` slots have passed. ``timeout_s`` bounds start-up, state
    transfers and profiling.
    """

    kind: str = "inproc"
    workers: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    local_servers: list[int] | None = None
    time_scale: float = 0.0
    deadline: float = 10.0
    max_misses: int = 2
    rejoin_after: int = 2
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        from edgemoe.train.transport import TRANSPORTS

        TRANSPORTS.get(self.kind, field="transport.kind")
        check_positive(self.time_scale, "transport.time_scale", allow_zero=True)
        check_positive(self.deadline, "transport.deadline")
        require(self.max_misses >= 1, "transport.max_misses", f"must be >= 1, got {self.max_misses}")
        require(self.rejoin_after >= 1, "transport.rejoin_after", f"must be >= 1, got {self.rejoin_after}")
        require(0 <= self.port < 65536, "transport.port", f"must be in [0, 65535], got {self.port}")
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
        check_router(self.model.router)
        for j in self.transport.local_servers or []:
            require(0 <= j < J, "transport.local_servers", f"server {j} is not in [0, {J})")

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


def check_router(name: str, field_name: str = "model.router") -> None:
    """An unknown gate name: one error naming ``field_name`` and every router, plug-ins included.

    Checked with the config, so the error comes before any server process starts.
    """
    from edgemoe.moe.config import ROUTERS

    ROUTERS.get(name, field=field_name)


def check_subsets(cfg: DataConfig, data: ImageDataset) -> list[str]:
    """Refuse subsets larger than the dataset (the loader returned fewer images than asked) or with
    fewer test images than classes.

    Returns warnings (a test set under 100 images measures accuracy in steps above 1 %).
    """
    train_size, test_size, num_classes = len(data.y_train_N), len(data.y_test_N), data.num_classes
    for name, value, size in (
        ("train_subset", cfg.train_subset, train_size),
        ("test_subset", cfg.test_subset, test_size),
    ):
        require(
            value is None or value <= size,
            f"data.{name}",
            f"asks for {value} images but {cfg.name!r} has {size}; use at most {size} or null (all)",
        )
    require(
        cfg.test_subset is None or cfg.test_subset >= num_classes,
        "data.test_subset",
        f"{cfg.test_subset} images cannot cover {num_classes} classes; use at least {num_classes}",
    )
    if test_size < 100:
        return [
            f"data.test_subset: {test_size} test images measure accuracy only in steps of {100 / test_size:.1f} %"
        ]
    return []


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain mapping."""
    return from_dict(TrainConfig, data)


# command-line flag -> dotted config field (shared by ``train`` and ``profile``)
FLAGS = {
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "train_subset": "data.train_subset",
    "test_subset": "data.test_subset",
    "policy": "policy",
    "scenario": "scenario",
    "scale": "scale",
    "slots": "slots",
    "seed": "seed",
    "k": "k",
    "buffer": "buffer",
    "router": "model.router",
    "backbone": "model.backbone",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "transport": "transport.kind",
    "workers": "transport.workers",
    "time_scale": "transport.time_scale",
    "deadline": "transport.deadline",
    "max_misses": "transport.max_misses",
    "local_servers": "transport.local_servers",
    "host": "transport.host",
    "port": "transport.port",
}


def config_with_flags(data: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """``data`` (config file + ``--set``) with every non-None flag of :data:`FLAGS` applied on top."""
    data = dict(data)
    for flag, dotted in FLAGS.items():
        value = flags.get(flag)
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[leaf] = value
    return train_config_from_dict(data)
