"""One registry mechanism for every pluggable component (routers, expert executors, controllers, LLM
backends).

A :class:`Registry` maps names to classes or factories. Registering a name twice with a different
object is an error; looking up an unknown name raises :class:`~edgemoe.errors.ConfigError` naming the
user's field and listing every valid name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from edgemoe.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> component. ``kind`` is what the names are ("router", "controller", ...).

    ``plugin_package``: an unknown identifier ``foo`` is looked up once in module
    ``<plugin_package>.foo`` (which registers itself on import) before the lookup fails.
    ``plugins``: names known to live in such modules; they are listed among the valid names before
    their module is imported (so an error message lists every choice without importing them all).
    """

    def __init__(
        self, kind: str, *, plugin_package: str | None = None, plugins: tuple[str, ...] = ()
    ) -> None:
        if plugins and plugin_package is None:
            raise ValueError("plugins need a plugin_package to be imported from")
        self.kind = kind
        self.plugin_package = plugin_package
        self.plugins = plugins
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a second, different object for a name raises."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._entries.get(name)
        if existing is not None and _qualname(existing) != _qualname(obj):
            raise ValueError(f"{self.kind} name {name!r} is already registered by {_qualname(existing)}")
        self._entries[name] = obj

    def names(self) -> list[str]:
        """Every valid name, sorted: registered ones and the declared plug-ins."""
        return sorted(set(self._entries) | set(self.plugins))

    def get(self, name: str, field: str) -> T:
        """The component called ``name``; ``field`` is the user-facing setting that named it."""
        if name not in self._entries and self.plugin_package and name.isidentifier():
            module = f"{self.plugin_package}.{name}"
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
        if name not in self._entries:
            raise ConfigError(field, f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
