"""MoE² run folders: build, fit, save and reload; the pieces the CLI, benchmarks and tests share.

:class:`RunData` holds one deployment's questions, answer cache, embeddings, per-request token counts
and split (gate training / selection = validation / held-out test); :func:`fit` trains the gate once
on the full expert set and :func:`calibrate` picks its per-category calibration (equal weights, the
gate, or a prior-leaning mix) on the validation split; :func:`problem` builds the coarse-level instance for one split.

Questions come from any source (``data.source``): a router benchmark in one of the
:mod:`edgemoe.collab.table` formats, MMLU on disk with a recorded or simulated answer cache, or
synthetic questions. Categories come from the data, a user mapping, or k-means clusters of the prompt
embeddings (``data.categories``). A run folder is self-contained: ``select``, ``sweep``, ``compare``,
``eval`` and ``serve`` reload it without the source files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgemoe.collab.cache import AnswerCache, read_cache
from edgemoe.collab.costs import (
    RequestCosts,
    estimate_prompt_tokens,
    latency_budget_Q,
    request_costs,
    with_measurements,
)
from edgemoe.collab.data import QuestionSet, load_mmlu, synthetic_questions
from edgemoe.collab.embed import EMBEDDER_KINDS, CachedEmbedder, Embedder, embedder_from_name, make_embedder
from edgemoe.collab.gate import Gate, GateConfig, train_gate
from edgemoe.collab.policy import EnergyQueue, MoE2Policy
from edgemoe.collab.profiles import MMLU_CATEGORIES, Budgets, CollabConfig, load_collab_config
from edgemoe.collab.selection.baselines import equal_weight_reference
from edgemoe.collab.selection.problem import SelectionProblem, build_problem
from edgemoe.collab.synthetic_answers import GeneratorConfig, default_experts, generate_cache
from edgemoe.collab.table import (
    DUPLICATES,
    READERS,
    RoutingTable,
    concat_tables,
    read_benchmark,
    with_category,
)
from edgemoe.config import ConfigError, check_choice, check_positive, from_dict, require, to_dict
from edgemoe.errors import DataError
from edgemoe.files import atomic_write_bytes
from edgemoe.paths import data_root

SPLITS = ("train", "select", "test")
SOURCES = ("mmlu", "synthetic", "table")
CATEGORY_MODES = ("auto", "data", "map", "cluster", "none")
# (τ, β) candidates of the gate calibration, in order of preference on ties.
CALIBRATION_GRID = tuple(
    [(0.0, 0.0), (1.0, 0.0)]
    + [
        (t, b)
        for t in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
        for b in (0.0, 1.0, 3.0, 10.0)
        if (t, b) not in ((0.0, 0.0), (1.0, 0.0))
    ]
)


@dataclass
class RunData:
    """Questions, their cache (aligned), embeddings, token counts and a seeded train/select/test split.

    ``correctness_only``: the data says only how right each expert was (``AnswerCache`` then holds
    [P(right), P(wrong)] per expert, with option 0 correct), so "accuracy" is expected accuracy.
    """

    config: CollabConfig
    questions: QuestionSet
    cache: AnswerCache
    emb_QD: np.ndarray
    split_Q: np.ndarray
    embedder: str = "unknown"
    correctness_only: bool = False
    prompt_tokens_Q: np.ndarray | None = None
    output_tokens_Q: np.ndarray | None = None

    def __post_init__(self) -> None:
        q = len(self.questions)
        if self.prompt_tokens_Q is None:
            self.prompt_tokens_Q = estimate_prompt_tokens(self.questions.prompts()).astype(np.float64)
        if self.output_tokens_Q is None:
            self.output_tokens_Q = np.full(q, np.nan)
        cats = list(self.config.categories)
        default_Q = np.array(
            [self.config.request.output_tokens_for(cats[c]) for c in self.questions.category_Q],
            dtype=np.float64,
        )
        self.output_tokens_Q = np.where(np.isnan(self.output_tokens_Q), default_Q, self.output_tokens_Q)

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_Q == SPLITS.index(split))

    @property
    def prompt_tokens(self) -> np.ndarray:
        """Prompt tokens per question (filled in ``__post_init__``)."""
        return np.asarray(self.prompt_tokens_Q, dtype=np.float64)

    @property
    def output_tokens(self) -> np.ndarray:
        """Output tokens per question (filled in ``__post_init__``)."""
        return np.asarray(self.output_tokens_Q, dtype=np.float64)

    @property
    def correct_QN(self) -> np.ndarray:
        return self.cache.probs_QNO[np.arange(len(self.questions)), :, self.questions.answer_Q]

    def costs(self, idx: np.ndarray) -> RequestCosts:
        """Delay/energy of questions ``idx`` from the profiles and their token counts (measured
        latencies and energies in the cache take precedence)."""
        c = request_costs(
            self.config.experts, self.prompt_tokens[idx], self.config.request, self.output_tokens[idx]
        )
        return with_measurements(c, self.cache.latency_QN[idx], self.cache.energy_QN[idx])


def make_split(num: int, fractions: tuple[float, float] = (0.5, 0.25), seed: int = 0) -> np.ndarray:
    """0 = gate training, 1 = selection (validation), 2 = held-out test (seeded permutation)."""
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
    index: np.ndarray | None = None,
) -> SelectionProblem:
    """The coarse-level instance on one split (or the questions ``index``), latency from ``budgets``."""
    idx = ws.index(split) if index is None else np.asarray(index)
    cfg = ws.config
    budgets = budgets or cfg.budgets
    qs = ws.questions.take(idx)
    logits = gate.logits(ws.emb_QD[idx], qs.category_Q)
    return build_problem(
        ws.cache.select(qids=qs.qid),
        qs.answer_Q,
        qs.category_Q,
        logits,
        ws.costs(idx),
        latency_budget_Q(budgets, list(cfg.categories), qs.category_Q),
        top_k=cfg.top_k if isinstance(top_k, str) else top_k,
        objective=objective or cfg.objective,
        correctness_only=ws.correctness_only,
        energy_mode=cfg.energy,
    )


def calibrate(
    ws: RunData, gate: Gate, grid: tuple[tuple[float, float], ...] = CALIBRATION_GRID
) -> dict[str, Any]:
    """Pick each category's gate calibration (τ, β) on the validation ("select") split.

    For every category and (τ, β) in ``grid`` it scores the full expert set with the configured fine
    level on that category's validation questions and keeps the best; ties go to the earlier entry
    (equal weights first, then the trained gate). With a top-k fine level, (0, 0) would rank experts
    by their order in the config, so it is not a candidate there. Returns per category the choice,
    the validation accuracy of the trained gate, of the gate-free reference on the full set (equal
    weights; a random router under top-k, see ``equal_weight_reference``) and of the choice.
    """
    train = ws.index("train")
    prior_N = np.log(np.maximum(ws.correct_QN[train].mean(axis=0), 1e-3)) if len(train) else None
    gate.set_calibration(np.tile([1.0, 0.0], (len(gate.categories), 1)), prior_N)
    sel = problem(ws, gate, "select")
    raw_QN = gate.raw_logits(ws.emb_QD[ws.index("select")], sel.category_Q)
    every_N = np.ones(sel.num_experts, dtype=bool)
    candidates = [g for g in grid if sel.top_k is None or g != (0.0, 0.0)]
    chosen, report = [], {}
    for c, name in enumerate(gate.categories):
        rows = np.flatnonzero(sel.category_Q == c)
        if len(rows) == 0:
            chosen.append((1.0, 0.0))
            report[name] = {"tau": 1.0, "beta": 0.0, "validation_questions": 0}
            continue
        base = _take(sel, rows)
        trials = []
        for tau, beta in candidates:
            logits = tau * raw_QN[rows] + beta * gate.prior_N.numpy()[None, :]
            trials.append(
                dataclasses.replace(base, logits_QN=logits, weight_logits_QN=logits).evaluate(every_N[None])
            )
        best = int(np.argmax([t.value_B[0] for t in trials]))
        chosen.append(candidates[best])
        report[name] = {
            "tau": candidates[best][0],
            "beta": candidates[best][1],
            "validation_questions": int(len(rows)),
            "gate_accuracy": float(trials[candidates.index((1.0, 0.0))].accuracy_B[0]),
            "equal_weights_accuracy": equal_weight_reference(base, every_N)["accuracy"],
            "chosen_accuracy": float(trials[best].accuracy_B[0]),
        }
    gate.set_calibration(np.array(chosen))
    return report


def _take(p: SelectionProblem, rows: np.ndarray) -> SelectionProblem:
    return dataclasses.replace(
        p,
        probs_QNO=p.probs_QNO[rows],
        answer_Q=p.answer_Q[rows],
        logits_QN=p.logits_QN[rows],
        eligible_QN=p.eligible_QN[rows],
        energy_QN=p.energy_QN[rows],
        delay_QN=p.delay_QN[rows],
        category_Q=p.category_Q[rows],
        weight_logits_QN=p.combine_QN[rows],
    )


@dataclass
class DataSpec:
    """Where the questions come from (``data:`` in the run file).

    - ``source: table`` reads ``path`` (relative paths are under the data root) with the reader
      ``format`` (``table`` | ``routerdc`` | ``routellm`` | ``routerbench``); ``duplicates``: what a
      repeated prompt does (``error`` | ``first`` | ``keep``).
    - ``source: mmlu`` reads MMLU under the data root (``qa/mmlu``) or ``dir``, with the answer cache
      of the run file's ``cache`` (else simulated from the profiles); ``source: synthetic`` needs no files.
    - ``test_path``: a second file of the same format whose questions are the held-out test split
      (then ``path`` is split into gate training and selection/validation, 3:1).
    - ``parts`` / ``test_parts`` instead of ``path`` / ``test_path``: ``{category: file}``, several
      benchmarks in one run, each file's questions in its category.
    - ``categories``: ``data`` (the data's own labels), ``map`` (``category_map`` from label to
      category; every label must be mapped), ``cluster`` (k-means with ``clusters`` clusters over the
      prompt embeddings), ``none`` (one category ``all``), ``auto`` (``data`` when every question has a
      label, else ``cluster``).
    """

    source: str = "mmlu"
    dir: str | None = None
    split: str = "test"
    limit_per_subject: int | None = None
    subjects: list[str] | None = None
    synthetic_questions: int = 2000
    format: str = "table"
    path: str | None = None
    test_path: str | None = None
    parts: dict[str, str] = field(default_factory=dict)
    test_parts: dict[str, str] = field(default_factory=dict)
    duplicates: str = "error"
    categories: str = "auto"
    category_map: dict[str, str] = field(default_factory=dict)
    clusters: int = 4
    limit: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.source, "data.source", SOURCES)
        check_choice(self.split, "data.split", ("dev", "test"))
        check_positive(self.synthetic_questions, "data.synthetic_questions")
        check_choice(self.duplicates, "data.duplicates", DUPLICATES)
        check_choice(self.categories, "data.categories", CATEGORY_MODES)
        check_positive(self.clusters, "data.clusters")
        if self.source == "table":
            require(
                (self.path is None) != (not self.parts),
                "data.path",
                "give either 'path' or 'parts' with source 'table'",
            )
            require(
                not (self.test_path and self.test_parts), "data.test_path", "give test_path or test_parts"
            )
            READERS.get(self.format, field="data.format")
        if self.categories == "map":
            require(bool(self.category_map), "data.category_map", "is required with categories 'map'")
        for name in ("limit_per_subject", "limit"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), f"data.{name}")

    def resolve_path(self, path: str) -> Path:
        """``path`` relative to the data root (``dir``, else ``$EDGEMOE_DATA``, else per-user default)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else data_root(self.dir) / p

    def load(self) -> QuestionSet:
        if self.source == "synthetic":
            return synthetic_questions(self.synthetic_questions, self.subjects)
        return load_mmlu(self.dir, self.split, self.subjects, self.limit_per_subject)

    def load_tables(self) -> tuple[RoutingTable, RoutingTable | None]:
        """The fitting table and the separate test table (None when the split is drawn)."""
        if self.parts:
            fit = _joined([with_category(self.load_table(p), c) for c, p in self.parts.items()])
        else:
            fit = self.load_table(str(self.path))
        test: RoutingTable | None = None
        if self.test_parts:
            test = _joined([with_category(self.load_table(p), c) for c, p in self.test_parts.items()])
        elif self.test_path:
            test = self.load_table(self.test_path)
        return fit, test

    def load_table(self, name: str) -> RoutingTable:
        path = self.resolve_path(name)
        if not path.exists():
            raise DataError(
                str(path),
                "benchmark not found; put it there, pass an absolute path, or point --data-dir / "
                "EDGEMOE_DATA at the data root that holds it",
            )
        table = read_benchmark(self.format, path, duplicates=self.duplicates)
        if self.limit is not None and self.limit < len(table):
            table = table.take(np.sort(np.random.default_rng(0).permutation(len(table))[: self.limit]))
        return table


