"""Inputs of `kvdiag eval`: task knobs from "knob=value" strings, and method specs with their
budgets ("spec", "spec@budget", (Method, budget) pairs) resolved into `MethodRun`s."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.eval.store import EXACT
from kvdiag.methods import Method


def parse_task_knobs(task: str, items: Sequence[str]) -> dict[str, Any]:
    """CLI "knob=value" strings -> typed knobs of `task` (the type of each knob's default; lists are
    comma-separated, e.g. "depths=0,50,100"; "none" for an optional value)."""
    from kvdiag.tasks import TASKS, get_task

    get_task(task)  # unknown task: did-you-mean error
    defaults = TASKS[task].knobs()
    knobs: dict[str, Any] = {}
    for item in items:
        knob, eq, text = item.partition("=")
        knob, text = knob.strip(), text.strip()
        if not eq:
            raise KvdiagError(f"--task-knob {item!r} is not knob=value")
        if knob not in defaults:
            raise unknown_name_error(f"knob of task {task!r}", knob, defaults)
        knobs[knob] = _typed(f"{task} knob {knob}", text, defaults[knob])
    return knobs


def _typed(what: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            kind = type(default[0]) if default else str
            return [kind(x.strip()) for x in text.strip("[]").split(",") if x.strip()]
    except ValueError:
        raise KvdiagError(f"{what}={text!r} is invalid; expected {type(default).__name__}") from None
    return None if default is None and text.lower() == "none" else text


@dataclasses.dataclass
class MethodRun:
    """One method of an eval run and the budgets it runs at (its own, or the run's `budgets`)."""

    method: Method
    label: str  # cells and tables name the method by it
    spec: str  # as given, without "@budget"
    budgets: list  # fractions of the prompt or token counts
    pinned: bool  # True: the budgets came with the method ("spec@budget" or a (method, budget) pair)

    def config(self) -> list[str]:
        """How the run's config names it: "label" (run's budgets) or "label@budget" per own budget."""
        return [f"{self.label}@{b!r}" for b in self.budgets] if self.pinned else [self.label]


def budget_label(budget: float | int, method: str | None = None) -> str:
    """How a budget reads to a person: "3.125 %" for a fraction of the prompt, "2048 tokens" for a
    token count, "all" for exact attention (stored as budget 1.0, the whole prompt)."""
    if method == EXACT:
        return "all"
    if isinstance(budget, float) and budget.is_integer() and budget > 1:
        budget = int(budget)  # a token count read back from a float column
    if isinstance(budget, int) and not isinstance(budget, bool):
        return f"{budget} tokens"
    return f"{100 * budget:.6g} %"


def split_method_budget(item) -> tuple[Method | str, float | int | None]:
    """ "spec@budget" / (method, budget) / spec / Method -> (spec or Method, budget or None)."""
    from kvdiag.methods import parse_budget

    if isinstance(item, tuple):
        if len(item) != 2:
            raise KvdiagError(f"a (method, budget) pair has two items, got {item!r}")
        method, budget = item
        return method, parse_budget(budget) if isinstance(budget, str) else budget
    if isinstance(item, str) and "@" in item:
        spec, _, budget = item.rpartition("@")
        return spec.strip(), parse_budget(budget)
    return item, None


def resolve_runs(methods, budgets: Sequence[float | int]) -> list[MethodRun]:
    """MethodRuns from specs / Methods / pairs (see the module docstring). `exact` entries are dropped
    (exact always runs, as plain generation), so [] or ["exact"] mean an exact-only run; None = every
    registered method but exact, each at every budget. A method may appear several times with its own
    budgets; the same (label, budget) twice is an error."""
    from kvdiag.methods import check_budget, default_methods, parse_method_spec

    runs: dict[str, MethodRun] = {}
    for item in default_methods() if methods is None else methods:
        given, budget = split_method_budget(item)
        name = (
            given.strip().partition(":")[0].strip()
            if isinstance(given, str)
            else getattr(given, "name", None)
        )
        if name == EXACT:
            continue
        method = parse_method_spec(given) if isinstance(given, str) else given
        if not isinstance(method, Method):
            raise KvdiagError(f"{given!r} is not a kvdiag Method or a method spec")
        label = method.label()
        own = [budget] if budget is not None else list(budgets)
        for b in own:
            check_budget(b)
        run = runs.get(label)
        if run is None:
            spec = given.strip() if isinstance(given, str) else label
            runs[label] = MethodRun(method, label, spec, [], budget is not None)
            run = runs[label]
        elif run.pinned != (budget is not None):
            raise KvdiagError(f"method {label} is given both with and without its own budget")
        twice = [b for b in own if repr(b) in {repr(x) for x in run.budgets}]
        if twice:
            raise KvdiagError(f"method {label} at budget {twice[0]!r} is given twice")
        run.budgets.extend(own)
    if any(not r.pinned for r in runs.values()) and not list(budgets):
        raise KvdiagError("no budgets given; e.g. 0.03125,0.0625 (fractions of the prompt) or 2048 (tokens)")
    return list(runs.values())
