"""The ``Routing`` contract: what every router returns and what the dispatcher consumes.

A routing is a table of T×K *slots*. Slot (t, j) names an expert ``expert_ids_TK[t, j]`` (always in
``[0, E)``), whether the token proposed it (``proposed_TK``), whether it survived capacity
(``kept_TK`` ⊆ ``proposed_TK``) and its combine weight (``weights_TK``, exactly 0 where not kept).
Token choice uses K = k; expert choice uses K = E with slot j meaning expert j; ETR uses
K = ℓ_max; external routing uses the K of the ids it is given. See docs/moe.md.

Also here, shared by every router: the one capacity formula (:func:`expert_capacity`), token-choice
capacity with drop priority (:func:`apply_capacity`) and the one expert-choice selection
(:func:`expert_choice`). Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgemoe.errors import InputError
from edgemoe.moe.losses import count_per_expert, router_entropy


@dataclass
class RoutingStats:
    """Telemetry of one routing decision (detached tensors; ``as_dict`` gives plain floats)."""

    tokens_per_expert_E: Tensor
    proposed_per_expert_E: Tensor
    kept: Tensor
    dropped: Tensor
    drop_rate: Tensor
    unrouted_fraction: Tensor
    load_max: Tensor
    load_mean: Tensor
    entropy: Tensor
    capacity: int | None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly copy (lists for per-expert counts)."""
        out: dict[str, object] = {
            "tokens_per_expert": [int(v) for v in self.tokens_per_expert_E.tolist()],
            "proposed_per_expert": [int(v) for v in self.proposed_per_expert_E.tolist()],
            "capacity": self.capacity,
        }
        for name in ("kept", "dropped", "drop_rate", "unrouted_fraction", "load_max", "load_mean", "entropy"):
            out[name] = float(getattr(self, name))
        return out


