"""Measuring MoE²'s two assumptions on an instance.

- Optimality preservation: the gate trained once on the full set, restricted to S, should be as good
  as a gate retrained on S alone. :func:`optimality_gap` retrains a gate on every non-empty subset
  (N <= 8) and reports the ensemble cross-entropy and accuracy of both on the same questions.
- Monotonicity: adding an enabled expert should never worsen the objective. :func:`monotonicity`
  compares f(S ∪ {n}) with f(S) over every (S, n) pair (or a seeded sample when N is large).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgemoe.collab.gate import Gate, restricted_weights
from edgemoe.collab.selection.problem import SelectionProblem
from edgemoe.config import ConfigError


def all_subsets(n: int) -> np.ndarray:
    """Every non-empty subset of n experts, bool (2^n − 1, n)."""
    bits = np.arange(1, 2**n, dtype=np.int64)
    return ((bits[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)


def mixture_metrics(
    logits_QN: np.ndarray, probs_QNO: np.ndarray, answer_Q: np.ndarray, mask_N: np.ndarray
) -> tuple[float, float]:
    """(cross-entropy, accuracy) of the gate restricted to ``mask_N`` (no latency filter, all of S)."""
    w_QN = restricted_weights(logits_QN, mask_N[None, :])
    mix_QO = np.einsum("qn,qno->qo", w_QN, probs_QNO)
    p_y = mix_QO[np.arange(len(answer_Q)), answer_Q]
    return float(-np.log(np.maximum(p_y, 1e-300)).mean()), float((mix_QO.argmax(axis=1) == answer_Q).mean())


def optimality_gap(
    full_gate: Gate,
    retrain: Callable[[np.ndarray], Gate],
    emb_QD: np.ndarray,
    category_Q: np.ndarray,
    probs_QNO: np.ndarray,
    answer_Q: np.ndarray,
    max_experts: int = 8,
    progress: Callable | None = None,
) -> dict:
    """Restricted full-set gate vs a gate retrained on each subset, evaluated on the given questions.

    ``retrain(mask_N)`` trains a gate on the subset. Gap = CE(restricted) − CE(retrained); a positive
    gap means the restricted gate is worse (the property holds exactly when every gap is ≤ 0).
    """
    n = probs_QNO.shape[1]
    if n > max_experts:
        raise ConfigError(
            "experts",
            f"the optimality gap retrains a gate per subset; use at most {max_experts} experts, got {n}",
        )
    full_logits = full_gate.logits(emb_QD, category_Q)
    subsets = all_subsets(n)
    rows = []
    it = progress(subsets) if progress else subsets
    for mask in it:
        ce_r, acc_r = mixture_metrics(full_logits, probs_QNO, answer_Q, mask)
        logits_s = retrain(mask).logits(emb_QD, category_Q)
        ce_s, acc_s = mixture_metrics(logits_s, probs_QNO, answer_Q, mask)
        rows.append((int(mask.sum()), ce_r, ce_s, acc_r, acc_s))
    arr = np.array(rows)
    gap_ce, gap_acc = arr[:, 1] - arr[:, 2], arr[:, 4] - arr[:, 3]
    multi = arr[:, 0] > 1
    return {
        "subsets": len(rows),
        "ce_gap_mean": float(gap_ce[multi].mean()) if multi.any() else 0.0,
        "ce_gap_max": float(gap_ce[multi].max()) if multi.any() else 0.0,
        "ce_gap_relative_mean": float((gap_ce / arr[:, 2])[multi].mean()) if multi.any() else 0.0,
        "accuracy_gap_mean": float(gap_acc[multi].mean()) if multi.any() else 0.0,
        "accuracy_gap_max": float(gap_acc[multi].max()) if multi.any() else 0.0,
        "rows": [
            {
                "size": int(r[0]),
                "ce_restricted": r[1],
                "ce_retrained": r[2],
                "acc_restricted": r[3],
                "acc_retrained": r[4],
            }
            for r in rows
        ],
    }


def monotonicity(
    problem: SelectionProblem, max_exhaustive: int = 12, samples: int = 20000, seed: int = 0
) -> dict:
    """How often, and by how much, adding one expert lowers the objective f(S)."""
    n = problem.num_experts
    if n <= max_exhaustive:
        subsets = np.vstack([np.zeros((1, n), dtype=bool), all_subsets(n)])
        vals = problem.evaluate(subsets).value_B
        bits = np.arange(2**n, dtype=np.int64)
        s_idx, add = np.nonzero(((bits[:, None] >> np.arange(n)[None, :]) & 1) == 0)
        before, after = vals[s_idx], vals[bits[s_idx] | (1 << add)]
        nonempty = s_idx > 0
        before, after = before[nonempty], after[nonempty]
        exhaustive = True
    else:
        rng = np.random.default_rng(seed)
        base = rng.random((samples, n)) < rng.random((samples, 1))
        add = rng.integers(0, n, size=samples)
        keep = ~base[np.arange(samples), add] & base.any(axis=1)
        base, add = base[keep], add[keep]
        plus = base.copy()
        plus[np.arange(len(add)), add] = True
        before, after = problem.evaluate(base).value_B, problem.evaluate(plus).value_B
        exhaustive = False
    drop = before - after
    worse = drop > 1e-12
    return {
        "pairs": int(len(drop)),
        "exhaustive": exhaustive,
        "violation_rate": float(worse.mean()),
        "mean_drop_when_worse": float(drop[worse].mean()) if worse.any() else 0.0,
        "max_drop": float(drop.max()) if len(drop) else 0.0,
    }
