"""report.md of a `kvdiag reproduce` run: tables, figures and Findings (one verdict per claim).

Verdicts compare means ± one standard error (std / √n over samples):
- a method *loses* on a task when its interval lies entirely below exact's and its mean is more than
  `TOLERANCE` points below; it is *lossless* when its mean is at most `TOLERANCE` points below exact
  (or above); anything else (a large drop inside overlapping intervals, or n = 1, which has no
  error bar) is *unclear*;
- claim 1 (needle vs context-intensive): holds when every baseline offloading method (ShadowKV,
  ArkVale, LRQK, InfiniGen) is lossless on needle and at least half of the (method, context-intensive
  task) pairs lose; does not hold when half the methods or more lose on needle, or every pair is
  lossless (pairs where exact itself scores at most `TOLERANCE` are *floor* and do not count); else
  inconclusive. ShadowKV at 10× budget: holds when it still loses on a task where
  ShadowKV loses; does not hold when it is lossless on every such task; else inconclusive;
- claim 2 (recall table, means over layers, KV heads and query positions of one prompt): low-rank
  keys hold when ShadowKV's err_key is more than twice YAKV's at ShadowKV's budget and do not hold
  when it is not larger; chunk landmarks hold when ShadowKV's err_selection is more than 1.25× YAKV's
  at the same budget with less attention mass and the oracle reaches ShadowKV's attention mass at
  half ShadowKV's budget or less, and do not hold when ShadowKV's err_selection is not larger than
  YAKV's; else inconclusive;
- claim 3 (Text2JSON): holds when YAKV's interval lies above ShadowKV's and YAKV recovers at least half
  of ShadowKV's gap to exact; does not hold when YAKV's interval lies below ShadowKV's, or when
  ShadowKV loses and YAKV's mean is not above ShadowKV's; else inconclusive.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError

TOLERANCE = 5.0  # score points (0-100): "near-lossless"
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
BASELINES = ("shadowkv", "arkvale", "lrqk", "infinigen")
CONTEXT_INTENSIVE = ("text2json", "multineedle", "html2tsv", "html2tsv_synthetic")
TITLES = {"shadowkv": "ShadowKV", "shadowkv_10x": "ShadowKV 10×", "arkvale": "ArkVale", "lrqk": "LRQK",
          "infinigen": "InfiniGen", "yakv": "YAKV", "yakv_centered": "YAKV centred (kvdiag)", "oracle": "oracle",
          "exact": "exact"}  # fmt: skip


# --- markdown ---------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table; align: one of 'l', 'r', 'c' per column (default: left). Cells are
    str()-ed, '|' escaped and newlines flattened.

    >>> print(markdown_table(["a", "b"], [[1, "x|y"]], align="lr"))
    | a | b |
    |:--|--:|
    | 1 | x\\|y |
    """
    if align is not None and len(align) != len(header):
        raise KvdiagError(f"align {align!r} has {len(align)} entries for {len(header)} columns")
    for row in rows:
        if len(row) != len(header):
            raise KvdiagError(f"row {row!r} has {len(row)} cells for {len(header)} columns")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join(rule[a] for a in (align or "l" * len(header))) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def score_text(mean: float, stderr: float) -> str:
    """ "36.0 ± 4.0", or "36.0 (n = 1)" without an error bar."""
    if mean is None or not np.isfinite(mean):
        return "–"
    return (
        f"{mean:.1f} ± {stderr:.1f}" if stderr is not None and np.isfinite(stderr) else f"{mean:.1f} (n = 1)"
    )


def _num(value, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g} %"


# --- verdicts ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Score:
    mean: float
    stderr: float  # NaN when n = 1

    def __str__(self) -> str:
        return score_text(self.mean, self.stderr)


@dataclasses.dataclass
class Finding:
    claim: str
    statement: str
    verdict: str
    evidence: str


def lookup(scores: pd.DataFrame, label: str, budget: float) -> Score | None:
    """The score of (method label, budget) in a `score_table` (None when absent)."""
    rows = scores[(scores.method == label) & np.isclose(scores.budget.astype(float), float(budget))]
    if rows.empty:
        return None
    return Score(float(rows.score_mean.iloc[0]), float(rows.score_stderr.iloc[0]))


def above(a: Score, b: Score) -> bool:
    """a's mean − stderr lies above b's mean + stderr (False when either has no error bar)."""
    if not (np.isfinite(a.stderr) and np.isfinite(b.stderr)):
        return False
    return a.mean - a.stderr > b.mean + b.stderr


