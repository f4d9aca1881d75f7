"""Router configs: one typed dataclass per router, each with ``build(dim, num_experts)``.

:class:`RouterConfig` holds the fields every router understands. Each router registers its own
subclass in :data:`ROUTERS` (``@ROUTERS.register("name")``) with its extra fields typed and
validated on construction, e.g. :class:`~edgemoe.moe.router.TopKRouterConfig` or
:class:`~edgemoe.moe.etr.ETRRouterConfig`. A mapping (YAML) picks the subclass by its ``name`` key
(:meth:`RouterConfig.from_mapping`); a plain ``RouterConfig(name=...)`` resolves to the named
router's config with defaults for that router's own fields (:func:`resolve_router_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from edgemoe.config import ConfigError, check_range, from_dict, require
from edgemoe.registry import Registry

if TYPE_CHECKING:
    from edgemoe.moe.router import Router

ROUTERS: Registry[type[RouterConfig]] = Registry("router", plugin_package="edgemoe.moe")
"""Router name -> its config class. A name not registered yet is looked up in ``edgemoe.moe.<name>``."""


@dataclass
class RouterConfig:
    """Which router, and how it turns gate scores into expert assignments.

    ``capacity_factor`` (token-choice routers): ``> 0`` caps each expert at ceil(cf·k·T/E)
    assignments (overflow dropped by ``drop_priority``); ``0`` is dropless; ``< 0`` is dropless with
    a dynamic capacity equal to the largest expert load, but capped at ceil(|cf|·k·T/E).
    For expert choice, C = ceil(cf·T/E) tokens per expert and cf must be > 0.

    Subclasses fix ``name`` (not an init argument there) and add their own fields.
    """

    name: str = "topk"
    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    jitter: float = 0.0
    capacity_factor: float = 0.0
    drop_priority: Literal["position", "score"] = "position"

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and bool(self.name), "router.name", "must be a router name")
        require(
            isinstance(self.top_k, int) and self.top_k >= 1,
            "router.top_k",
            f"must be an integer >= 1, got {self.top_k!r}",
        )
        require(
            self.score_func in ("softmax", "sigmoid"),
            "router.score_func",
            f"must be 'softmax' or 'sigmoid', got {self.score_func!r}",
        )
        check_range(self.jitter, "router.jitter", 0.0, 0.99)
        require(
            isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor),
            "router.capacity_factor",
            f"must be a finite number (> 0 capped, 0 dropless, < 0 dynamic), got {self.capacity_factor!r}",
        )
        require(
            self.drop_priority in ("position", "score"),
            "router.drop_priority",
            f"must be 'position' or 'score', got {self.drop_priority!r}",
        )

    def check_experts(self, num_experts: int) -> None:
        """Checks that need the number of experts (run by :meth:`build` and by ``MoEConfig``)."""
        require(
            self.top_k <= num_experts,
            "router.top_k",
            f"must be <= num_experts ({num_experts}), got {self.top_k}; lower top_k or add experts",
        )

    def build(self, dim: int, num_experts: int) -> Router:
        """The router for ``dim``-wide tokens over ``num_experts`` experts."""
        return resolve_router_config(self).build(dim, num_experts)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], field: str = "router") -> RouterConfig:
        """The config named by ``data["name"]`` (default ``topk``), its fields checked and typed.

        Errors name ``field`` (the setting's dotted path, e.g. ``model.router``) and list the
        valid router names or fields.
        """
        fields = dict(data)
        name = fields.pop("name", "topk")
        require(isinstance(name, str), f"{field}.name", f"must be a router name, got {name!r}")
        config_cls = ROUTERS.get(name, field=f"{field}.name")
        try:
            return from_dict(config_cls, fields, prefix="router")
        except ConfigError as exc:
            raise _renamed(exc, field) from None


def resolve_router_config(cfg: RouterConfig | Mapping[str, Any] | str, field: str = "router") -> RouterConfig:
    """The typed config of the named router.

    A subclass instance is returned as is; a plain :class:`RouterConfig` becomes the named router's
    config with the same shared fields (defaults for the router's own); a mapping goes through
    :meth:`RouterConfig.from_mapping`; a bare name gives the router's defaults.
    """
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    if isinstance(cfg, Mapping):
        return RouterConfig.from_mapping(cfg, field)
    if type(cfg) is not RouterConfig:
        return cfg
    config_cls = ROUTERS.get(cfg.name, field=f"{field}.name")
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RouterConfig) if f.name != "name"}
    try:
        return config_cls(**shared)
    except ConfigError as exc:
        raise _renamed(exc, field) from None


def _renamed(exc: ConfigError, field: str) -> ConfigError:
    """``exc`` with its leading ``router`` replaced by ``field`` (the user's setting)."""
    head, dot, rest = exc.field.partition(".")
    if head != "router" or field == "router":
        return exc
    return ConfigError(f"{field}{dot}{rest}", str(exc).split(": ", 1)[-1])
