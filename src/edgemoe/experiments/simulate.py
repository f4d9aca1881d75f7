"""Network simulation experiments: Stable-MoE and the baselines on a simulated edge network.

Everything ``edgemoe simulate`` does besides parsing its flags lives here: the policy list (or a
parameter sweep), the seeds and their worker processes, the workload chunk sized to a memory budget,
the run folder (``spec.yaml``, ``summary.json``, per-seed CSV traces, PNG plots).

:func:`plan_simulation` validates everything first (flags, policies, sweep values, the workload's
files), so a run that cannot start fails before its folder exists; :func:`run_simulation` then runs
the plan and writes the folder.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from edgemoe.config import require
from edgemoe.edge.controllers import expand_policies
from edgemoe.edge.scores import Workload
from edgemoe.edge.simulator import PolicySpec, RunTrace, simulate, summarize
from edgemoe.edge.spec import ControllerSpec, NetworkSpec
from edgemoe.errors import ConfigError
from edgemoe.runs import RunFolder

# Summary keys comparing Stable-MoE with the best baselines (global; per sweep point in a sweep).
HEADLINE_KEYS = (
    "stable_moe_policy",
    "stable_moe_throughput_ratio",
    "best_gate_following_baseline",
    "stable_moe_gc_gain",
    "best_load_only_baseline",
)
# References simulated alongside a sweep: the gate-following limit and the load-only limit.
SWEEP_REFERENCES = ("topk-sustainable", "jsq-k")
DEFAULT_CHUNK = 250
"""Slots per workload chunk when the memory budget allows it."""
DEFAULT_MEMORY_MB = 512
BYTES_PER_SCORE = 8
"""Bytes per (token, expert) gate score held in one chunk, counting the float64 working copies."""


@dataclass(frozen=True)
class Sweep:
    """One controller parameter swept over ``values`` for ``policy``."""

    param: str
    values: list[float]
    policy: str


@dataclass
class SimulationPlan:
    """A validated simulation: what runs, how long, on how many seeds, in which chunks."""

    spec: NetworkSpec
    policies: list[PolicySpec]
    slots: int
    seeds: int
    chunk: int
    jobs: int = 1
    sweep: Sweep | None = None
    notes: list[str] = field(default_factory=list)
    """Warnings for the user (e.g. a chunk over the memory budget)."""

    @property
    def policy_slots(self) -> int:
        return self.slots * len(self.policies) * self.seeds


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"V=0.1,1,10"`` -> ``("V", [0.1, 1.0, 10.0])``; the parameter must be a controller field."""
    require("=" in text, "--sweep", f"must look like V=0.1,1,10, got {text!r}")
    param, raw = text.split("=", 1)
    param = param.strip()
    allowed = [f for f in ControllerSpec.__dataclass_fields__ if f != "mode"]
    require(param in allowed, "--sweep", f"parameter must be one of {allowed}, got {param!r}")
    try:
        values = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("--sweep", f"values must be numbers, got {raw!r}") from None
    require(len(values) > 0, "--sweep", "give at least one value")
    return param, values


def build_policies(policies: str | None, sweep: str | None) -> tuple[list[PolicySpec], Sweep | None]:
    """The policies to simulate: ``policies`` (default all), or with ``sweep`` one labelled policy per
    swept value (default Stable-MoE) plus the sweep references."""
    if sweep is None:
        return [PolicySpec(n, n) for n in expand_policies(policies or "all")], None
    param, values = parse_sweep(sweep)
    names = expand_policies(policies or "stable-moe")
    out = []
    for name in names:
        for v in values:
            value: Any = int(v) if param == "block" else v
            out.append(PolicySpec(f"{name}[{param}={v:g}]", name, {param: value}))
    out += [PolicySpec(n, n) for n in SWEEP_REFERENCES if n not in names]
    return out, Sweep(param, values, names[0])


def check_policies(spec: NetworkSpec, policies: list[PolicySpec]) -> None:
    """Build every controller once so a bad parameter (e.g. ``V=-1`` in a sweep) fails up front,
    naming the policy."""
    for p in policies:
        try:
            p.build(spec, seed=0)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{str(exc).split(': ', 1)[-1]} (policy {p.label})") from None


def chunk_bytes(chunk: int, tokens_per_slot: float, num_experts: int) -> int:
    """Memory of one workload chunk's gate scores: chunk x N x E x 8 bytes."""
    return int(chunk * max(tokens_per_slot, 1.0) * num_experts * BYTES_PER_SCORE)


