"""Component registries with lazy, cached entry-point discovery.

Each component kind (backbone, objective, dataset) has one :class:`Registry`. Components come from two
places: :meth:`Registry.register` in user code, and entry points in the group ``mtdisent.<kind>s``
declared by any installed distribution (mtdisent's own first-party plugins included). Entry points are
read on first use and imported only when their name is asked for or the registry is listed; the result is
cached. A plugin that fails to import becomes a :class:`~mtdisent.PluginWarning` naming it, and the rest
keep working.
"""

from __future__ import annotations

import builtins
import importlib.metadata as importlib_metadata
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from torch import nn

from ._errors import (
    ComponentError,
    DuplicateComponentError,
    MtdisentError,
    PluginLoadError,
    UnknownComponentError,
    did_you_mean,
    warn_plugin,
    with_context,
)
from ._levers import Lever
from ._objectives import Objective

if TYPE_CHECKING:
    from ._protocols import BackboneFactory, DatasetFactory

__all__ = [
    "Registry",
    "ComponentInfo",
    "backbones",
    "objectives",
    "datasets",
    "levers",
    "register",
    "list_plugins",
    "REGISTRIES",
]

T = TypeVar("T")


def check_arguments(
    fn: Callable[..., Any],
    args: Mapping[str, Any],
    what: str,
    skip: tuple[str, ...] = (),
    error: type[MtdisentError] = ComponentError,
) -> None:
    """Raise ``error`` (:class:`ComponentError`) naming ``what`` if ``args`` holds a keyword ``fn`` does not accept.

    ``fn`` may be a function or a class (its ``__init__`` signature). Names in ``skip`` are filled in by the
    caller and are not the user's to give. A factory taking ``**kwargs`` accepts anything.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in skip]
    for key in args:
        if key not in valid:
            hint = did_you_mean(key, valid) if valid else "It takes no arguments."
            raise error(f"{what}: unknown argument {key!r}. {hint}")


@dataclass(frozen=True)
class ComponentInfo:
    """Where a registered component came from."""

    kind: str
    name: str
    source: str  # distribution name and version, or "<registered in code>"
    value: str  # "module:attr" of the factory
    loaded: bool


@dataclass
class _Entry:
    name: str
    source: str
    value: str
    entry_point: importlib_metadata.EntryPoint | None = None
    obj: Any = None
    loaded: bool = False
    failed: str | None = None


def _entry_points(group: str) -> list[importlib_metadata.EntryPoint]:
    return list(importlib_metadata.entry_points(group=group))


class Registry(Generic[T]):
    """A named collection of factories of one component kind.

    Args:
        kind: Human name of the kind, for example ``"backbone"``.
        group: Entry-point group scanned for plugins, for example ``"mtdisent.backbones"``.
    """

    def __init__(self, kind: str, group: str, returns: type | tuple[type, ...] | None = None) -> None:
        self.kind = kind
        self.group = group
        self.returns = returns
        self._entries: dict[str, _Entry] = {}
        self._discovered = False
        self._lock = threading.RLock()

    # -- discovery -----------------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            for ep in sorted(_entry_points(self.group), key=lambda e: (e.name, _dist_name(e))):
                source = _dist_name(ep)
                if ep.name in self._entries:
                    other = self._entries[ep.name]
                    if other.value == ep.value:  # the same distribution seen twice on sys.path
                        continue
                    warn_plugin(
                        f"{self.kind} {ep.name!r} is declared twice: by {other.source} ({other.value}) and by "
                        f"{source} ({ep.value}); keeping the one from {other.source}. Uninstall one of them or "
                        f"rename the entry point in group {self.group!r}."
                    )
                    continue
                self._entries[ep.name] = _Entry(ep.name, source, ep.value, entry_point=ep)
            self._discovered = True

    def _load(self, entry: _Entry) -> Any:
        if entry.loaded:
            return entry.obj
        if entry.failed is not None:
            raise PluginLoadError(entry.failed)
        assert entry.entry_point is not None
        try:
            entry.obj = entry.entry_point.load()
        except Exception as exc:  # any import-time failure of third-party code
            entry.failed = (
                f"{self.kind} plugin {entry.name!r} from {entry.source} ({entry.value}) failed to import: "
                f"{type(exc).__name__}: {exc}"
            )
            raise PluginLoadError(entry.failed) from exc
        entry.loaded = True
        return entry.obj

    def refresh(self) -> None:
        """Forget discovered entry points (not components registered in code) and scan again on next use."""
        with self._lock:
            self._entries = {k: e for k, e in self._entries.items() if e.entry_point is None}
            self._discovered = False

    # -- public API ----------------------------------------------------------------------------------
    @overload
    def register(self, name: str, obj: None = None, *, override: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, override: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; used bare as a decorator when ``obj`` is omitted.

        Args:
            name: The name specs use to refer to the component.
            obj: The factory. Omit it to use the method as a decorator.
            override: Replace an existing component of that name instead of raising.

        Raises:
            DuplicateComponentError: ``name`` is taken and ``override`` is false.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(o: T) -> T:
            self._discover()
            with self._lock:
                existing = self._entries.get(name)
                if existing is not None and not override:
                    raise DuplicateComponentError(
                        f"{self.kind} {name!r} is already registered (by {existing.source}, {existing.value}); "
                        f"choose another name or pass override=True."
                    )
                value = f"{getattr(o, '__module__', '?')}:{getattr(o, '__qualname__', repr(o))}"
                self._entries[name] = _Entry(name, "<registered in code>", value, obj=o, loaded=True)
            return o

        return decorator if obj is None else decorator(obj)

    def unregister(self, name: str) -> None:
        """Remove a component (mainly for tests); unknown names raise :class:`UnknownComponentError`."""
        self._discover()
        with self._lock:
            if name not in self._entries:
                raise UnknownComponentError(f"Unknown {self.kind} {name!r}. {did_you_mean(name, self._entries)}")
            del self._entries[name]

    def get(self, name: str) -> T:
        """Return the factory registered as ``name``, importing its plugin on first use.

        Raises:
            UnknownComponentError: no such name; the message lists what is available and close matches.
            PluginLoadError: the plugin providing ``name`` failed to import.
        """
        self._discover()
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownComponentError(f"Unknown {self.kind} {name!r}. {did_you_mean(name, self.list())}")
        return self._load(entry)

    def create(self, name: str, args: Mapping[str, Any] | None = None, *, what: str | None = None, **fixed: Any) -> Any:
        """Build component ``name`` with the user's ``args`` and the caller's ``fixed`` keyword arguments.

        The one way every component is built: ``args`` are checked against the factory's signature (``fixed``
        names are the caller's, not the user's), and any error the factory raises comes back naming the
        component: an mtdisent error keeps its class with the component prefixed, anything else becomes a
        :class:`~mtdisent.ComponentError`.

        Args:
            name: Registered name.
            args: The user's keyword arguments (from the spec).
            what: How to name the component in errors (default ``"<kind> '<name>'"``).
            **fixed: Arguments the caller supplies (for example ``in_channels`` of a backbone).

        Raises:
            UnknownComponentError, PluginLoadError, ComponentError: as described.
        """
        args = dict(args or {})
        label = what or f"{self.kind} {name!r}"
        factory: Any = self.get(name)
        check_arguments(factory, args, label, skip=tuple(fixed))
        try:
            obj = factory(**fixed, **args)
        except MtdisentError as exc:
            raise with_context(exc, label) from exc
        except Exception as exc:  # third-party code: any failure is the component's
            raise ComponentError(f"{label} could not be built with args {args}: {type(exc).__name__}: {exc}") from exc
        if self.returns is not None and not isinstance(obj, self.returns):
            expected = (
                self.returns.__name__
                if isinstance(self.returns, type)
                else " or ".join(t.__name__ for t in self.returns)
            )
            raise ComponentError(f"{label}: its factory returned {type(obj).__name__}, expected {expected}")
        return obj

    def list(self) -> builtins.list[str]:
        """Names of the components that load; plugins that fail to import are skipped with a warning."""
        return [info.name for info in self.info() if info.loaded]

    def info(self) -> builtins.list[ComponentInfo]:
        """Every component with its source distribution, loading each plugin (failures become warnings)."""
        self._discover()
        out = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            if not entry.loaded:
                try:
                    self._load(entry)
                except PluginLoadError as exc:
                    warn_plugin(f"{exc} It is skipped; other plugins keep working.")
            out.append(ComponentInfo(self.kind, name, entry.source, entry.value, entry.loaded))
        return out

    def names(self) -> builtins.list[str]:
        """Every declared name, without importing any plugin."""
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __repr__(self) -> str:
        return f"Registry(kind={self.kind!r}, group={self.group!r})"


def _dist_name(ep: importlib_metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown distribution>"
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # metadata of a broken install
        return "<unknown distribution>"


backbones: Registry[BackboneFactory] = Registry("backbone", "mtdisent.backbones", returns=nn.Module)
objectives: Registry[Callable[..., Objective]] = Registry("objective", "mtdisent.objectives", returns=Objective)
datasets: Registry[DatasetFactory] = Registry("dataset", "mtdisent.datasets")
levers: Registry[Callable[..., Lever]] = Registry("lever", "mtdisent.levers", returns=Lever)

REGISTRIES: dict[str, Registry[Any]] = {
    "backbone": backbones,
    "objective": objectives,
    "dataset": datasets,
    "lever": levers,
}


def _registry_for(kind: str) -> Registry[Any]:
    key = kind[:-1] if kind.endswith("s") else kind
    if key not in REGISTRIES:
        raise UnknownComponentError(f"Unknown component kind {kind!r}. {did_you_mean(key, REGISTRIES)}")
    return REGISTRIES[key]


def register(kind: str, name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a component of ``kind`` (``"backbone"``, ``"objective"`` or ``"dataset"``) under ``name``.

    Used as a decorator::

        @mtdisent.register("backbone", "tiny_cnn")
        def tiny_cnn(in_channels: int, width: int = 8) -> nn.Module: ...
    """
    return _registry_for(kind).register(name, obj, override=override)


def list_plugins(kind: str | None = None) -> list[ComponentInfo]:
    """Every component of every kind (or of ``kind``) with the distribution it came from."""
    regs = [_registry_for(kind)] if kind else list(REGISTRIES.values())
    return [info for reg in regs for info in reg.info()]
