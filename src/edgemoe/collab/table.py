"""Per-question, per-model results: one table format for any router benchmark, and its readers.

The **routing table** (JSON Lines, one question per line) is the documented format::

    {"id": "q17", "prompt": "What is 7*8?", "category": "math", "num_options": 0,
     "models": {"llama-8b": {"quality": 1.0, "latency_s": 0.8, "prompt_tokens": 9, "output_tokens": 40,
                             "cost": 0.0002},
                "mistral-7b": {"quality": 0.4}}}

- ``prompt`` (required, text); ``id`` (optional, default the row number); ``category`` (optional);
  ``num_options`` (optional, 0 or absent = not multiple choice); ``answer`` (index of the gold option,
  required only with ``probs``).
- per model, either ``quality`` in [0, 1] (probability of the gold answer, or the share of sampled
  answers that were right) or ``probs`` (a full distribution over the ``num_options`` options), plus
  optional measured ``latency_s``, ``prompt_tokens``, ``output_tokens`` and ``cost``. Every row lists
  the same models.

Readers (:data:`READERS`, looked up by ``data.format``) turn public layouts into a :class:`RoutingTable`:
``table`` (the format above), ``routerdc`` (RouterDC's JSON list of ``{"question", "scores"}``),
``routellm`` (RouteLLM's CSVs: ``prompt`` and one True/False column per model; a folder of per-subject
files gives the subject as the category; ``contaminated_prompts.jsonl`` beside them is dropped) and
``routerbench`` (CSV: ``prompt``, one quality column per model, optional ``<model>|total_cost``,
optional ``eval_name``/``category``). Every malformed input raises :class:`DataError` naming the file,
the row and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import ConfigError, DataError
from edgemoe.files import atomic_write_bytes
from edgemoe.registry import Registry

DUPLICATES = ("error", "first", "keep")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)
_MEASURES = ("latency_s", "prompt_tokens", "output_tokens", "cost")


@dataclass
class RoutingTable:
    """Questions × models. ``quality_QN`` is always there (P(gold) per model); ``probs_QNO`` and
    ``answer_Q`` only when every model gave a full option distribution. Measurements: NaN = none."""

    qid: list[str]
    prompt: list[str]
    category: list[str | None]
    num_options_Q: np.ndarray
    models: list[str]
    quality_QN: np.ndarray
    latency_QN: np.ndarray
    prompt_tokens_QN: np.ndarray
    output_tokens_QN: np.ndarray
    cost_QN: np.ndarray
    probs_QNO: np.ndarray | None = None
    answer_Q: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.qid)

    @property
    def correctness_only(self) -> bool:
        """True when the data says only how right each model was, not which option it chose."""
        return self.probs_QNO is None

    def take(self, index: Iterable[int]) -> RoutingTable:
        idx = np.asarray(list(index), dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return RoutingTable(
            qid=[self.qid[i] for i in idx],
            prompt=[self.prompt[i] for i in idx],
            category=[self.category[i] for i in idx],
            num_options_Q=self.num_options_Q[idx],
            models=list(self.models),
            quality_QN=self.quality_QN[idx],
            latency_QN=self.latency_QN[idx],
            prompt_tokens_QN=self.prompt_tokens_QN[idx],
            output_tokens_QN=self.output_tokens_QN[idx],
            cost_QN=self.cost_QN[idx],
            probs_QNO=pick(self.probs_QNO),
            answer_Q=pick(self.answer_Q),
            source=self.source,
        )

    def records(self) -> list[dict[str, Any]]:
        """Rows in the documented format (what :func:`write_table` writes)."""
        out = []
        for q in range(len(self)):
            models = {}
            for n, m in enumerate(self.models):
                rec: dict[str, Any] = (
                    {"quality": float(self.quality_QN[q, n])}
                    if self.probs_QNO is None
                    else {"probs": [float(p) for p in self.probs_QNO[q, n, : self.num_options_Q[q]]]}
                )
                for key, arr in zip(_MEASURES, self._measures()):
                    if not math.isnan(arr[q, n]):
                        rec[key] = float(arr[q, n])
                models[m] = rec
            row: dict[str, Any] = {"id": self.qid[q], "prompt": self.prompt[q]}
            if self.category[q] is not None:
                row["category"] = self.category[q]
            row["num_options"] = int(self.num_options_Q[q])
            if self.answer_Q is not None:
                row["answer"] = int(self.answer_Q[q])
            row["models"] = models
            out.append(row)
        return out

    def _measures(self) -> tuple[np.ndarray, ...]:
        return self.latency_QN, self.prompt_tokens_QN, self.output_tokens_QN, self.cost_QN


def with_category(table: RoutingTable, category: str) -> RoutingTable:
    """The same table with every question in ``category`` (ids prefixed ``<category>/``)."""
    return dataclasses.replace(
        table, category=[category] * len(table), qid=[f"{category}/{q}" for q in table.qid]
    )


def concat_tables(first: RoutingTable, second: RoutingTable, prefix: str = "test:") -> RoutingTable:
    """``first`` then ``second`` (same models, same kind of answers); ids of ``second`` get ``prefix``."""
    if set(first.models) != set(second.models):
        raise DataError(
            second.source, f"has models {sorted(second.models)}, the other file {sorted(first.models)}"
        )
    if first.correctness_only != second.correctness_only:
        raise DataError(
            second.source, "mixes option distributions and correctness-only results with the other file"
        )
    order = [second.models.index(m) for m in first.models]
    probs_QNO, answer_Q = None, None
    if first.probs_QNO is not None and second.probs_QNO is not None:
        o = max(first.probs_QNO.shape[2], second.probs_QNO.shape[2])
        pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, o - a.shape[2])))  # noqa: E731
        probs_QNO = np.concatenate([pad(first.probs_QNO), pad(second.probs_QNO[:, order])])
    if first.answer_Q is not None and second.answer_Q is not None:
        answer_Q = np.concatenate([first.answer_Q, second.answer_Q])
    return RoutingTable(
        qid=list(first.qid) + [f"{prefix}{q}" for q in second.qid],
        prompt=first.prompt + second.prompt,
        category=first.category + second.category,
        num_options_Q=np.concatenate([first.num_options_Q, second.num_options_Q]),
        models=list(first.models),
        quality_QN=np.concatenate([first.quality_QN, second.quality_QN[:, order]]),
        latency_QN=np.concatenate([first.latency_QN, second.latency_QN[:, order]]),
        prompt_tokens_QN=np.concatenate([first.prompt_tokens_QN, second.prompt_tokens_QN[:, order]]),
        output_tokens_QN=np.concatenate([first.output_tokens_QN, second.output_tokens_QN[:, order]]),
        cost_QN=np.concatenate([first.cost_QN, second.cost_QN[:, order]]),
        probs_QNO=probs_QNO,
        answer_Q=answer_Q,
        source=f"{first.source}+{second.source}",
    )


def write_table(table: RoutingTable, path: str | Path) -> Path:
    """Write a table as JSON Lines, atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.records())
    return atomic_write_bytes(path, text.encode())


