"""Figures of a `kvdiag recall` run, drawn from its recall.parquet (so `kvdiag plot RUN_DIR` redraws them).

- recall_vs_budget:   top-k recall and attention mass vs budget (fraction of the context, log x),
                      one line per method, the oracle dashed as the ceiling;
- recall_heatmap:     layer × KV-head recall at one budget, one panel per method;
- error_decomposition: selection loss, key loss and total output error per method at one budget,
                      with the oracle's selection floor;
- accuracy_vs_bytes:  attention mass and 1 − output error vs GPU-resident bytes per token per layer,
                      one point per method × budget;
- error_vs_attended:  output error and attention mass vs the context tokens a method actually attends
                      (its selection plus always-kept tokens), beside the oracle at the same number of
                      attended tokens (err_oracle, dotted): the fair comparison when a method's local
                      window or outliers make it attend far more than its nominal budget.

The "one budget" is the run's budget closest (in log scale) to 3.125 % of the context, YAKV's.
Rows are averaged over layers, KV heads and query positions (weighted by `n_queries` when the table
was aggregated over positions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.plots import run_config, save_figure, style
from kvdiag.plots.axes import log_ticks_at
from kvdiag.runs import read_table

FOCUS_FRACTION = 0.03125
ERRORS = {"err_selection": "selection loss", "err_key": "key loss", "err_total": "total"}


def _weighted_mean(table: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    weight = table["n_queries"] if "n_queries" in table else pd.Series(1.0, index=table.index)
    parts = table[by].copy()
    for col in columns:
        parts[col] = table[col] * weight
    parts["_w"] = weight
    sums = parts.groupby(by, as_index=False, sort=True).sum()
    for col in columns:
        sums[col] = sums[col] / sums["_w"]
    return sums.drop(columns="_w")


def focus_budget(table: pd.DataFrame, fraction: float = FOCUS_FRACTION) -> float:
    """The budget fraction of the table closest (log scale) to `fraction` (default 3.125 %).

    Tables hold realised fractions (tokens / L0, e.g. 0.031306 for a requested 0.03125), so plots
    asked for a requested budget use the nearest one.
    """
    fractions = np.array(sorted(table.budget_fraction.unique()))
    return float(fractions[np.argmin(np.abs(np.log(fractions / fraction)))])


def _colors(methods: list[str]) -> dict[str, tuple]:
    import matplotlib.pyplot as plt

    others = [m for m in methods if not m.startswith("oracle")]
    palette = plt.get_cmap("tab10")
    colors = {m: palette(i % 10) for i, m in enumerate(others)}
    colors.update({m: (0, 0, 0, 1) for m in methods if m.startswith("oracle")})
    return colors


def _percent_ticks(ax, fractions) -> None:
    """Log x axis with ticks at the run's budget fractions, labelled in percent."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(list(fractions)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{100 * f:.3g} %" for f in fractions], fontsize=7)


def _methods(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table.method))


