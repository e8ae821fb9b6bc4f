"""Head-wise budgets against their base method at equal fetched bytes: recall and eval on samples other
than the calibration's, paired differences with bootstrap intervals (issue 11; figures/headwise/README.md).

    python -m kvdiag.study.headwise --out runs/headwise          # smollm2-135m, Text2JSON + MultiNeedle
    python -m kvdiag.study.headwise --out runs/headwise --stages compare     # redo the tables only

Stages, per task, each resumable (a finished stage is skipped):
- calibrate: `kvdiag heads` on `n_calib` samples of seed `calib_seed` (default 100), no needle
  baseline → calib_<task>/heads_calibration.json;
- recall: the `n` evaluated samples (seed `seed`, default 0: other prompts) with their gold answer
  teacher-forced, every layer, the answer's positions as decode queries (as `kvdiag heads`
  measures): `recall_table` of the base, headwise on it, the oracle and headwise on the oracle at
  each budget; one row per sample × method × budget with the means over layers, KV heads and
  queries, and the fetched bytes per step summed over KV heads, mean over layers →
  recall_<task>.csv;
- eval: `run_eval` of the base and headwise at each budget on the same samples (score, teacher-forced
  KL and top-1 agreement, gold log-probability, fetched bytes) → eval_<task>/;
- split: on the same teacher-forced samples, every layer, the attention mass the oracle's selection
  keeps under the even split, the calibrated need-proportional splits (need^1 and need^0.5) and the
  best static / per-step splits in hindsight (`kvdiag.analysis.head_split`) → split_<task>.csv.
Then comparison.csv: per source (recall / eval / split), task, budget and metric, the paired
difference headwise − base (split: each split − the even one; `kvdiag.study.paired.paired_difference`:
mean and 95 % BCa bootstrap interval over samples) next to both means.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvdiag.errors import KvdiagError
from kvdiag.methods import get_method, parse_method_spec
from kvdiag.study.paired import paired_difference, paired_scores

log = logging.getLogger(__name__)

TASKS = ("text2json", "multineedle")
BUDGETS = (0.015625, 0.03125)
MAX_NEW_TOKENS = {"text2json": 128, "multineedle": 160}
RECALL_METRICS = ("attention_mass", "recall_gqa", "err_total", "err_selection", "fetched_bytes_step")
EVAL_METRICS = ("score", "kl_mean", "top1_agree", "gold_logprob_method", "fetched_bytes_per_step")
SPLITS = ("proportional", "proportional_p0.5", "best_static", "best_per_step")
STAGES = ("calibrate", "recall", "eval", "split", "compare")


def headwise_spec(base: str, calib: Path) -> str:
    """The label of headwise wrapping `base` (a spec) with the calibration at `calib` (which must exist)."""
    return get_method("headwise", base=base, calib=str(calib)).label()


def calibrate(model: str, task: str, out: Path, n: int, seed: int, target_tokens: int) -> Path:
    """`kvdiag heads` on the calibration samples (skipped when out already holds a calibration)."""
    from kvdiag.eval.heads import run_heads

    path = out / "heads_calibration.json"
    if not path.exists():
        run_heads(model, out, task=task, n=n, seed=seed, target_tokens=target_tokens, needle_baseline=False)
    return path


def teacher_forced_traces(model: str, task: str, n: int, seed: int, target_tokens: int, chat: bool | None,
                          desc: str):  # fmt: skip
    """Yield (sample, TeacherForced inputs, Trace) for n samples of `task`: the prompt plus the gold
    answer captured in one forward pass (its positions are the decode-like queries)."""
    from kvdiag.capture import capture_prompt
    from kvdiag.eval.heads import teacher_forced
    from kvdiag.models import load_model
    from kvdiag.tasks import get_task

    net, tokenizer = load_model(model)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    samples = get_task(task).samples(n, seed=seed, tokenizer=tokenizer, target_tokens=target_tokens)
    for sample in tqdm(samples, desc=f"{desc} {task}", unit="sample"):
        x = teacher_forced(tokenizer, task, sample, use_chat)
        yield sample, x, capture_prompt(net, tokenizer, None, input_ids=x.input_ids)


def recall_per_sample(model: str, task: str, methods: Sequence[str], budgets: Sequence[float], n: int,
                      seed: int, target_tokens: int, chat: bool | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per sample × method × budget: recall metrics at the gold answer's positions (see the
    module docstring), means over layers, KV heads and queries."""
    from kvdiag.analysis.recall import recall_table

    rows = []
    for sample, x, trace in teacher_forced_traces(model, task, n, seed, target_tokens, chat, "recall"):
        table = recall_table(trace, list(methods), budgets, query_positions=x.positions, per_position=False,
                             progress=False)  # fmt: skip
        layers = table.layer.nunique()
        grouped = table.groupby(["method", "budget"], sort=False)
        summary = grouped[[m for m in RECALL_METRICS if m in table]].mean()
        summary["fetched_bytes_step"] = grouped.fetched_bytes.sum() / layers  # all KV heads, mean layer
        summary["attended_tokens"] = grouped.attended_tokens.mean()
        rows.append(summary.reset_index().assign(task=task, sample_id=sample.id, n_context=int(x.positions[0]),
                                                 answer_tokens=x.answer_tokens))  # fmt: skip
        del trace
    return pd.concat(rows, ignore_index=True)


