"""Slot-level simulator: every policy runs on identical arrival and gate-score streams (common random
numbers), and per-slot metrics are recorded.

The slot loop is the only Python loop; all per-token work (routing, gate-mass and overlap metrics,
FIFO completion tracking) is vectorised, metrics over whole chunks of slots at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemoe.config import require
from edgemoe.edge.controllers import GATE_FOLLOWING, LOAD_ONLY, Controller, group_rank, make_controller
from edgemoe.edge.scores import ScoreTrace, Workload
from edgemoe.edge.spec import NetworkSpec
from edgemoe.edge.state import Service, SlotEngine

PER_SERVER = ("backlog", "served", "arrived", "energy", "energy_queue", "freq")
PER_SLOT = ("tokens", "completed", "gate_mass", "topk_mass", "overlap", "drops")


@dataclass
class PolicySpec:
    """A policy to simulate: a display ``label``, a controller ``name`` and parameter overrides."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, spec: NetworkSpec, seed: int) -> Controller:
        params = dict(self.params)
        if self.name == "random-k":
            params.setdefault("seed", seed)
        return make_controller(self.name, spec, **params)


@dataclass
class RunTrace:
    """Per-slot records of one policy on one seed: ``[T, J]`` arrays (backlog after the slot, served,
    arrived, energy, energy queue, frequency) and ``[T]`` arrays (tokens, completed tokens, kept gate
    mass, top-K gate mass, top-K overlap count, dropped assignments)."""

    label: str
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


class CompletionTracker:
    """FIFO per server; a token completes in the slot in which its last kept assignment is served.

    Assignment n (0-based) on server j is done in the first slot whose cumulative service reaches
    n + 1. A chunk's new assignments on server j are a contiguous range of n, so they are resolved with
    one ``searchsorted`` per server. Tokens still waiting join a pool that is re-examined only at the
    end of the run, or when it has doubled beyond ``MIN_POOL`` tokens (10 bytes per assignment), so a
    policy whose queues grow without bound does not keep rescanning its stuck tokens.
    """

    MIN_POOL = 1 << 22

    def __init__(self, num_servers: int, slots: int):
        self.J = num_servers
        self.arrived_E = np.zeros(num_servers, dtype=np.int64)
        self.cum_served_ET = np.zeros((num_servers, slots))
        self.completed_T = np.zeros(slots, dtype=np.int64)
        self.pool_ids: list[np.ndarray] = []  # waiting tokens' servers, int16 [P, K] blocks
        self.pool_idx: list[np.ndarray] = []  # and FIFO positions (-1 = dropped)
        self.pool_size = 0
        self.resolve_at = self.MIN_POOL

    def _done_slot(self, j: int | np.integer, positions: np.ndarray, upto: int) -> np.ndarray:
        return np.searchsorted(self.cum_served_ET[j, :upto], positions + 1 - 1e-9, side="left")

    def add(self, ids_NK: np.ndarray, kept_NK: np.ndarray, upto: int) -> None:
        """Enqueue a chunk's assignments (token order, slots in order) and resolve what service in
        slots ``[0, upto)`` completed."""
        flat, kept = ids_NK.ravel(), kept_NK.ravel()
        all_kept = bool(kept.all())
        kept_ids = flat if all_kept else flat[kept]  # dropped assignments never enter a queue
        rank = group_rank(kept_ids, self.J)
        counts_E = np.bincount(kept_ids, minlength=self.J)
        offsets = np.concatenate([[0], np.cumsum(counts_E)])
        table = np.empty(offsets[-1], dtype=np.int64)
        for j in np.nonzero(counts_E)[0]:
            positions = self.arrived_E[j] + np.arange(counts_E[j])
            table[offsets[j] : offsets[j + 1]] = self._done_slot(j, positions, upto)
        position = self.arrived_E[kept_ids] + rank  # FIFO position on its server
        if all_kept:
            done, idx = table[offsets[kept_ids] + rank], position
        else:
            done = np.full(len(flat), -1, dtype=np.int64)
            done[kept] = table[offsets[kept_ids] + rank]
            idx = np.full(len(flat), -1, dtype=np.int64)
            idx[kept] = position
        self.arrived_E += counts_E
        waiting = self._count(done.reshape(ids_NK.shape), upto)
        self.pool_ids.append(ids_NK[waiting].astype(np.int16))
        self.pool_idx.append(idx.reshape(ids_NK.shape)[waiting])
        self.pool_size += int(waiting.sum())
        if self.pool_size >= self.resolve_at:
            self.finish(upto)
            self.resolve_at = max(self.MIN_POOL, 2 * self.pool_size)

    def _count(self, done_PK: np.ndarray, upto: int) -> np.ndarray:
        """Record completions; returns the mask of tokens still waiting."""
        done_P = done_PK[:, 0].copy()
        for k in range(1, done_PK.shape[1]):
            np.maximum(done_P, done_PK[:, k], out=done_P)
        finished = done_P < upto
        self.completed_T += np.bincount(done_P[finished & (done_P >= 0)], minlength=len(self.completed_T))
        return ~finished

    def finish(self, upto: int) -> None:
        """Resolve every waiting token against service in slots ``[0, upto)``."""
        if not self.pool_ids or upto == 0:
            return
        ids_PK, idx_PK = np.concatenate(self.pool_ids), np.concatenate(self.pool_idx)
        # Position n on server j is served by now iff n < floor(cumulative service); only tokens whose
        # every assignment is served need their completion slots looked up.
        served_E = np.floor(self.cum_served_ET[:, upto - 1] + 1e-9)
        ready = ((idx_PK < 0) | (idx_PK < served_E[ids_PK])).all(axis=1)
        ready_ids, ready_idx = ids_PK[ready], idx_PK[ready]
        flat_ids, flat_idx = ready_ids.ravel(), ready_idx.ravel()
        done = np.where(flat_idx < 0, -1, upto)
        for j in range(self.J):
            sel = np.nonzero((flat_ids == j) & (flat_idx >= 0))[0]
            done[sel] = self._done_slot(j, flat_idx[sel], upto)
        self._count(done.reshape(ready_ids.shape), upto)  # every ready token completes
        self.pool_ids, self.pool_idx = [ids_PK[~ready]], [idx_PK[~ready]]
        self.pool_size = int((~ready).sum())


