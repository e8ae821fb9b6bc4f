"""The method zoo and its registry.

Every module of this package (except `base` and private `_*` helpers) is imported once, and every
`Method` subclass found there that declares its own `name` registers itself: a new file is a new
method. Use `get_method("shadowkv", rank=320)`, `parse_method_spec("shadowkv:rank=320,chunk=8")`
(for CLIs) or `list_methods()`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget

__all__ = [
    "LayerKV",
    "Method",
    "Selection",
    "resolve_budget",
    "get_method",
    "list_methods",
    "method_names",
    "parse_method_spec",
]

_REGISTRY: dict[str, type[Method]] | None = None


def _registry() -> dict[str, type[Method]]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, type[Method]] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
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
        _REGISTRY = found
    return _REGISTRY


def method_names() -> list[str]:
    return sorted(_registry())


def _knob_fields(cls: type[Method]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _default(field: dataclasses.Field) -> Any:
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
    registry = _registry()
    if name not in registry:
        raise unknown_name_error("method", name, registry)
    cls = registry[name]
    known = [f.name for f in _knob_fields(cls)]
    for knob in knobs:
        if knob not in known:
            raise unknown_name_error(f"knob of method {name!r}:", knob, known)
    return cls(**knobs)


def list_methods() -> list[dict[str, Any]]:
    """One dict per registered method: name, paper, knobs (name -> default), description (one line)."""
    rows = []
    for name in method_names():
        cls = _registry()[name]
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "paper": cls.paper,
                "knobs": {f.name: _default(f) for f in _knob_fields(cls)},
                "description": doc.strip().splitlines()[0] if doc.strip() else "",
            }
        )
    return rows


def _parse_value(method: str, knob: str, text: str, default: Any) -> Any:
    """Convert a spec string to the type of the knob's default (bool, int, float or str)."""
    low = text.strip().lower()
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise KvdiagError(f"{method}: {knob}={text!r} is invalid; use true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise KvdiagError(f"{method}: {knob}={text!r} is invalid; use an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise KvdiagError(f"{method}: {knob}={text!r} is invalid; use a number") from None
    return text.strip()


def parse_method_spec(spec: str) -> Method:
    """Build a method from a CLI spec "name" or "name:knob=value,knob=value".

    Values take the type of the knob's default; string values may contain ':' (e.g.
    "yakv:landmark_quant=higgs:EDEN4-256").

    >>> m = parse_method_spec("shadowkv:rank=320,chunk=8")
    >>> (m.name, m.rank, m.chunk)
    ('shadowkv', 320, 8)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise KvdiagError(f"method spec {spec!r} is empty; use e.g. 'shadowkv:rank=320,chunk=8'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    registry = _registry()
    if name not in registry:
        raise unknown_name_error("method", name, registry)
    fields = {f.name: f for f in _knob_fields(registry[name])}
    knobs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        knob, eq, value = item.partition("=")
        knob = knob.strip()
        if not eq:
            raise KvdiagError(f"method spec {spec!r}: {item!r} is not knob=value")
        if knob not in fields:
            raise unknown_name_error(f"knob of method {name!r}:", knob, fields)
        knobs[knob] = _parse_value(name, knob, value, _default(fields[knob]))
    return get_method(name, **knobs)