def split_per_sample(model: str, task: str, budgets: Sequence[float], n: int, seed: int, target_tokens: int,
                     calib: Path, chat: bool | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per sample × layer × budget: `head_split_table` at the gold answer's positions, with the
    calibration's need for the proportional split."""
    from kvdiag.analysis.head_split import head_split_table
    from kvdiag.methods import resolve_budget
    from kvdiag.methods._head_budget import load_calibration

    need = load_calibration(calib).need
    rows = []
    for sample, x, trace in teacher_forced_traces(model, task, n, seed, target_tokens, chat, "split"):
        n_ctx = int(x.positions[0])
        tokens = [resolve_budget(b, n_ctx) for b in budgets]
        table = head_split_table(trace, x.positions, tokens, need, powers=(1.0, 0.5))
        table["budget"] = table.budget_tokens.map(dict(zip(tokens, budgets)))
        rows.append(table.assign(task=task, sample_id=sample.id, n_context=n_ctx))
        del trace
    return pd.concat(rows, ignore_index=True)


def split_rows(table: pd.DataFrame, task: str, budgets: Sequence[float]) -> list[dict]:
    """Paired differences (over samples, means over layers) of each split's mass − the even split's."""
    per_sample = table.groupby(["sample_id", "budget"])[["even", *SPLITS]].mean().reset_index()
    long = per_sample.melt(["sample_id", "budget"], var_name="method", value_name="attention_mass")
    return [row for split in SPLITS
            for row in paired_rows(long, "split", task, "even", split, budgets, ["attention_mass"])]  # fmt: skip


def paired_rows(table: pd.DataFrame, source: str, task: str, base: str, headwise: str,
                budgets: Sequence[float], metrics: Sequence[str]) -> list[dict]:  # fmt: skip
    """Paired differences headwise − base per budget and metric (one dict each)."""
    rows = []
    for budget in budgets:
        for metric in metrics:
            a, b = paired_scores(table, (headwise, budget), (base, budget), column=metric)
            diff = paired_difference(a, b)
            rows.append({"source": source, "task": task, "base": base, "method": headwise, "budget": budget,
                         "metric": metric,
                         "n": diff.n, "base_mean": diff.b_mean, "headwise_mean": diff.a_mean,
                         "difference": diff.mean, "ci_low": diff.low, "ci_high": diff.high,
                         "interval": diff.interval})  # fmt: skip
    return rows


def run_headwise_study(out, model: str = "smollm2-135m", tasks: Sequence[str] = TASKS, base: str = "yakv",
                       budgets: Sequence[float] = BUDGETS, n: int = 6, seed: int = 0, n_calib: int = 4,
                       calib_seed: int = 100, target_tokens: int = 1500,
                       stages: Sequence[str] = STAGES) -> pd.DataFrame:  # fmt: skip
    """Run the stages (module docstring) into `out`; returns the comparison table (empty without compare)."""
    from kvdiag.eval.harness import run_eval
    from kvdiag.runs import atomic_write_bytes, write_manifest

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise KvdiagError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    if seed == calib_seed:
        raise KvdiagError(
            f"seed {seed} is the calibration seed: evaluate other samples than the calibration's"
        )
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    base = parse_method_spec(base).label()
    oracle = "oracle"
    rows = []
    for task in tasks:
        calib_dir = out / f"calib_{task}"
        if "calibrate" in stages:
            calibrate(model, task, calib_dir, n_calib, calib_seed, target_tokens)
        headwise, headwise_oracle = headwise_spec(base, calib_dir), headwise_spec(oracle, calib_dir)
        recall_csv = out / f"recall_{task}.csv"
        if "recall" in stages and not recall_csv.exists():
            methods = [base, headwise, oracle, headwise_oracle]
            table = recall_per_sample(model, task, methods, budgets, n, seed, target_tokens)
            atomic_write_bytes(recall_csv, table.to_csv(index=False).encode())
        if "eval" in stages:
            run_eval(model, task, out / f"eval_{task}", methods=[base, headwise], budgets=list(budgets), n=n,
                     seed=seed, target_tokens=target_tokens, max_new_tokens=MAX_NEW_TOKENS.get(task, 128))  # fmt: skip
        split_csv = out / f"split_{task}.csv"
        if "split" in stages and not split_csv.exists():
            table = split_per_sample(model, task, budgets, n, seed, target_tokens, calib_dir)
            atomic_write_bytes(split_csv, table.to_csv(index=False).encode())
        if "compare" in stages:
            if recall_csv.exists():
                recall = pd.read_csv(recall_csv)
                rows += paired_rows(recall, "recall", task, base, headwise, budgets, RECALL_METRICS)
                rows += paired_rows(recall, "recall", task, oracle, headwise_oracle, budgets, RECALL_METRICS)
            if split_csv.exists():
                rows += split_rows(pd.read_csv(split_csv), task, budgets)
            results = out / f"eval_{task}" / "results.parquet"
            if results.exists():
                rows += paired_rows(
                    pd.read_parquet(results), "eval", task, base, headwise, budgets, EVAL_METRICS
                )
    comparison = pd.DataFrame(rows)
    if rows:
        atomic_write_bytes(out / "comparison.csv", comparison.to_csv(index=False).encode())
        config = {"model": model, "tasks": list(tasks), "base": base, "budgets": list(budgets), "n": n,
                  "seed": seed, "n_calib": n_calib, "calib_seed": calib_seed, "target_tokens": target_tokens}  # fmt: skip
        write_manifest(out, "headwise-study", config, {"rows": len(comparison)})
    return comparison


def markdown_table(comparison: pd.DataFrame, digits: int = 3) -> str:
    """comparison.csv as a markdown table: what is compared with what, both means and the paired
    difference with its interval."""
    lines = ["| source | task | budget | metric | compared | base | compared − base [95 % CI] |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in comparison.itertuples(index=False):
        compared = f"{row.method} split" if row.source == "split" else f"headwise({row.base})"
        interval = "" if row.interval == "none" else f" [{row.ci_low:+.{digits}g}, {row.ci_high:+.{digits}g}]"
        lines.append(f"| {row.source} | {row.task} | {100 * row.budget:g} % | {row.metric} | {compared} "
                     f"{row.headwise_mean:.{digits}g} | {row.base} {row.base_mean:.{digits}g} | "
                     f"{row.difference:+.{digits}g}{interval} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--base", default="yakv", help="the base method's spec")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--n", type=int, default=6, help="evaluated samples per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluated samples")
    parser.add_argument("--n-calib", type=int, default=4, help="calibration samples per task")
    parser.add_argument("--calib-seed", type=int, default=100)
    parser.add_argument("--target-tokens", type=int, default=1500)
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    comparison = run_headwise_study(
        args.out, args.model, args.tasks.split(","), args.base, [float(b) for b in args.budgets.split(",")],
        args.n, args.seed, args.n_calib, args.calib_seed, args.target_tokens, args.stages.split(","),
    )  # fmt: skip
    if not comparison.empty:
        print(markdown_table(comparison))


if __name__ == "__main__":
    main()
