"""Budget sweeps: MoE² (DMO) against exhaustive search and every baseline.

Each row is one (budget, method): the chosen set, its accuracy on the selection split (where the
choice was made) and on the held-out test split, its reserved and realised energy per request, and
the realised per-category latency — checked against the budgets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from edgemoe.collab.profiles import Budgets
from edgemoe.collab.selection.baselines import BASELINES, equal_weight_reference, uniform_gate
from edgemoe.collab.selection.dmo import SelectionResult, dmo, exhaustive, fits
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.config import check_choice

METHODS = ("dmo", "exhaustive", *BASELINES)


def solve(
    problem: SelectionProblem, budget: float, method: str, seed: int = 0, bound: str = "valid"
) -> SelectionResult:
    """Run one coarse-level method."""
    check_choice(method, "method", METHODS)
    if method == "dmo":
        return dmo(problem, budget, bound=bound)
    if method == "exhaustive":
        return exhaustive(problem, budget)
    if method == "random":
        return BASELINES.get("random", field="method")(problem, budget, seed=seed)
    return BASELINES.get(method, field="method")(problem, budget)


def _row(
    res: SelectionResult,
    select: SelectionProblem,
    test: SelectionProblem,
    budget: float,
    latency: Budgets,
    categories: list[str],
) -> dict:
    row = {
        "method": res.method.split("-")[0] if res.method.startswith("dmo") else res.method,
        "energy_budget_j": budget,
        "experts": " ".join(res.experts),
        "size": len(res.experts),
        "feasible": res.feasible,
        "reason": res.reason,
        "value": res.value,
        "select_accuracy": res.accuracy,
        "select_log_likelihood": res.log_likelihood,
        "energy_reserved_j": res.energy_j,
        "evals": res.evals,
        "seconds": res.seconds,
    }
    if not res.feasible:
        return {
            **row,
            "test_accuracy": 0.0,
            "test_log_likelihood": row["select_log_likelihood"],
            "within_budget": True,
        }
    mask = np.asarray(res.mask)
    if res.method == "uniform":
        select, test = uniform_gate(select), uniform_gate(test)
    sel = select.realised(mask, categories)
    tst = test.realised(mask, categories)
    lat_ok = all(
        v["max_s"] <= latency.latency_for(c) + 1e-9
        for split in (sel, tst)
        for c, v in split["latency"].items()
    )
    if res.method.startswith("dmo"):
        # The gate-free reference on the same set (selection.baselines.equal_weight_reference).
        for name, prob in (("select", select), ("test", test)):
            ref = equal_weight_reference(prob, mask)
            row[f"{name}_accuracy_equal_weights"] = ref["accuracy"]
            row[f"{name}_energy_equal_weights_j"] = ref["energy_j"]
    row.update(
        test_accuracy=tst["accuracy"],
        test_log_likelihood=tst["log_likelihood"],
        energy_realised_select_j=sel["energy_realised_j"],
        energy_realised_test_j=tst["energy_realised_j"],
        served_fraction_test=tst["served_fraction"],
        experts_per_request_test=tst["experts_per_request"],
        latency_max_test_s=max((v["max_s"] for v in tst["latency"].values()), default=0.0),
        within_budget=bool(fits(sel["energy_realised_j"], budget) and lat_ok),
        energy_within_budget_test=bool(fits(tst["energy_realised_j"], budget)),
    )
    return row


def run_budgets(
    make_problem: Callable[[str, Budgets], SelectionProblem],
    energy_budgets: Iterable[float],
    latency: Budgets,
    methods: Iterable[str],
    categories: list[str],
    random_draws: int = 5,
    progress: Callable | None = None,
    bound: str = "valid",
) -> list[dict]:
    """Rows for every (energy budget, method) under one latency-budget setting.

    ``make_problem(split, budgets)`` builds the instance on ``select`` / ``test``. The random
    baseline is averaged over ``random_draws`` seeds.
    """
    select, test = make_problem("select", latency), make_problem("test", latency)
    rows = []
    jobs = [(b, m) for b in energy_budgets for m in methods]
    for budget, method in progress(jobs) if progress else jobs:
        draws = random_draws if method == "random" else 1
        parts = [
            _row(
                solve(select, budget, method, seed=s, bound=bound), select, test, budget, latency, categories
            )
            for s in range(draws)
        ]
        row = dict(parts[0])
        for key in (
            "select_accuracy",
            "test_accuracy",
            "select_log_likelihood",
            "test_log_likelihood",
            "energy_reserved_j",
        ):
            row[key] = float(np.mean([p[key] for p in parts]))
        row["within_budget"] = all(p["within_budget"] for p in parts)
        row["energy_within_budget_test"] = all(p.get("energy_within_budget_test", True) for p in parts)
        row["latency_budget_s"] = (
            latency.default_latency_s if latency.default_latency_s is not None else float("inf")
        )
        rows.append(row)
    return rows


def uniform_latency(budgets: Budgets, seconds: float | None) -> Budgets:
    """The same budgets with one latency budget for every category."""
    return dataclasses.replace(budgets, latency_s={}, default_latency_s=seconds)


def summarise(rows: list[dict]) -> dict:
    """Headline figures: DMO == exhaustive, MoE² vs every baseline, margin over the best single expert."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r.get("sweep", ""), r["energy_budget_j"], r["latency_budget_s"]), {})[r["method"]] = r
    exact, dominates, within, margins, test_margins, test_over = [], [], [], [], [], []
    vs_equal = []
    for group in by.values():
        moe = group.get("dmo")
        if moe is None:
            continue
        if "exhaustive" in group:
            ex = group["exhaustive"]
            exact.append(
                ex["feasible"] == moe["feasible"]
                and (not ex["feasible"] or abs(ex["value"] - moe["value"]) <= 1e-12)
            )
        others = [g for m, g in group.items() if m not in ("dmo", "exhaustive")]
        dominates.append(all(moe["select_accuracy"] >= o["select_accuracy"] - 1e-12 for o in others))
        within.append(all(g["within_budget"] for g in group.values()))
        test_over.append(not moe.get("energy_within_budget_test", True))
        if "test_accuracy_equal_weights" in moe:
            vs_equal.append(moe["test_accuracy"] - moe["test_accuracy_equal_weights"])
        single = group.get("best_single")
        if single is not None and single["feasible"]:
            margins.append(moe["select_accuracy"] - single["select_accuracy"])
            test_margins.append(moe["test_accuracy"] - single["test_accuracy"])
    return {
        "budgets": len(by),
        "dmo_equals_exhaustive": all(exact) if exact else None,
        "dmo_at_or_above_every_baseline": all(dominates),
        "within_budget": all(within),
        "moe2_budgets_over_energy_on_test_split": int(sum(test_over)),
        "margin_over_best_single_max": float(max(margins)) if margins else None,
        "margin_over_best_single_mean": float(np.mean(margins)) if margins else None,
        "test_margin_over_best_single_max": float(max(test_margins)) if test_margins else None,
        "test_margin_over_best_single_mean": float(np.mean(test_margins)) if test_margins else None,
        "test_gate_minus_equal_weights_min": float(min(vs_equal)) if vs_equal else None,
        "test_gate_at_or_above_equal_weights": int(sum(d >= -1e-12 for d in vs_equal)),
        "test_gate_vs_equal_weights_budgets": len(vs_equal),
    }
