"""Expert-Token Resonance (ETR): an affinity-driven, bidirectional MoE router.

The router has no learnable weights. Its pieces, each a small function or class with one job:

- :func:`grap_affinity` — grouped-average-pooling affinity: the cosine between a token and the
  indicator of each expert's contiguous group of model dimensions.
- :func:`token_choice` — each token proposes its top-ℓ experts, ℓ from a cumulative gate-score
  threshold, capped at ``l_max``.
- expert choice — each expert keeps the ``C`` proposers with the highest affinity (the shared
  :func:`edgemoe.moe.routing.expert_choice` with the proposers as candidates); the others are
  dropped for that expert (residual pass-through), never reassigned.
- capacity schedules (:class:`FixedCapacity`, :class:`AnnealedCapacity`,
  :class:`FalsePositiveCapacity`) — the capacity factor for the next step, from the step count or
  from routing statistics measured on the previous steps.
- :func:`locality_loss` — ``KL(D_c ‖ D_l)`` towards the local node's experts; the Switch
  load-balance loss is the shared :func:`edgemoe.moe.losses.load_balance_loss` (via the base class).

In training the router runs token choice then expert choice under the scheduled capacity; the
schedule advances in :meth:`ETRRouter.step`, called after the optimiser step (``MoELayer.step``),
never inside ``forward``. In inference (``router.eval()``) it runs token choice alone, without
capacity: every proposal is kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from edgemoe.config import ConfigError, check_choice, check_positive, check_range, require
from edgemoe.moe.config import ROUTERS, RouterConfig
from edgemoe.moe.router import Router
from edgemoe.moe.routing import (
    Routing,
    apply_capacity,
    expert_capacity,
    expert_choice,
    expert_choice_slots,
)

_EPS = 1e-12


# ----------------------------------------------------------------------------------------- configs


@dataclass
class CapacityConfig:
    """How the per-expert capacity ``C = ceil(factor * T * l_max / E)`` evolves during training.

    - ``fixed``: ``factor`` throughout.
    - ``annealed``: from ``factor`` down to ``floor``; ``anneal_by="steps"`` moves linearly over
      ``anneal_steps`` training steps, ``anneal_by="settle"`` lowers the factor by ``settle_decrement``
      each time the moving average of the rearranged fraction has changed by less than ``settle_tol``
      over ``settle_window`` steps.
    - ``fpr``: estimated each step from the measured false-positive count (non-proposing tokens that
      outscore an expert's typical candidate): ``C >= fpr_margin * that count``, clamped to
      ``[floor, factor]`` and smoothed with ``fpr_ema``.
    """

    schedule: Literal["fixed", "annealed", "fpr"] = "fixed"
    factor: float = 1.1
    floor: float = 0.66
    anneal_by: Literal["steps", "settle"] = "steps"
    anneal_steps: int = 1000
    settle_window: int = 20
    settle_tol: float = 0.01
    settle_decrement: float = 0.04
    fpr_margin: float = 2.0
    fpr_ema: float = 0.9

    def __post_init__(self) -> None:
        check_choice(self.schedule, "schedule", ("fixed", "annealed", "fpr"))
        check_choice(self.anneal_by, "anneal_by", ("steps", "settle"))
        check_positive(self.factor, "factor")
        check_positive(self.floor, "floor")
        require(
            self.schedule == "fixed" or self.floor <= self.factor,
            "floor",
            f"must be <= factor ({self.factor}), got {self.floor}; lower it or raise factor",
        )
        check_positive(self.anneal_steps, "anneal_steps")
        check_positive(self.settle_window, "settle_window")
        check_positive(self.settle_tol, "settle_tol")
        check_positive(self.settle_decrement, "settle_decrement")
        check_positive(self.fpr_margin, "fpr_margin")
        check_range(self.fpr_ema, "fpr_ema", 0.0, 0.999)


@ROUTERS.register("etr")
@dataclass
class ETRRouterConfig(RouterConfig):
    """ETR router settings, on top of the shared router fields.

    ``temperature`` scales the affinity before the softmax gate; ``score_threshold`` is the
    cumulative gate mass a token's proposals must reach (ℓ = fewest experts reaching it, capped at
    ``l_max``; ``None`` uses ``top_k``). ``expert_nodes[i]`` is the node hosting expert ``i``
    and ``local_node`` the node the tokens live on; the locality loss pulls the batch's soft
    assignment towards the local node's experts (smoothed by ``locality_smoothing`` so the KL stays
    finite). Without ``expert_nodes`` all experts share the local node, so ``D_l`` is uniform.

    ``selection`` is ETR's ``bidirectional`` (token choice, then expert choice among proposers) or
    one phase alone, for ablations: ``token`` (proposals capped first-come, Switch-style) or
    ``expert`` (each expert takes its top-C of all tokens, ``C = ceil(factor·T/E)``, also at
    inference since nothing else decides).

    The shared ``capacity_factor``, when > 0, is the schedule's start factor (``capacity.factor``)
    and lowers a default ``capacity.floor`` to at most it; giving both factors, different, is an
    error.
    """

    name: str = field(default="etr", init=False)
    temperature: float = 0.1
    selection: Literal["bidirectional", "token", "expert"] = "bidirectional"
    l_max: int | None = None
    score_threshold: float = 0.5
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    expert_nodes: list[int] | None = None
    local_node: int = 0
    locality_smoothing: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.temperature, "router.temperature")
        check_choice(self.selection, "router.selection", ("bidirectional", "token", "expert"))
        require(
            self.l_max is None or (isinstance(self.l_max, int) and self.l_max >= 1),
            "router.l_max",
            f"must be an integer >= 1 (or null for router.top_k), got {self.l_max!r}",
        )
        check_range(self.score_threshold, "router.score_threshold", 0.0, 1.0)
        check_range(self.locality_smoothing, "router.locality_smoothing", 1e-6, 1.0)
        if self.expert_nodes is not None:
            require(
                self.local_node in self.expert_nodes,
                "router.local_node",
                f"must be one of expert_nodes {sorted(set(self.expert_nodes))}, got {self.local_node}",
            )
        self.capacity = self._start_capacity()

    def _start_capacity(self) -> CapacityConfig:
        """``capacity`` with the shared ``capacity_factor`` folded in (see the class docstring)."""
        cf, cap = self.capacity_factor, self.capacity
        if cf <= 0 or cap.factor == cf:
            return cap
        require(
            cap.factor == CapacityConfig.factor,
            "router.capacity_factor",
            f"conflicts with router.capacity.factor={cap.factor}; set only one of them",
        )
        floor = min(cap.floor, cf) if cap.floor == CapacityConfig.floor else cap.floor
        try:
            return dataclasses.replace(cap, factor=cf, floor=floor)
        except ConfigError as exc:
            raise ConfigError(f"router.capacity.{exc.field}", str(exc).split(": ", 1)[-1]) from None

    def check_experts(self, num_experts: int) -> None:
        super().check_experts(num_experts)
        self.check_nodes(num_experts)

    def check_nodes(self, num_experts: int) -> None:
        """One node per expert in ``expert_nodes``."""
        if self.expert_nodes is not None:
            require(
                len(self.expert_nodes) == num_experts,
                "router.expert_nodes",
                f"must list one node per expert ({num_experts}), got {len(self.expert_nodes)}",
            )

    def build(self, dim: int, num_experts: int) -> ETRRouter:
        return ETRRouter(dim, num_experts, self)


# ------------------------------------------------------------------------------- routing primitives


def grap_affinity(x_TD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cosine between each token and each expert's indicator vector over a contiguous group of dims.

    ``δ_ti = Σ_{j∈G_i} x_tj / (sqrt(d/E) · ‖x_t‖)``; a zero token has affinity 0 everywhere.
    """
    dim = x_TD.shape[-1]
    if dim % num_experts != 0:
        raise ConfigError(
            "num_experts",
            f"GrAP splits the model dimension into one group per expert, but dim={dim} is not "
            f"divisible by num_experts={num_experts}; choose a dim that is a multiple of it",
        )
    group = dim // num_experts
    sums_TE = x_TD.unflatten(-1, (num_experts, group)).sum(-1)
    norm_T1 = x_TD.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return sums_TE / (math.sqrt(group) * norm_T1)


