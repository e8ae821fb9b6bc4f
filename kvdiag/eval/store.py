"""The run directory of `kvdiag eval`: predictions.jsonl (append-only, resumable), the resume check
against manifest.json, and the tidy results / score tables rebuilt from it.

- predictions.jsonl: one JSON line per finished cell (sample, method label, budget), appended with
  flush + fsync as soon as the cell finishes; a torn last line (a kill mid-write) is cut off on read;
  what a later invocation may add to a run is `kvdiag.eval.resume`'s business;
- results.parquet: `results_table` of those lines (columns `RESULT_COLUMNS`, plus `metric_*` for tasks
  with several metrics); `score_table` aggregates it per method × budget.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.runs import check_writable as check_out  # noqa: F401  (the harness checks --out with it)

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.parquet"
EXACT = "exact"
RESULT_COLUMNS = [
    "sample_id", "task", "method", "method_spec", "budget", "budget_tokens", "budget_fraction",
    "prompt_tokens", "n_facts", "score", "kl_mean", "top1_agree", "gold_logprob_exact",
    "gold_logprob_method", "answer_tokens", "resident_bytes_per_token", "fetched_tokens_per_step",
    "fetched_bytes_per_step", "decode_steps", "tokens_generated", "hit_cap", "wall_s",
    "attended_tokens_per_step",
]  # fmt: skip


def cell_key(sample_id: str, method: str, budget) -> tuple[str, str, str]:
    """What identifies a cell: (sample id, method label, repr of the budget as given)."""
    return (sample_id, method, repr(budget))


def read_predictions(run_dir: str | Path) -> list[dict]:
    """The finished cells of a run; a torn last line (a kill mid-write) is cut off the file."""
    path = Path(run_dir) / PREDICTIONS
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        log.warning("%s: dropping an unfinished last line", path)
        with open(path, "r+b") as f:
            f.truncate(len(good))
    rows = []
    for number, line in enumerate(good.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise KvdiagError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and make it durable before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def results_table(rows: list[dict]) -> pd.DataFrame:
    """The tidy results table from prediction rows (prediction and gold text left out; the first row
    of a cell wins should one appear twice)."""
    records, seen = [], set()
    for row in rows:
        key = cell_key(row["sample_id"], row["method"], row["budget"])
        if key in seen:
            continue
        seen.add(key)
        record = {c: row.get(c) for c in RESULT_COLUMNS}
        record.update(
            {f"metric_{k}": v for k, v in (row.get("metrics") or {}).items() if len(row["metrics"]) > 1}
        )
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=None if records else RESULT_COLUMNS)
    if not table.empty:
        table["budget"] = table["budget"].astype(float)
        table["hit_cap"] = table["hit_cap"].astype(bool)
    return table


def score_table(run_dir_or_table) -> pd.DataFrame:
    """Mean score ± standard error (std / √n, NaN for n = 1) per method × budget, exact first, with the
    mean budget fraction, bytes, fidelity, runaway rate and generated tokens."""
    table = run_dir_or_table
    if not isinstance(table, pd.DataFrame):
        path = Path(run_dir_or_table) / RESULTS
        if not path.exists():
            raise KvdiagError(f"{Path(run_dir_or_table)} is not a finished eval run (missing {RESULTS})")
        table = pd.read_parquet(path)
    grouped = table.groupby(["method", "budget"], sort=False)
    summary = grouped.agg(
        n=("score", "size"), score_mean=("score", "mean"), score_std=("score", "std"),
        budget_tokens=("budget_tokens", "mean"), budget_fraction=("budget_fraction", "mean"),
        resident_bytes_per_token=("resident_bytes_per_token", "mean"),
        fetched_bytes_per_step=("fetched_bytes_per_step", "mean"), kl_mean=("kl_mean", "mean"),
        top1_agree=("top1_agree", "mean"), hit_cap_rate=("hit_cap", "mean"),
        tokens_generated=("tokens_generated", "mean"), wall_s=("wall_s", "mean"),
    ).reset_index()  # fmt: skip
    summary.insert(4, "score_stderr", summary.pop("score_std") / summary["n"].pow(0.5))
    order = {m: i for i, m in enumerate(dict.fromkeys([EXACT, *table.method]))}
    summary["_o"] = summary.method.map(order)
    return summary.sort_values(["_o", "budget_fraction"]).drop(columns="_o").reset_index(drop=True)
