"""report.md of a `kvdiag reproduce` run: configuration, Findings (one verdict per claim, decided by
`kvdiag.study.claims` from paired bootstrap intervals, with the rules printed), per-task tables with each
configuration's paired difference to exact, the recall table and the figures; beside it findings.json
and predictions/<task>.jsonl (`kvdiag.study.findings`). `export_report` copies all of it into a folder
such as `figures/`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.study.claims import RULES, TITLES, UNSURE, compare_to_exact, findings, percent, recall_summary

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


# --- report.md --------------------------------------------------------------------------------------


def _task_table(summary: pd.DataFrame, role_of: dict[tuple, str], differences: dict[str, str]) -> str:
    """differences: role -> "Δ [CI] (outcome)" text of its paired difference to exact."""
    header = ["configuration", "method", "budget", "score", "− exact [95 % CI]", "n", "KL (nats)", "top-1 agree",
              "GPU bytes / token", "hit cap"]  # fmt: skip
    rows = []
    for r in summary.itertuples():
        role = "exact" if r.method == "exact" else role_of.get((r.method, round(float(r.budget), 8)), "")
        budget = (
            "100 %" if r.method == "exact" else f"{percent(r.budget_fraction)} ({r.budget_tokens:.0f} tok)"
        )
        rows.append([TITLES.get(role, role), f"`{r.method}`", budget, score_text(r.score_mean, r.score_stderr),
                     differences.get(role, ""), int(r.n), _num(r.kl_mean), _num(r.top1_agree),
                     _num(r.resident_bytes_per_token, 4), f"{100 * r.hit_cap_rate:.0f} %"])  # fmt: skip
    return markdown_table(header, rows, align="llllrrrrrr")


def _recall_table(recall: pd.DataFrame, roles: dict[str, tuple]) -> str:
    header = ["configuration", "budget", "attention mass", "recall", "err_selection", "err_key", "err_total",
              "GPU bytes / token"]  # fmt: skip
    rows = []
    for role, (label, budget) in roles.items():
        s = recall_summary(recall, label, budget)
        if s is not None:
            rows.append([TITLES[role], percent(budget), *(_num(s[c]) for c in (
                "attention_mass", "recall", "err_selection", "err_key", "err_total")),
                _num(s["resident_bytes_per_token"], 4)])  # fmt: skip
    return markdown_table(header, rows, align="llrrrrrr")


def _figure(out: Path, rel: str, caption: str) -> str:
    return f"![{caption}]({rel})\n" if (out / rel).exists() else ""


def _config_option(config: dict) -> str:
    name = config.get("name", "custom")
    return {"quick": " --quick", "custom": " (a ReproduceConfig from Python)"}.get(name, f" --config {name}")


def _finding_line(f) -> str:
    needed = ""
    if f.verdict == UNSURE and f.comparisons:
        needed = (f" To decide it: n ≈ {f.needed_n} samples (interval shrinking as 1/√n at the observed means)."
                  if f.needed_n is not None else " No sample size estimate (n = 1, or a mean on its threshold).")  # fmt: skip
    return f"- **Claim {f.id}: {f.statement}: {f.verdict}.** {f.evidence.rstrip('.')}.{needed}"


def _calibration_lines(out: Path) -> list[str]:
    """The calibrate stage's table and choice (`kvdiag.study.calibrate`), when the run has one."""
    from kvdiag.study.calibrate import load_choice

    saved = load_choice(out / "calibrate")
    if saved is None:
        return []
    cal, chosen, table = saved["calibration"], saved["chosen"], saved["table"]
    knob_names = list(cal["candidates"][0]["knobs"])
    rows = [[r["candidate"], *[r.get(f"knob_{k}") for k in knob_names], r["max_new_tokens"],
             f"{r['prompt_tokens_mean']:.0f}", f"{r['exact_mean']:.1f} ({r['exact_min']:.0f}-{r['exact_max']:.0f})",
             r["tokens_generated_max"], f"{r['hit_cap_share']:.2f}",
             "**chosen**" if r["candidate"] == chosen["candidate"] else ""] for r in table]  # fmt: skip
    return [
        f"Calibration of {cal['task']} (`calibrate/`): exact attention alone on {cal['n']} samples of seed "
        f"{cal['seed']} (the evaluation uses seed 0), per candidate setting; chosen: {chosen['reason']}.",
        "",
        markdown_table(
            [
                "candidate",
                *knob_names,
                "max new tokens",
                "prompt tokens",
                "exact score (min-max)",
                "longest answer",
                "hit cap",
                "",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


def _partial_note(out: Path, info: dict) -> list[str]:
    """The warning at the top of a report written before every stage finished (`--partial-report`)."""
    if not info.get("unfinished"):
        return []
    counts = []
    for stage in info["unfinished"]:
        path = out / stage / "results.parquet"
        if path.exists():
            table = pd.read_parquet(path)
            counts.append(f"`{stage}` ({table.sample_id.nunique()} samples with results so far)")
        else:
            counts.append(f"`{stage}` (no results)")
    return [
        f"**Partial report**: written before every stage finished. Not finished: {', '.join(counts)}. "
        "Verdicts use the samples finished so far; re-running the same command continues the run.",
        "",
    ]


def write_report(out: str | Path, info: dict) -> Path:
    """Write out/report.md, out/findings.json and out/predictions/ from the sub-runs of a reproduce run;
    info: what `run_reproduce` passes (model, family, quick, mode, device, html2tsv_task, config, roles,
    tasks, stages, recall_roles, outlier_chunks)."""
    from kvdiag.eval.store import RESULTS, score_table
    from kvdiag.plots.eval import plot_study_scores
    from kvdiag.study.findings import write_findings

    out = Path(out)
    tables = {
        t: pd.read_parquet(out / f"eval_{t}" / RESULTS)
        for t in info["tasks"]
        if (out / f"eval_{t}" / RESULTS).exists()
    }
    scores = {t: score_table(table) for t, table in tables.items()}
    recall_path = out / "recall" / "recall.parquet"
    recall = pd.read_parquet(recall_path) if recall_path.exists() else None
    if scores:
        plot_study_scores(
            scores, info["roles"], out / "figures", title=f"{info['model']}: the study's configurations"
        )
    found = findings(tables, info["roles"], recall, info["recall_roles"], info.get("family"))
    write_findings(out, info, found, tables, scores)
    config = info["config"]
    mode = info.get("mode") or ("quick (CPU-sized)" if info["quick"] else "full")
    lines = [
        f"# kvdiag reproduce: arXiv 2604.08426 on `{info['model']}`",
        "",
        *_partial_note(out, info),
        f"Mode: {mode}; device {info['device']}; LRQK family `{info['family']}`. Command: "
        f"`kvdiag reproduce --model {info['model']}{_config_option(config)} --out {out}`. "
        "Sub-runs: `spectrum/`, `recall/`, " + ", ".join(f"`eval_{t}/`" for t in info["tasks"]) + ".",
        "",
        "## Findings",
        "",
        *[_finding_line(f) for f in found],
        "",
        "How the verdicts are decided (`kvdiag.study.claims`):",
        "",
        *[f"{i}. {rule}" for i, rule in enumerate(RULES, 1)],
        "",
        "Every number above is in `findings.json`, and every cell's prediction, gold answer and score in "
        "`predictions/<task>.jsonl`; `kvdiag rescore DIR` scores them again with the tasks' own scorers.",
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
                for t in info.get("plans", config["tasks"])
            ],
        ),  # fmt: skip
        "",
        *_calibration_lines(out),
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
                [TITLES[r], f"`{lab}`", percent(b)]
                for r, (lab, b) in next(iter(info["roles"].values()), {}).items()
            ],
        ),  # fmt: skip
        "",
    ]
    for task, summary in scores.items():
        role_of = {(lab, round(float(b), 8)): r for r, (lab, b) in info["roles"][task].items()}
        differences = {}
        for role in info["roles"][task]:
            c = compare_to_exact(tables, info["roles"], task, role)
            if c is not None:
                differences[role] = f"{c.diff.text()} {c.outcome}"
        manifest = json.loads((out / f"eval_{task}" / "manifest.json").read_text())
        lengths = [s["prompt_tokens"] for s in manifest.get("samples", [])]
        lines += [f"## {task}", "", f"Metric `{manifest.get('metric')}` (0-100), prompts of "
                  f"{min(lengths)}-{max(lengths)} tokens." if lengths else "", "",
                  _task_table(summary, role_of, differences), "",
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
    -> eval_text2json-x.png), rewriting its links, plus findings.json, predictions/<task>.jsonl (old
    prediction files in dest are replaced) and each eval stage's score summary (`score_table`) as
    eval_<task>-scores.csv, the reference numbers notebooks can load. Returns the written paths."""
    from kvdiag.eval.store import RESULTS, score_table
    from kvdiag.runs import atomic_write_bytes
    from kvdiag.study.findings import FINDINGS, PREDICTIONS_DIR

    run_dir, dest = Path(run_dir), Path(dest)
    report = run_dir / "report.md"
    if not report.exists():
        raise KvdiagError(f"{run_dir} has no report.md; run kvdiag reproduce --out {run_dir} first")
    dest.mkdir(parents=True, exist_ok=True)
    written = []

    def copy(source: Path, target: Path) -> None:
        atomic_write_bytes(target, source.read_bytes())
        written.append(target)

    def copy_figure(match: re.Match) -> str:
        rel = Path(match.group(2))
        name = "-".join(p for p in rel.parts if p != "figures")
        copy(run_dir / rel, dest / name)
        return f"![{match.group(1)}]({name})"

    text = IMAGE_LINK.sub(copy_figure, report.read_text())
    if (run_dir / FINDINGS).exists():
        copy(run_dir / FINDINGS, dest / FINDINGS)
        (dest / PREDICTIONS_DIR).mkdir(exist_ok=True)
        for stale in (dest / PREDICTIONS_DIR).glob("*.jsonl"):
            stale.unlink()
        for source in sorted((run_dir / PREDICTIONS_DIR).glob("*.jsonl")):
            copy(source, dest / PREDICTIONS_DIR / source.name)
    atomic_write_bytes(dest / "report.md", text.encode())
    for results in sorted(run_dir.glob(f"eval_*/{RESULTS}")):
        target = dest / f"{results.parent.name}-scores.csv"
        atomic_write_bytes(target, score_table(results.parent).to_csv(index=False).encode())
        written.append(target)
    return [dest / "report.md", *written]