def classify(method: Score, exact: Score) -> str:
    """'floor' (exact itself scores at most TOLERANCE: nothing to lose), 'lossless' (at most TOLERANCE
    points below exact), 'loss' (more, and the intervals apart), else 'unclear'."""
    if exact.mean <= TOLERANCE:
        return "floor"
    if exact.mean - method.mean <= TOLERANCE:
        return "lossless"
    return "loss" if above(exact, method) else "unclear"


def claim1(scores: dict[str, pd.DataFrame], roles: dict[str, dict[str, tuple]]) -> list[Finding]:
    """Claim 1 from per-task score tables; roles[task][role] = (label, budget)."""
    ci = [t for t in scores if t in CONTEXT_INTENSIVE]
    exact = {t: lookup(scores[t], "exact", 1.0) for t in scores}
    statement = ("offloading methods that look near-lossless on needle-in-a-haystack lose a lot on "
                 "context-intensive tasks")  # fmt: skip
    found = []
    if "needle" not in scores or not ci:
        found.append(Finding("1", statement, UNSURE, "needs the needle task and a context-intensive task"))
    else:
        needle = {r: lookup(scores["needle"], *roles["needle"][r]) for r in BASELINES if r in roles["needle"]}
        needle_cls = {r: classify(s, exact["needle"]) for r, s in needle.items() if s is not None}
        pairs = {(r, t): lookup(scores[t], *roles[t][r]) for t in ci for r in BASELINES if r in roles[t]}
        pair_cls = {k: classify(s, exact[k[1]]) for k, s in pairs.items() if s is not None}
        testable = [c for c in pair_cls.values() if c != "floor"]
        losing = [k for k, c in pair_cls.items() if c == "loss"]
        needle_ok = bool(needle_cls) and all(c == "lossless" for c in needle_cls.values())
        if needle_ok and testable and 2 * len(losing) >= len(testable):
            verdict = HOLDS
        elif 2 * sum(c == "loss" for c in needle_cls.values()) >= len(needle_cls) > 0 or (
            testable and all(c == "lossless" for c in testable)
        ):
            verdict = FAILS
        else:
            verdict = UNSURE
        evidence = (
            f"needle: exact {exact['needle']}; "
            + ", ".join(f"{TITLES[r]} {needle[r]} ({c})" for r, c in needle_cls.items())
            + f". Context-intensive: {len(losing)} of {len(testable)} (method, task) pairs lose"
            + "".join(
                f"; {t}: exact {exact[t]}, "
                + ", ".join(
                    f"{TITLES[r]} {pairs[r, t]} ({pair_cls[r, t]})" for r in BASELINES if (r, t) in pair_cls
                )
                for t in ci
            )
            + "."
        )
        found.append(Finding("1", statement, verdict, evidence))

    statement = "raising ShadowKV's budget 10× does not fix it"
    rows = []
    for t in ci:
        base, ten = (
            lookup(scores[t], *roles[t][r]) if r in roles[t] else None for r in ("shadowkv", "shadowkv_10x")
        )
        if base is not None and ten is not None:
            rows.append((t, base, ten, classify(base, exact[t]), classify(ten, exact[t])))
    where = [r for r in rows if r[3] == "loss"]
    if any(r[4] == "loss" for r in where):
        verdict = HOLDS
    elif where and all(r[4] == "lossless" for r in where):
        verdict = FAILS
    else:
        verdict = UNSURE
    evidence = (
        "; ".join(
            f"{t}: exact {exact[t]}, ShadowKV {b} ({cb}), ShadowKV 10× {x} ({cx})" for t, b, x, cb, cx in rows
        )
        or "no ShadowKV scores on a context-intensive task"
    )
    if not where and rows:
        evidence += " (ShadowKV does not lose significantly at its own budget, so there is nothing to fix)"
    found.append(Finding("1", statement, verdict, evidence + "."))
    return found


def recall_summary(recall: pd.DataFrame, label: str, budget: float) -> dict | None:
    """Mean recall metrics of (method label, budget) over layers, KV heads and query positions."""
    rows = recall[(recall.method == label) & np.isclose(recall.budget.astype(float), float(budget))]
    if rows.empty:
        return None
    cols = ["attention_mass", "recall", "err_selection", "err_key", "err_total", "resident_bytes_per_token"]
    return {c: float(rows[c].mean()) for c in cols}