@dataclass
class Routing:
    """Expert assignment of T tokens over T×K slots, plus aux losses and telemetry.

    ``weights_TK`` stays differentiable w.r.t. the router's parameters; everything else is
    integer/boolean. ``aux_losses`` is always a dict of scalar tensors (no coefficients applied).
    ``stats`` (telemetry, detached) is computed from the slot tables when first read.
    ``capacity`` is read lazily too: a dynamic capacity (largest expert load) stays a tensor until
    someone asks for the number.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    kept_TK: Tensor
    proposed_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor | None
    aux_losses: dict[str, Tensor]
    capacity_raw: int | Tensor | None = None
    extras: dict[str, object] = field(default_factory=dict)
    _stats: RoutingStats | None = field(default=None, init=False, repr=False)

    @property
    def capacity(self) -> int | None:
        """Per-expert capacity used (``None`` = dropless); a host read if it is still a tensor."""
        if isinstance(self.capacity_raw, Tensor):
            self.capacity_raw = int(self.capacity_raw)
        return self.capacity_raw

    @property
    def stats(self) -> RoutingStats:
        """Telemetry, computed on first access (keeps the counts off the hot path when unused)."""
        if self._stats is None:
            self._stats = routing_stats(
                self.expert_ids_TK, self.kept_TK, self.proposed_TK, self.scores_TE, self.capacity
            )
        return self._stats

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_ids_TK.shape[1]


def check_input(cond: bool, what: str, message: str) -> None:
    """Raise :class:`~edgemoe.errors.InputError` for run-time data (``what``) unless ``cond`` holds."""
    if not cond:
        raise InputError(what, message)


def combine_weights(gate_TK: Tensor, kept_TK: Tensor, renormalize: bool) -> Tensor:
    """Zero the weights of dropped slots and, if asked, renormalise to sum to one over kept slots.

    A token with no kept slot keeps all-zero weights (it passes through with zero expert output).
    """
    weights_TK = gate_TK * kept_TK.to(gate_TK.dtype)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return weights_TK


def routing_stats(
    expert_ids_TK: Tensor, kept_TK: Tensor, proposed_TK: Tensor, scores_TE: Tensor, capacity: int | None
) -> RoutingStats:
    """Per-expert loads, drop counts and router entropy, as tensors (no host reads)."""
    num_experts = scores_TE.shape[-1]
    tokens_E = count_per_expert(expert_ids_TK, num_experts, kept_TK.to(torch.float32))
    proposed_E = count_per_expert(expert_ids_TK, num_experts, proposed_TK.to(torch.float32))
    kept = tokens_E.sum()
    proposed = proposed_E.sum()
    dropped = proposed - kept
    num_tokens = max(expert_ids_TK.shape[0], 1)
    unrouted = (~kept_TK.any(dim=-1)).sum().to(torch.float32) / num_tokens
    return RoutingStats(
        tokens_per_expert_E=tokens_E.round().long(),
        proposed_per_expert_E=proposed_E.round().long(),
        kept=kept,
        dropped=dropped,
        drop_rate=dropped / proposed.clamp_min(1.0),
        unrouted_fraction=unrouted,
        load_max=tokens_E.max(),
        load_mean=tokens_E.mean(),
        entropy=router_entropy(scores_TE),
        capacity=capacity,
    )


def make_routing(
    expert_ids_TK: Tensor,
    gate_TK: Tensor,
    kept_TK: Tensor,
    scores_TE: Tensor,
    *,
    renormalize: bool,
    aux_losses: dict[str, Tensor],
    logits_TE: Tensor | None = None,
    proposed_TK: Tensor | None = None,
    capacity: int | Tensor | None = None,
    extras: dict[str, object] | None = None,
) -> Routing:
    """Assemble a :class:`Routing` from slot tables; the one constructor every router uses.

    ``gate_TK`` are the raw gate values of each slot (typically ``scores_TE`` gathered at
    ``expert_ids_TK``); they become combine weights via :func:`combine_weights`.
    """
    if proposed_TK is None:
        proposed_TK = torch.ones_like(kept_TK)
    kept_TK = kept_TK & proposed_TK
    return Routing(
        expert_ids_TK=expert_ids_TK,
        weights_TK=combine_weights(gate_TK, kept_TK, renormalize),
        kept_TK=kept_TK,
        proposed_TK=proposed_TK,
        scores_TE=scores_TE,
        logits_TE=logits_TE,
        aux_losses=aux_losses,
        capacity_raw=capacity,
        extras=extras or {},
    )


def expert_capacity(
    capacity_factor: float, num_tokens: int, num_experts: int, slots_per_token: int = 1
) -> int:
    """ceil(|cf|·k·T/E), at least 1: the per-expert capacity of every router (k = slots per token).

    Token choice uses k = top_k, expert choice k = 1, ETR k = ℓ_max. A 1e-9 slack keeps a
    product that is an integer up to rounding (e.g. 1.1·10) from rounding up to the next one.
    """
    return max(1, math.ceil(abs(capacity_factor) * slots_per_token * num_tokens / num_experts - 1e-9))


def expert_choice(scores_TE: Tensor, capacity: int, candidates_TE: Tensor | None = None) -> Tensor:
    """Boolean kept mask ``[..., T, E]``: each expert keeps its ``capacity`` best tokens by score.

    Only ``candidates_TE`` compete when given (ETR's proposers); non-candidates are never kept.
    Tokens are along dim -2; ties are broken as ``torch.topk`` breaks them; no gradient.
    """
    num_tokens = scores_TE.shape[-2]
    c = min(max(int(capacity), 0), num_tokens)
    if candidates_TE is None:
        candidates_TE = torch.ones_like(scores_TE, dtype=torch.bool)
    if c == 0:
        return torch.zeros_like(candidates_TE)
    masked_TE = scores_TE.detach().masked_fill(~candidates_TE, -math.inf)
    _, top_rows_CE = masked_TE.topk(c, dim=-2, sorted=False)
    in_top_TE = torch.zeros_like(candidates_TE).scatter(-2, top_rows_CE, True)
    return in_top_TE & candidates_TE


def expert_choice_slots(kept_TE: Tensor) -> tuple[Tensor, Tensor]:
    """``(expert_ids_TE, kept_TE)``: expert-choice slots, K = E with slot j meaning expert j."""
    num_tokens, num_experts = kept_TE.shape
    expert_ids_TE = torch.arange(num_experts, device=kept_TE.device).expand(num_tokens, -1)
    return expert_ids_TE.contiguous(), kept_TE


def rank_within_expert(expert_ids_TK: Tensor, gate_TK: Tensor, priority: str, num_experts: int) -> Tensor:
    """0-based rank of every slot among the slots of the same expert, under ``priority``.

    ``position``: all first choices before any second choice, then by token index (GShard/Switch).
    ``score``: by gate value, highest first (ties by the ``position`` order).
    """
    num_tokens, top_k = expert_ids_TK.shape
    # Slot-major flattening: index j*T + t, so first choices come first.
    ids_N = expert_ids_TK.t().reshape(-1)
    if priority == "score":
        pre_N = torch.argsort(gate_TK.detach().t().reshape(-1), descending=True, stable=True)
    else:
        pre_N = torch.arange(ids_N.numel(), device=ids_N.device)
    order_N = pre_N[torch.argsort(ids_N[pre_N], stable=True)]
    counts_E = count_per_expert(ids_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order_N]]
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[order_N] = rank_sorted_N
    return rank_N.view(top_k, num_tokens).t()


def apply_capacity(
    expert_ids_TK: Tensor,
    gate_TK: Tensor,
    proposed_TK: Tensor,
    capacity_factor: float,
    priority: str,
    num_experts: int,
) -> tuple[Tensor, int | Tensor | None]:
    """Kept mask and capacity of token-choice routing under the documented capacity semantics.

    Only proposed slots compete for capacity. Returns ``(kept_TK, capacity)``; capacity is None
    when dropless (cf == 0). A dynamic capacity (cf < 0) is returned as a 0-dim tensor (the
    largest load, at most the cap): the kept mask never needs its value, since a slot's rank within
    its expert is always below that expert's load.
    """
    if capacity_factor == 0:
        return proposed_TK.clone(), None
    num_tokens, top_k = expert_ids_TK.shape
    cap = expert_capacity(capacity_factor, num_tokens, num_experts, top_k)
    masked_ids = torch.where(proposed_TK, expert_ids_TK, torch.full_like(expert_ids_TK, num_experts))
    gate = torch.where(proposed_TK, gate_TK.detach(), torch.full_like(gate_TK, -math.inf))
    rank_TK = rank_within_expert(masked_ids, gate, priority, num_experts + 1)
    kept_TK = proposed_TK & (rank_TK < cap)
    if capacity_factor < 0:
        load_max = count_per_expert(masked_ids, num_experts + 1)[:num_experts].max()
        return kept_TK, load_max.clamp(1, cap)
    return kept_TK, cap
