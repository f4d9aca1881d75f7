"""A tiny training setup for tests and examples: four servers in two speed classes, a small model and
data subset, a few slots. Plain config dicts (no imports), so any layer's tests may use them."""

from __future__ import annotations

from typing import Any

TINY_SERVERS: list[dict[str, Any]] = [
    {"f_max": 1e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5, "count": 2},
    {"f_max": 3e9, "cycles_per_token": 1e8, "kappa": 1e-28, "energy_budget": 0.5, "count": 2},
]


def tiny_train_config(**overrides: Any) -> dict[str, Any]:
    """A train config dict (``train_config_from_dict`` input) that runs in well under a second per
    slot on a CPU; top-level ``overrides`` replace whole sections."""
    base: dict[str, Any] = {
        "slots": 6,
        "eval_every": 3,
        "network": {"servers": TINY_SERVERS, "arrivals": {"rate": 20.0}},
        "model": {"dim": 16, "expert_hidden": 16, "channels": 4},
        "data": {"train_subset": 200, "test_subset": 60},
    }
    base.update(overrides)
    return base
