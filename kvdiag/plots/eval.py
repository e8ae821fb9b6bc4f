"""Figures of a `kvdiag eval` run, drawn from its results.parquet (`kvdiag plot RUN_DIR` redraws them).

- score_vs_budget:   mean task score ± standard error vs budget (as asked: a share of the prompt, or
                     a token count at its mean share; log x), one line and marker per method, shifted
                     a little sideways so equal scores stay visible; exact attention as a dashed line
                     with its ± stderr band, both in the legend;
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
from kvdiag.eval.inputs import budget_label
from kvdiag.eval.store import EXACT, RESULTS, score_table
from kvdiag.plots import run_manifest, save_figure, style
from kvdiag.plots.axes import MARKERS, dodge, log_ticks_at, thin_ticks
from kvdiag.plots.recall import _colors
from kvdiag.runs import read_table


def _title(run_dir: Path) -> tuple[str, str]:
    """(figure title, score axis label) from the manifest."""
    manifest = run_manifest(run_dir)
    config = manifest.get("config", {})
    title = f"{config.get('model', '?')} on {config.get('task', '?')}, n = {config.get('n', '?')}"
    return title, f"{manifest.get('metric', 'score')} (0-100)"


def budget_x(rows: pd.DataFrame) -> pd.Series:
    """Where each summary row sits on a budget axis: at its budget as asked when that is a share of
    the prompt (not the realised share, which rounds up: 6.25 % → 6.36 % of a 550-token prompt), at
    the mean share attended when it is a token count."""
    return rows.budget.where(rows.budget <= 1, rows.budget_fraction)


def _budget_axis(ax, rows: pd.DataFrame) -> None:
    """Log x axis with a tick per budget, labelled as asked: shares of the prompt ("6.25 %") on the
    major ticks, token counts ("64 tokens", at their mean share) on minor ticks one row lower, so
    the two kinds never collide."""
    from matplotlib.ticker import FixedLocator

    x = budget_x(rows)
    shares = {float(xi): budget_label(float(b)) for b, xi in zip(rows.budget, x) if b <= 1}
    tokens = {float(xi): budget_label(float(b)) for b, xi in zip(rows.budget, x) if b > 1}
    log_ticks_at(ax, [*shares, *tokens], fmt=lambda v: "")  # limits and log scale for both kinds
    lo, hi = ax.get_xlim()
    kept_shares, kept_tokens = thin_ticks(list(shares), lo, hi), thin_ticks(list(tokens), lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(kept_shares))
    ax.set_xticks(kept_shares, [shares[v] for v in kept_shares])
    ax.set_xticks(kept_tokens, [tokens[v] for v in kept_tokens], minor=True)
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.tick_params(axis="x", which="minor", pad=12, length=2)


def _exact_line(ax, summary: pd.DataFrame) -> None:
    """Exact attention's mean score as a dashed line, its ± stderr band (when n > 1) in the legend."""
    exact = summary[summary.method == EXACT]
    if exact.empty:
        return
    mean, err = float(exact.score_mean.iloc[0]), float(np.nan_to_num(exact.score_stderr.iloc[0]))
    ax.axhline(mean, color="0.3", ls="--", lw=1, label=EXACT, zorder=1)
    if err > 0:
        ax.axhspan(mean - err, mean + err, color="0.3", alpha=0.12, lw=0, label=f"{EXACT} ± stderr", zorder=0)


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7)


