"""``edgemoe collab profile`` and ``edgemoe collab build-cache``: real edge LLM experts.

Added to the ``collab`` command through ``register_collab`` (the MoE² core's CLI calls it).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgemoe.cli.common import run_dir, write_json
from edgemoe.config import ConfigError, load_yaml, require


def register_collab(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser(
        "profile",
        help="measure each expert's load time, prefill and decode rate on this machine",
        description="Measure every expert of --experts and write a profiled copy of the file.",
    )
    prof.add_argument(
        "--experts", type=Path, required=True, help="YAML with an experts: list (backend: per expert)"
    )
    prof.add_argument("--only", nargs="+", metavar="NAME", help="profile only these experts")
    prof.add_argument("--out", type=Path, default=None, help="results folder (default runs/profile-<time>)")
    prof.add_argument("--prompt-chars", type=int, default=1024, help="length of the prefill prompt")
    prof.add_argument("--decode-tokens", type=int, default=32, help="tokens generated for the decode rate")
    prof.add_argument("--repeats", type=int, default=3)
    prof.set_defaults(func=run_profile)

    cache = sub.add_parser(
        "build-cache",
        help="run every expert over a benchmark into the MoE² answer cache (resumable)",
        description="Answer every (question, expert) pair missing from OUT/answers.jsonl; rerun to resume.",
    )
    cache.add_argument(
        "--experts", type=Path, required=True, help="YAML with an experts: list (backend: per expert)"
    )
    cache.add_argument("--benchmark", choices=["mmlu"], default="mmlu")
    cache.add_argument("--data-dir", type=Path, default=None, help="MMLU folder (default: see docs/moe2.md)")
    cache.add_argument("--split", default="test")
    draw = cache.add_mutually_exclusive_group()
    draw.add_argument("--per-category", type=int, default=20, help="questions per category (seeded draw)")
    draw.add_argument(
        "--per-subject",
        type=int,
        default=None,
        help="the first N questions of every subject instead (what 'collab fit' selects with data.limit_per_subject)",
    )
    cache.add_argument("--subjects", nargs="+", default=None, help="restrict to these subjects")
    cache.add_argument("--seed", type=int, default=0, help="seed of the stratified draw")
    cache.add_argument("--only", nargs="+", metavar="NAME", help="run only these experts")
    cache.add_argument(
        "--out", type=Path, default=Path("runs/cache-mmlu"), help="results folder (resume: same)"
    )
    cache.add_argument("--max-answers", type=int, default=None, help="stop after this many new answers")
    cache.add_argument("--no-progress", action="store_true")
    cache.set_defaults(func=run_build_cache)

    comp = sub.add_parser(
        "compare",
        help="each single expert vs the uniform ensemble vs MoE² on a fitted run's held-out questions",
        description="Accuracy, energy and latency per request on the test split of a 'collab fit' run.",
    )
    comp.add_argument("--run", type=Path, required=True, help="folder written by 'edgemoe collab fit'")
    comp.add_argument("--split", default="test", choices=("train", "select", "test"))
    comp.add_argument(
        "--energy-fraction",
        type=float,
        action="append",
        default=None,
        help="also MoE² under an energy budget of this fraction of all experts' energy (repeatable)",
    )
    comp.add_argument(
        "--energy", type=float, action="append", default=None, help="energy budget in J (repeatable)"
    )
    comp.add_argument(
        "--at-best-single", action="store_true", help="also MoE² at the energy of the best single expert"
    )
    comp.add_argument("--routellm", action="store_true", help="RouteLLM's APGR and CPT (two-expert runs)")
    comp.add_argument("--out", type=Path, default=None, help="results folder (default RUN/compare)")
    comp.set_defaults(func=run_compare)


def _experts(path: Path, only: list[str] | None):
    from edgemoe.collab.backends import load_experts

    collab, backends, _ = load_experts(path)
    if only:
        for name in only:
            require(
                name in collab.expert_names, "--only", f"unknown expert {name!r}; have {collab.expert_names}"
            )
    chosen = [e for e in collab.experts if not only or e.name in only]
    return collab, backends, chosen


def run_profile(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from edgemoe.collab.backends import BackendError, build_backend
    from edgemoe.collab.profiling import profile_backend, profiled_expert

    for name in ("prompt_chars", "decode_tokens", "repeats"):
        require(getattr(args, name) > 0, f"--{name.replace('_', '-')}", "must be > 0")
    collab, backends, chosen = _experts(args.experts, args.only)
    out = run_dir(args.out, "runs", "profile")
    results, failures = [], {}
    for profile in tqdm(chosen, desc="profiling", unit="expert"):
        backend = build_backend(profile.name, backends[profile.name])
        try:
            results.append(
                profile_backend(
                    backend,
                    profile,
                    prompt_chars=args.prompt_chars,
                    decode_tokens=args.decode_tokens,
                    repeats=args.repeats,
                )
            )
        except BackendError as exc:
            failures[profile.name] = str(exc)
        finally:
            backend.close()
    rows = [r.row() for r in results]
    if rows:
        with (out / "profile.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    raw = load_yaml(args.experts)
    by_name = {r.name: r for r in results}
    raw["experts"] = [
        profiled_expert(e, by_name[e["name"]]) if e["name"] in by_name else e for e in raw["experts"]
    ]
    (out / "experts.profiled.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_json(
        out / "summary.json",
        {
            "experts": rows,
            "failed": failures,
            "energy_model": "power_w (hardware-class preset or override) x busy time; not a measurement",
            "machine": {"cpu_count": os.cpu_count()},
        },
    )
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        names = [r["name"] for r in rows]
        for ax, key, label in zip(
            axes,
            ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s"),
            ("load time (s)", "prefill (tokens/s)", "decode (tokens/s)"),
        ):
            ax.bar(names, [r[key] for r in rows], color="#4c72b0")
            ax.set_title(label)
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(out / "profile.png", dpi=120)
        plt.close(fig)
    for r in rows:
        print(
            f"{r['name']:>20}: load {r['load_s']:.2f} s, prefill {r['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s, {r['power_w']:g} W (modelled)"
        )
    for name, err in failures.items():
        print(f"{name:>20}: FAILED: {err}")
    print(f"profiled experts: {out / 'experts.profiled.yaml'}")
    return 1 if failures else 0


def run_build_cache(args: argparse.Namespace) -> int:
    from edgemoe.collab.backends import BackendError, build_backend
    from edgemoe.collab.build_cache import build_cache, stratified_subset
    from edgemoe.collab.cache import read_cache
    from edgemoe.collab.data import load_mmlu

    require(args.per_category > 0, "--per-category", "must be > 0")
    require(args.per_subject is None or args.per_subject > 0, "--per-subject", "must be > 0")
    collab, backends, chosen = _experts(args.experts, args.only)
    if args.per_subject is not None:
        questions = load_mmlu(args.data_dir, args.split, args.subjects, limit_per_subject=args.per_subject)
    else:
        questions = stratified_subset(
            load_mmlu(args.data_dir, split=args.split, subjects=args.subjects), args.per_category, args.seed
        )
    require(len(questions) > 0, "--subjects", "selects no questions")
    out = run_dir(args.out, "runs", "cache-mmlu")
    cache_path = out / "answers.jsonl"
    _check_same_questions(out / "questions.csv", questions)
    _write_questions(out / "questions.csv", questions)
    factories = [(p, functools.partial(build_backend, p.name, backends[p.name])) for p in chosen]
    try:
        stats = build_cache(
            factories, questions, cache_path, progress=not args.no_progress, max_answers=args.max_answers
        )
    except BackendError as exc:
        print(
            f"an expert failed: {exc}\nanswers so far are kept in {cache_path}; rerun the same command to resume"
        )
        return 1
    summary: dict[str, Any] = {
        "cache": str(cache_path),
        "questions": len(questions),
        "experts": [p.name for p in chosen],
        "answered_now": stats.answered,
        "already_cached": stats.skipped,
        "complete": not stats.interrupted and stats.answered + stats.skipped == stats.total,
        "energy_model": "power_w x measured latency per answer; not a measurement",
    }
    if summary["complete"]:
        cache = read_cache(cache_path, qids=questions.qid, experts=[p.name for p in chosen])
        summary["per_expert"] = _accuracy_table(cache, questions)
    write_json(out / "summary.json", summary)
    if not summary["complete"]:
        print(f"stopped after {stats.answered} new answers; rerun the same command to resume ({cache_path})")
        return 3
    for name, row in summary["per_expert"].items():
        print(
            f"{name:>20}: accuracy {row['accuracy']:.3f}, mean latency {row['mean_latency_s']:.3f} s, "
            f"mean energy {row['mean_energy_j']:.3f} J"
        )
    print(f"answer cache: {cache_path} ({len(questions)} questions x {len(chosen)} experts)")
    return 0


def _write_questions(path: Path, questions) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["qid", "subject", "category", "answer"])
        for i in range(len(questions)):
            cat = questions.categories[int(questions.category_Q[i])]
            writer.writerow([questions.qid[i], questions.subject[i], cat, int(questions.answer_Q[i])])


def _check_same_questions(path: Path, questions) -> None:
    """Resuming with a different question draw would mix two caches: refuse with a clear error."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        previous = [row["qid"] for row in csv.DictReader(fh)]
    if previous != list(questions.qid):
        raise ConfigError(
            "--out",
            f"{path.parent} holds a cache for a different question set (other --per-category/--seed/--subjects); "
            "use the original options or a new --out",
        )


