"""Figures of a `kvdiag eval` run, drawn from its results.parquet (`kvdiag plot RUN_DIR` redraws them).

- score_vs_budget:   mean task score ± standard error vs budget (mean fraction of the prompt, log x),
                     one line per method; exact attention as a horizontal line with its error band;
- score_vs_bytes:    mean score vs GPU-resident bytes per prompt token and layer, one point per
                     method × budget (exact: full bf16 K+V);
- fidelity_vs_budget: teacher-forced KL(exact ‖ method) and top-1 agreement on the gold answer vs
                     budget (only when the run computed fidelity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.eval.store import EXACT, RESULTS, score_table
from kvdiag.plots import run_manifest, save_figure, style
from kvdiag.plots.recall import _colors, _percent_ticks
from kvdiag.runs import read_table


def _title(run_dir: Path) -> tuple[str, str]:
    """(figure title, score axis label) from the manifest."""
    manifest = run_manifest(run_dir)
    config = manifest.get("config", {})
    title = f"{config.get('model', '?')} on {config.get('task', '?')}, n = {config.get('n', '?')}"
    return title, f"{manifest.get('metric', 'score')} (0-100)"


def _exact_line(ax, summary: pd.DataFrame) -> None:
    exact = summary[summary.method == EXACT]
    if exact.empty:
        return
    mean, err = float(exact.score_mean.iloc[0]), float(np.nan_to_num(exact.score_stderr.iloc[0]))
    ax.axhline(mean, color="0.3", ls="--", lw=1, label=EXACT)
    ax.axhspan(mean - err, mean + err, color="0.3", alpha=0.12, lw=0)


def score_vs_budget(summary: pd.DataFrame, title: str = "", ylabel: str = "score"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    methods = [m for m in dict.fromkeys(summary.method) if m != EXACT]
    colors = _colors(methods)
    for method in methods:
        rows = summary[summary.method == method].sort_values("budget_fraction")
        ax.errorbar(rows.budget_fraction, rows.score_mean, yerr=rows.score_stderr.fillna(0), marker="o", ms=3,
                    capsize=2, color=colors[method], label=method)  # fmt: skip
    _exact_line(ax, summary)
    fractions = sorted(summary.loc[summary.method != EXACT, "budget_fraction"].round(6).unique())
    if fractions:
        _percent_ticks(ax, fractions)
    ax.set_xlabel("budget (share of the prompt attended, mean over samples)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return fig


def score_vs_bytes(summary: pd.DataFrame, title: str = "", ylabel: str = "score"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    methods = [m for m in dict.fromkeys(summary.method) if m != EXACT]
    colors = _colors(methods)
    for method in methods:
        rows = summary[summary.method == method].sort_values("resident_bytes_per_token")
        ax.plot(rows.resident_bytes_per_token, rows.score_mean, marker="o", ms=4, color=colors[method],
                label=method)  # fmt: skip
    exact = summary[summary.method == EXACT]
    if not exact.empty:
        ax.plot(exact.resident_bytes_per_token, exact.score_mean, marker="*", ms=10, color="0.3", ls="none",
                label=f"{EXACT} (bf16 K+V)")  # fmt: skip
        ax.axhline(float(exact.score_mean.iloc[0]), color="0.3", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("GPU-resident bytes per prompt token and layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return fig


def fidelity_vs_budget(summary: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    rows_all = summary[(summary.method != EXACT) & summary.kl_mean.notna()]
    methods = list(dict.fromkeys(rows_all.method))
    colors = _colors(methods)
    for method in methods:
        rows = rows_all[rows_all.method == method].sort_values("budget_fraction")
        axes[0].plot(rows.budget_fraction, rows.kl_mean, marker="o", ms=3, color=colors[method], label=method)
        axes[1].plot(
            rows.budget_fraction, rows.top1_agree, marker="o", ms=3, color=colors[method], label=method
        )
    fractions = sorted(rows_all.budget_fraction.round(6).unique())
    for ax in axes:
        _percent_ticks(ax, fractions)
        ax.set_xlabel("budget (share of the prompt)")
    if (rows_all.kl_mean > 0).all():
        axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL(exact ‖ method), nats")
    axes[0].set_title("teacher-forced KL on the gold answer")
    axes[1].set_ylabel("top-1 agreement with exact")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("top-1 agreement")
    axes[1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def plot_eval_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a `kvdiag eval` run directory from its results.parquet."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).exists():
        raise KvdiagError(f"{run_dir} is not a finished eval run directory (missing {RESULTS})")
    table = read_table(run_dir / RESULTS)
    if table.empty:
        raise KvdiagError(f"{run_dir / RESULTS} has no rows")
    summary = score_table(table)
    title, ylabel = _title(run_dir)
    out = run_dir / "figures"
    paths = []
    with style():
        paths += save_figure(score_vs_budget(summary, title, ylabel), out, "score_vs_budget")
        paths += save_figure(score_vs_bytes(summary, title, ylabel), out, "score_vs_bytes")
        if summary.loc[summary.method != EXACT, "kl_mean"].notna().any():
            paths += save_figure(fidelity_vs_budget(summary, title), out, "fidelity_vs_budget")
    return paths


def study_scores(scores: dict[str, pd.DataFrame], roles: dict[str, dict[str, tuple]], title: str = ""):
    """Grouped bars: per task, mean score ± stderr of exact and of each study configuration.

    scores: task -> `score_table`; roles: task -> {role: (method label, budget)}.
    """
    import matplotlib.pyplot as plt

    tasks = list(scores)
    order = [EXACT, *dict.fromkeys(r for t in tasks for r in roles.get(t, {}))]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2), 3.4))
    width = 0.8 / len(order)
    palette = plt.get_cmap("tab10")
    for i, role in enumerate(order):
        means, errs = [], []
        for task in tasks:
            label, budget = (EXACT, 1.0) if role == EXACT else roles[task].get(role, (None, None))
            rows = scores[task][
                (scores[task].method == label) & np.isclose(scores[task].budget, budget or -1)
            ]
            means.append(float(rows.score_mean.iloc[0]) if len(rows) else np.nan)
            errs.append(float(np.nan_to_num(rows.score_stderr.iloc[0])) if len(rows) else 0.0)
        color = "0.3" if role == EXACT else (0, 0, 0, 1) if role == "oracle" else palette((i - 1) % 10)
        budget = "" if role == EXACT else f" @{100 * roles[tasks[0]][role][1]:.4g}%"
        ax.bar(np.arange(len(tasks)) + (i - (len(order) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               color=color, label=f"{role}{budget}")  # fmt: skip
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("score (0-100), mean ± stderr")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_study_scores(scores: dict[str, pd.DataFrame], roles: dict[str, dict[str, tuple]], out_dir: Path,
                      title: str = "") -> list[Path]:  # fmt: skip
    """study_scores.png/.pdf in out_dir (a `kvdiag reproduce` run's figures/)."""
    with style():
        return save_figure(study_scores(scores, roles, title), Path(out_dir), "study_scores")
