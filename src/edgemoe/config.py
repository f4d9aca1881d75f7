"""One configuration language: typed dataclasses loaded from YAML/dicts, validated on load.

Errors name the offending field (dotted path), the value, and what is allowed, so a user can fix
the file without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgemoe.errors import ConfigError

T = TypeVar("T")


def require(cond: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(field, message)


def check_positive(value: float, field: str, *, allow_zero: bool = False) -> None:
    """Finite and > 0 (or >= 0 with ``allow_zero``)."""
    ok = (
        isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    )
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, field, f"must be a finite number {bound}, got {value!r}")


def check_range(value: float, field: str, lo: float, hi: float) -> None:
    """Finite and within [lo, hi]."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi
    require(ok, field, f"must be in [{lo}, {hi}], got {value!r}")


def check_choice(value: Any, field: str, choices: typing.Iterable[Any]) -> None:
    """One of ``choices``."""
    choices = list(choices)
    require(value in choices, field, f"must be one of {choices}, got {value!r}")


def _coerce(tp: Any, value: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(field, f"does not match any of {args}: {'; '.join(errors)}")
    if origin is typing.Literal:
        check_choice(value, field, args)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        require(isinstance(value, Mapping), field, f"must be a mapping, got {type(value).__name__}")
        loader = getattr(tp, "from_mapping", None)  # a base config that picks its subclass by name
        if loader is not None:
            return loader(value, field)
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        require(isinstance(value, (list, tuple)), field, f"must be a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            require(len(value) == len(args), field, f"must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{field}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        require(isinstance(value, Mapping), field, f"must be a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{field}.{k}") for k, v in value.items()}
    if tp is float:
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            field,
            f"must be a number, got {value!r}",
        )
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok or (isinstance(value, float) and value.is_integer())
        require(ok, field, f"must be an integer, got {value!r}")
        return int(value)
    if tp is bool:
        require(isinstance(value, bool), field, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        require(isinstance(value, str), field, f"must be a string, got {value!r}")
        return value
    if tp is Path:
        require(isinstance(value, (str, Path)), field, f"must be a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, type-checking every field and rejecting unknown keys.

    The dataclass's own ``__post_init__`` then runs its range checks.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    unknown = sorted(set(data) - set(fields))
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", f"unknown field; allowed fields are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}{missing[0]}", "is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.field.startswith(prefix):
            raise ConfigError(f"{prefix}.{exc.field}", str(exc).split(": ", 1)[-1]) from None
        raise


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1.0e9``, ``1e9`` and ``-2E-3`` are numbers.

    (PyYAML follows YAML 1.1, whose float rule needs a dot and a signed exponent, so ``1e9`` and
    ``1.0e9`` would stay strings.)
    """


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line :class:`ConfigError` naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(where, f"is not valid YAML{at}: {problem}; fix the syntax there") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, malformed or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file {str(path)!r} does not exist")
    data = parse_yaml(path.read_text(), f"--config {path}") or {}
    require(isinstance(data, Mapping), "--config", f"{path} must contain a YAML mapping at top level")
    return dict(data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML so numbers and lists work."""
    require("=" in text, "--set", f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_yaml(raw, f"--set {key.strip()}")


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (copying as it goes)."""
    out = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, Mapping) else {}
            node = node[k]
        node[keys[-1]] = value
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON/YAML-friendly structure."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
