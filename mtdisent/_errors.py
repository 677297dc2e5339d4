"""The exception hierarchy: every error mtdisent raises derives from :class:`MtdisentError`."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any

__all__ = [
    "MtdisentError",
    "SpecError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "PluginLoadError",
    "ComponentError",
    "PluginWarning",
    "did_you_mean",
    "with_context",
]


class MtdisentError(Exception):
    """Root of every error raised by mtdisent."""


class SpecError(MtdisentError, ValueError):
    """An experiment specification is invalid; the message names the field and what would be valid.

    Attributes:
        errors: The individual problems (pydantic's error dicts) when the spec failed validation.
    """

    def __init__(self, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])


class UnknownComponentError(MtdisentError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(MtdisentError):
    """Two components were registered under the same name."""


class PluginLoadError(MtdisentError, ImportError):
    """A plugin's entry point could not be imported."""


class ComponentError(MtdisentError):
    """A component (backbone, objective, dataset) was built with bad arguments or misbehaved."""


class PluginWarning(UserWarning):
    """A plugin failed to load or was declared twice; the other plugins keep working."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return a sentence listing what is available and the closest matches to ``name``."""
    candidates = sorted(candidates)
    close = get_close_matches(name, candidates, n=3, cutoff=0.5)
    available = ", ".join(repr(c) for c in candidates) if candidates else "(none)"
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Available: {available}.{hint}"


def with_context(exc: MtdisentError, context: str) -> MtdisentError:
    """The same kind of error with ``context`` (the component or task at fault) prefixed to its message."""
    message = f"{context}: {exc}"
    try:
        new = type(exc)(message)
    except TypeError:  # a subclass with another constructor
        new = ComponentError(message)
    if isinstance(exc, SpecError) and isinstance(new, SpecError):
        new.errors = exc.errors
    return new


def signature_repr(obj: Any) -> str:
    """``Name(arg=value, ...)`` for a component whose constructor parameters are stored as attributes."""
    names = [n for n in inspect.signature(type(obj)).parameters if hasattr(obj, n)]
    return f"{type(obj).__name__}({', '.join(f'{n}={getattr(obj, n)!r}' for n in names)})"


def warn_plugin(message: str) -> None:
    """Emit a :class:`PluginWarning` attributed to the caller's caller."""
    warnings.warn(message, PluginWarning, stacklevel=3)