def chunk_gate_stats(trace: ScoreTrace, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token: top-K gate mass and the K-th largest score (the top-K membership threshold)."""
    J = trace.scores.shape[1]
    part = np.partition(trace.scores, J - k, axis=1)[:, J - k :]
    return part.sum(axis=1), part.min(axis=1)


def per_slot_sum(values_R: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum rows of each slot (empty slots give 0)."""
    csum = np.concatenate([[0.0], np.cumsum(values_R, dtype=np.float64)])
    return csum[offsets[1:]] - csum[offsets[:-1]]


class PolicyRun:
    """One policy's controller, queues and records within a simulation."""

    def __init__(
        self, policy: PolicySpec, spec: NetworkSpec, slots: int, seed: int, service: Service = "fluid"
    ):
        self.label = policy.label
        self.spec = spec
        self.controller = policy.build(spec, seed)
        self.engine = SlotEngine(spec, service)
        self.state = self.engine.state
        J = spec.num_servers
        self.arrays: dict[str, np.ndarray] = {name: np.zeros((slots, J)) for name in PER_SERVER}
        self.arrays.update({name: np.zeros(slots) for name in PER_SLOT})
        self.tracker = CompletionTracker(J, slots)
        self.cum_served_E = np.zeros(J)

    def run_chunk(self, trace: ScoreTrace, t0: int, topk_mass_R: np.ndarray, kth_R: np.ndarray) -> None:
        J, K = self.spec.num_servers, self.spec.k
        ids, kept = [], []
        a = self.arrays
        for i in range(trace.num_slots):
            t = t0 + i
            decision = self.controller.decide(self.state, trace.slot(i))
            arrived_E = decision.routed_E(J)
            outcome = self.engine.step(decision.freq_E, arrived_E)
            self.cum_served_E += outcome.served_E
            self.tracker.cum_served_ET[:, t] = self.cum_served_E
            a["served"][t] = outcome.served_E
            a["arrived"][t] = arrived_E
            a["energy"][t] = outcome.energy_E
            a["freq"][t] = decision.freq_E
            a["backlog"][t] = self.state.backlog_E
            a["energy_queue"][t] = self.state.energy_queue_E
            ids.append(decision.expert_ids_NK)
            kept.append(decision.kept_mask())
        ids_RK = np.concatenate(ids) if ids else np.zeros((0, K), dtype=np.int64)
        kept_RK = np.concatenate(kept) if kept else np.zeros((0, K), dtype=bool)
        chosen_RK = np.take_along_axis(trace.scores, ids_RK, axis=1)
        sl = slice(t0, t0 + trace.num_slots)
        offs = trace.offsets
        a["tokens"][sl] = trace.counts
        a["gate_mass"][sl] = per_slot_sum((chosen_RK * kept_RK).sum(axis=1), offs)
        a["topk_mass"][sl] = per_slot_sum(topk_mass_R, offs)
        a["overlap"][sl] = per_slot_sum(((chosen_RK >= kth_R[:, None]) & kept_RK).sum(axis=1), offs)
        a["drops"][sl] = per_slot_sum((~kept_RK).sum(axis=1), offs)
        self.tracker.add(ids_RK, kept_RK, t0 + trace.num_slots)

    def finish(self) -> RunTrace:
        self.tracker.finish(len(self.arrays["tokens"]))
        self.arrays["completed"] = self.tracker.completed_T.astype(np.float64)
        return RunTrace(self.label, self.arrays)


def simulate(
    spec: NetworkSpec,
    policies: list[PolicySpec],
    slots: int,
    seed: int = 0,
    chunk: int = 250,
    progress: Callable[[int], None] | None = None,
    service: Service = "fluid",
) -> dict[str, RunTrace]:
    """Run every policy for ``slots`` slots on the same workload (seeded by ``seed``).

    ``progress(n)`` is called after each chunk with the number of policy-slots just simulated;
    ``service`` is the slot engine's service model (``whole`` tokens is what the trainer runs).
    """
    require(slots >= 1, "slots", f"must be >= 1, got {slots}")
    labels = [p.label for p in policies]
    require(len(set(labels)) == len(labels), "policies", f"labels must be unique, got {labels}")
    workload = Workload(spec, seed)
    runs = [PolicyRun(p, spec, slots, seed, service) for p in policies]
    for t0 in range(0, slots, chunk):
        trace = workload.next_chunk(min(chunk, slots - t0))
        topk_mass_R, kth_R = chunk_gate_stats(trace, spec.k)
        for run in runs:
            run.run_chunk(trace, t0, topk_mass_R, kth_R)
            if progress is not None:
                progress(trace.num_slots)
    return {run.label: run.finish() for run in runs}


# ---------------------------------------------------------------------------------------------------
# Summaries


def slope(y_T: np.ndarray) -> float:
    """Least-squares slope per slot."""
    if len(y_T) < 2:
        return 0.0
    x = np.arange(len(y_T), dtype=np.float64)
    x -= x.mean()
    return float(np.dot(x, y_T - y_T.mean()) / np.dot(x, x))


def trend_correlation(y_T: np.ndarray) -> float:
    """Correlation of a series with time: the share of its variation a linear trend explains (signed)."""
    if len(y_T) < 2 or np.std(y_T) == 0:
        return 0.0
    return float(np.corrcoef(np.arange(len(y_T)), y_T)[0, 1])


def summarize_run(run: RunTrace, spec: NetworkSpec, cfg_omega: tuple[float, float]) -> dict[str, float]:
    """Scalar metrics of one policy on one seed (see docs/stable-moe.md, "Reading the outputs")."""
    T = len(run["tokens"])
    total_backlog = run["backlog"].sum(axis=1)
    half = total_backlog[T // 2 :]
    demand = float(run["tokens"].mean() * spec.k)
    with np.errstate(invalid="ignore", divide="ignore"):
        gc_T = np.where(run["topk_mass"] > 0, run["gate_mass"] / run["topk_mass"], 1.0)
        overlap_T = np.where(run["tokens"] > 0, run["overlap"] / (run["tokens"] * spec.k), 1.0)
    energy_ratio_E = run["energy"].mean(axis=0) / spec.budget_E
    omega1, omega2 = cfg_omega
    served_T = run["served"].sum(axis=1)
    return {
        "throughput_mean": float(served_T.mean()),
        "completed_mean": float(run["completed"].mean()),
        "backlog_mean": float(total_backlog.mean()),
        "backlog_final": float(total_backlog[-1]),
        "backlog_max_server_final": float(run["backlog"][-1].max()),
        "backlog_slope_last_half": slope(half),
        "backlog_slope_relative": slope(half) / max(demand, 1e-12),
        "backlog_trend_r": trend_correlation(half),
        "energy_over_budget_max": float(energy_ratio_E.max()),
        "energy_queue_mean": float(run["energy_queue"].sum(axis=1).mean()),
        "energy_queue_slope_last_half": slope(run["energy_queue"].sum(axis=1)[T // 2 :]),
        "gc_norm_mean": float(gc_T.mean()),
        "topk_overlap_mean": float(overlap_T.mean()),
        "drops_mean": float(run["drops"].mean()),
        "demand_mean": demand,
        "utility_mean": float((omega1 * served_T + omega2 * run["gate_mass"]).mean()),
    }


STABLE_SLOPE = 1e-3
STABLE_TREND_R = 0.5
"""Over the last half of a run, a policy's total backlog counts as stable when its least-squares slope
is below ``STABLE_SLOPE`` of the per-slot demand (K tokens per arrival), or when a linear trend explains
little of its variation (correlation with time below ``STABLE_TREND_R``: bursty but bounded). A queue
that grows without bound fails both."""


def is_stable(run_summary: dict[str, float]) -> bool:
    return bool(
        run_summary["backlog_slope_relative"] < STABLE_SLOPE
        or run_summary["backlog_trend_r"] < STABLE_TREND_R
    )


def summarize(
    runs_by_seed: list[dict[str, RunTrace]], spec: NetworkSpec, policies: list[PolicySpec]
) -> dict[str, Any]:
    """Average metrics over seeds per policy (with the spread across seeds), plus the headline ratios:
    Stable-MoE's throughput over the best gate-following baseline and its GC gain over the best
    load-only baseline."""
    out: dict[str, Any] = {}
    for p in policies:
        params = {**vars(spec.controller), **p.params}
        omega = (float(params.get("omega1", 1.0)), float(params.get("omega2", 1.0)))
        per_seed = [summarize_run(runs[p.label], spec, omega) for runs in runs_by_seed]
        entry: dict[str, Any] = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
        entry["throughput_std"] = float(np.std([s["throughput_mean"] for s in per_seed]))
        entry["gc_norm_std"] = float(np.std([s["gc_norm_mean"] for s in per_seed]))
        entry["stable"] = all(is_stable(s) for s in per_seed)
        entry["controller"] = p.name
        entry["params"] = dict(p.params)
        out[p.label] = entry
    out.update(headline(out))
    return out


def headline(per_policy: dict[str, Any]) -> dict[str, Any]:
    """Stable-MoE vs the best gate-following (top-K family) and best load-only (random-K, JSQ-K) policy."""
    by_name = {v["controller"]: k for k, v in per_policy.items() if isinstance(v, dict) and "controller" in v}
    main = next(
        (by_name[n] for n in ("stable-moe", "stable-moe-sequential", "stable-moe-linear") if n in by_name),
        None,
    )
    result: dict[str, Any] = {}
    gate = [by_name[n] for n in GATE_FOLLOWING if n in by_name] + (
        [by_name["topk"]] if "topk" in by_name else []
    )
    load = [by_name[n] for n in LOAD_ONLY if n in by_name]
    if main is None:
        return result
    result["stable_moe_policy"] = main
    if gate:
        best = max(gate, key=lambda lab: per_policy[lab]["throughput_mean"])
        result["stable_moe_throughput_ratio"] = per_policy[main]["throughput_mean"] / max(
            per_policy[best]["throughput_mean"], 1e-12
        )
        result["best_gate_following_baseline"] = best
    if load:
        best = max(load, key=lambda lab: per_policy[lab]["gc_norm_mean"])
        result["stable_moe_gc_gain"] = per_policy[main]["gc_norm_mean"] - per_policy[best]["gc_norm_mean"]
        result["best_load_only_baseline"] = best
    return result
