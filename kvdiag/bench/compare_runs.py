"""Compare two `kvdiag spectrum` run directories (e.g. CPU float32 vs GPU bfloat16).

    python -m kvdiag.bench.compare_runs RUN_A RUN_B

Prints, per stage, the largest singular-value difference relative to each matrix's largest singular
value, the largest energy difference, rank@95 % disagreements, and the largest low-rank damage
differences. bf16 keys carry ~3 significant digits (2^-8 relative rounding), which sets the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

KEYS = ["layer", "kv_head", "stage", "index"]


def compare(a: Path, b: Path) -> dict:
    sa, sb = pd.read_parquet(a / "spectrum.parquet"), pd.read_parquet(b / "spectrum.parquet")
    merged = sa.merge(sb, on=KEYS, suffixes=("_a", "_b"))
    top = merged.groupby(["layer", "kv_head", "stage"]).singular_value_a.transform("max")
    merged["sv_rel"] = (merged.singular_value_a - merged.singular_value_b).abs() / top
    merged["energy_abs"] = (merged.energy_a - merged.energy_b).abs()
    ua, ub = pd.read_parquet(a / "spectrum_summary.parquet"), pd.read_parquet(b / "spectrum_summary.parquet")
    su = ua.merge(ub, on=["layer", "kv_head", "stage"], suffixes=("_a", "_b"))
    da, db = pd.read_parquet(a / "lowrank_damage.parquet"), pd.read_parquet(b / "lowrank_damage.parquet")
    dm = da.merge(db, on=["layer", "kv_head", "rank"], suffixes=("_a", "_b"))
    result = {
        "rows": len(merged),
        "max_sv_rel_diff": merged.sv_rel.max(),
        "max_energy_abs_diff": merged.energy_abs.max(),
        "rank95_mismatch_share": float((su.rank95_a != su.rank95_b).mean()),
        "max_rank95_abs_diff": int((su.rank95_a - su.rank95_b).abs().max()),
        "max_effective_rank_rel_diff": float(
            ((su.effective_rank_a - su.effective_rank_b).abs() / su.effective_rank_a).max()
        ),
    }
    for metric in ("topk_recall", "logit_rel_error", "output_rel_error"):
        diff = (dm[f"{metric}_a"] - dm[f"{metric}_b"]).abs()
        result[f"max_{metric}_abs_diff"] = float(diff.max())
        result[f"mean_{metric}_abs_diff"] = float(diff.mean())
    return result


if __name__ == "__main__":
    for key, value in compare(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