@dataclass
class RunSpec:
    """Everything a ``collab fit`` run needs, from one YAML file.

    Top-level keys are the :class:`CollabConfig` fields plus ``data``, ``gate``, ``embedder``,
    ``embed_cache`` (folder keeping prompt embeddings between runs), ``cache`` (a JSONL answer cache
    for MMLU; none = simulate from the profiles), ``simulated_experts`` (a default zoo when
    ``experts`` is absent) and ``seed``.
    """

    deployment: CollabConfig
    data: DataSpec = field(default_factory=DataSpec)
    gate: GateConfig = field(default_factory=GateConfig)
    embedder: str = "auto"
    cache: str | None = None
    seed: int = 0
    embed_cache: str | None = None
    categories_given: bool = False
    deployment_raw: dict[str, Any] = field(default_factory=dict)


RUN_KEYS = ("data", "gate", "embedder", "cache", "simulated_experts", "seed", "embed_cache")


def load_run_spec(data: dict[str, Any]) -> RunSpec:
    """Parse a run file (see :class:`RunSpec`); errors name the bad field."""
    data = dict(data)
    extra = {k: data.pop(k) for k in RUN_KEYS if k in data}
    seed = int(extra.get("seed", 0))
    spec_data = from_dict(DataSpec, extra.get("data", {}), prefix="data")
    categories_given = "categories" in data
    if "experts" not in data:
        require(
            spec_data.source != "table",
            "experts",
            "list the benchmark's models you deploy, each with a hardware profile "
            "(name: <model as in the data>, hardware: jetson-agx-orin | rtx-4090 | ... | custom)",
        )
        num = extra.get("simulated_experts", 8)
        require(
            isinstance(num, int) and num > 0, "simulated_experts", f"must be a positive integer, got {num!r}"
        )
        cats = data.get("categories", list(MMLU_CATEGORIES))
        data["experts"] = [to_dict(e) for e in default_experts(num, list(cats), seed=seed)]
    if spec_data.source == "table" and not categories_given:
        data["categories"] = ["all"]  # replaced by the data's categories in build_run_data
    embedder = extra.get("embedder", "auto")
    check_choice(embedder, "embedder", EMBEDDER_KINDS)
    raw = dict(data)
    if spec_data.source == "table":
        # Category-dependent settings are checked once the data's categories are known.
        data = {k: v for k, v in data.items() if k not in ("budgets", "request")}
    return RunSpec(
        deployment=load_collab_config(data),
        deployment_raw=raw,
        data=spec_data,
        gate=from_dict(GateConfig, extra.get("gate", {}), prefix="gate"),
        embedder=embedder,
        cache=extra.get("cache"),
        seed=seed,
        embed_cache=extra.get("embed_cache"),
        categories_given=categories_given,
    )


