"""End-to-end MoE² pieces shared by the CLI, the benchmark and the tests.

``Workspace`` holds one deployment's questions, answer cache, embeddings and split (gate training /
selection / held-out test); ``fit`` trains the gate once on the full expert set; ``problem`` builds
the coarse-level instance for a latency-budget setting on one split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.collab.cache import AnswerCache
from edgemoe.collab.costs import estimate_prompt_tokens, latency_budget_Q, request_costs, with_measurements
from edgemoe.collab.data import QuestionSet
from edgemoe.collab.embed import Embedder
from edgemoe.collab.gate import Gate, GateConfig, train_gate
from edgemoe.collab.problem import SelectionProblem, build_problem
from edgemoe.collab.profiles import Budgets, CollabConfig, RequestModel
from edgemoe.collab.simulate import GeneratorConfig, default_experts, generate_cache

SPLITS = ("train", "select", "test")


@dataclass
class Workspace:
    """Questions, their cache (aligned), embeddings and a seeded train/select/test split."""

    config: CollabConfig
    questions: QuestionSet
    cache: AnswerCache
    emb_QD: np.ndarray
    split_Q: np.ndarray

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_Q == SPLITS.index(split))

    @property
    def correct_QN(self) -> np.ndarray:
        return self.cache.probs_QNO[np.arange(len(self.questions)), :, self.questions.answer_Q]


def make_split(num: int, fractions: tuple[float, float] = (0.5, 0.25), seed: int = 0) -> np.ndarray:
    """0 = gate training, 1 = selection, 2 = held-out test (seeded permutation)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num)
    n_train, n_sel = int(fractions[0] * num), int(fractions[1] * num)
    split = np.full(num, 2, dtype=np.int64)
    split[perm[:n_train]] = 0
    split[perm[n_train : n_train + n_sel]] = 1
    return split


def workspace(
    config: CollabConfig, questions: QuestionSet, cache: AnswerCache, embedder: Embedder, seed: int = 0
) -> Workspace:
    cache = cache.select(qids=questions.qid, experts=config.expert_names)
    emb = embedder.encode(questions.prompts())
    return Workspace(config, questions, cache, emb, make_split(len(questions), seed=seed))


def simulated_config(num_experts: int, categories: list[str], seed: int = 0, **kw) -> CollabConfig:
    """A config with the default zoo of simulated experts."""
    return CollabConfig(experts=default_experts(num_experts, categories, seed=seed), categories=categories, **kw)


def simulated_cache(config: CollabConfig, questions: QuestionSet, seed: int = 0) -> AnswerCache:
    return generate_cache(questions, config.experts, GeneratorConfig(seed=seed))


def fit(ws: Workspace, gate_cfg: GateConfig, mask_N: np.ndarray | None = None) -> Gate:
    """Train the gate on the training split (on the full expert set unless ``mask_N`` is given)."""
    idx = ws.index("train")
    return train_gate(
        ws.emb_QD[idx],
        ws.questions.category_Q[idx],
        ws.correct_QN[idx],
        ws.config.expert_names,
        list(ws.config.categories),
        gate_cfg,
        mask_N=mask_N,
    )


def problem(
    ws: Workspace,
    gate: Gate,
    split: str = "select",
    budgets: Budgets | None = None,
    top_k: int | None | str = "config",
    objective: str | None = None,
) -> SelectionProblem:
    """The coarse-level instance on one split, with latency eligibility from ``budgets``."""
    idx = ws.index(split)
    cfg = ws.config
    budgets = budgets or cfg.budgets
    qs = ws.questions.take(idx)
    costs = request_costs(cfg.experts, estimate_prompt_tokens(qs.prompts()), cfg.request)
    costs = with_measurements(costs, ws.cache.latency_QN[idx], ws.cache.energy_QN[idx])
    logits = gate.logits(ws.emb_QD[idx], qs.category_Q)
    return build_problem(
        ws.cache.select(qids=qs.qid),
        qs.answer_Q,
        qs.category_Q,
        logits,
        costs,
        latency_budget_Q(budgets, list(cfg.categories), qs.category_Q),
        top_k=cfg.top_k if top_k == "config" else top_k,
        objective=objective or cfg.objective,
    )


def default_request() -> RequestModel:
    return RequestModel()
