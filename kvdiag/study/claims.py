"""The study's claims, each decided from paired bootstrap intervals (`kvdiag.study.paired`) on the
per-sample scores of the eval stages (claims 1, 3, 4) or from the recall table (claim 2).

`RULES` states every decision rule; the report and findings.json print it verbatim. Inputs: `tables`
maps a task to its results table (columns sample_id, method, budget, score), `roles[task][role]` =
(method label, budget) of each study configuration in that task's table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from kvdiag.study.paired import PairedDifference, needed_n, paired_difference, paired_scores

MARGIN = 5.0  # score points (0-100): how much worse than exact still counts as near-lossless
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
BASELINES = ("shadowkv", "arkvale", "lrqk", "infinigen")
CONTEXT_INTENSIVE = ("text2json", "multineedle", "html2tsv", "html2tsv_synthetic")
EXACT_ROLE = ("exact", 1.0)
TITLES = {"shadowkv": "ShadowKV", "shadowkv_10x": "ShadowKV 10×", "arkvale": "ArkVale", "lrqk": "LRQK",
          "infinigen": "InfiniGen", "yakv": "YAKV", "yakv_centered": "YAKV centred (kvdiag)", "oracle": "oracle",
          "exact": "exact"}  # fmt: skip

RULES = [
    "Every comparison is a paired difference over the samples both sides ran on: mean(a − b) with a 95 % "
    "bootstrap interval (scipy.stats.bootstrap, paired=True, BCa, 9 999 resamples, seed 0; the percentile "
    "interval where BCa is undefined; no interval for n = 1; [d, d] when every difference is d).",
    f"A method vs exact (d = method − exact) is *lossless* when the interval's lower end is ≥ −{MARGIN:g} points, "
    f"a *loss* when its upper end is < −{MARGIN:g}, *floor* when exact's mean is ≤ {MARGIN:g} (nothing to lose), "
    "else *unclear* (so is any n = 1 comparison).",
    "Claim 1a holds when every baseline (ShadowKV, ArkVale, LRQK, InfiniGen) is lossless on needle and at least "
    "half of the (baseline, context-intensive task) pairs that are not floor are a loss; it does not hold when "
    "half of the baselines or more lose on needle, or every such pair is lossless; else inconclusive.",
    "Claim 1b holds when ShadowKV at 10× budget is still a loss on a task where ShadowKV is a loss; it does not "
    "hold when it is lossless on every such task; else inconclusive.",
    "Claim 2 (one prompt's recall table, means over layers, KV heads and queries): low-rank keys hold when "
    "ShadowKV's err_key is more than twice YAKV's at ShadowKV's budget and do not hold when it is not larger; "
    "chunk landmarks hold when ShadowKV's err_selection is more than 1.25× YAKV's with less attention mass and "
    "the oracle reaches ShadowKV's attention mass at half its budget or less, and do not hold when ShadowKV's "
    "err_selection is not larger than YAKV's; else inconclusive.",
    "Claim 3 (Text2JSON, d = YAKV − ShadowKV) holds when the interval lies above 0 and YAKV recovers at least "
    "half of ShadowKV's gap to exact (mean d ≥ ½ mean(exact − ShadowKV)); it does not hold when the interval "
    "lies below 0, or ShadowKV is a loss and the interval lies below half that gap; else inconclusive.",
    "Claim 4 (Text2JSON, d = YAKV centred − YAKV) holds when the interval lies above 0 and does not hold when "
    "its upper end is ≤ 0; else inconclusive.",
    "Where a comparison is undecided, the sample size it would need is n·(half-width / |mean − threshold|)², "
    "the n at which an interval shrinking as 1/√n would exclude the threshold (−margin for method vs exact, "
    "0 for method vs method) at the observed mean.",
]


@dataclasses.dataclass
class Comparison:
    """One paired difference behind a verdict: a − b on `task`, judged against `threshold`."""

    task: str
    a: str  # role (or "exact")
    b: str
    diff: PairedDifference
    threshold: float
    outcome: str  # lossless / loss / floor / unclear, or above / below / inside (method vs method)

    @property
    def needed_n(self) -> int | None:
        return needed_n(self.diff, self.threshold)

    def text(self) -> str:
        return (
            f"{TITLES.get(self.a, self.a)} − {TITLES.get(self.b, self.b)} {self.diff.text()} ({self.outcome})"
        )

    def to_json(self) -> dict:
        return {"task": self.task, "a": self.a, "b": self.b, **self.diff.to_json(), "threshold": self.threshold,
                "outcome": self.outcome, "needed_n": self.needed_n}  # fmt: skip


@dataclasses.dataclass
class Finding:
    id: str  # "1a", "1b", "2a", "2b", "3", "3c", "4"
    claim: str  # the study's claim number
    statement: str
    verdict: str
    evidence: str
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    numbers: dict = dataclasses.field(default_factory=dict)  # claim 2's recall means

    @property
    def needed_n(self) -> int | None:
        """Undecided: the largest sample size its unclear comparisons would need (None if unknown)."""
        if self.verdict != UNSURE:
            return None
        needs = [c.needed_n for c in self.comparisons if c.outcome in ("unclear", "inside")]
        return None if not needs or None in needs else max(needs)


def compare_to_exact(tables: dict, roles: dict, task: str, role: str) -> Comparison | None:
    """role − exact on task, classified as lossless / loss / floor / unclear (see `RULES`)."""
    if task not in tables or role not in roles.get(task, {}):
        return None
    a, b = paired_scores(tables[task], roles[task][role], EXACT_ROLE)
    if len(a) == 0:
        return None
    diff = paired_difference(a, b)
    if diff.b_mean <= MARGIN:
        outcome = "floor"
    elif diff.interval != "none" and diff.low >= -MARGIN:
        outcome = "lossless"
    elif diff.below(-MARGIN):
        outcome = "loss"
    else:
        outcome = "unclear"
    return Comparison(task, role, "exact", diff, -MARGIN, outcome)


def compare_methods(tables: dict, roles: dict, task: str, role_a: str, role_b: str) -> Comparison | None:
    """role_a − role_b on task: above / below / inside 0."""
    if task not in tables or role_a not in roles.get(task, {}) or role_b not in roles.get(task, {}):
        return None
    a, b = paired_scores(tables[task], roles[task][role_a], roles[task][role_b])
    if len(a) == 0:
        return None
    diff = paired_difference(a, b)
    outcome = "above" if diff.above(0.0) else "below" if diff.below(0.0) else "inside"
    return Comparison(task, role_a, role_b, diff, 0.0, outcome)


def _pairs_text(comparisons: list[Comparison]) -> str:
    return "; ".join(f"{c.task}: {c.text()}" for c in comparisons)


def claim1(tables: dict, roles: dict) -> list[Finding]:
    """Claims 1a (needle looks fine, context-intensive tasks lose) and 1b (10× ShadowKV budget)."""
    ci = [t for t in tables if t in CONTEXT_INTENSIVE]
    statement = ("offloading methods that look near-lossless on needle-in-a-haystack lose a lot on "
                 "context-intensive tasks")  # fmt: skip
    needle = [c for r in BASELINES if (c := compare_to_exact(tables, roles, "needle", r)) is not None]
    pairs = [c for t in ci for r in BASELINES if (c := compare_to_exact(tables, roles, t, r)) is not None]
    testable = [c for c in pairs if c.outcome != "floor"]
    losing = [c for c in testable if c.outcome == "loss"]
    if not needle or not pairs:
        verdict = UNSURE
    elif all(c.outcome == "lossless" for c in needle) and testable and 2 * len(losing) >= len(testable):
        verdict = HOLDS
    elif 2 * sum(c.outcome == "loss" for c in needle) >= len(needle) or (
        testable and all(c.outcome == "lossless" for c in testable)
    ):
        verdict = FAILS
    else:
        verdict = UNSURE
    evidence = (
        "needs the needle task and a context-intensive task"
        if not needle or not pairs
        else f"{_pairs_text(needle)}. Context-intensive: {len(losing)} of {len(testable)} (method, task) "
        f"pairs lose; {_pairs_text(pairs)}"
    )
    found = [Finding("1a", "1", statement, verdict, evidence + ".", needle + pairs)]

    statement = "raising ShadowKV's budget 10× does not fix it"
    rows = []
    for t in ci:
        base, ten = (compare_to_exact(tables, roles, t, r) for r in ("shadowkv", "shadowkv_10x"))
        if base is not None and ten is not None:
            rows.append((base, ten, compare_methods(tables, roles, t, "shadowkv_10x", "shadowkv")))
    where = [r for r in rows if r[0].outcome == "loss"]
    if any(ten.outcome == "loss" for _, ten, _ in where):
        verdict = HOLDS
    elif where and all(ten.outcome == "lossless" for _, ten, _ in where):
        verdict = FAILS
    else:
        verdict = UNSURE
    evidence = (
        "; ".join(f"{b.task}: {b.text()}, {x.text()}" + (f", {m.text()}" if m else "") for b, x, m in rows)
        or "no ShadowKV scores on a context-intensive task"
    )
    if not where and rows:
        evidence += " (ShadowKV is not a loss at its own budget, so there is nothing to fix)"
    comparisons = [c for row in rows for c in row if c is not None]
    found.append(Finding("1b", "1", statement, verdict, evidence + ".", comparisons))
    return found


def recall_summary(recall: pd.DataFrame, label: str, budget: float) -> dict | None:
    """Mean recall metrics of (method label, budget) over layers, KV heads and query positions."""
    rows = recall[(recall.method == label) & np.isclose(recall.budget.astype(float), float(budget))]
    if rows.empty:
        return None
    cols = ["attention_mass", "recall", "err_selection", "err_key", "err_total", "resident_bytes_per_token"]
    return {c: float(rows[c].mean()) for c in cols}


def percent(fraction: float) -> str:
    """0.015625 -> '1.562 %'."""
    return f"{100 * fraction:.4g} %"


def claim2(recall: pd.DataFrame | None, roles: dict[str, tuple]) -> list[Finding]:
    """Claims 2a (low-rank keys) and 2b (chunk landmarks) from a recall table; roles[role] = (label, budget)."""
    s_low = "low-rank (SVD) pre-RoPE keys cost accuracy (key loss)"
    s_chunk = (
        "chunk-mean landmarks select the wrong tokens (selection loss); exact q·k needs far fewer tokens"
    )
    if recall is None or "shadowkv" not in roles or "yakv" not in roles:
        return [Finding(i, "2", s, UNSURE, "no recall table with ShadowKV and YAKV")
                for i, s in (("2a", s_low), ("2b", s_chunk))]  # fmt: skip
    label, budget = roles["shadowkv"]
    shadow = recall_summary(recall, label, budget)
    yakv = recall_summary(recall, roles["yakv"][0], budget)
    if shadow is None or yakv is None:
        return [Finding(i, "2", s, UNSURE, f"no recall rows at ShadowKV's budget {percent(budget)}")
                for i, s in (("2a", s_low), ("2b", s_chunk))]  # fmt: skip
    at = f"at {percent(budget)} of the context"
    numbers = {"budget": budget, "shadowkv": shadow, "yakv": yakv}
    if shadow["err_key"] > 2 * yakv["err_key"]:
        verdict = HOLDS
    elif shadow["err_key"] <= yakv["err_key"]:
        verdict = FAILS
    else:
        verdict = UNSURE
    low = Finding("2a", "2", s_low, verdict,
                  f"{at}: err_key ShadowKV {shadow['err_key']:.3f} (err_total {shadow['err_total']:.3f}) vs "
                  f"YAKV {yakv['err_key']:.3f} (4-bit K/V)", numbers=numbers)  # fmt: skip
    evidence = (f"{at}: err_selection ShadowKV {shadow['err_selection']:.3f} vs YAKV {yakv['err_selection']:.3f}; "
                f"attention mass {shadow['attention_mass']:.3f} vs {yakv['attention_mass']:.3f}")  # fmt: skip
    oracle_ok = True  # the oracle reaches ShadowKV's attention mass at no more than half its budget
    if "oracle" in roles:
        oracle = recall[recall.method == roles["oracle"][0]].groupby("budget").attention_mass.mean()
        enough = oracle[oracle >= shadow["attention_mass"]]
        oracle_ok = not enough.empty and enough.index.min() <= budget / 2
        numbers = {
            **numbers,
            "oracle_budget_for_shadowkv_mass": None if enough.empty else float(enough.index.min()),
        }
        evidence += (f"; the oracle reaches ShadowKV's attention mass at {percent(enough.index.min())} of the "
                     f"context (ShadowKV: {percent(budget)})" if not enough.empty
                     else "; the oracle does not reach ShadowKV's attention mass at the budgets run")  # fmt: skip
    if shadow["err_selection"] <= yakv["err_selection"]:
        verdict = FAILS
    elif (
        shadow["err_selection"] > 1.25 * yakv["err_selection"]
        and shadow["attention_mass"] < yakv["attention_mass"]
        and oracle_ok
    ):
        verdict = HOLDS
    else:
        verdict = UNSURE
    return [low, Finding("2b", "2", s_chunk, verdict, evidence, numbers=numbers)]


def claim3(tables: dict, roles: dict, yakv_role: str = "yakv") -> Finding:
    """Claim 3 on Text2JSON; yakv_role="yakv_centered" asks the same of kvdiag's centred-K/V YAKV."""
    statement = "YAKV recovers most of the loss: exact > YAKV > ShadowKV on Text2JSON"
    finding_id = "3"
    if yakv_role != "yakv":
        statement += " (YAKV with centred K/V, a kvdiag addition)"
        finding_id = "3c"
    task = "text2json"
    versus = compare_methods(tables, roles, task, yakv_role, "shadowkv")
    shadow = compare_to_exact(tables, roles, task, "shadowkv")
    yakv = compare_to_exact(tables, roles, task, yakv_role)
    if versus is None or shadow is None or yakv is None:
        return Finding(finding_id, "3", statement, UNSURE, "Text2JSON lacks exact, YAKV or ShadowKV scores")
    gap = -shadow.diff.mean  # mean(exact − ShadowKV)
    share = versus.diff.mean / gap if gap > 0 else math.nan
    if versus.outcome == "above" and math.isfinite(share) and share >= 0.5:
        verdict = HOLDS
    elif versus.outcome == "below" or (shadow.outcome == "loss" and versus.diff.below(gap / 2)):
        verdict = FAILS
    else:
        verdict = UNSURE
    recovered = f"; YAKV recovers {100 * share:.0f} % of ShadowKV's gap" if math.isfinite(share) else ""
    evidence = f"{versus.text()}; {yakv.text()}; {shadow.text()}{recovered}"
    return Finding(finding_id, "3", statement, verdict, evidence, [versus, yakv, shadow])


