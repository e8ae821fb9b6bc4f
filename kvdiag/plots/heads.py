"""Figures of a `kvdiag heads` run, drawn from its heads.parquet (so `kvdiag plot RUN_DIR` redraws them).

- need_heatmap:    layer × KV head of the median (over query positions) union need at τ = 0.9, as a
                   share of the context L0, log colour scale, one panel per task (shared scale);
- need_comparison: (a) per layer, every KV head's need (dots) and the median over heads (line), one
                   colour per task; (b) the distribution over layer × KV head of the need at each τ,
                   per task; (c) with a needle baseline, one point per layer × KV head: need on the
                   needle task (x) vs on the task (y), the diagonal y = x (above it: the head reads
                   more of the context on the task than on a needle).

A head's value is its per-sample statistic (`fraction_median` of measure "union") averaged over the
task's samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.plots import run_config, save_figure, style

FOCUS_TAU = 0.9
NEEDLE = "needle"
VALUE = "fraction_median"


def head_grid(
    table: pd.DataFrame, tau: float = FOCUS_TAU, measure: str = "union", value: str = VALUE
) -> pd.DataFrame:
    """One row per task × layer × KV head × tau (all taus when tau is None): `value` averaged over samples."""
    rows = table[table.measure == measure]
    if tau is not None:
        rows = rows[np.isclose(rows.tau, tau)]
        if rows.empty:
            raise KvdiagError(f"the table has no rows at tau {tau}; it has {sorted(table.tau.unique())}")
    return rows.groupby(["task", "layer", "kv_head", "tau"], as_index=False, sort=True)[value].mean()


def _tasks(table: pd.DataFrame) -> list[str]:
    """Tasks in table order, the needle baseline last."""
    tasks = list(dict.fromkeys(table.task))
    return [t for t in tasks if t != NEEDLE] + [t for t in tasks if t == NEEDLE]


def _percent(share: float) -> str:
    """A share of L0 as a percentage with 2–3 significant digits ("0.41 %", "12 %", "99.6 %")."""
    return f"{100 * share:.3g} %" if share >= 0.1 else f"{100 * share:.2g} %"


def _percent_log_axis(axis, low: float, high: float) -> None:
    """Percent labels on a log axis (minor ticks labelled too when the data spans under a decade)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    label = FuncFormatter(lambda v, _pos: _percent(v))
    axis.set_major_formatter(label)
    axis.set_minor_formatter(label if high / low < 10 else NullFormatter())


def _log_limits(values: pd.Series) -> tuple[float, float]:
    positive = values[values > 0]
    low, high = (float(positive.min()), float(positive.max())) if len(positive) else (1e-3, 1.0)
    return low, max(high, low * 1.01)