def _accuracy_table(cache, questions) -> dict[str, dict[str, float]]:
    correct_QN = cache.probs_QNO.argmax(axis=2) == questions.answer_Q[:, None]
    table = {}
    for j, name in enumerate(cache.experts):
        row = {
            "accuracy": float(correct_QN[:, j].mean()),
            "mean_latency_s": float(np.nanmean(cache.latency_QN[:, j])),
            "mean_energy_j": float(np.nanmean(cache.energy_QN[:, j])),
        }
        for c, cat in enumerate(questions.categories):
            mask = questions.category_Q == c
            row[f"accuracy_{cat}"] = float(correct_QN[mask, j].mean()) if mask.any() else math.nan
        table[name] = row
    return table


def _seconds(x: float) -> str:
    return "—" if x != x else f"{x:.2f}"


def run_compare(args: argparse.Namespace) -> int:
    from edgemoe.collab.offline.compare import compare, routellm_report
    from edgemoe.collab.offline.runs import load_run, problem
    from edgemoe.collab.selection.baselines import best_single

    ws, gate = load_run(args.run)
    select = problem(ws, gate, "select")
    total = float(select.cost_N[select.usable_N].sum())
    budgets = [f * total for f in args.energy_fraction or []] + list(args.energy or [])
    if args.at_best_single:
        single = best_single(select, float("inf"))
        budgets.append(single.energy_j)
    rows = compare(ws, gate, budgets, split=args.split)
    out = args.out or Path(args.run) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    result = {"split": args.split, "questions": int(len(ws.index(args.split))), "rows": rows}
    if args.routellm:
        require(len(ws.config.experts) == 2, "--routellm", "needs a run with exactly two experts")
        result.update(routellm_report(ws, gate, args.split))
    write_json(out / "compare.json", result)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"| method ({result['questions']} {args.split} questions) | energy budget (J) | experts | accuracy "
        "| energy / request (J) | latency mean (s) | latency max (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = f"{r['energy_budget_j']:.1f}" if "energy_budget_j" in r else ""
        if "accuracy" not in r:
            lines.append(f"| {r['method']} | {budget} | — | infeasible | | | |")
            continue
        lines.append(
            f"| {r['method']} | {budget} | {r['experts']} | {r['accuracy']:.4f} | {r['energy_j']:.1f} "
            f"| {_seconds(r['latency_mean_s'])} | {_seconds(r['latency_max_s'])} |"
        )
    table = "\n".join(lines) + "\n"
    if "routellm" in result:
        m = result["routellm"]
        r = result["routellm_ridge_router"]
        table += (
            f"\nRouteLLM metrics (strong = {m['strong']}): MoE² gate APGR {m['apgr']:.3f}, "
            f"CPT(50%) {m['cpt50']:.1%}, CPT(80%) {m['cpt80']:.1%}; ridge router APGR {r['apgr']:.3f}, "
            f"CPT(50%) {r['cpt50']:.1%}, CPT(80%) {r['cpt80']:.1%}\n"
        )
    (out / "compare.md").write_text(table)
    print(table)
    return 0