def count_options(prompt: str) -> int:
    """Lettered options ("A. ...", "B) ...") at the start of lines, when they run A, B, C, ...; else 0."""
    letters = _OPTION_LINE.findall(prompt)
    n = 0
    for letter in letters:
        if letter == chr(ord("A") + n):
            n += 1
    return n if n >= 2 else 0


def _number(value: Any, where: str, field: str, low: float = 0.0, high: float = math.inf) -> float:
    """A finite number in [low, high]; booleans count as 0/1 (True/False correctness columns)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return float(text.lower() == "true")
        try:
            value = float(text)
        except ValueError:
            raise DataError(where, f"{field}: {value!r} is not a number") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise DataError(where, f"{field}: must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


class _Builder:
    """Collects rows (checking each) and builds a :class:`RoutingTable`."""

    def __init__(self, path: Path, duplicates: str = "error"):
        if duplicates not in DUPLICATES:
            raise ConfigError("data.duplicates", f"must be one of {list(DUPLICATES)}, got {duplicates!r}")
        self.path = path
        self.duplicates = duplicates
        self.rows: list[dict[str, Any]] = []
        self.models: list[str] | None = None
        self.seen: dict[str, str] = {}
        self.ids: set[str] = set()

    def add(
        self,
        where: str,
        qid: str | None,
        prompt: Any,
        category: str | None,
        num_options: Any,
        models: dict[str, dict[str, Any]],
        answer: int | None = None,
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(where, "prompt: must be a non-empty string")
        if self.models is None:
            if not models:
                raise DataError(where, "lists no model results")
            self.models = list(models)
        elif set(models) != set(self.models):
            extra, missing = sorted(set(models) - set(self.models)), sorted(set(self.models) - set(models))
            raise DataError(
                where, f"lists other models than the first row (extra {extra}, missing {missing})"
            )
        if prompt in self.seen:
            if self.duplicates == "error":
                raise DataError(
                    where,
                    f"prompt: duplicate of {self.seen[prompt]}; remove it or set data.duplicates to "
                    "'first' (keep the first) or 'keep' (keep both)",
                )
            if self.duplicates == "first":
                return
        qid = str(qid) if qid is not None else str(len(self.rows))
        if qid in self.ids:
            qid = f"{qid}#{len(self.rows)}"
        self.seen.setdefault(prompt, where)
        self.ids.add(qid)
        n_opt = (
            count_options(prompt) if num_options is None else int(_number(num_options, where, "num_options"))
        )
        parsed = {}
        for m in self.models:
            rec = models[m]
            f = f"models.{m}"
            out: dict[str, Any] = {}
            if "probs" in rec and rec["probs"] is not None:
                probs = rec["probs"]
                if not isinstance(probs, list) or len(probs) < 2:
                    raise DataError(where, f"{f}.probs: must be a list of at least 2 probabilities")
                p = np.array([_number(x, where, f"{f}.probs", 0.0, 1.0) for x in probs])
                if not math.isclose(p.sum(), 1.0, abs_tol=1e-3):
                    raise DataError(where, f"{f}.probs: must sum to 1, sums to {p.sum():.4g}")
                if n_opt and len(p) != n_opt:
                    raise DataError(where, f"{f}.probs: {len(p)} values for {n_opt} options")
                if answer is None:
                    raise DataError(where, "answer: required when a model gives option probabilities")
                out["probs"] = p / p.sum()
                n_opt = len(p)
            elif "quality" in rec:
                out["quality"] = _number(rec["quality"], where, f"{f}.quality", 0.0, 1.0)
            else:
                raise DataError(where, f"{f}: needs 'quality' (in [0, 1]) or 'probs'")
            for key in _MEASURES:
                if rec.get(key) is not None:
                    out[key] = _number(rec[key], where, f"{f}.{key}")
            parsed[m] = out
        if answer is not None:
            a = int(_number(answer, where, "answer"))
            if n_opt and not 0 <= a < n_opt:
                raise DataError(where, f"answer: {a} is not an option index in 0..{n_opt - 1}")
            answer = a
        self.rows.append(
            {
                "qid": qid,
                "prompt": prompt,
                "category": category,
                "n_opt": n_opt,
                "answer": answer,
                "m": parsed,
            }
        )

    def build(self, source: str) -> RoutingTable:
        if not self.rows or self.models is None:
            raise DataError(str(self.path), "holds no questions (an empty benchmark)")
        q, n = len(self.rows), len(self.models)
        full = all("probs" in r["m"][m] for r in self.rows for m in self.models)
        o = max(r["n_opt"] for r in self.rows) if full else 0
        quality = np.zeros((q, n))
        probs = np.zeros((q, n, o)) if full else None
        meas = {k: np.full((q, n), np.nan) for k in _MEASURES}
        for i, r in enumerate(self.rows):
            for j, m in enumerate(self.models):
                rec = r["m"][m]
                if "probs" in rec:
                    quality[i, j] = rec["probs"][r["answer"]]
                    if probs is not None:
                        probs[i, j, : len(rec["probs"])] = rec["probs"]
                else:
                    quality[i, j] = rec["quality"]
                for k in _MEASURES:
                    meas[k][i, j] = rec.get(k, np.nan)
        return RoutingTable(
            qid=[r["qid"] for r in self.rows],
            prompt=[r["prompt"] for r in self.rows],
            category=[r["category"] for r in self.rows],
            num_options_Q=np.array([r["n_opt"] for r in self.rows], dtype=np.int64),
            models=list(self.models),
            quality_QN=quality,
            latency_QN=meas["latency_s"],
            prompt_tokens_QN=meas["prompt_tokens"],
            output_tokens_QN=meas["output_tokens"],
            cost_QN=meas["cost"],
            probs_QNO=probs,
            answer_Q=np.array([r["answer"] for r in self.rows], dtype=np.int64) if full else None,
            source=source,
        )


Reader = Callable[..., RoutingTable]
READERS: Registry[Reader] = Registry("benchmark format")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), f"{what} not found")
    return path


@READERS.register("table")
def read_table(path: str | Path, duplicates: str = "error") -> RoutingTable:
    """The documented JSON Lines format (module doc)."""
    path = _existing(path, "routing table")
    b = _Builder(path, duplicates)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(where, f"is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("models"), dict):
                raise DataError(where, "models: every row needs a 'models' mapping")
            for m, rec in row["models"].items():
                if not isinstance(rec, dict):
                    raise DataError(where, f"models.{m}: must be a mapping with 'quality' or 'probs'")
            b.add(
                where,
                row.get("id"),
                row.get("prompt"),
                row.get("category"),
                row.get("num_options"),
                row["models"],
                row.get("answer"),
            )
    return b.build(f"table:{path.name}")


@READERS.register("routerdc")
def read_routerdc(path: str | Path, duplicates: str = "error") -> RoutingTable:
    """RouterDC's JSON: a list of ``{"question": text, "scores": {model: quality}}``."""
    path = _existing(path, "RouterDC file")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(str(path), "must hold a JSON list of {'question', 'scores'} objects")
    b = _Builder(path, duplicates)
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict) or not isinstance(row.get("scores"), dict):
            raise DataError(where, "scores: every item needs a 'scores' mapping of model -> quality")
        b.add(
            where,
            str(i),
            row.get("question"),
            row.get("category"),
            None,
            {m: {"quality": v} for m, v in row["scores"].items()},
        )
    return b.build(f"routerdc:{path.name}")


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    csv.field_size_limit(1 << 30)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"is not a readable CSV file ({exc})") from None
    if "prompt" not in header:
        raise DataError(str(path), f"needs a 'prompt' column; has {header}")
    return header, rows