def score_vs_budget(summary: pd.DataFrame, title: str = "", ylabel: str = "score"):
    """Mean score ± stderr per method vs budget (as asked), one marker and a small sideways shift per
    method so that equal scores stay visible; exact as a dashed line with its stderr band."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    methods = [m for m in dict.fromkeys(summary.method) if m != EXACT]
    colors = _colors(methods)
    for i, method in enumerate(methods):
        rows = summary[summary.method == method].sort_values("budget_fraction")
        oracle = method.startswith("oracle")
        ax.errorbar(dodge(budget_x(rows), i, len(methods)), rows.score_mean, yerr=rows.score_stderr.fillna(0),
                    marker=MARKERS[i % len(MARKERS)], ms=4, capsize=2, color=colors[method], ls="--" if oracle else "-",
                    label=method, zorder=3 if oracle else 2)  # fmt: skip
    _exact_line(ax, summary)
    if methods:
        _budget_axis(ax, summary[summary.method != EXACT])
    ax.set_xlabel("budget as asked (share of the prompt; token budgets at their mean share)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return fig


def score_vs_bytes(summary: pd.DataFrame, title: str = "", ylabel: str = "score"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    methods = [m for m in dict.fromkeys(summary.method) if m != EXACT]
    colors = _colors(methods)
    for i, method in enumerate(methods):
        rows = summary[summary.method == method].sort_values("resident_bytes_per_token")
        ax.plot(rows.resident_bytes_per_token, rows.score_mean, marker=MARKERS[i % len(MARKERS)], ms=4,
                color=colors[method], label=method, ls="--" if method.startswith("oracle") else "-")  # fmt: skip
    exact = summary[summary.method == EXACT]
    if not exact.empty:
        ax.plot(exact.resident_bytes_per_token, exact.score_mean, marker="*", ms=10, color="0.3", ls="none",
                label=f"{EXACT} (bf16 K+V)")  # fmt: skip
        ax.axhline(float(exact.score_mean.iloc[0]), color="0.3", ls="--", lw=0.8)
    log_ticks_at(ax, summary.resident_bytes_per_token)
    ax.set_xlabel("GPU-resident bytes per prompt token and layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return fig


def fidelity_vs_budget(summary: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.2))
    rows_all = summary[(summary.method != EXACT) & summary.kl_mean.notna()]
    methods = list(dict.fromkeys(rows_all.method))
    colors = _colors(methods)
    for i, method in enumerate(methods):
        rows = rows_all[rows_all.method == method].sort_values("budget_fraction")
        x = dodge(budget_x(rows), i, len(methods))
        style = dict(marker=MARKERS[i % len(MARKERS)], ms=3, color=colors[method], label=method,
                     ls="--" if method.startswith("oracle") else "-")  # fmt: skip
        axes[0].plot(x, rows.kl_mean, **style)
        axes[1].plot(x, rows.top1_agree, **style)
    for ax in axes:
        _budget_axis(ax, rows_all)
        ax.set_xlabel("budget as asked (share of the prompt)")
    if (rows_all.kl_mean > 0).all():
        axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL(exact ‖ method), nats")
    axes[0].set_title("teacher-forced KL on the gold answer")
    axes[1].set_ylabel("top-1 agreement with exact")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("top-1 agreement")
    _legend_outside(axes[1])
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

    scores: task -> `score_table`; roles: task -> {role: (method label, budget)}. A score of 0 is drawn
    as a flat mark with "0" above it; a configuration that was not run gets a grey "×" (both in the
    legend), so the two never look alike.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = list(scores)
    order = [EXACT, *dict.fromkeys(r for t in tasks for r in roles.get(t, {}))]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2), 3.4))
    width = 0.8 / len(order)
    palette = plt.get_cmap("tab10")
    zero_drawn = missing_drawn = False
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
        budget = "" if role == EXACT else f" @ {budget_label(float(roles[tasks[0]][role][1]))}"
        x = np.arange(len(tasks)) + (i - (len(order) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, capsize=2, color=color, label=f"{role}{budget}")
        for xi, mean in zip(x, means):
            if np.isnan(mean):  # not run
                ax.plot(xi, 1.5, marker="x", ms=4, color="0.55", ls="none")
                missing_drawn = True
            elif mean == 0:  # a real zero: a flat mark on the baseline and the number
                ax.plot([xi - width * 0.45, xi + width * 0.45], [0, 0], color=color, lw=2.5, solid_capstyle="butt",
                        clip_on=False)  # fmt: skip
                ax.text(xi, 1.0, "0", ha="center", va="bottom", fontsize=6, color=color)
                zero_drawn = True
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("score (0-100), mean ± stderr")
    ax.set_ylim(-1, 105)
    handles, _ = ax.get_legend_handles_labels()
    if zero_drawn:
        handles.append(Line2D([], [], color="0.3", lw=2.5, label='score 0 (flat mark, "0")'))
    if missing_drawn:
        handles.append(Line2D([], [], color="0.55", marker="x", ls="none", label="not run"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_study_scores(scores: dict[str, pd.DataFrame], roles: dict[str, dict[str, tuple]], out_dir: Path,
                      title: str = "") -> list[Path]:  # fmt: skip
    """study_scores.png/.pdf in out_dir (a `kvdiag reproduce` run's figures/)."""
    with style():
        return save_figure(study_scores(scores, roles, title), Path(out_dir), "study_scores")
