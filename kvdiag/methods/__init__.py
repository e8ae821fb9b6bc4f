"""The method zoo: one dataclass per file, behind the contract of `kvdiag.methods.base`.

    get_method("shadowkv", rank=320)                  # a method with knobs
    parse_method_spec("shadowkv:rank=320,chunk=8")    # the same from a CLI spec
    list_methods()                                    # name, paper, knobs, description

A new file here is a new method (`kvdiag.methods.registry`); methods from outside kvdiag register
with `@register_method` or the `kvdiag.methods` entry-point group. `headwise` wraps another method
("headwise:base=yakv,calib=runs/heads"); private helpers (`_scoring`, `_head_budget`) start with "_".
"""

from __future__ import annotations

from kvdiag.methods.base import Built, DecodeState, LayerKV, Method, Selection, resolve_budget
from kvdiag.methods.registry import get_method, list_methods, method_names, register_method
from kvdiag.methods.specs import (
    check_budget,
    default_methods,
    parse_budget,
    parse_method_spec,
    resolve_methods,
)

__all__ = [
    "Built",
    "DecodeState",
    "LayerKV",
    "Method",
    "Selection",
    "check_budget",
    "default_methods",
    "get_method",
    "list_methods",
    "method_names",
    "parse_budget",
    "parse_method_spec",
    "register_method",
    "resolve_budget",
    "resolve_methods",
]