def size_chunk(
    chunk: int | None, tokens_per_slot: float, num_experts: int, memory_mb: float
) -> tuple[int, str | None]:
    """The chunk to simulate with and a warning, if any.

    Without an explicit ``chunk`` the largest one up to :data:`DEFAULT_CHUNK` within ``memory_mb`` is
    chosen (at least one slot). An explicit chunk is kept; the warning says when it exceeds the budget.
    Results do not depend on the chunk (the workload streams are chunk-independent).
    """
    budget = memory_mb * 2**20
    per_slot = chunk_bytes(1, tokens_per_slot, num_experts)
    if chunk is None:
        chunk = int(max(1, min(DEFAULT_CHUNK, budget // per_slot)))
        if per_slot > budget:
            return chunk, (
                f"one slot's gate scores need {per_slot / 2**20:.0f} MB (N={tokens_per_slot:.0f} tokens x "
                f"E={num_experts} x {BYTES_PER_SCORE} B), over --memory-mb {memory_mb:g}; simulating one slot "
                "per chunk"
            )
        return chunk, None
    need = chunk * per_slot
    if need > budget:
        return chunk, (
            f"--chunk {chunk} holds ~{need / 2**20:.0f} MB of gate scores (chunk x N={tokens_per_slot:.0f} x "
            f"E={num_experts} x {BYTES_PER_SCORE} B), over --memory-mb {memory_mb:g}; drop --chunk to size it "
            "automatically"
        )
    return chunk, None


def mean_tokens_per_slot(spec: NetworkSpec, workload: Workload) -> float:
    """Expected tokens per slot: the recording's mean for a replay, else the arrival process's mean."""
    if spec.scores.kind == "replay":
        return float(workload.trace.counts.mean())
    return spec.arrivals.mean_rate()


def plan_simulation(
    spec: NetworkSpec,
    *,
    slots: int,
    seeds: int,
    policies: str | None = None,
    sweep: str | None = None,
    chunk: int | None = None,
    jobs: int = 1,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> SimulationPlan:
    """Validate a simulation before anything is written (flags, policies, sweep values, workload files)."""
    require(slots >= 1, "--slots", f"must be >= 1, got {slots}")
    require(seeds >= 1, "--seeds", f"must be >= 1, got {seeds}")
    require(chunk is None or chunk >= 1, "--chunk", f"must be >= 1, got {chunk}")
    require(jobs >= 1, "--jobs", f"must be >= 1, got {jobs}")
    require(memory_mb > 0, "--memory-mb", f"must be > 0, got {memory_mb}")
    policy_list, sweep_spec = build_policies(policies, sweep)
    check_policies(spec, policy_list)
    workload = Workload(spec, seed=0)  # loads and checks a recorded score trace
    size, note = size_chunk(chunk, mean_tokens_per_slot(spec, workload), spec.num_servers, memory_mb)
    return SimulationPlan(
        spec, policy_list, slots, seeds, size, jobs, sweep_spec, notes=[note] if note else []
    )


def _simulate_seed(
    spec: NetworkSpec, policies: list[PolicySpec], slots: int, seed: int, chunk: int, queue: Any
) -> dict[str, RunTrace]:
    """One seed in a worker process; progress goes back through ``queue``."""
    return simulate(spec, policies, slots, seed=seed, chunk=chunk, progress=queue.put)


def run_seeds(plan: SimulationPlan, progress: Callable[[int], None]) -> list[dict[str, RunTrace]]:
    """Simulate seeds 0..seeds-1, in ``plan.jobs`` worker processes (seeds are independent; results
    are identical to a serial run)."""
    jobs = min(plan.jobs, plan.seeds)
    args = (plan.spec, plan.policies, plan.slots)
    if jobs <= 1:
        return [simulate(*args, seed=s, chunk=plan.chunk, progress=progress) for s in range(plan.seeds)]
    with mp.Manager() as manager, ProcessPoolExecutor(max_workers=jobs) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_simulate_seed, *args, s, plan.chunk, queue) for s in range(plan.seeds)]
        while not all(f.done() for f in futures):
            try:
                progress(queue.get(timeout=0.2))
            except queue_module.Empty:
                continue
        while not queue.empty():
            progress(queue.get())
        return [f.result() for f in futures]


@dataclass(frozen=True)
class TraceTable:
    """One policy's per-slot trace as CSV columns: totals over servers, then per-server columns.

    The per-server arrays keep their ``[T, E]`` shape until the CSV header is written, so no code
    reads metrics back through formatted column names.
    """

    totals: dict[str, np.ndarray]
    """``[T]`` columns: slot, tokens, served, completed, backlog, energy, energy queue, gate masses, drops."""
    per_server: dict[str, np.ndarray]
    """``[T, E]`` columns: backlog and frequency (GHz) per server."""

    @classmethod
    def of(cls, run: RunTrace) -> TraceTable:
        totals = {
            "slot": np.arange(len(run["tokens"])),
            "tokens": run["tokens"],
            "served": run["served"].sum(axis=1),
            "completed": run["completed"],
            "backlog": run["backlog"].sum(axis=1),
            "energy": run["energy"].sum(axis=1),
            "energy_queue": run["energy_queue"].sum(axis=1),
            "gate_mass": run["gate_mass"],
            "topk_mass": run["topk_mass"],
            "drops": run["drops"],
        }
        return cls(totals, {"backlog": run["backlog"], "freq_ghz": run["freq"] / 1e9})

    def header(self) -> list[str]:
        cols = list(self.totals)
        for name, values_TE in self.per_server.items():
            cols += [f"{name}_{e}" for e in range(values_TE.shape[1])]
        return cols

    def rows(self) -> list[list[float]]:
        columns_CT = [*self.totals.values()] + [
            values_TE[:, e] for values_TE in self.per_server.values() for e in range(values_TE.shape[1])
        ]
        return [list(row) for row in zip(*[np.round(c, 6).tolist() for c in columns_CT])]


def trace_name(label: str, seed: int) -> str:
    """File name of one policy's trace: ``stable-moe[V=10]`` seed 0 -> ``stable-moe_V10_seed0.csv``."""
    safe = label.replace("[", "_").replace("]", "").replace("=", "")
    return f"{safe}_seed{seed}.csv"


def write_traces(runs: dict[str, RunTrace], folder: RunFolder, seed: int) -> None:
    """One CSV per policy under ``traces/``."""
    for label, run in runs.items():
        table = TraceTable.of(run)
        folder.csv(f"traces/{trace_name(label, seed)}", table.rows(), header=table.header())


def sweep_points(summary: dict[str, Any], policies: list[PolicySpec], sweep: Sweep) -> dict[str, Any]:
    """The swept policy's metrics per value, plus a least-squares line of backlog against the value."""
    points = []
    for p in policies:
        if p.name == sweep.policy and sweep.param in p.params:
            point = {"value": float(p.params[sweep.param]), "label": p.label, **summary[p.label]}
            if "topk-sustainable" in summary:
                ref = summary["topk-sustainable"]["throughput_mean"]
                point["throughput_ratio_vs_topk"] = point["throughput_mean"] / max(ref, 1e-12)
            if "jsq-k" in summary:
                point["gc_gain_vs_jsq"] = point["gc_norm_mean"] - summary["jsq-k"]["gc_norm_mean"]
            points.append(point)
    xs = np.array([pt["value"] for pt in points])
    ys = np.array([pt["backlog_mean"] for pt in points])
    fit: dict[str, float] = {}
    if len(points) >= 2 and np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        resid = ys - (slope * xs + intercept)
        r2 = 1.0 - float(resid @ resid) / max(float(((ys - ys.mean()) ** 2).sum()), 1e-12)
        fit = {"backlog_per_unit": float(slope), "intercept": float(intercept), "r2": r2}
    return {**asdict(sweep), "points": points, "backlog_linear_fit": fit}


def run_simulation(
    plan: SimulationPlan, folder: RunFolder, *, plots: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Run ``plan``; write ``spec.yaml``, per-seed traces, ``summary.json`` and plots to ``folder``;
    return the summary (policy -> metrics, headline ratios, ``run`` facts, ``sweep`` for a sweep)."""
    spec = plan.spec
    folder.text("spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    started = time.perf_counter()
    bar = tqdm(
        total=plan.policy_slots,
        desc=f"simulate {spec.name}",
        unit="slot",
        mininterval=1.0,
        disable=not progress,
    )
    with bar:
        runs_by_seed = run_seeds(plan, bar.update)
    for seed, runs in enumerate(runs_by_seed):
        write_traces(runs, folder, seed)
    elapsed = time.perf_counter() - started

    summary = summarize(runs_by_seed, spec, plan.policies)
    summary["run"] = {
        "scenario": spec.name,
        "slots": plan.slots,
        "seeds": plan.seeds,
        "chunk": plan.chunk,
        "policies": [p.label for p in plan.policies],
        "wall_seconds": elapsed,
        "policy_slots_per_second": plan.policy_slots / max(elapsed, 1e-9),
    }
    if plan.sweep is not None:
        # The Stable-MoE-vs-baselines headline is per sweep point here (in sweep.points), not global.
        for key in HEADLINE_KEYS:
            summary.pop(key, None)
        summary["sweep"] = sweep_points(summary, plan.policies, plan.sweep)
    folder.json("summary.json", summary)
    if plots:
        from edgemoe.report.network import plot_runs, plot_sweep

        plot_runs(runs_by_seed[0], spec, summary, folder.path)
        if plan.sweep is not None:
            plot_sweep(summary["sweep"], summary, folder.path)
    return summary