def claim4(tables: dict, roles: dict, family: str | None = None) -> Finding:
    """kvdiag's finding: centring K/V per KV head before YAKV's quantizer improves YAKV on Text2JSON
    (Qwen2's keys carry a large shared component, the k_proj bias)."""
    statement = ("centring K/V per KV head before YAKV's quantizer (kvdiag) improves YAKV on Text2JSON "
                 "(Qwen2's k_proj bias)")  # fmt: skip
    versus = compare_methods(tables, roles, "text2json", "yakv_centered", "yakv")
    if versus is None:
        return Finding("4", "kvdiag", statement, UNSURE, "Text2JSON lacks YAKV or centred-YAKV scores")
    if versus.outcome == "above":
        verdict = HOLDS
    elif versus.diff.interval != "none" and versus.diff.high <= 0:
        verdict = FAILS
    else:
        verdict = UNSURE
    others = [
        c
        for t in tables
        if t != "text2json" and (c := compare_methods(tables, roles, t, "yakv_centered", "yakv"))
    ]
    evidence = f"text2json: {versus.text()}" + "".join(f"; {c.task}: {c.text()}" for c in others)
    if family is not None:
        evidence += f" (model family {family})"
    return Finding("4", "kvdiag", statement, verdict, evidence, [versus, *others])


def findings(tables: dict, roles: dict, recall: pd.DataFrame | None, recall_roles: dict,
             family: str | None = None) -> list[Finding]:  # fmt: skip
    """Every claim's verdict (see `RULES`)."""
    found = [*claim1(tables, roles), *claim2(recall, recall_roles), claim3(tables, roles)]
    if "yakv_centered" in roles.get("text2json", {}):
        found.append(claim3(tables, roles, yakv_role="yakv_centered"))
        found.append(claim4(tables, roles, family))
    return found
