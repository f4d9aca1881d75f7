"""DMO vs exhaustive search on profile-simulated experts over MMLU.

For each N, a default zoo of N simulated experts answers MMLU (``qa/mmlu`` under the data root:
``--data-dir``, ``EDGEMOE_DATA`` or the per-user default), a gate is trained once on the full set,
and the coarse-level problem is solved on the selection split for a
sweep of energy budgets (fractions of all experts' reserved energy) under one latency budget, by
DMO and by exhaustive search over every feasible subset (both vectorised, same objective code).
Reports per N: objective evaluations and seconds (summed over the budgets), whether DMO matched
exhaustive search on every budget, and MoE² against the baselines.

    python benchmarks/dmo.py --quick      # N = 8, 12, 16, 20
    python benchmarks/dmo.py              # N = 6..24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from edgemoe.collab.data import load_mmlu  # noqa: E402
from edgemoe.collab.embed import HashingEmbedder  # noqa: E402
from edgemoe.collab.gate import GateConfig  # noqa: E402
from edgemoe.collab.offline.runs import fit, problem, run_data, simulated_cache, simulated_config  # noqa: E402
from edgemoe.collab.profiles import MMLU_CATEGORIES, Budgets  # noqa: E402
from edgemoe.collab.selection.baselines import BASELINES  # noqa: E402
from edgemoe.collab.selection.dmo import dmo, exhaustive  # noqa: E402
from edgemoe.files import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def bench_n(n: int, questions, fractions: list[float], latency_s: float, bound: str, seed: int) -> dict:
    cats = list(MMLU_CATEGORIES)
    cfg = simulated_config(n, cats, seed=seed)
    ws = run_data(cfg, questions, simulated_cache(cfg, questions, seed=seed), HashingEmbedder(128), seed=seed)
    gate = fit(ws, GateConfig(steps=200, seed=seed))
    sel = problem(ws, gate, "select", Budgets(default_latency_s=latency_s))
    total = float(sel.cost_N[sel.usable_N].sum())
    out = {"n": n, "questions": sel.num_questions, "usable_experts": int(sel.usable_N.sum()), "budgets": []}
    for frac in fractions:
        budget = frac * total
        d = dmo(sel, budget, bound=bound)
        e = exhaustive(sel, budget)
        base = {name: BASELINES.get(name, field="method")(sel, budget).accuracy for name in BASELINES}
        out["budgets"].append(
            {
                "energy_fraction": frac,
                "energy_budget_j": budget,
                "exact": (d.feasible == e.feasible) and (not e.feasible or abs(d.value - e.value) <= 1e-12),
                "same_set": d.experts == e.experts,
                "dmo_evals": d.evals,
                "dmo_bound_evals": d.bound_evals,
                "dmo_nodes": d.nodes,
                "exhaustive_evals": e.evals,
                "dmo_seconds": d.seconds,
                "exhaustive_seconds": e.seconds,
                "relied_on_monotonicity": d.relied_on_monotonicity,
                "monotonicity_violations": d.monotonicity_violations,
                "fallback_changed_answer": d.fallback_changed_answer,
                "moe2_accuracy": d.accuracy,
                "moe2_size": len(d.experts),
                "baseline_accuracy": base,
                "moe2_at_or_above_baselines": all(d.accuracy >= a - 1e-12 for a in base.values()),
            }
        )
    rows = out["budgets"]
    for key in ("dmo_evals", "exhaustive_evals", "dmo_seconds", "exhaustive_seconds"):
        out[key] = float(sum(r[key] for r in rows)) if "seconds" in key else int(sum(r[key] for r in rows))
    out["exact"] = all(r["exact"] for r in rows)
    out["eval_ratio"] = out["exhaustive_evals"] / max(out["dmo_evals"], 1)
    out["time_ratio"] = out["exhaustive_seconds"] / max(out["dmo_seconds"], 1e-9)
    out["moe2_at_or_above_baselines"] = all(r["moe2_at_or_above_baselines"] for r in rows)
    out["margin_over_best_single_max"] = max(
        r["moe2_accuracy"] - r["baseline_accuracy"]["best_single"] for r in rows
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 8, 12, 16, 20 on fewer questions")
    ap.add_argument("--ns", default=None, help="comma-separated N values")
    ap.add_argument("--fractions", default="0.05,0.1,0.2,0.3", help="energy budgets, fractions of the total")
    ap.add_argument("--limit-per-subject", type=int, default=None)
    ap.add_argument(
        "--latency", type=float, default=0.5, help="latency budget per request (s), every category"
    )
    ap.add_argument("--bound", default="valid", choices=("valid", "monotone"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="data root holding qa/mmlu")
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/dmo[_quick].json)")
    args, _ = ap.parse_known_args()
    torch.set_num_threads(1)
    ns = (
        [int(x) for x in args.ns.split(",")]
        if args.ns
        else ([8, 12, 16, 20] if args.quick else [6, 8, 12, 16, 20, 24])
    )
    out = Path(args.out or HERE / "results" / ("dmo_quick.json" if args.quick else "dmo.json"))
    limit = args.limit_per_subject or (40 if args.quick else 80)
    fractions = [float(x) for x in args.fractions.split(",")]
    questions = load_mmlu(args.data_dir, limit_per_subject=limit)
    results = []
    t0 = time.perf_counter()
    for n in ns:
        r = bench_n(n, questions, fractions, args.latency, args.bound, args.seed)
        results.append(r)
        keys = ("n", "dmo_evals", "exhaustive_evals", "dmo_seconds", "exhaustive_seconds", "exact")
        print(
            json.dumps(
                {k: r[k] for k in keys}
                | {"eval_ratio": round(r["eval_ratio"], 1), "time_ratio": round(r["time_ratio"], 1)}
            ),
            flush=True,
        )
    report = {
        "benchmark": "dmo",
        "quick": args.quick,
        "bound": args.bound,
        "mmlu_questions": len(questions),
        "energy_fractions": fractions,
        "latency_budget_s": args.latency,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - t0,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    try:
        from edgemoe.report.collab import plot_dmo

        plot_dmo(results, out.with_suffix(".png"))
    except ImportError:
        pass
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