def _embedder(spec: RunSpec) -> Embedder:
    inner = make_embedder(spec.embedder)
    return CachedEmbedder(inner, spec.embed_cache) if spec.embed_cache else inner


def build_run_data(spec: RunSpec) -> RunData:
    """Load questions and answers from the source, embed the prompts, set categories, split."""
    if spec.data.source == "table":
        return _table_run_data(spec)
    questions = spec.data.load()
    if spec.cache:
        cache = read_cache(spec.cache, qids=questions.qid, experts=spec.deployment.expert_names)
    else:
        cache = simulated_cache(spec.deployment, questions, seed=spec.seed)
    return run_data(spec.deployment, questions, cache, _embedder(spec), seed=spec.seed)


def _joined(tables: list[RoutingTable]) -> RoutingTable:
    out = tables[0]
    for t in tables[1:]:
        out = concat_tables(out, t, prefix="")
    return out


def _table_run_data(spec: RunSpec) -> RunData:
    table, test = spec.data.load_tables()
    num_fit = len(table)
    if test is not None:
        table = concat_tables(table, test)
    cfg = spec.deployment
    for i, name in enumerate(cfg.expert_names):
        require(
            name in table.models,
            f"experts[{i}].name",
            f"model {name!r} is not in {spec.data.path} (its models: {table.models})",
        )
    embedder = _embedder(spec)
    emb = embedder.encode(table.prompt)
    labels, categories = resolve_categories(table, spec.data, emb, seed=spec.seed)
    if spec.categories_given:
        unknown = sorted(set(categories) - set(cfg.categories))
        require(not unknown, "categories", f"the data has categories {unknown} not listed here")
        categories = list(cfg.categories)
    config = load_collab_config({**spec.deployment_raw, "categories": categories})
    questions, cache = table_questions(table, labels, categories, config.expert_names)
    sel = [table.models.index(n) for n in config.expert_names]
    prompt_tokens = _row_mean(table.prompt_tokens_QN[:, sel])
    out_tokens = _row_mean(table.output_tokens_QN[:, sel])
    return RunData(
        config,
        questions,
        cache,
        emb,
        _table_split(len(questions), num_fit, spec.seed),
        embedder.name,
        correctness_only=table.correctness_only,
        prompt_tokens_Q=prompt_tokens,
        output_tokens_Q=out_tokens,
    )


