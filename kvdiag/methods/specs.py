"""Method and budget specs as the command line and configs write them.

- `parse_method_spec("shadowkv:rank=320,chunk=8")` builds a method from "name" or
  "name:knob=value,knob=value" (values take the type of the knob's default; a wrapper's base as
  "headwise:base=shadowkv,base.rank=320,calib=runs/heads");
- `parse_budget("3.125%")` reads a budget: a fraction of the prompt ("0.03125", "3.125%") or tokens
  ("2048"), checked for form before the prompt length is known (`check_budget`);
- `resolve_methods([...])` turns a list of objects or specs into Method objects, refusing duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.methods.base import Method, resolve_budget
from kvdiag.methods.registry import default_value, get_method, knob_fields, method_names, registry

NO_BUDGETS = "no budgets given; e.g. 0.015625,0.03125 (fractions of the context) or 2048 (tokens)"


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
    "yakv:landmark_quant=higgs:EDEN4-256"). A wrapper's field that holds a method spec (its class's
    `nested_specs`) is written "base=shadowkv,base.rank=320,base.chunk=8" (or, with one knob,
    "base=shadowkv:rank=320"): the dotted knobs join the field's spec.

    >>> m = parse_method_spec("shadowkv:rank=320,chunk=8")
    >>> (m.name, m.rank, m.chunk)
    ('shadowkv', 320, 8)
    >>> parse_method_spec("headwise:base=shadowkv,base.rank=320").base
    'shadowkv:rank=320'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise KvdiagError(f"method spec {spec!r} is empty; use e.g. 'shadowkv:rank=320,chunk=8'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    found = registry()
    if name not in found:
        raise unknown_name_error("method", name, found)
    fields = {f.name: f for f in knob_fields(found[name])}
    nested = {field: [] for field in found[name].nested_specs}
    knobs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        knob, eq, value = item.partition("=")
        knob = knob.strip()
        if not eq:
            raise KvdiagError(f"method spec {spec!r}: {item!r} is not knob=value")
        outer, dot, inner = knob.partition(".")
        if dot and outer in nested:
            nested[outer].append(f"{inner.strip()}={value.strip()}")
            continue
        if knob not in fields:
            raise unknown_name_error(f"knob of method {name!r}:", knob, fields)
        knobs[knob] = _parse_value(name, knob, value, default_value(fields[knob]))
    for field, items in nested.items():
        if items:
            inner_spec = str(knobs.get(field, default_value(fields[field])))
            knobs[field] = inner_spec + ("," if ":" in inner_spec else ":") + ",".join(items)
    return get_method(name, **knobs)


def parse_budget(text: str) -> float | int:
    """CLI budget: "0.03125" or "3.125%" → fraction of the context, "2048" → tokens ("1.0" = all)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value: float | int = float(raw[:-1]) / 100
        elif any(c in raw for c in ".eE"):
            value = float(raw)
        else:
            value = int(raw)
    except ValueError:
        raise KvdiagError(
            f"budget {text!r} is not a number; use a fraction like 0.03125, 3.125% or tokens like 2048"
        ) from None
    check_budget(value)
    return value


def check_budget(budget: float | int) -> None:
    """Check the form of a budget before the context length is known: a fraction in (0, 1] or a
    whole number of tokens ≥ 1 (the upper limit, the prompt length, is checked once it is known)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise KvdiagError(
            f"budget {budget!r} is not a number; give a fraction in (0, 1] or a token count ≥ 1"
        )
    if isinstance(budget, float) and budget <= 1:
        resolve_budget(budget, 1)  # raises for fractions outside (0, 1]
        return
    if not float(budget).is_integer() or budget < 1:
        raise KvdiagError(
            f"budget {budget} is invalid; give a fraction in (0, 1] (e.g. 0.03125 or 3.125%) or a whole "
            "number of tokens ≥ 1 (e.g. 2048)"
        )


def default_methods() -> list[str]:
    """Every registered method except `exact` (the reference itself) and the wrappers of another
    method (`headwise`: by default a copy of its base)."""
    found = registry()
    return [name for name in method_names() if name != "exact" and not found[name].wraps_method]


def resolve_methods(methods: Sequence[Method | str] | None) -> list[Method]:
    """Method objects from objects or CLI specs ("shadowkv:rank=320"); None = `default_methods()`."""
    chosen = [
        parse_method_spec(m) if isinstance(m, str) else m
        for m in (default_methods() if methods is None else methods)
    ]
    if not chosen:
        raise KvdiagError(f"no methods given; choose from {', '.join(method_names())}")
    for m in chosen:
        if not isinstance(m, Method):
            raise KvdiagError(f"{m!r} is not a kvdiag Method or a method spec")
    labels = [m.label() for m in chosen]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise KvdiagError(f"method {', '.join(twice)} is given twice")
    return chosen