def claim2(recall: pd.DataFrame | None, roles: dict[str, tuple]) -> list[Finding]:
    """Claim 2 from a recall table; roles[role] = (label, budget) of the recall run's methods."""
    s_low = "low-rank (SVD) pre-RoPE keys cost accuracy (key loss)"
    s_chunk = (
        "chunk-mean landmarks select the wrong tokens (selection loss); exact q·k needs far fewer tokens"
    )
    if recall is None or "shadowkv" not in roles or "yakv" not in roles:
        return [Finding("2", s, UNSURE, "no recall table with ShadowKV and YAKV") for s in (s_low, s_chunk)]
    label, budget = roles["shadowkv"]
    shadow = recall_summary(recall, label, budget)
    yakv = recall_summary(recall, roles["yakv"][0], budget)
    if shadow is None or yakv is None:
        return [Finding("2", s, UNSURE, f"no recall rows at ShadowKV's budget {_percent(budget)}")
                for s in (s_low, s_chunk)]  # fmt: skip
    at = f"at {_percent(budget)} of the context"
    if shadow["err_key"] > 2 * yakv["err_key"]:
        verdict = HOLDS
    elif shadow["err_key"] <= yakv["err_key"]:
        verdict = FAILS
    else:
        verdict = UNSURE
    low = Finding("2", s_low, verdict,
                  f"{at}: err_key ShadowKV {shadow['err_key']:.3f} (err_total {shadow['err_total']:.3f}) vs "
                  f"YAKV {yakv['err_key']:.3f} (4-bit K/V)")  # fmt: skip
    evidence = (f"{at}: err_selection ShadowKV {shadow['err_selection']:.3f} vs YAKV {yakv['err_selection']:.3f}; "
                f"attention mass {shadow['attention_mass']:.3f} vs {yakv['attention_mass']:.3f}")  # fmt: skip
    oracle_ok = True  # the oracle reaches ShadowKV's attention mass at no more than half its budget
    if "oracle" in roles:
        oracle = recall[recall.method == roles["oracle"][0]].groupby("budget").attention_mass.mean()
        enough = oracle[oracle >= shadow["attention_mass"]]
        oracle_ok = not enough.empty and enough.index.min() <= budget / 2
        evidence += (f"; the oracle reaches ShadowKV's attention mass at {_percent(enough.index.min())} of the "
                     f"context (ShadowKV: {_percent(budget)})" if not enough.empty
                     else "; the oracle does not reach ShadowKV's attention mass at the budgets run")  # fmt: skip
    selection_worse = shadow["err_selection"] > 1.25 * yakv["err_selection"]
    if shadow["err_selection"] <= yakv["err_selection"]:
        verdict = FAILS
    elif selection_worse and shadow["attention_mass"] < yakv["attention_mass"] and oracle_ok:
        verdict = HOLDS
    else:
        verdict = UNSURE
    return [low, Finding("2", s_chunk, verdict, evidence)]


def claim3(scores: pd.DataFrame | None, roles: dict[str, tuple], yakv_role: str = "yakv") -> Finding:
    """Claim 3 from the Text2JSON score table; roles[role] = (label, budget). yakv_role="yakv_centered"
    asks the same of kvdiag's centred-K/V YAKV (not part of the study)."""
    statement = "YAKV recovers most of the loss: exact > YAKV > ShadowKV on Text2JSON"
    if yakv_role != "yakv":
        statement += " (YAKV with centred K/V, a kvdiag addition)"
    if scores is None:
        return Finding("3", statement, UNSURE, "no Text2JSON scores")
    exact, yakv, shadow = (
        lookup(scores, *r) for r in (("exact", 1.0), roles.get(yakv_role), roles.get("shadowkv"))
    )
    if None in (exact, yakv, shadow):
        return Finding("3", statement, UNSURE, "Text2JSON lacks exact, YAKV or ShadowKV scores")
    gap = exact.mean - shadow.mean
    share = (yakv.mean - shadow.mean) / gap if gap > 0 else math.nan
    if above(yakv, shadow) and np.isfinite(share) and share >= 0.5:
        verdict = HOLDS
    elif above(shadow, yakv) or (classify(shadow, exact) == "loss" and yakv.mean <= shadow.mean):
        verdict = FAILS
    else:
        verdict = UNSURE
    recovered = f"; YAKV recovers {100 * share:.0f} % of ShadowKV's gap" if np.isfinite(share) else ""
    return Finding("3", statement, verdict, f"exact {exact}, YAKV {yakv}, ShadowKV {shadow}{recovered}")


def findings(scores: dict[str, pd.DataFrame], roles: dict[str, dict], recall: pd.DataFrame | None,
             recall_roles: dict[str, tuple]) -> list[Finding]:  # fmt: skip
    """Every claim's verdict (see the module docstring)."""
    t2j = "text2json"
    found = [
        *claim1(scores, roles),
        *claim2(recall, recall_roles),
        claim3(scores.get(t2j), roles.get(t2j, {})),
    ]
    if "yakv_centered" in roles.get(t2j, {}):
        found.append(claim3(scores.get(t2j), roles[t2j], yakv_role="yakv_centered"))
    return found


