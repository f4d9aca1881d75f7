"""MoE² against every reference point on a run's held-out questions, and RouteLLM's metrics.

:func:`compare` returns one row per method, each with the accuracy (expected accuracy on
correctness-only data) and the realised mean energy and latency per request on the chosen split:

- every single expert; the uniform ensemble of all experts; the per-question oracle (the cheapest of
  the experts that are best on that question);
- a top-1 router on the same embeddings: one ridge regression per expert predicts its quality from
  the prompt embedding and category (fitted on the training split), each request goes to the argmax;
- MoE² with every expert enabled, and, per energy budget, MoE² with the DMO-selected set (chosen on the
  selection split), equal weights on that same set (no gate: its gate-free reference,
  :func:`~edgemoe.collab.selection.baselines.equal_weight_reference`; no latency figures), and the
  best single expert within the budget.

:func:`routellm_metrics` computes RouteLLM's cost–quality summary for a two-expert run: the
performance gap recovered (PGR) as a function of the share of calls to the strong expert, its area
(APGR) and the shares needed to recover 50 % and 80 % of the gap (CPT(50 %), CPT(80 %)).
"""

from __future__ import annotations

import numpy as np

from edgemoe.collab.costs import RequestCosts
from edgemoe.collab.gate import Gate
from edgemoe.collab.offline.runs import RunData, problem
from edgemoe.collab.selection.baselines import best_single, equal_weight_reference, uniform_gate
from edgemoe.collab.selection.dmo import dmo
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.errors import ConfigError


def _row(label: str, prob: SelectionProblem, mask_N: np.ndarray, **extra) -> dict:
    mask_N = np.asarray(mask_N, dtype=bool)
    real = prob.realised(mask_N)
    routed_QN = prob.routed_QN(mask_N)
    delay_Q = RequestCosts(prob.delay_QN, prob.energy_QN, prob.aggregation_s).set_delay(routed_QN)
    return {
        "method": label,
        "experts": " ".join(n for n, on in zip(prob.names, mask_N) if on),
        "accuracy": real["accuracy"],
        "energy_j": real["energy_realised_j"],
        "latency_mean_s": float(delay_Q.mean()) if len(delay_Q) else 0.0,
        "latency_max_s": float(delay_Q.max()) if len(delay_Q) else 0.0,
        "experts_per_request": real["experts_per_request"],
        **extra,
    }


def _per_question_row(label: str, prob: SelectionProblem, choice_Q: np.ndarray) -> dict:
    """A policy that sends each request to one expert (``choice_Q``), evaluated exactly."""
    rows = np.arange(prob.num_questions)
    p_y_Q = prob.correct_QN[rows, choice_Q]
    ok_Q = (
        p_y_Q
        if prob.correctness_only
        else (prob.probs_QNO[rows, choice_Q].argmax(axis=1) == prob.answer_Q).astype(np.float64)
    )
    delay_Q = prob.delay_QN[rows, choice_Q] + prob.aggregation_s
    return {
        "method": label,
        "experts": "per request",
        "accuracy": float(ok_Q.mean()),
        "energy_j": float(prob.energy_QN[rows, choice_Q].mean()),
        "latency_mean_s": float(delay_Q.mean()),
        "latency_max_s": float(delay_Q.max()),
        "experts_per_request": 1.0,
    }


def oracle_choice(prob: SelectionProblem) -> np.ndarray:
    """Per question, the cheapest expert among those scoring best on it (eligible ones only)."""
    if prob.correctness_only:
        score_QN = prob.correct_QN
    else:
        score_QN = (prob.probs_QNO.argmax(axis=2) == prob.answer_Q[:, None]).astype(np.float64)
    score_QN = np.where(prob.eligible_QN, score_QN, -np.inf)
    best_QN = score_QN >= score_QN.max(axis=1, keepdims=True)
    return np.argmin(np.where(best_QN, prob.energy_QN, np.inf), axis=1)


