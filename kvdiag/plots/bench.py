"""Figure of a `kvdiag bench` run: per case, the runtime's kernel step against its floor, full
attention and the plain-PyTorch path (log scale)."""

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
    fig.tight_layout()
    return fig


def plot_bench_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    path = run_dir / "bench.parquet"
    if not path.exists():
        raise KvdiagError(f"{run_dir} is not a bench run directory (missing bench.parquet)")
    table = pd.read_parquet(path)
    with style():
        return save_figure(step_vs_baselines(table), run_dir / "figures", "step_vs_baselines")
