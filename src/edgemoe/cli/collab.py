"""``edgemoe collab fit|select|sweep|eval``: MoE² over edge LLM experts.

``fit`` builds a run folder (answer cache, embeddings, split, gate trained once on the full expert
set); the other commands reload it. Other modules of this package extend the group by defining
``register_collab(collab_subparsers)``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import edgemoe.cli as cli_pkg
from edgemoe.cli.common import add_config_args, load_config_dict, run_dir, write_json

EXHAUSTIVE_WARN_EXPERTS = 16


def exhaustive_warning(n: int) -> str:
    return (
        f"{n} experts: exhaustive search ('collab sweep', 'collab eval') evaluates up to 2^{n} = {2**n:,} "
        "subsets per budget and will take minutes; pass --no-exhaustive to skip it (DMO is exact)"
    )


def objective_note(correctness_only: bool, objective: str) -> str:
    if correctness_only:
        return (
            f"{objective} on correctness-only data: each expert gives only its probability of being right, "
            "so the ensemble's probability of the correct answer is the gate-weighted mean of the experts' "
            "and 'accuracy' is that expected accuracy"
        )
    return f"{objective} of the gate-weighted mixture of the experts' option distributions"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("collab", help="MoE²: collaborative inference over edge LLM experts")
    sub = parser.add_subparsers(dest="collab_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 1)

    fit = sub.add_parser("fit", help="build a run: answer cache, embeddings, gate trained on the full set")
    add_config_args(fit)
    fit.add_argument("--experts", type=int, default=None, help="simulate a default zoo of N experts")
    fit.add_argument(
        "--data-dir", default=None, help="data root (default: $EDGEMOE_DATA or the per-user data folder)"
    )
    fit.add_argument("--limit-per-subject", type=int, default=None)
    fit.add_argument("--synthetic", type=int, default=None, metavar="Q", help="use Q synthetic questions")
    fit.add_argument(
        "--table",
        default=None,
        metavar="PATH",
        help="a router benchmark file/folder (relative: under the data root)",
    )
    fit.add_argument(
        "--format", default=None, help="reader for --table: table | routerdc | routellm | routerbench"
    )
    fit.add_argument("--cache", default=None, help="answer cache (JSONL); default: simulate from profiles")
    fit.add_argument("--embedder", default=None, choices=("auto", "minilm", "hashing"))
    fit.add_argument("--embed-cache", default=None, metavar="DIR", help="keep prompt embeddings in DIR")
    fit.add_argument("--out", default=None)
    fit.set_defaults(func=cmd_fit)

    sel = sub.add_parser("select", help="choose the enabled experts under energy/latency budgets")
    _run_args(sel)
    sel.add_argument(
        "--method", default="dmo", choices=("dmo", "exhaustive", "best_single", "uniform", "greedy", "random")
    )
    sel.add_argument("--bound", default="valid", choices=("valid", "monotone"))
    sel.set_defaults(func=cmd_select)

    sw = sub.add_parser("sweep", help="accuracy vs energy and vs latency budget, MoE² and every baseline")
    _run_args(sw)
    sw.add_argument("--energy-fractions", default="0.03,0.06,0.1,0.15,0.2,0.3,0.45")
    sw.add_argument("--latency-budgets", default="0.05,0.1,0.2,0.4,0.8")
    sw.add_argument("--no-exhaustive", action="store_true", help="skip exhaustive search (large N)")
    sw.set_defaults(func=cmd_sweep)

    ev = sub.add_parser("eval", help="measure optimality preservation and monotonicity; DMO vs exhaustive")
    _run_args(ev)
    ev.add_argument("--gap-steps", type=int, default=150, help="gate training steps per retrained subset")
    ev.add_argument("--gap-max-experts", type=int, default=8)
    ev.add_argument(
        "--gap-train-questions", type=int, default=1500, help="training questions per retrained gate"
    )
    ev.add_argument("--energy-fractions", default="0.05,0.1,0.2,0.35,0.5", help="budgets for the DMO check")
    ev.add_argument(
        "--no-exhaustive",
        action="store_true",
        help="check the monotone-bound DMO against valid-bound DMO instead",
    )
    ev.set_defaults(func=cmd_eval)

    st = sub.add_parser(
        "stream",
        help="select on one question mix, serve another: realised energy with and without the energy queue",
    )
    _run_args(st)
    st.add_argument("--select-categories", default=None, help="comma list: select on these (default: all)")
    st.add_argument(
        "--serve-categories", default=None, help="comma list: serve these test questions (default: all)"
    )
    st.add_argument("--order", default="shuffled", choices=("shuffled", "blocks"), help="stream order")
    st.add_argument(
        "--v", type=float, default=None, help="queue weight V in units of the budget (default: run's)"
    )
    st.add_argument(
        "--coarse-energy-fraction",
        type=float,
        default=None,
        help="choose the enabled set under this fraction of all experts' energy instead (the queue keeps --energy)",
    )
    st.add_argument(
        "--credit", type=float, default=0.0, help="energy the queue may bank from cheap requests (J)"
    )
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=cmd_stream)

    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "collab":
            continue
        module = importlib.import_module(f"{cli_pkg.__name__}.{info.name}")
        extend = getattr(module, "register_collab", None)
        if extend is not None:
            extend(sub)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="folder written by 'edgemoe collab fit'")
    p.add_argument("--energy", type=float, default=None, help="energy budget per request (J)")
    p.add_argument(
        "--energy-fraction", type=float, default=None, help="budget as a fraction of all experts' energy"
    )
    p.add_argument(
        "--latency", type=float, default=None, help="latency budget per request (s), every category"
    )
    p.add_argument("--out", default=None)


def cmd_fit(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.runs import build_run_data, calibrate, fit, load_run_spec, problem, save_run

    data = load_config_dict(args)
    if args.experts is not None:
        data.pop("experts", None)
        data["simulated_experts"] = args.experts
    d = dict(data.get("data", {}))
    if args.data_dir:
        d["dir"] = args.data_dir
    if args.limit_per_subject:
        d["limit_per_subject"] = args.limit_per_subject
    if args.synthetic:
        d.update(source="synthetic", synthetic_questions=args.synthetic)
    if args.table:
        d.update(source="table", path=args.table)
    if args.format:
        d["format"] = args.format
    data["data"] = d
    if args.cache:
        data["cache"] = args.cache
    if args.embedder:
        data["embedder"] = args.embedder
    if args.embed_cache:
        data["embed_cache"] = args.embed_cache
    spec = load_run_spec(data)
    out = run_dir(args.out, "runs", "collab-fit")
    with tqdm(total=4, desc="collab fit") as bar:
        ws = build_run_data(spec)
        bar.update()
        gate = fit(ws, spec.gate)
        bar.update()
        calibration = calibrate(ws, gate)
        bar.update()
        save_run(out, spec, ws, gate)
        bar.update()
    sel = problem(ws, gate, "select")
    singles = sel.evaluate(np.eye(sel.num_experts, dtype=bool))
    n = sel.num_experts
    summary = {
        "run": str(out),
        "questions": len(ws.questions),
        "split_sizes": {s: int(len(ws.index(s))) for s in ("train", "select", "test")},
        "experts": ws.config.expert_names,
        "categories": list(ws.config.categories),
        "embedding_dim": int(ws.emb_QD.shape[1]),
        "embedder": ws.embedder,
        "objective": objective_note(ws.correctness_only, ws.config.objective),
        "gate_calibration": calibration,
        "equal_weight_categories": [c for c, r in calibration.items() if (r["tau"], r["beta"]) == (0.0, 0.0)],
        "single_expert_select_accuracy": dict(zip(sel.names, singles.accuracy_B.round(4).tolist())),
        "energy_per_request_j": dict(zip(sel.names, sel.cost_N.round(4).tolist())),
    }
    if n > EXHAUSTIVE_WARN_EXPERTS:
        summary["warning"] = exhaustive_warning(n)
        print(f"warning: {summary['warning']}", file=sys.stderr)
    write_json(out / "summary.json", summary)
    rows = [
        {
            "expert": e.name,
            "hardware": e.hardware,
            "params_b": e.params_b,
            "power_w": e.power,
            "energy_per_request_j": float(sel.cost_N[i]),
            "mean_delay_s": float(sel.delay_QN[:, i].mean()),
            "select_accuracy": float(singles.accuracy_B[i]),
        }
        for i, e in enumerate(ws.config.experts)
    ]
    _write_csv(out / "experts.csv", rows)
    print(json.dumps(summary, indent=2))
    return 0


def _budgets(args: argparse.Namespace, ws, gate):
    from edgemoe.collab.offline.runs import problem
    from edgemoe.collab.offline.sweep import uniform_latency

    latency = ws.config.budgets if args.latency is None else uniform_latency(ws.config.budgets, args.latency)
    select = problem(ws, gate, "select", latency)
    total = float(select.cost_N[select.usable_N].sum())
    if args.energy is not None:
        energy = args.energy
    elif args.energy_fraction is not None:
        energy = args.energy_fraction * total
    else:
        energy = ws.config.budgets.energy_j if ws.config.budgets.energy_j is not None else total
    return latency, select, energy, total


def cmd_select(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.runs import load_run, problem
    from edgemoe.collab.offline.sweep import solve

    ws, gate = load_run(args.run)
    latency, select, energy, _ = _budgets(args, ws, gate)
    res = solve(select, energy, args.method, bound=args.bound)
    out = res.to_dict()
    out["energy_budget_j"] = energy
    if res.feasible:
        out["test"] = problem(ws, gate, "test", latency).realised(
            np.asarray(res.mask), list(ws.config.categories)
        )
    folder = run_dir(args.out, str(Path(args.run)), "select")
    write_json(folder / "summary.json", out)
    print(json.dumps({k: v for k, v in out.items() if k != "mask"}, indent=2, default=float))
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def cmd_sweep(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.runs import load_run, problem
    from edgemoe.collab.offline.sweep import METHODS, run_budgets, summarise, uniform_latency
    from edgemoe.report.collab import plot_sweep

    ws, gate = load_run(args.run)
    latency, select, energy, total = _budgets(args, ws, gate)
    methods = [m for m in METHODS if not (args.no_exhaustive and m == "exhaustive")]
    if "exhaustive" in methods and select.num_experts > EXHAUSTIVE_WARN_EXPERTS:
        print(f"warning: {exhaustive_warning(select.num_experts)}", file=sys.stderr)
    cats = list(ws.config.categories)

    def make(split, budgets):
        return problem(ws, gate, split, budgets)

    fractions = [float(x) for x in args.energy_fractions.split(",")]
    rows = []
    for r in run_budgets(
        make,
        [f * total for f in fractions],
        latency,
        methods,
        cats,
        progress=lambda j: tqdm(j, desc="energy sweep"),
    ):
        rows.append({"sweep": "energy", **r})
    for t in tqdm([float(x) for x in args.latency_budgets.split(",")], desc="latency sweep"):
        for r in run_budgets(make, [energy], uniform_latency(ws.config.budgets, t), methods, cats):
            rows.append({"sweep": "latency", **r})
    folder = run_dir(args.out, str(Path(args.run)), "sweep")
    _write_csv(folder / "sweep.csv", rows)
    write_json(folder / "sweep.json", rows)
    summary = {"energy_total_j": total, "energy_budget_for_latency_sweep_j": energy, **summarise(rows)}
    write_json(folder / "summary.json", summary)
    plot_sweep(rows, folder)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.assumptions import monotonicity, optimality_gap
    from edgemoe.collab.offline.runs import fit, load_run
    from edgemoe.collab.selection.dmo import dmo, exhaustive

    ws, gate = load_run(args.run)
    latency, select, energy, total = _budgets(args, ws, gate)
    out: dict[str, Any] = {"monotonicity": monotonicity(select)}
    checks = []
    reference = (lambda p, b: dmo(p, b, bound="valid")) if args.no_exhaustive else exhaustive
    fractions = [float(x) for x in args.energy_fractions.split(",")]
    for frac in tqdm(fractions, desc="dmo vs reference"):
        b = frac * total
        d, e = dmo(select, b, bound="monotone"), reference(select, b)
        checks.append(
            {
                "energy_budget_j": b,
                "reference": e.method,
                "exact": abs(d.value - e.value) <= 1e-12 or (not d.feasible and not e.feasible),
                "dmo_evals": d.evals,
                "reference_evals": e.evals,
                "relied_on_monotonicity": d.relied_on_monotonicity,
                "monotonicity_violations": d.monotonicity_violations,
                "fallback_changed_answer": d.fallback_changed_answer,
            }
        )
    out["dmo_monotone_check"] = checks
    n = len(ws.config.experts)
    if n <= args.gap_max_experts:
        idx = ws.index("select")
        train = ws.index("train")[: args.gap_train_questions]
        cfg = dataclasses.replace(gate.cfg, steps=args.gap_steps)
        full = fit(ws, cfg, index=train)
        out["optimality_gap"] = optimality_gap(
            full,
            lambda m: fit(ws, cfg, mask_N=m, index=train),
            ws.emb_QD[idx],
            ws.questions.category_Q[idx],
            ws.cache.probs_QNO[idx],
            ws.questions.answer_Q[idx],
            max_experts=args.gap_max_experts,
            progress=lambda it: tqdm(it, desc="optimality gap"),
        )
    else:
        out["optimality_gap"] = f"skipped: {n} experts > {args.gap_max_experts} (retrains a gate per subset)"
    folder = run_dir(args.out, str(Path(args.run)), "eval")
    write_json(folder / "summary.json", out)
    if isinstance(out["optimality_gap"], dict):
        from edgemoe.report.collab import plot_gap

        plot_gap(out["optimality_gap"], folder)
    brief = {k: v for k, v in out.items() if k != "optimality_gap"}
    if isinstance(out["optimality_gap"], dict):
        brief["optimality_gap"] = {k: v for k, v in out["optimality_gap"].items() if k != "rows"}
    print(json.dumps(brief, indent=2))
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.runs import load_run
    from edgemoe.collab.offline.stream import ShiftSpec, run_shift
    from edgemoe.collab.offline.sweep import uniform_latency
    from edgemoe.report.collab import plot_stream

    ws, gate = load_run(args.run)
    latency = ws.config.budgets if args.latency is None else uniform_latency(ws.config.budgets, args.latency)
    spec = ShiftSpec(
        energy_j=args.energy,
        energy_fraction=args.energy_fraction,
        coarse_energy_fraction=args.coarse_energy_fraction,
        select_categories=args.select_categories.split(",") if args.select_categories else None,
        serve_categories=args.serve_categories.split(",") if args.serve_categories else None,
        order=args.order,
        v=args.v,
        credit_j=args.credit,
        seed=args.seed,
    )
    out = run_shift(ws, gate, spec, latency)
    folder = run_dir(args.out, str(Path(args.run)), "stream")
    trace = out.pop("running_energy_without_j"), out.pop("running_energy_with_j")
    _write_csv(
        folder / "trace.csv",
        [
            {"request": i + 1, "running_energy_without_j": a, "running_energy_with_j": b}
            for i, (a, b) in enumerate(zip(*trace))
        ],
    )
    write_json(folder / "summary.json", out)
    plot_stream(trace[0], trace[1], out["budget_j"], folder)
    print(json.dumps(out, indent=2))
    return 0