# --- report.md --------------------------------------------------------------------------------------


def _task_table(summary: pd.DataFrame, role_of: dict[tuple, str]) -> str:
    header = ["configuration", "method", "budget", "score", "n", "KL (nats)", "top-1 agree",
              "GPU bytes / token", "hit cap"]  # fmt: skip
    rows = []
    for r in summary.itertuples():
        role = "exact" if r.method == "exact" else role_of.get((r.method, round(float(r.budget), 8)), "")
        budget = (
            "100 %" if r.method == "exact" else f"{_percent(r.budget_fraction)} ({r.budget_tokens:.0f} tok)"
        )
        rows.append([TITLES.get(role, role), f"`{r.method}`", budget, score_text(r.score_mean, r.score_stderr),
                     int(r.n), _num(r.kl_mean), _num(r.top1_agree), _num(r.resident_bytes_per_token, 4),
                     f"{100 * r.hit_cap_rate:.0f} %"])  # fmt: skip
    return markdown_table(header, rows, align="lllrrrrrr")


def _recall_table(recall: pd.DataFrame, roles: dict[str, tuple]) -> str:
    header = ["configuration", "budget", "attention mass", "recall", "err_selection", "err_key", "err_total",
              "GPU bytes / token"]  # fmt: skip
    rows = []
    for role, (label, budget) in roles.items():
        s = recall_summary(recall, label, budget)
        if s is not None:
            rows.append([TITLES[role], _percent(budget), *(_num(s[c]) for c in (
                "attention_mass", "recall", "err_selection", "err_key", "err_total")),
                _num(s["resident_bytes_per_token"], 4)])  # fmt: skip
    return markdown_table(header, rows, align="llrrrrrr")


def _figure(out: Path, rel: str, caption: str) -> str:
    return f"![{caption}]({rel})\n" if (out / rel).exists() else ""


