"""Figures of a `kvdiag spectrum` run: energy vs rank, rank heatmap, low-rank damage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.analysis.lowrank import SHADOWKV_CHANNELS, SHADOWKV_RANK
from kvdiag.errors import KvdiagError
from kvdiag.plots import run_config, save_figure, style
from kvdiag.runs import read_table

STAGE_TITLES = {"pre_rope": "pre-RoPE keys", "post_rope": "post-RoPE keys"}


def energy_vs_rank(spectrum: pd.DataFrame, title: str = "", channels: int | None = None):
    """Cumulative energy vs rank of the joint key matrix, one curve per layer, pre vs post RoPE.

    channels: H_kv·d (the summary table's `dim` of kv_head −1); defaults to the number of singular
    values, which is smaller when the prompt has fewer tokens than channels.
    """
    import matplotlib.pyplot as plt

    joint = spectrum[spectrum.kv_head == -1]
    layers = sorted(joint.layer.unique())
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.95, max(len(layers), 1)))
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(7.5, 3.4))
    channels = channels or int(joint["index"].max()) + 1
    for ax, stage in zip(axes, STAGE_TITLES):
        for color, layer in zip(colors, layers):
            rows = joint[(joint.stage == stage) & (joint.layer == layer)]
            ax.plot(rows["index"] + 1, rows.energy, color=color, lw=1.0, label=f"layer {layer}")
        ax.axvline(SHADOWKV_RANK * channels / SHADOWKV_CHANNELS, color="crimson", ls="--", lw=1)
        ax.text(
            SHADOWKV_RANK * channels / SHADOWKV_CHANNELS, 0.02, " ShadowKV rank", color="crimson", fontsize=7
        )
        ax.set_xscale("log")
        ax.set_xlabel(f"rank r (of {channels} channels, all KV heads joint)")
        ax.set_title(STAGE_TITLES[stage])
    axes[0].set_ylabel("energy in top-r singular values")
    axes[0].set_ylim(0, 1.01)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(layers), max(layers)))
    fig.colorbar(sm, ax=axes, label="layer", fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title)
    return fig


def rank_heatmap(summary: pd.DataFrame, level: int = 95, title: str = ""):
    """Layer × KV-head heatmap of the rank that holds `level` % of the energy, pre vs post RoPE."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    per_head = summary[summary.kv_head >= 0]
    column = f"rank{level}"
    vmax = per_head[column].max()
    n_layers, n_heads = per_head.layer.nunique(), per_head.kv_head.nunique()
    fig, axes = plt.subplots(1, 2, figsize=(3 + 0.5 * n_heads * 2, 2.2 + 0.18 * n_layers), sharey=True)
    for ax, stage in zip(axes, STAGE_TITLES):
        grid = per_head[per_head.stage == stage].pivot(index="layer", columns="kv_head", values=column)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap="viridis", annot=n_heads * n_layers <= 160,
                    fmt=".0f", annot_kws={"fontsize": 6}, cbar=stage == "post_rope",
                    cbar_kws={"label": f"rank for {level} % energy"})  # fmt: skip
        ax.set_title(STAGE_TITLES[stage])
        ax.set_xlabel("KV head")
        ax.set_ylabel("")
        ax.grid(False)
        ax.tick_params(axis="y", labelsize=6, rotation=0)
    axes[0].set_ylabel("layer")
    if title:
        fig.suptitle(title)
    return fig


def lowrank_damage_plot(damage: pd.DataFrame, title: str = ""):
    """Top-k recall, logit and output error vs rank (mean over layers and heads; faint grey: each
    layer, in the legend)."""
    import matplotlib.pyplot as plt

    metrics = {"topk_recall": "top-k recall (k = 1.5625 % of L)", "logit_rel_error": "relative logit error",
               "output_rel_error": "attention-output rel. error"}  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2))
    per_layer = damage.groupby(["layer", "rank_fraction"], as_index=False)[list(metrics)].mean()
    overall = damage.groupby("rank_fraction", as_index=False)[list(metrics)].mean()
    svd_rank = damage.loc[damage.is_shadowkv_rank, "rank_fraction"]
    for ax, (metric, label) in zip(axes, metrics.items()):
        for k, (_, rows) in enumerate(per_layer.groupby("layer")):
            ax.plot(rows.rank_fraction, rows[metric], color="0.6", lw=0.5, alpha=0.6,
                    label="one layer (mean over its heads)" if k == 0 else None)  # fmt: skip
        ax.plot(overall.rank_fraction, overall[metric], color="k", marker="o", ms=3, label="mean over layers")
        if len(svd_rank):
            ax.axvline(svd_rank.iloc[0], color="crimson", ls="--", lw=1, label="ShadowKV rank (160/1024)")
        ax.set_xscale("log")
        ax.set_xlabel("rank / channels")
        ax.set_title(label)
    axes[0].set_ylim(0, 1.02)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    if title:
        fig.suptitle(title)
    return fig


def _title(run_dir: Path) -> str:
    config = run_config(run_dir)
    return f"{config.get('model', '')}, {config.get('n_tokens', '?')} tokens" if config else ""


def plot_spectrum_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a `kvdiag spectrum` run directory from its tables."""
    run_dir = Path(run_dir)
    needed = ["spectrum.parquet", "spectrum_summary.parquet"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise KvdiagError(f"{run_dir} is not a spectrum run directory (missing {', '.join(missing)})")
    title = _title(run_dir)
    out = run_dir / "figures"
    paths = []
    summary = read_table(run_dir / "spectrum_summary.parquet")
    channels = int(summary.loc[summary.kv_head == -1, "dim"].max())
    with style():
        spectrum = read_table(run_dir / "spectrum.parquet")
        paths += save_figure(energy_vs_rank(spectrum, title, channels), out, "energy_vs_rank")
        paths += save_figure(rank_heatmap(summary, 95, title), out, "rank95_heatmap")
        if (run_dir / "lowrank_damage.parquet").exists():
            damage = read_table(run_dir / "lowrank_damage.parquet")
            paths += save_figure(lowrank_damage_plot(damage, title), out, "lowrank_damage")
    return paths