def need_heatmap(table: pd.DataFrame, tau: float = FOCUS_TAU, title: str = ""):
    """Layer × KV-head median union need at `tau` (share of L0, log colours), one panel per task."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    grid = head_grid(table, tau)
    tasks = _tasks(grid)
    n_layers, n_heads = grid.layer.nunique(), grid.kv_head.nunique()
    norm = LogNorm(*_log_limits(grid[VALUE]))
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.6 + len(tasks) * (0.9 + 0.45 * n_heads), 1.4 + 0.17 * n_layers))  # fmt: skip
    for ax, task in zip(axes.flat, tasks):
        pivot = grid[grid.task == task].pivot(index="layer", columns="kv_head", values=VALUE)
        image = ax.imshow(pivot.clip(lower=norm.vmin).to_numpy(), norm=norm, cmap="magma", aspect="auto",
                          interpolation="nearest")  # fmt: skip
        ax.set_xticks(range(pivot.shape[1]), pivot.columns)
        ax.set_yticks(range(pivot.shape[0]), pivot.index, fontsize=6)
        if pivot.size <= 96:
            for (i, j), v in np.ndenumerate(pivot.to_numpy()):
                ax.text(j, i, _percent(v)[:-2], ha="center", va="center", fontsize=5,
                        color="white" if norm(max(v, norm.vmin)) < 0.6 else "black")  # fmt: skip
        ax.set_title(task, fontsize=8)
        ax.set_xlabel("KV head")
        ax.grid(False)
    axes[0, 0].set_ylabel("layer")
    bar = fig.colorbar(image, ax=axes, label=f"median union need at τ = {tau:g} (% of L0)", fraction=0.08)
    _percent_log_axis(bar.ax.yaxis, norm.vmin, norm.vmax)
    fig.suptitle(title or "tokens a KV head needs", fontsize=9)
    return fig


def need_comparison(table: pd.DataFrame, tau: float = FOCUS_TAU, title: str = ""):
    """Per-layer need, need at each τ and (with a needle baseline) need on the task vs on the needle."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    focus, every_tau = head_grid(table, tau), head_grid(table, None)
    tasks = _tasks(focus)
    others = [t for t in tasks if t != NEEDLE]
    scatter = NEEDLE in tasks and bool(others)
    colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(others)} | {NEEDLE: (0.45, 0.45, 0.45, 1.0)}
    fig, axes = plt.subplots(
        1, 3 if scatter else 2, figsize=(11 if scatter else 7.5, 3.6), layout="constrained"
    )
    ax = axes[0]
    for k, task in enumerate(tasks):
        rows = focus[focus.task == task]
        jitter = (k - (len(tasks) - 1) / 2) * 0.18
        ax.scatter(rows.layer + jitter, rows[VALUE], s=6, alpha=0.5, color=colors[task], lw=0)
        median = rows.groupby("layer")[VALUE].median()
        ax.plot(median.index, median.values, color=colors[task], label=task)
    ax.set_yscale("log")
    _percent_log_axis(ax.yaxis, *_log_limits(focus[VALUE]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"median union need at τ = {tau:g} (% of L0)")
    ax.set_title("per layer (dots: KV heads)")
    ax.legend(fontsize=7)

    ax = axes[1]
    taus = sorted(every_tau.tau.unique())
    width = 0.8 / len(tasks)
    for k, task in enumerate(tasks):
        data = [
            every_tau[(every_tau.task == task) & (every_tau.tau == t)][VALUE].clip(lower=1e-6) for t in taus
        ]
        where = np.arange(len(taus)) + (k - (len(tasks) - 1) / 2) * width
        parts = ax.boxplot(data, positions=where, widths=width * 0.85, patch_artist=True, showfliers=False)
        for box in parts["boxes"]:
            box.set(facecolor=colors[task], alpha=0.6)
        for median in parts["medians"]:
            median.set(color="black")
    ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_yscale("log")
    _percent_log_axis(ax.yaxis, *_log_limits(every_tau[VALUE]))
    ax.set_xlabel("mass level τ")
    ax.set_ylabel("median union need (% of L0)")
    ax.set_title("over layers × KV heads")

    if scatter:
        ax = axes[2]
        task = others[0]
        pair = focus[focus.task == task].merge(focus[focus.task == NEEDLE], on=["layer", "kv_head"],
                                               suffixes=("_task", "_needle"))  # fmt: skip
        points = ax.scatter(
            pair[f"{VALUE}_needle"], pair[f"{VALUE}_task"], c=pair.layer, cmap="viridis", s=12
        )
        low, high = _log_limits(pd.concat([pair[f"{VALUE}_needle"], pair[f"{VALUE}_task"]]))
        ax.plot([low, high], [low, high], color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _percent_log_axis(ax.xaxis, low, high)
        _percent_log_axis(ax.yaxis, low, high)
        ax.set_xlabel(f"on {NEEDLE} (% of L0)")
        ax.set_ylabel(f"on {task} (% of L0)")
        ax.set_title(f"each KV head, τ = {tau:g}")
        fig.colorbar(points, ax=ax, label="layer")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _title(run_dir: Path, table: pd.DataFrame) -> str:
    config = run_config(run_dir)
    n_ctx = table.groupby("task").n_context.mean()
    lengths = ", ".join(f"{task} L0 ≈ {n_ctx[task]:.0f}" for task in _tasks(table))
    return f"{config.get('model', '')}: {lengths}" if config else lengths


def plot_heads_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a `kvdiag heads` run directory from its heads.parquet."""
    run_dir = Path(run_dir)
    if not (run_dir / "heads.parquet").exists():
        raise KvdiagError(f"{run_dir} is not a heads run directory (missing heads.parquet)")
    table = pd.read_parquet(run_dir / "heads.parquet")
    if table.empty:
        raise KvdiagError(f"{run_dir / 'heads.parquet'} has no rows")
    title = _title(run_dir, table)
    taus = np.array(sorted(table.tau.unique()))
    tau = float(taus[np.argmin(np.abs(taus - FOCUS_TAU))])  # τ = 0.9, or the run's nearest
    out = run_dir / "figures"
    with style():
        paths = save_figure(need_heatmap(table, tau, title), out, "need_heatmap")
        paths += save_figure(need_comparison(table, tau, title), out, "need_comparison")
    return paths
