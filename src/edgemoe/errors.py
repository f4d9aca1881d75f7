"""The error hierarchy. Every error a user can cause is an :class:`EdgeMoEError`; the CLI prints it as
one line (no traceback) and exits 2. Anything else is a bug and keeps its traceback.

- :class:`ConfigError`: a configuration value or command-line flag is invalid (names the field);
- :class:`InputError`: data handed over at run time is invalid (NaN activations, negative counts);
- :class:`DataError`: a dataset or input file is missing or malformed (names the file and the fix).

Errors of one component (checkpoints, LLM backends, transports) subclass these or ``EdgeMoEError``.
"""

from __future__ import annotations


class EdgeMoEError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(EdgeMoEError, ValueError):
    """A configuration value is invalid. ``field`` is the dotted path of the bad field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class InputError(EdgeMoEError, ValueError):
    """Run-time input is invalid (not a configuration mistake). ``what`` names the input."""

    def __init__(self, what: str, message: str):
        self.what = what
        super().__init__(f"{what}: {message}")


class DataError(EdgeMoEError):
    """A data file or dataset folder is missing or malformed. ``path`` names it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")