def write_report(out: str | Path, info: dict) -> Path:
    """Write out/report.md from the sub-runs of a reproduce run; info: what `run_reproduce` passes
    (model, family, quick, device, html2tsv_task, config, roles, tasks, recall_roles, outlier_chunks)."""
    import json

    from kvdiag.eval.store import score_table
    from kvdiag.plots.eval import plot_study_scores

    out = Path(out)
    scores = {
        t: score_table(out / f"eval_{t}")
        for t in info["tasks"]
        if (out / f"eval_{t}" / "results.parquet").exists()
    }
    recall_path = out / "recall" / "recall.parquet"
    recall = pd.read_parquet(recall_path) if recall_path.exists() else None
    if scores:
        plot_study_scores(
            scores, info["roles"], out / "figures", title=f"{info['model']}: the study's configurations"
        )
    found = findings(scores, info["roles"], recall, info["recall_roles"])
    config = info["config"]
    mode = info.get("mode") or ("quick (CPU-sized)" if info["quick"] else "full")
    lines = [
        f"# kvdiag reproduce: arXiv 2604.08426 on `{info['model']}`",
        "",
        f"Mode: {mode}; device {info['device']}; LRQK family `{info['family']}`. Command: "
        f"`kvdiag reproduce --model {info['model']}{' --quick' if info['quick'] else ''} --out {out}`. "
        "Sub-runs: `spectrum/`, `recall/`, " + ", ".join(f"`eval_{t}/`" for t in info["tasks"]) + ".",
        "",
        "## Findings",
        "",
        *[f"- **Claim {f.claim}: {f.statement}: {f.verdict}.** {f.evidence}" for f in found],
        "",
        f"Verdicts: a method *loses* when its mean ± 1 stderr interval lies below exact's and it is more than "
        f"{TOLERANCE:g} points below; *lossless* when at most {TOLERANCE:g} points below; n = 1 has no "
        "error bar, so it never counts as a loss; where exact itself scores at most "
        f"{TOLERANCE:g} (*floor*) there is nothing to lose (see `kvdiag.study.report`).",
        "",
        _figure(out, "figures/study_scores.png", "scores of the study's configurations per task"),
        "## Configuration",
        "",
        markdown_table(
            ["task", "n", "prompt tokens (target)", "max new tokens", "knobs", "ShadowKV outlier chunks"],
            [
                [
                    t["task"],
                    t["n"],
                    t["target_tokens"],
                    t["max_new_tokens"],
                    ", ".join(f"{k}={v}" for k, v in t["knobs"].items()) or "defaults",
                    info["outlier_chunks"].get(t["task"], ""),
                ]
                for t in config["tasks"]
            ],
        ),  # fmt: skip
        "",
        f"HTML→TSV: `{info['html2tsv_task']}` "
        + (
            "(LongProc's real pages)."
            if info["html2tsv_task"] == "html2tsv"
            else "(kvdiag's synthetic pages; LongProc's real data was not used: "
            + (
                "quick mode, whose 0.5B model scores 0 on the real 2K-11K-token pages)."
                if info["quick"]
                else "not found; pass --data-dir)."
            )
        )  # fmt: skip
        + " Budgets are fractions of the prompt; GPU bytes / token are the method's resident index per "
        "prompt token and layer (exact: bf16 K+V). KL and top-1 agreement are teacher-forced on the gold answer."
        + "".join(
            f" Not run on this model: {t} ({why})." for t, why in config.get("skipped_tasks", {}).items()
        ),
        "",
        markdown_table(
            ["configuration", "method", "budget"],
            [
                [TITLES[r], f"`{lab}`", _percent(b)]
                for r, (lab, b) in next(iter(info["roles"].values()), {}).items()
            ],
        ),  # fmt: skip
        "",
    ]
    for task, summary in scores.items():
        role_of = {(lab, round(float(b), 8)): r for r, (lab, b) in info["roles"][task].items()}
        manifest = json.loads((out / f"eval_{task}" / "manifest.json").read_text())
        lengths = [s["prompt_tokens"] for s in manifest.get("samples", [])]
        lines += [f"## {task}", "", f"Metric `{manifest.get('metric')}` (0-100), prompts of "
                  f"{min(lengths)}-{max(lengths)} tokens." if lengths else "", "",
                  _task_table(summary, role_of), "",
                  _figure(out, f"eval_{task}/figures/score_vs_bytes.png", f"{task}: score vs GPU bytes"),
                  _figure(out, f"eval_{task}/figures/fidelity_vs_budget.png", f"{task}: teacher-forced fidelity")]  # fmt: skip
    if recall is not None:
        rman = json.loads((out / "recall" / "manifest.json").read_text())
        lines += ["## Recall and error decomposition", "",
                  f"One Text2JSON prompt of {rman['config']['n_tokens']} tokens, the last "
                  f"{rman['config']['queries']} positions as decode queries, layers {rman.get('layers_used')}; "
                  "means over layers, KV heads and query positions, at each configuration's budget.", "",
                  _recall_table(recall, info["recall_roles"]), "",
                  _figure(out, "recall/figures/recall_vs_budget.png", "recall vs budget"),
                  _figure(out, "recall/figures/error_decomposition.png", "error decomposition")]  # fmt: skip
    if (out / "spectrum" / "manifest.json").exists():
        lines += ["## Key spectra", "",
                  _figure(out, "spectrum/figures/energy_vs_rank.png", "key spectrum energy vs rank"),
                  _figure(out, "spectrum/figures/lowrank_damage.png", "low-rank damage")]  # fmt: skip
    text = "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"
    from kvdiag.runs import atomic_write_bytes

    atomic_write_bytes(out / "report.md", text.encode())
    return out / "report.md"


IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")


def export_report(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy run_dir/report.md and the PNGs it embeds into dest (flat names: eval_text2json/figures/x.png
    -> eval_text2json-x.png), rewriting its links, and each eval stage's score summary
    (`score_table`) as eval_<task>-scores.csv, the reference numbers notebooks can load. Returns the
    written paths."""
    run_dir, dest = Path(run_dir), Path(dest)
    report = run_dir / "report.md"
    if not report.exists():
        raise KvdiagError(f"{run_dir} has no report.md; run kvdiag reproduce --out {run_dir} first")
    dest.mkdir(parents=True, exist_ok=True)
    written = []

    def copy(match: re.Match) -> str:
        rel = Path(match.group(2))
        parts = [p for p in rel.parts if p != "figures"]
        name = "-".join(parts)
        shutil.copyfile(run_dir / rel, dest / name)
        written.append(dest / name)
        return f"![{match.group(1)}]({name})"

    text = IMAGE_LINK.sub(copy, report.read_text())
    (dest / "report.md").write_text(text)
    from kvdiag.eval.store import RESULTS, score_table
    from kvdiag.runs import atomic_write_bytes

    for results in sorted(run_dir.glob(f"eval_*/{RESULTS}")):
        target = dest / f"{results.parent.name}-scores.csv"
        atomic_write_bytes(target, score_table(results.parent).to_csv(index=False).encode())
        written.append(target)
    return [dest / "report.md", *written]
