"""The method registry: every `Method` subclass of this package that declares its own `name`, plus
methods registered from outside kvdiag.

A new file in `kvdiag/methods/` is a new method. Outside kvdiag, register a method with the
`register_method` decorator, or ship it in a package that declares an entry point in the group
`kvdiag.methods` (`name = "package.module:ClassName"`): it is loaded the first time the registry is
read, so `kvdiag methods`, `--methods mine:knob=1` and `get_method("mine")` see it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.methods.base import Method

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "kvdiag.methods"
_REGISTRY: dict[str, type[Method]] | None = None
_ADDED: dict[str, type[Method]] = {}


def _check_class(cls) -> type[Method]:
    if not (inspect.isclass(cls) and issubclass(cls, Method)) or cls is Method:
        raise KvdiagError(f"{cls!r} is not a subclass of kvdiag.methods.Method")
    if "name" not in cls.__dict__ or not isinstance(cls.name, str) or not cls.name:
        raise KvdiagError(f"method class {cls.__name__} needs its own `name` (a ClassVar[str])")
    if not dataclasses.is_dataclass(cls):
        raise KvdiagError(f"method class {cls.__name__} must be a @dataclass (its fields are its knobs)")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise KvdiagError(f"method class {cls.__name__} does not implement {missing}")
    return cls


def register_method(cls):
    """Class decorator: make a Method subclass available by its `name` everywhere in kvdiag.

    >>> @register_method
    ... @dataclass
    ... class Mine(Method): name: ClassVar[str] = "mine"; ...
    """
    cls = _check_class(cls)
    other = registry().get(cls.name)
    if other is not None and other is not cls and other.__module__ != cls.__module__:
        raise KvdiagError(f"method name {cls.name!r} is taken by {other.__module__}.{other.__name__}")
    _ADDED[cls.name] = cls
    registry()[cls.name] = cls
    return cls


def _builtin() -> dict[str, type[Method]]:
    import kvdiag.methods as package

    found: dict[str, type[Method]] = {}
    skip = {"base", "registry", "specs"}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in skip or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, Method) or cls is Method or cls.__module__ != module.__name__:
                continue
            if "name" not in cls.__dict__:
                continue  # an abstract helper class without its own registry key
            other = found.get(cls.name)
            if other is not None and other is not cls:
                raise KvdiagError(
                    f"method name {cls.name!r} is registered twice: {other.__module__} and {cls.__module__}"
                )
            found[cls.name] = cls
    return found


def _from_entry_points() -> dict[str, type[Method]]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = _check_class(ep.load())
        except Exception as err:  # a broken plugin must not break kvdiag
            log.warning("method entry point %s = %s not loaded: %s", ep.name, ep.value, err)
    return found


def registry() -> dict[str, type[Method]]:
    """name -> Method class (built-in, entry points, then `register_method`)."""
    global _REGISTRY
    if _REGISTRY is None:
        found = _builtin()
        for name, cls in _from_entry_points().items():
            if name in found:
                log.warning("method entry point %r is shadowed by kvdiag's own method of that name", name)
                continue
            found[name] = cls
        found.update(_ADDED)
        _REGISTRY = found
    return _REGISTRY


def method_names() -> list[str]:
    return sorted(registry())


def knob_fields(cls: type[Method]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def default_value(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def get_method(name: str, **knobs: Any) -> Method:
    """The method registered as `name`, with knobs overriding its upstream defaults.

    >>> get_method("streaming", sinks=8).sinks
    8
    """
    found = registry()
    if name not in found:
        raise unknown_name_error("method", name, found)
    cls = found[name]
    known = [f.name for f in knob_fields(cls)]
    for knob in knobs:
        if knob not in known:
            raise unknown_name_error(f"knob of method {name!r}:", knob, known)
    return cls(**knobs)


def list_methods() -> list[dict[str, Any]]:
    """One dict per registered method: name, paper, knobs (name -> default), description (one line)."""
    rows = []
    for name in method_names():
        cls = registry()[name]
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "paper": cls.paper,
                "knobs": {f.name: default_value(f) for f in knob_fields(cls)},
                "description": doc.strip().splitlines()[0] if doc.strip() else "",
            }
        )
    return rows