def ridge_router(ws: RunData, index: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Predicted quality of every expert on questions ``index`` (ridge fitted on the training split)."""
    from sklearn.linear_model import Ridge

    def features(idx: np.ndarray) -> np.ndarray:
        onehot = np.eye(len(ws.config.categories))[ws.questions.category_Q[idx]]
        return np.hstack([ws.emb_QD[idx], onehot])

    train = ws.index("train")
    model = Ridge(alpha=alpha).fit(features(train), ws.correct_QN[train])
    return model.predict(features(index))


def compare(
    ws: RunData, gate: Gate, energy_budgets: list[float], split: str = "test", latency=None
) -> list[dict]:
    """Rows for every method (module doc) on ``split``; budgets in J per request."""
    test = problem(ws, gate, split, latency)
    select = problem(ws, gate, "select", latency)
    n = test.num_experts
    every = np.ones(n, dtype=bool)
    rows = [_row(f"single: {name}", test, np.eye(n, dtype=bool)[i]) for i, name in enumerate(test.names)]
    flat = uniform_gate(test)
    flat.top_k = None
    rows.append(_row("uniform ensemble (all)", flat, every))
    rows.append(_per_question_row("oracle (per question)", test, oracle_choice(test)))
    pred_QN = np.where(test.eligible_QN, ridge_router(ws, ws.index(split)), -np.inf)
    rows.append(_per_question_row("top-1 router (ridge on embeddings)", test, pred_QN.argmax(axis=1)))
    rows.append(_row("MoE² (all enabled)", test, every))
    for budget in energy_budgets:
        res = dmo(select, budget)
        single = best_single(select, budget)
        if not res.feasible:
            rows.append({"method": "MoE² (DMO)", "energy_budget_j": budget, "reason": res.reason})
            continue
        mask = np.asarray(res.mask, dtype=bool)
        rows.append(_row("MoE² (DMO)", test, mask, energy_budget_j=budget))
        ref = equal_weight_reference(test, mask)
        rows.append(
            {
                "method": "equal weights on the DMO set",
                "experts": " ".join(n for n, on in zip(test.names, mask) if on),
                "accuracy": ref["accuracy"],
                "energy_j": ref["energy_j"],
                "latency_mean_s": float("nan"),
                "latency_max_s": float("nan"),
                "energy_budget_j": budget,
            }
        )
        rows.append(_row("best single within budget", test, np.asarray(single.mask), energy_budget_j=budget))
    return rows


def routellm_metrics(
    strong_score_Q: np.ndarray, weak_ok_Q: np.ndarray, strong_ok_Q: np.ndarray, points: int = 101
) -> dict:
    """PGR curve, APGR, CPT(50 %), CPT(80 %) of a router sending the highest-scoring requests to the
    strong expert (scores: e.g. the gate's logit difference strong − weak)."""
    q = len(strong_score_Q)
    if q == 0:
        raise ConfigError("questions", "no questions to compute RouteLLM metrics on")
    weak, strong = float(np.mean(weak_ok_Q)), float(np.mean(strong_ok_Q))
    gap = strong - weak
    if gap <= 0:
        raise ConfigError(
            "experts", f"the strong expert ({strong:.3f}) is not better than the weak ({weak:.3f})"
        )
    order = np.argsort(-np.asarray(strong_score_Q), kind="stable")
    gain_Q = (np.asarray(strong_ok_Q) - np.asarray(weak_ok_Q))[order]
    perf_K = weak + np.concatenate([[0.0], np.cumsum(gain_Q)]) / q  # K = 0..q requests to strong
    share = np.linspace(0.0, 1.0, points)
    perf = np.interp(share * q, np.arange(q + 1), perf_K)
    pgr = (perf - weak) / gap

    def cpt(target: float) -> float:
        hit = np.flatnonzero((perf_K - weak) / gap >= target - 1e-12)
        return float(hit[0] / q) if len(hit) else 1.0

    return {
        "weak_accuracy": weak,
        "strong_accuracy": strong,
        "apgr": float(np.trapezoid(pgr, share)),
        "cpt50": cpt(0.5),
        "cpt80": cpt(0.8),
        "share": share.tolist(),
        "pgr": pgr.tolist(),
    }


def routellm_report(ws: RunData, gate: Gate, split: str = "test") -> dict:
    """RouteLLM's metrics on a two-expert run for the MoE² gate (its own logit difference, before
    calibration) and for the ridge router; the strong expert is the better one on the selection split."""
    select = problem(ws, gate, "select")
    test = problem(ws, gate, split)
    idx = ws.index(split)
    strong = int(np.argmax(select.correct_QN.mean(axis=0)))
    weak = 1 - strong
    raw_QN = gate.raw_logits(ws.emb_QD[idx], ws.questions.category_Q[idx])
    gate_m = routellm_metrics(
        raw_QN[:, strong] - raw_QN[:, weak], test.correct_QN[:, weak], test.correct_QN[:, strong]
    )
    pred_QN = ridge_router(ws, idx)
    ridge = routellm_metrics(
        pred_QN[:, strong] - pred_QN[:, weak], test.correct_QN[:, weak], test.correct_QN[:, strong]
    )
    return {
        "routellm": {**gate_m, "strong": test.names[strong]},
        "routellm_ridge_router": {k: ridge[k] for k in ("apgr", "cpt50", "cpt80")},
    }