def _table_split(num: int, num_fit: int, seed: int) -> np.ndarray:
    """The default split, or with a separate test file: its rows are the test split and the first
    ``num_fit`` rows are split 3:1 into gate training and selection."""
    if num_fit == num:
        return make_split(num, seed=seed)
    split = np.full(num, 2, dtype=np.int64)
    split[:num_fit] = make_split(num_fit, fractions=(0.75, 0.25), seed=seed)
    return split


def _row_mean(a_QN: np.ndarray) -> np.ndarray | None:
    """Mean of each row's measured values (NaN where none); None when nothing is measured."""
    have_QN = np.isfinite(a_QN)
    if not have_QN.any():
        return None
    count_Q = have_QN.sum(axis=1)
    total_Q = np.where(have_QN, a_QN, 0.0).sum(axis=1)
    return np.where(count_Q > 0, total_Q / np.maximum(count_Q, 1), np.nan)


def table_questions(
    table: RoutingTable, labels: list[str], categories: list[str], experts: list[str]
) -> tuple[QuestionSet, AnswerCache]:
    """A routing table as questions + answer cache (correctness-only data: [P(right), P(wrong)])."""
    sel = [table.models.index(n) for n in experts]
    q = len(table)
    if table.probs_QNO is None or table.answer_Q is None:
        quality_QN = table.quality_QN[:, sel]
        probs_QNO = np.stack([quality_QN, 1.0 - quality_QN], axis=2)
        answer_Q = np.zeros(q, dtype=np.int64)
    else:
        probs_QNO = table.probs_QNO[:, sel]
        answer_Q = table.answer_Q
    cat_index = {c: i for i, c in enumerate(categories)}
    questions = QuestionSet(
        qid=list(table.qid),
        subject=[lab or "" for lab in labels],
        category_Q=np.array([cat_index[lab] for lab in labels], dtype=np.int64),
        question=list(table.prompt),
        choices=[[""] * int(n) for n in table.num_options_Q],
        answer_Q=answer_Q,
        categories=tuple(categories),
        text=list(table.prompt),
    )
    cache = AnswerCache(
        list(table.qid),
        list(experts),
        probs_QNO,
        table.latency_QN[:, sel].copy(),
        np.full((q, len(sel)), np.nan),
    )
    return questions, cache