def narrow_softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    """Softmax over the (few) experts, written out: on CPU it beats ``torch.softmax`` for small E."""
    exp_TE = (logits_TE - logits_TE.amax(-1, keepdim=True)).exp()
    return exp_TE / exp_TE.sum(-1, keepdim=True)


def token_choice(gate_TE: torch.Tensor, l_max: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top experts until their gate mass reaches ``threshold``, as a slot table.

    Returns ``(expert_ids_TK, proposed_TK)`` with K = min(l_max, E), slots in descending gate
    order; a token always proposes its first slot and at most ``l_max``. Works on any leading dims.
    """
    k = min(l_max, gate_TE.shape[-1])
    gate_TE = gate_TE.detach()
    if k == 1:
        top_scores_TK, expert_ids_TK = gate_TE.max(dim=-1, keepdim=True)
    else:
        top_scores_TK, expert_ids_TK = gate_TE.topk(k, dim=-1)
    mass_before_TK = top_scores_TK.cumsum(-1) - top_scores_TK
    proposed_TK = mass_before_TK < threshold
    proposed_TK[..., 0] = True
    return expert_ids_TK, proposed_TK


def slots_to_mask(expert_ids_TK: torch.Tensor, on_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Boolean ``[..., T, E]`` mask of the experts whose slot is on."""
    mask_TE = torch.zeros(*expert_ids_TK.shape[:-1], num_experts, dtype=torch.bool, device=on_TK.device)
    return mask_TE.scatter(-1, expert_ids_TK, on_TK)


def false_positive_counts(affinity_TE: torch.Tensor, proposed_TE: torch.Tensor) -> torch.Tensor:
    """Per expert: non-proposing tokens whose affinity beats the expert's typical candidate.

    The typical candidate is the mean affinity of the expert's candidates (one pass, no sort). An
    expert with no candidates counts 0 (there is no typical candidate to outscore).
    """
    aff_TE = affinity_TE.detach()
    proposed_f_TE = proposed_TE.to(aff_TE.dtype)
    count_E = proposed_f_TE.sum(-2)
    typical_E = (aff_TE * proposed_f_TE).sum(-2) / count_E.clamp_min(1)
    outscore_TE = (aff_TE > typical_E.unsqueeze(-2)) & ~proposed_TE
    return torch.where(count_E > 0, outscore_TE.sum(-2), 0)


def locality_target(expert_nodes: list[int], local_node: int, smoothing: float) -> torch.Tensor:
    """``D_l``: mass ``1 - smoothing`` uniformly on the local node's experts, ``smoothing`` on all."""
    nodes_E = torch.tensor(expert_nodes)
    local_E = (nodes_E == local_node).float()
    uniform_E = torch.full_like(local_E, 1.0 / len(expert_nodes))
    return (1.0 - smoothing) * local_E / local_E.sum() + smoothing * uniform_E


def locality_loss(gate_TE: torch.Tensor, target_E: torch.Tensor) -> torch.Tensor:
    """``KL(D_c ‖ D_l)`` with ``D_c`` the batch's mean soft assignment over experts."""
    d_c_E = gate_TE.reshape(-1, gate_TE.shape[-1]).mean(0)
    target_E = target_E.to(d_c_E)
    return (torch.xlogy(d_c_E, d_c_E) - d_c_E * target_E.log()).sum()


# ------------------------------------------------------------------------------ capacity schedules


@dataclass
class CapacityObservation:
    """What a capacity schedule may observe after a training step."""

    rearranged_fraction: float
    false_positives_per_expert: float
    tokens_per_expert: float


class FixedCapacity:
    """A constant capacity factor."""

    def __init__(self, cfg: CapacityConfig):
        self.factor = cfg.factor

    def observe(self, obs: CapacityObservation) -> None:
        """Nothing to adapt."""


class AnnealedCapacity:
    """Non-increasing factor from ``cfg.factor`` to ``cfg.floor`` by step count or by settling."""

    def __init__(self, cfg: CapacityConfig):
        self.cfg = cfg
        self.factor = cfg.factor
        self.step = 0
        self._ema: float | None = None
        self._ema_at_check: float | None = None

    def observe(self, obs: CapacityObservation) -> None:
        self.step += 1
        cfg = self.cfg
        if cfg.anneal_by == "steps":
            progress = min(1.0, self.step / cfg.anneal_steps)
            self.factor = cfg.factor + (cfg.floor - cfg.factor) * progress
            return
        r = obs.rearranged_fraction
        self._ema = r if self._ema is None else 0.8 * self._ema + 0.2 * r
        if self.step % cfg.settle_window:
            return
        settled = self._ema_at_check is not None and abs(self._ema - self._ema_at_check) < cfg.settle_tol
        self._ema_at_check = self._ema
        if settled:
            self.factor = max(cfg.floor, self.factor - cfg.settle_decrement)


class FalsePositiveCapacity:
    """Factor estimated from the measured false positives, clamped to ``[floor, factor]``."""

    def __init__(self, cfg: CapacityConfig):
        self.cfg = cfg
        self.factor = cfg.factor

    def estimate(self, obs: CapacityObservation) -> float:
        """The factor whose capacity covers ``fpr_margin`` times the false positives per expert."""
        needed = self.cfg.fpr_margin * obs.false_positives_per_expert
        raw = needed / max(obs.tokens_per_expert, _EPS)
        return min(self.cfg.factor, max(self.cfg.floor, raw))

    def observe(self, obs: CapacityObservation) -> None:
        a = self.cfg.fpr_ema
        self.factor = a * self.factor + (1.0 - a) * self.estimate(obs)


CapacitySchedule = FixedCapacity | AnnealedCapacity | FalsePositiveCapacity


def build_capacity_schedule(cfg: CapacityConfig) -> CapacitySchedule:
    """The schedule object named by ``cfg.schedule``."""
    kinds: dict[str, type[CapacitySchedule]] = {
        "fixed": FixedCapacity,
        "annealed": AnnealedCapacity,
        "fpr": FalsePositiveCapacity,
    }
    return kinds[cfg.schedule](cfg)


# ------------------------------------------------------------------------------------------ router


class ETRRouter(Router):
    """Expert-Token Resonance: GrAP affinity, token choice then expert choice under a capacity schedule.

    Slots are ``[T, ℓ_max]`` in descending gate order. Training mode: proposals compete for each
    expert's ``C`` slots by affinity, and the step's routing statistics are kept (as tensors) for
    :meth:`step`; eval mode: every proposal is kept (no capacity). Aux losses: ``load_balance``
    (Switch), ``z_loss`` and ``locality``.
    """

    cfg: ETRRouterConfig
    locality_target_E: torch.Tensor

    def __init__(self, dim: int, num_experts: int, cfg: ETRRouterConfig):
        super().__init__(dim, num_experts, cfg)
        cfg.check_nodes(num_experts)
        if dim % num_experts:
            grap_affinity(torch.zeros(1, dim), num_experts)
        self.l_max = min(cfg.l_max or cfg.top_k, num_experts)
        self.schedule = build_capacity_schedule(cfg.capacity)
        nodes = cfg.expert_nodes if cfg.expert_nodes is not None else [cfg.local_node] * num_experts
        self.register_buffer(
            "locality_target_E",
            locality_target(nodes, cfg.local_node, cfg.locality_smoothing),
            persistent=False,
        )
        # Sums over the training forwards since the last step: rearranged tokens, false positives,
        # tokens. Read (one host sync) by ``step``, never by ``forward``.
        self._observed_3: torch.Tensor | None = None

    def get_extra_state(self) -> dict[str, object]:
        """The schedule's progress, so a resumed run continues the anneal where it stopped."""
        return {k: v for k, v in vars(self.schedule).items() if k != "cfg"}

    def set_extra_state(self, state: dict[str, object]) -> None:
        vars(self.schedule).update(state)

    @property
    def capacity_factor(self) -> float:
        """The factor the next training forward will use."""
        return float(self.schedule.factor)

    def capacity(self, num_tokens: int) -> int:
        """Per-expert slots at the current factor."""
        return expert_capacity(self.capacity_factor, num_tokens, self.num_experts, self.l_max)

    def step(self) -> None:
        """Advance the capacity schedule by one training step.

        Feeds the schedule the routing statistics of the training forwards since the previous
        call (pooled, as one batch); without any (evaluation only, or external routing) it does
        nothing. Call it after the optimiser step.
        """
        if self._observed_3 is None:
            return
        rearranged, false_positives, tokens = self._observed_3.tolist()
        self._observed_3 = None
        self.schedule.observe(
            CapacityObservation(
                rearranged_fraction=rearranged / max(tokens, 1.0),
                false_positives_per_expert=false_positives / self.num_experts,
                tokens_per_expert=tokens * self.l_max / self.num_experts,
            )
        )

    def gate(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = grap_affinity(x_TD.float(), self.num_experts) / self.cfg.temperature
        return logits_TE, narrow_softmax(logits_TE).to(x_TD.dtype)

    def select(self, x_TD: torch.Tensor, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> Routing:
        num_tokens = scores_TE.shape[0]
        expert_ids_TK, proposed_TK = token_choice(scores_TE, self.l_max, self.cfg.score_threshold)
        proposed_TE = slots_to_mask(expert_ids_TK, proposed_TK, self.num_experts)
        factor = self.capacity_factor
        mode = self.cfg.selection
        capacity: int | torch.Tensor | None
        if mode == "expert":
            capacity = min(num_tokens, expert_capacity(factor, num_tokens, self.num_experts))
            expert_ids_TK, kept_TK = expert_choice_slots(expert_choice(logits_TE, capacity))
            proposed_TK = kept_TK
        elif not self.training:
            capacity, kept_TK = None, proposed_TK.clone()
        elif mode == "token":
            gate_TK = scores_TE.gather(-1, expert_ids_TK)
            kept_TK, capacity = apply_capacity(
                expert_ids_TK, gate_TK, proposed_TK, factor, "position", self.num_experts
            )
        else:
            capacity = self.capacity(num_tokens)
            kept_TE = expert_choice(logits_TE, capacity, proposed_TE)
            kept_TK = kept_TE.gather(-1, expert_ids_TK) & proposed_TK
        kept_TE = slots_to_mask(expert_ids_TK, kept_TK, self.num_experts)
        extras = self._telemetry(logits_TE, proposed_TE, kept_TE, factor)
        gate_TK = scores_TE.gather(-1, expert_ids_TK)
        return self.finish(
            expert_ids_TK, gate_TK, kept_TK, proposed_TK, logits_TE, scores_TE, capacity, extras
        )

    def _telemetry(
        self, logits_TE: torch.Tensor, proposed_TE: torch.Tensor, kept_TE: torch.Tensor, factor: float
    ) -> dict[str, object]:
        """Capacity factor, rearranged fraction, false-positive rate and mean proposals (0-dim tensors).

        "Rearranged" tokens are those with a token-choice proposal the expert side did not keep.
        In training the counts are also added to the observations :meth:`step` feeds the schedule.
        """
        num_tokens, num_experts = proposed_TE.shape
        rearranged_n = (proposed_TE & ~kept_TE).any(-1).sum().to(torch.float32)
        false_positives = false_positive_counts(logits_TE, proposed_TE).sum().to(torch.float32)
        proposals = proposed_TE.sum().to(torch.float32)
        if self.training:
            observed_3 = torch.stack([rearranged_n, false_positives, rearranged_n.new_tensor(num_tokens)])
            self._observed_3 = observed_3 if self._observed_3 is None else self._observed_3 + observed_3
        return {
            "capacity_factor": factor,
            "rearranged_fraction": rearranged_n / max(num_tokens, 1),
            "false_positive_rate": false_positives / (num_tokens * num_experts - proposals).clamp_min(1.0),
            "mean_proposals": proposals / max(num_tokens, 1),
        }

    def aux_losses(
        self,
        logits_TE: torch.Tensor,
        scores_TE: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        proposed_TK: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The shared ``load_balance`` and ``z_loss`` plus ETR's ``locality`` KL.

        The z-loss is kept for callers that weigh every router alike; on ETR's logits (affinity in
        [-1, 1] over the temperature) it is bounded and carries little signal.
        """
        losses = super().aux_losses(logits_TE, scores_TE, expert_ids_TK, proposed_TK)
        losses["locality"] = locality_loss(scores_TE, self.locality_target_E)
        return losses