_ROUTELLM_SKIP = re.compile(r"(_response|\|.*)$")


@READERS.register("routellm")
def read_routellm(path: str | Path, duplicates: str = "error") -> RoutingTable:
    """RouteLLM's CSVs (``prompt`` + one True/False column per model; ``*_response`` columns ignored).

    ``path`` is one CSV or a folder of them; in a folder each file's name (without a ``mmlu_`` style
    prefix) is the category, and prompts listed in ``contaminated_prompts.jsonl`` (``eval_prompt``)
    are dropped.
    """
    path = _existing(path, "RouteLLM CSV file or folder")
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise DataError(str(path), "holds no .csv files")
    drop: set[str] = set()
    contaminated = (path if path.is_dir() else path.parent) / "contaminated_prompts.jsonl"
    if contaminated.is_file():
        for lineno, line in enumerate(contaminated.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    drop.add(json.loads(line)["eval_prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(
                        f"{contaminated}:{lineno}", "eval_prompt: expected a JSON object with it"
                    ) from None
    b = _Builder(path, duplicates)
    for f in files:
        header, rows = _csv_rows(f)
        models = [c for c in header if c != "prompt" and not _ROUTELLM_SKIP.search(c)]
        category = f.stem.split("_", 1)[1] if path.is_dir() and "_" in f.stem else None
        for i, row in enumerate(rows):
            if row["prompt"] in drop:
                continue
            b.add(
                f"{f}: row {i + 2}",
                f"{f.stem}/{i}",
                row["prompt"],
                category,
                None,
                {m: {"quality": row[m]} for m in models},
            )
    return b.build(f"routellm:{path.name}")


_ROUTERBENCH_META = (
    "sample_id",
    "prompt",
    "eval_name",
    "category",
    "oracle_model_to_route_to",
    "num_options",
)


@READERS.register("routerbench")
def read_routerbench(path: str | Path, duplicates: str = "error") -> RoutingTable:
    """RouterBench-style CSV: ``prompt``, a quality column per model, optional ``<model>|total_cost``,
    optional ``eval_name`` or ``category`` (the category), ``sample_id`` (the id)."""
    path = _existing(path, "RouterBench CSV file")
    header, rows = _csv_rows(path)
    models = [c for c in header if c not in _ROUTERBENCH_META and "|" not in c]
    cat_col = "category" if "category" in header else "eval_name" if "eval_name" in header else None
    b = _Builder(path, duplicates)
    for i, row in enumerate(rows):
        recs = {}
        for m in models:
            rec: dict[str, Any] = {"quality": row[m]}
            cost = row.get(f"{m}|total_cost")
            if cost not in (None, ""):
                rec["cost"] = cost
            recs[m] = rec
        b.add(
            f"{path}: row {i + 2}",
            row.get("sample_id") or str(i),
            row["prompt"],
            row.get(cat_col) if cat_col else None,
            row.get("num_options") or None,
            recs,
        )
    return b.build(f"routerbench:{path.name}")


def read_benchmark(fmt: str, path: str | Path, duplicates: str = "error") -> RoutingTable:
    """Read ``path`` with the reader registered as ``fmt`` (``data.format``)."""
    return READERS.get(fmt, field="data.format")(path, duplicates=duplicates)
