"""End-to-end MoE² pieces shared by the CLI, the benchmark and the tests.

``RunData`` holds one deployment's questions, answer cache, embeddings and split (gate training /
selection / held-out test); ``fit`` trains the gate once on the full expert set; ``problem`` builds
the coarse-level instance for a latency-budget setting on one split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgemoe.collab.cache import AnswerCache, read_cache
from edgemoe.collab.costs import estimate_prompt_tokens, latency_budget_Q, request_costs, with_measurements
from edgemoe.collab.data import QuestionSet, load_mmlu, synthetic_questions
from edgemoe.collab.embed import EMBEDDER_KINDS, Embedder, embedder_from_name, make_embedder
from edgemoe.collab.gate import Gate, GateConfig, train_gate
from edgemoe.collab.policy import MoE2Policy
from edgemoe.collab.profiles import MMLU_CATEGORIES, Budgets, CollabConfig, load_collab_config
from edgemoe.collab.selection.problem import SelectionProblem, build_problem
from edgemoe.collab.synthetic_answers import GeneratorConfig, default_experts, generate_cache
from edgemoe.config import ConfigError, check_choice, check_positive, from_dict, require, to_dict

SPLITS = ("train", "select", "test")


@dataclass
class RunData:
    """Questions, their cache (aligned), embeddings and a seeded train/select/test split."""

    config: CollabConfig
    questions: QuestionSet
    cache: AnswerCache
    emb_QD: np.ndarray
    split_Q: np.ndarray
    embedder: str = "unknown"

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


def run_data(
    config: CollabConfig, questions: QuestionSet, cache: AnswerCache, embedder: Embedder, seed: int = 0
) -> RunData:
    cache = cache.select(qids=questions.qid, experts=config.expert_names)
    emb = embedder.encode(questions.prompts())
    return RunData(config, questions, cache, emb, make_split(len(questions), seed=seed), embedder.name)


def simulated_config(num_experts: int, categories: list[str], seed: int = 0, **kw) -> CollabConfig:
    """A config with the default zoo of simulated experts."""
    return CollabConfig(
        experts=default_experts(num_experts, categories, seed=seed), categories=categories, **kw
    )


def simulated_cache(config: CollabConfig, questions: QuestionSet, seed: int = 0) -> AnswerCache:
    return generate_cache(questions, config.experts, GeneratorConfig(seed=seed))


def fit(
    ws: RunData, gate_cfg: GateConfig, mask_N: np.ndarray | None = None, index: np.ndarray | None = None
) -> Gate:
    """Train the gate on the training split (or ``index``), on the full expert set unless ``mask_N``."""
    idx = ws.index("train") if index is None else index
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
    ws: RunData,
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


@dataclass
class DataSpec:
    """Where the questions come from: MMLU on disk or a synthetic stand-in (no files needed)."""

    source: str = "mmlu"
    dir: str | None = None
    split: str = "test"
    limit_per_subject: int | None = None
    subjects: list[str] | None = None
    synthetic_questions: int = 2000

    def __post_init__(self) -> None:
        check_choice(self.source, "data.source", ("mmlu", "synthetic"))
        check_choice(self.split, "data.split", ("dev", "test"))
        check_positive(self.synthetic_questions, "data.synthetic_questions")
        if self.limit_per_subject is not None:
            check_positive(self.limit_per_subject, "data.limit_per_subject")

    def load(self) -> QuestionSet:
        if self.source == "synthetic":
            return synthetic_questions(self.synthetic_questions, self.subjects)
        return load_mmlu(self.dir, self.split, self.subjects, self.limit_per_subject)


@dataclass
class RunSpec:
    """Everything a ``collab fit`` run needs, from one YAML file.

    Top-level keys are the :class:`CollabConfig` fields plus ``data``, ``gate``, ``embedder``,
    ``cache`` (a JSONL answer cache; none = simulate from the profiles), ``simulated_experts``
    (a default zoo when ``experts`` is absent) and ``seed``.
    """

    deployment: CollabConfig
    data: DataSpec = field(default_factory=DataSpec)
    gate: GateConfig = field(default_factory=GateConfig)
    embedder: str = "auto"
    cache: str | None = None
    seed: int = 0


RUN_KEYS = ("data", "gate", "embedder", "cache", "simulated_experts", "seed")


def load_run_spec(data: dict[str, Any]) -> RunSpec:
    """Parse a run file (see :class:`RunSpec`); errors name the bad field."""
    data = dict(data)
    extra = {k: data.pop(k) for k in RUN_KEYS if k in data}
    seed = int(extra.get("seed", 0))
    if "experts" not in data:
        num = extra.get("simulated_experts", 8)
        require(
            isinstance(num, int) and num > 0, "simulated_experts", f"must be a positive integer, got {num!r}"
        )
        cats = data.get("categories", list(MMLU_CATEGORIES))
        data["experts"] = [to_dict(e) for e in default_experts(num, list(cats), seed=seed)]
    embedder = extra.get("embedder", "auto")
    check_choice(embedder, "embedder", EMBEDDER_KINDS)
    return RunSpec(
        deployment=load_collab_config(data),
        data=from_dict(DataSpec, extra.get("data", {}), prefix="data"),
        gate=from_dict(GateConfig, extra.get("gate", {}), prefix="gate"),
        embedder=embedder,
        cache=extra.get("cache"),
        seed=seed,
    )


def build_run_data(spec: RunSpec) -> RunData:
    """Load questions, read or simulate the answer cache, embed the prompts, split."""
    questions = spec.data.load()
    if spec.cache:
        cache = read_cache(spec.cache, qids=questions.qid, experts=spec.deployment.expert_names)
    else:
        cache = simulated_cache(spec.deployment, questions, seed=spec.seed)
    return run_data(spec.deployment, questions, cache, make_embedder(spec.embedder), seed=spec.seed)


def save_run(folder: Path, spec: RunSpec, ws: RunData, gate: Gate) -> None:
    """Write what ``select``/``sweep``/``eval`` reload: config, cache, embeddings, split, gate."""
    folder.mkdir(parents=True, exist_ok=True)
    run = {
        "data": to_dict(spec.data),
        "embedder": ws.embedder,
        "seed": spec.seed,
        **to_dict(spec.deployment),
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    ws.cache.write(folder / "cache.jsonl")
    np.save(folder / "embeddings.npy", ws.emb_QD)
    np.save(folder / "split.npy", ws.split_Q)
    (folder / "qids.json").write_text(json.dumps(ws.questions.qid))
    gate.save(folder / "gate.pt")


def load_run(folder: str | Path) -> tuple[RunData, Gate]:
    """Reload a ``collab fit`` run folder."""
    folder = Path(folder)
    if not (folder / "run.yaml").is_file():
        raise ConfigError("--run", f"{folder} is not a 'collab fit' run folder (no run.yaml)")
    raw = yaml.safe_load((folder / "run.yaml").read_text())
    data = from_dict(DataSpec, raw.pop("data"), prefix="data")
    embedder = raw.pop("embedder", "unknown")
    raw.pop("seed", None)
    config = load_collab_config(raw)
    qids = json.loads((folder / "qids.json").read_text())
    questions = data.load()
    pos = {q: i for i, q in enumerate(questions.qid)}
    missing = [q for q in qids if q not in pos]
    if missing:
        raise ConfigError("data", f"question {missing[0]!r} of the run is not in the data any more")
    questions = questions.take(np.array([pos[q] for q in qids], dtype=np.int64))
    cache = read_cache(folder / "cache.jsonl", qids=qids, experts=config.expert_names)
    emb, split = np.load(folder / "embeddings.npy"), np.load(folder / "split.npy")
    ws = RunData(config, questions, cache, emb, split, str(embedder))
    return ws, Gate.load(folder / "gate.pt")


def load_policy(folder: str | Path, enabled: list[str] | None = None) -> MoE2Policy:
    """A per-request policy from a ``collab fit`` run (all experts enabled unless ``enabled``)."""
    ws, gate = load_run(folder)
    names = enabled if enabled is not None else ws.config.expert_names
    return MoE2Policy(ws.config, gate, embedder_from_name(ws.embedder), names)