def recall_vs_budget(table: pd.DataFrame, title: str = ""):
    """Recall and attention mass vs budget fraction, one line per method (oracle dashed: the ceiling)."""
    import matplotlib.pyplot as plt

    means = _weighted_mean(table, ["method", "budget_fraction"], ["recall", "attention_mass"])
    methods = _methods(table)
    colors = _colors(methods)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharex=True)
    for ax, (metric, label) in zip(axes, {"recall": "top-k recall (k = budget)",
                                          "attention_mass": "exact attention mass attended"}.items()):  # fmt: skip
        for method in methods:
            rows = means[means.method == method]
            oracle = method.startswith("oracle")
            ax.plot(rows.budget_fraction, rows[metric], marker="o", ms=3, color=colors[method],
                    ls="--" if oracle else "-", lw=1.6 if oracle else 1.2, label=method)  # fmt: skip
        _percent_ticks(ax, sorted(means.budget_fraction.unique()))
        ax.set_xlabel("budget (share of the context L0)")
        ax.set_title(label)
        ax.set_ylim(0, 1.02)
    axes[1].legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def recall_heatmap(table: pd.DataFrame, fraction: float = FOCUS_FRACTION, title: str = ""):
    """Layer × KV-head recall at the budget nearest `fraction`, one panel per method."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fraction = focus_budget(table, fraction)
    rows = table[table.budget_fraction == fraction]
    grid = _weighted_mean(rows, ["method", "layer", "kv_head"], ["recall"])
    methods = [m for m in _methods(rows) if m != "exact"] or _methods(rows)
    n_layers, n_heads = grid.layer.nunique(), grid.kv_head.nunique()
    cols = min(len(methods), 4)
    n_rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(n_rows, cols, squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.2 + cols * (0.6 + 0.35 * n_heads), 1.2 + n_rows * (0.8 + 0.16 * n_layers)))  # fmt: skip
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.axis("off")
            continue
        pivot = grid[grid.method == methods[k]].pivot(index="layer", columns="kv_head", values="recall")
        sns.heatmap(pivot, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=k == len(methods) - 1,
                    annot=n_heads * n_layers <= 64, fmt=".2f", annot_kws={"fontsize": 5},
                    cbar_kws={"label": "top-k recall"})  # fmt: skip
        ax.set_title(methods[k], fontsize=8)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer" if k % cols == 0 else "")
        ax.grid(False)
        ax.tick_params(axis="y", labelsize=6, rotation=0)
    fig.suptitle(f"{title + ', ' if title else ''}budget {100 * fraction:.3g} % of the context", fontsize=9)
    return fig


def error_decomposition(table: pd.DataFrame, fraction: float = FOCUS_FRACTION, title: str = ""):
    """Selection loss, key loss and total output error per method at the budget nearest `fraction`."""
    import matplotlib.pyplot as plt

    fraction = focus_budget(table, fraction)
    rows = table[table.budget_fraction == fraction]
    means = _weighted_mean(rows, ["method"], [*ERRORS, "err_oracle"])
    methods = _methods(rows)
    means = means.set_index("method").loc[methods]
    x = np.arange(len(methods))
    width = 0.8 / len(ERRORS)
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(methods), 3.4))
    for k, (col, label) in enumerate(ERRORS.items()):
        ax.bar(x + (k - 1) * width, means[col], width, label=label)
    floor = float(means["err_oracle"].mean())
    ax.axhline(floor, color="k", ls="--", lw=1, label="oracle selection (exact K/V)")
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("attention-output relative error")
    ax.set_title(f"{title + ', ' if title else ''}budget {100 * fraction:.3g} % of the context", fontsize=9)
    ax.legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0
    )  # clear of the floor line
    return fig


def accuracy_vs_bytes(table: pd.DataFrame, title: str = ""):
    """Attention mass and 1 − output error vs resident bytes per token per layer (method × budget)."""
    import matplotlib.pyplot as plt

    means = _weighted_mean(table, ["method", "budget_fraction"],
                           ["attention_mass", "err_total", "resident_bytes_per_token"])  # fmt: skip
    means["accuracy"] = 1 - means.err_total
    methods = _methods(table)
    colors = _colors(methods)
    fractions = sorted(means.budget_fraction.unique())
    markers = dict(zip(fractions, "os^Dvp*hX<>"))
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6), sharex=True)
    for ax, (metric, label) in zip(axes, {"attention_mass": "exact attention mass attended",
                                          "accuracy": "1 − output relative error"}.items()):  # fmt: skip
        for method in methods:
            rows = means[means.method == method]
            for _, row in rows.iterrows():
                ax.scatter(max(row.resident_bytes_per_token, 1e-3), row[metric], color=colors[method],
                           marker=markers.get(row.budget_fraction, "o"), s=22)  # fmt: skip
            ax.plot(
                rows.resident_bytes_per_token.clip(lower=1e-3), rows[metric], color=colors[method], lw=0.6
            )
        log_ticks_at(ax, means.resident_bytes_per_token.clip(lower=1e-3))
        ax.set_xlabel("GPU-resident bytes per token per layer")
        ax.set_title(label)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [
        plt.Line2D([], [], color="0.4", marker=markers[f], ls="", label=f"budget {100 * f:.3g} %")
        for f in fractions
    ]
    axes[1].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    return fig


def error_vs_attended(table: pd.DataFrame, title: str = ""):
    """Output error and attention mass vs mean attended context tokens per KV head (log x), one line
    per method over its budgets; on the error panel each method's dotted twin is the oracle's error at
    the same attended tokens (err_oracle), so a gap between a line and its twin is what the method's
    selection and keys cost at equal size (hollow markers: one per budget, visible with one budget too)."""
    import matplotlib.pyplot as plt

    from kvdiag.plots.axes import MARKERS

    means = _weighted_mean(table, ["method", "budget_fraction"],
                           ["err_total", "err_oracle", "attention_mass", "attended_tokens"])  # fmt: skip
    methods = _methods(table)
    colors = _colors(methods)
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6), sharex=True)
    for i, method in enumerate(methods):
        rows = means[means.method == method].sort_values("attended_tokens")
        marker = MARKERS[i % len(MARKERS)]
        axes[0].plot(rows.attended_tokens, rows.err_total, marker=marker, ms=3.5, color=colors[method],
                     lw=1.2, label=method)  # fmt: skip
        if not method.startswith("oracle"):
            axes[0].plot(rows.attended_tokens, rows.err_oracle, ls=":", lw=1.0, marker=marker, ms=4.5,
                         mfc="none", color=colors[method])  # fmt: skip
        axes[1].plot(rows.attended_tokens, rows.attention_mass, marker=marker, ms=3.5, color=colors[method],
                     lw=1.2, label=method)  # fmt: skip
    for ax, label in zip(axes, ["output relative error (lower is better)", "exact attention mass attended"]):
        log_ticks_at(ax, means.attended_tokens.clip(lower=1e-3))
        ax.set_xlabel("attended context tokens per KV head (mean)")
        ax.set_title(label)
    axes[1].set_ylim(0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.4", ls=":", marker="o", mfc="none",
                              label="oracle at the same attended tokens"))  # fmt: skip
    axes[1].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    return fig


def _title(run_dir: Path) -> str:
    config = run_config(run_dir)
    return f"{config.get('model', '')}, L0 = {config.get('n_context', '?')} tokens" if config else ""


def plot_recall_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a `kvdiag recall` run directory from its recall.parquet."""
    run_dir = Path(run_dir)
    if not (run_dir / "recall.parquet").exists():
        raise KvdiagError(f"{run_dir} is not a recall run directory (missing recall.parquet)")
    table = read_table(run_dir / "recall.parquet")
    if table.empty:
        raise KvdiagError(f"{run_dir / 'recall.parquet'} has no rows")
    title = _title(run_dir)
    fraction = focus_budget(table)
    out = run_dir / "figures"
    paths = []
    with style():
        paths += save_figure(recall_vs_budget(table, title), out, "recall_vs_budget")
        paths += save_figure(recall_heatmap(table, fraction, title), out, "recall_heatmap")
        paths += save_figure(error_decomposition(table, fraction, title), out, "error_decomposition")
        paths += save_figure(accuracy_vs_bytes(table, title), out, "accuracy_vs_bytes")
        if {"attended_tokens", "err_oracle"} <= set(table.columns):  # tables from before these columns
            paths += save_figure(error_vs_attended(table, title), out, "error_vs_attended")
    return paths
