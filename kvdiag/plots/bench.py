"""Figures of a `kvdiag bench` run: per case, the runtime's kernel step against its floor, full
attention and the plain-PyTorch path (log scale); the end-to-end decode's tokens/s per batch against
full attention and its floor, and the largest batch each engine fits at the longest length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.plots import save_figure, style

KINDS = {"floor": "floor (bytes / HBM + fetched / link)", "step": "kernel step (CUDA graph)",
         "sdpa_full": "full attention, all K/V on GPU", "torch_path": "plain PyTorch path"}  # fmt: skip


def step_vs_baselines(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    cases = table[table.kind == "step"][["method", "L", "B"]].drop_duplicates().reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 3.6))
    width = 0.8 / len(KINDS)
    for i, (kind, label) in enumerate(KINDS.items()):
        values = []
        for case in cases.itertuples():
            sel = table[
                (table.kind == kind)
                & (table.method == case.method)
                & (table.L == case.L)
                & (table.B == case.B)
            ]
            values.append(float(sel.median_us.iloc[0]) if len(sel) else np.nan)
        ax.bar(np.arange(len(cases)) + (i - (len(KINDS) - 1) / 2) * width, values, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("µs per layer and decode step")
    ax.set_xticks(np.arange(len(cases)))
    ax.set_xticklabels([f"{c.method}\nL={c.L // 1024 if c.L >= 1024 else c.L}{'K' if c.L >= 1024 else ''}, B={c.B}"
                        for c in cases.itertuples()], fontsize=7)  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.set_layout_engine("constrained")
    return fig


def e2e_decode(table: pd.DataFrame):
    """Left: tokens/s against batch per engine and prompt length (full attention's floor dashed);
    right: the largest batch each engine decodes at the longest length, its tokens/s on the bar."""
    import matplotlib.pyplot as plt

    e2e = table[table.kind == "e2e"]
    if "oom" in e2e:
        e2e = e2e[e2e.oom.isna() | (e2e.oom == False)]  # noqa: E712 (a column of True / NaN)
    largest = table[table.kind == "e2e_max_batch"]
    fig, axes = plt.subplots(
        1, 2 if len(largest) else 1, figsize=(9.5 if len(largest) else 5.5, 3.6), squeeze=False
    )
    ax = axes[0, 0]
    floors = table[table.kind == "e2e_floor"]
    markers = dict(zip(sorted(e2e.L.dropna().unique()), "os^Dv"))
    for (engine, length), rows in e2e.groupby(["engine", "L"]):
        rows = rows.sort_values("B")
        ax.plot(
            rows.B, rows.tokens_per_s, marker=markers.get(length, "o"), label=f"{engine}, L={_tokens(length)}"
        )
    for length, rows in floors.groupby("L"):
        rows = rows.sort_values("B")
        ax.plot(rows.B, rows.tokens_per_s, ls="--", color="grey", lw=1)
        ax.annotate(f"full-attention floor, L={_tokens(length)}", (rows.B.iloc[-1], rows.tokens_per_s.iloc[-1]),
                    fontsize=6, color="grey", ha="right", va="bottom")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (rows decoded together)")
    ax.set_ylabel("tokens / s (whole model)")
    ax.legend(fontsize=6, loc="upper left")
    if len(largest):
        ax = axes[0, 1]
        ax.bar(largest.engine, largest.B, color="C0")
        for i, row in enumerate(largest.itertuples()):
            speed = "" if pd.isna(row.tokens_per_s) else f"{row.tokens_per_s:.0f} tok/s"
            ax.annotate(
                f"{int(row.B)}{'+' if row.capped else ''}\n{speed}",
                (i, row.B),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_ylabel(f"largest batch at L={_tokens(largest.L.iloc[0])}")
        ax.margins(y=0.25)
    fig.set_layout_engine("constrained")
    return fig


def _tokens(length) -> str:
    length = int(length)
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def plot_bench_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    path = run_dir / "bench.parquet"
    if not path.exists():
        raise KvdiagError(f"{run_dir} is not a bench run directory (missing bench.parquet)")
    table = pd.read_parquet(path)
    paths: list[Path] = []
    with style():
        if (table.kind == "step").any():
            paths += save_figure(step_vs_baselines(table), run_dir / "figures", "step_vs_baselines")
        if (table.kind == "e2e").any():
            paths += save_figure(e2e_decode(table), run_dir / "figures", "e2e_decode")
    return paths