def resolve_categories(
    table: RoutingTable, spec: DataSpec, emb_QD: np.ndarray, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Each question's category and the sorted category list (see :class:`DataSpec`)."""
    mode = spec.categories
    if mode == "auto":
        mode = "data" if all(c is not None for c in table.category) else "cluster"
    if mode == "none":
        labels = ["all"] * len(table)
    elif mode == "data":
        missing = [i for i, c in enumerate(table.category) if c is None]
        if missing:
            raise DataError(
                table.source,
                f"question {table.qid[missing[0]]!r} has no category; set data.categories to 'cluster' or 'none'",
            )
        labels = [str(c) for c in table.category]
    elif mode == "map":
        labels = []
        for i, c in enumerate(table.category):
            if c not in spec.category_map:
                raise ConfigError(
                    "data.category_map",
                    f"has no entry for {c!r} (question {table.qid[i]!r}); map every label",
                )
            labels.append(spec.category_map[c])
    else:
        from sklearn.cluster import KMeans

        k = min(spec.clusters, len(table))
        fit = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(np.asarray(emb_QD, dtype=np.float64))
        labels = [f"cluster{int(c)}" for c in fit.labels_]
    return labels, sorted(set(labels))


def save_run(folder: Path, spec: RunSpec, ws: RunData, gate: Gate, extra: dict | None = None) -> None:
    """Write what ``select``/``sweep``/``compare``/``eval``/``serve`` reload (no source files needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    run = {
        "data": to_dict(spec.data),
        "embedder": ws.embedder,
        "seed": spec.seed,
        "correctness_only": ws.correctness_only,
        **to_dict(ws.config),
    }
    questions = [
        {
            "qid": ws.questions.qid[i],
            "prompt": ws.questions.prompt(i),
            "label": ws.questions.subject[i],
            "category": int(ws.questions.category_Q[i]),
            "num_options": len(ws.questions.choices[i]),
            "answer": int(ws.questions.answer_Q[i]),
            "prompt_tokens": float(ws.prompt_tokens[i]),
            "output_tokens": float(ws.output_tokens[i]),
        }
        for i in range(len(ws.questions))
    ]
    atomic_write_bytes(
        folder / "questions.jsonl",
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions).encode(),
    )
    ws.cache.write(folder / "cache.jsonl")
    np.save(folder / "embeddings.npy", ws.emb_QD)
    np.save(folder / "split.npy", ws.split_Q)
    gate.save(folder / "gate.pt")
    # run.yaml last: its presence marks a complete run folder.
    atomic_write_bytes(folder / "run.yaml", yaml.safe_dump(run, sort_keys=False, allow_unicode=True).encode())


def load_run(folder: str | Path) -> tuple[RunData, Gate]:
    """Reload a ``collab fit`` run folder (self-contained: the source data is not read again)."""
    folder = Path(folder)
    if not (folder / "run.yaml").is_file():
        raise DataError(
            str(folder), "is not a 'collab fit' run folder (no run.yaml); run 'edgemoe collab fit'"
        )
    raw = yaml.safe_load((folder / "run.yaml").read_text())
    raw.pop("data", None)
    embedder = raw.pop("embedder", "unknown")
    correctness_only = bool(raw.pop("correctness_only", False))
    raw.pop("seed", None)
    config = load_collab_config(raw)
    rows = [
        json.loads(line)
        for line in (folder / "questions.jsonl").read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    questions = QuestionSet(
        qid=[r["qid"] for r in rows],
        subject=[r["label"] for r in rows],
        category_Q=np.array([r["category"] for r in rows], dtype=np.int64),
        question=[r["prompt"] for r in rows],
        choices=[[""] * r["num_options"] for r in rows],
        answer_Q=np.array([r["answer"] for r in rows], dtype=np.int64),
        categories=tuple(config.categories),
        text=[r["prompt"] for r in rows],
    )
    cache = read_cache(folder / "cache.jsonl", qids=questions.qid, experts=config.expert_names)
    emb, split = np.load(folder / "embeddings.npy"), np.load(folder / "split.npy")
    ws = RunData(
        config,
        questions,
        cache,
        emb,
        split,
        str(embedder),
        correctness_only=correctness_only,
        prompt_tokens_Q=np.array([r["prompt_tokens"] for r in rows]),
        output_tokens_Q=np.array([r["output_tokens"] for r in rows]),
    )
    return ws, Gate.load(folder / "gate.pt")


def load_policy(
    folder: str | Path, enabled: list[str] | None = None, energy_budget_j: float | None = None
) -> MoE2Policy:
    """A per-request policy from a ``collab fit`` run (all experts enabled unless ``enabled``).

    With ``energy_budget_j`` and the run's ``energy_queue_v`` set, the policy holds an energy queue.
    """
    ws, gate = load_run(folder)
    names = enabled if enabled is not None else ws.config.expert_names
    queue = None
    if energy_budget_j is not None:
        queue = EnergyQueue(energy_budget_j, v=ws.config.energy_queue_v or EnergyQueue.v)
    return MoE2Policy(ws.config, gate, embedder_from_name(ws.embedder), names, energy_queue=queue)
