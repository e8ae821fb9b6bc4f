"""The run directory of `kvdiag eval`: predictions.jsonl (append-only, resumable), the resume check
against manifest.json, and the tidy results / score tables rebuilt from it.

- predictions.jsonl: one JSON line per finished cell (sample, method label, budget), appended with
  flush + fsync as soon as the cell finishes; a torn last line (a kill mid-write) is cut off on read;
  what a later invocation may add to a run is `kvdiag.eval.resume`'s business;
- predictions.rank{R}.jsonl: the same rows, written by rank R under torchrun
  (`kvdiag.eval.distributed`); rank 0 merges them into predictions.jsonl at the end of the run
  (`merge_rank_files`), and a run that finds some left by a killed launch counts their cells as
  finished and merges them too;
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
from kvdiag.runs import atomic_write_bytes

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RANK_PREDICTIONS = "predictions.rank{rank}.jsonl"
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


def read_predictions(run_dir: str | Path, name: str = PREDICTIONS) -> list[dict]:
    """The finished cells in a run's predictions file (`name`: predictions.jsonl or a rank's file);
    a torn last line (a kill mid-write) is cut off the file."""
    return [row for _, row in _read_lines(Path(run_dir) / name)]


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for each complete, non-empty line of a predictions file, cutting a torn last line
    off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        log.warning("%s: dropping an unfinished last line", path)
        with open(path, "r+b") as f:
            f.truncate(len(good))
    lines = []
    for number, line in enumerate(good.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 is text
        if line.strip():
            try:
                lines.append((line, json.loads(line)))
            except json.JSONDecodeError as err:
                raise KvdiagError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return lines


def rank_file(run_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` of a torchrun launch appends its rows."""
    return Path(run_dir) / RANK_PREDICTIONS.format(rank=rank)


def rank_files(run_dir: str | Path) -> list[Path]:
    """The ranks' predictions files in a run directory, by rank."""
    prefix, suffix = RANK_PREDICTIONS.split("{rank}")
    found = {}
    for path in Path(run_dir).glob(f"{prefix}*{suffix}"):
        rank = path.name[len(prefix) : -len(suffix)]
        if rank.isdigit():
            found[int(rank)] = path
    return [found[rank] for rank in sorted(found)]


def finished_keys(run_dir: str | Path) -> set[tuple[str, str, str]]:
    """The cells finished in a run directory: in predictions.jsonl or in any rank's file."""
    names = [PREDICTIONS, *(p.name for p in rank_files(run_dir))]
    return {_row_key(row) for name in names for row in read_predictions(run_dir, name)}


def merge_rank_files(run_dir: str | Path, order: list[tuple[str, str, str]]) -> int:
    """Move the rows of the ranks' files into predictions.jsonl (atomically: its old lines, then the
    new cells in the order of the cell keys in `order`, cells not in it last by key; a cell already
    there or seen in an earlier rank file is left out), then delete the rank files. Returns the
    number of cells added. A crash in between leaves rows in both places, which the next merge skips."""
    run_dir = Path(run_dir)
    files = rank_files(run_dir)
    if not files:
        return 0
    kept = _read_lines(run_dir / PREDICTIONS)
    seen = {_row_key(row) for _, row in kept}
    new: dict[tuple, str] = {}
    for path in files:
        for line, row in _read_lines(path):
            key = _row_key(row)
            if key not in seen and key not in new:
                new[key] = line
    position = {key: i for i, key in enumerate(order)}
    ordered = sorted(new, key=lambda k: (k not in position, position.get(k, 0), k))
    text = "".join(line + "\n" for line in [*(line for line, _ in kept), *(new[k] for k in ordered)])
    atomic_write_bytes(run_dir / PREDICTIONS, text.encode("utf-8"))
    for path in files:
        path.unlink()
    log.info("merged %d cells from %d rank files into %s", len(new), len(files), run_dir / PREDICTIONS)
    return len(new)


def _row_key(row: dict) -> tuple[str, str, str]:
    return cell_key(row["sample_id"], row["method"], row["budget"])


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
