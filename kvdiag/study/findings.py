"""Machine-readable results of a reproduce run, and re-scoring them from the exported predictions alone.

    out/findings.json
      run:        model, device, gpu, mode, versions, git, date, stages ({name: seconds, git})
      statistics: rules (`kvdiag.study.claims.RULES`), margin, confidence, resamples, seed
      tasks:      [{task, metric, knobs, n, prompt_tokens_min, prompt_tokens_max, target_tokens,
                    max_new_tokens, scores: [{method, role, budget, n, mean, stderr}]}]
      claims:     [{id, claim, text, verdict, evidence, needed_n, comparisons: [{task, a, b, n,
                    mean_difference, ci_low, ci_high, interval, threshold, outcome, needed_n, mean_a,
                    mean_b}], scores: {task: {role: mean}}, numbers}]
    out/predictions/<task>.jsonl   one line per cell: task, sample_id, method, role, budget, prediction,
                                   gold, score, metric, metrics

`rescore(DIR)` (`kvdiag rescore DIR`, DIR a reproduce run or the folder `export_report` wrote) scores
every prediction again with the task's own scorer and checks each stored score and each mean of
findings.json against it: the test that the export is complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from pathlib import Path

import pandas as pd

from kvdiag.errors import KvdiagError

log = logging.getLogger(__name__)

FINDINGS = "findings.json"
PREDICTIONS_DIR = "predictions"
TOLERANCE = 1e-9  # stored vs recomputed score (0-100 scale)


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _gold_by_sample(eval_dir: Path) -> dict:
    """Gold answers of an eval run's samples, regenerated from its manifest (runs made before the
    prediction rows carried their gold)."""
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task

    config = json.loads((eval_dir / "manifest.json").read_text())["config"]
    task = get_task(config["task"], **config["task_knobs"])
    samples = task.samples(config["n"], seed=config["seed"], tokenizer=load_tokenizer(config["model"]),
                           target_tokens=config["target_tokens"])  # fmt: skip
    return {s.id: s.gold for s in samples}


def prediction_rows(eval_dir: Path, roles: dict[str, tuple]) -> list[dict]:
    """One export line per cell of an eval run (the first line of a cell wins), role names attached."""
    from kvdiag.eval.store import cell_key, read_predictions

    role_of = {(label, round(float(budget), 8)): role for role, (label, budget) in roles.items()}
    role_of[("exact", 1.0)] = "exact"
    rows, seen = [], set()
    for row in read_predictions(eval_dir):
        key = cell_key(row["sample_id"], row["method"], row["budget"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    gold = _gold_by_sample(eval_dir) if any("gold" not in r for r in rows) else {}
    metric = json.loads((eval_dir / "manifest.json").read_text()).get("metric")
    return [
        {"task": r["task"], "sample_id": r["sample_id"], "method": r["method"],
         "role": role_of.get((r["method"], round(float(r["budget"]), 8))), "budget": r["budget"],
         "prediction": r["prediction"], "gold": r["gold"] if "gold" in r else gold[r["sample_id"]],
         "score": r["score"], "metric": metric, "metrics": r.get("metrics")}
        for r in rows
    ]  # fmt: skip


def _task_entry(eval_dir: Path, summary: pd.DataFrame, roles: dict) -> dict:
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    config = manifest["config"]
    lengths = [s["prompt_tokens"] for s in manifest.get("samples", [])]
    role_of = {(label, round(float(budget), 8)): role for role, (label, budget) in roles.items()}
    exact = summary[summary.method == "exact"]
    return {
        "task": config["task"], "metric": manifest.get("metric"),
        "knobs": {k: v for k, v in config["task_knobs"].items() if k != "data_dir"},
        "n": int(exact.n.iloc[0]) if len(exact) else 0,
        "prompt_tokens_min": min(lengths, default=None), "prompt_tokens_max": max(lengths, default=None),
        "target_tokens": config["target_tokens"], "max_new_tokens": config["max_new_tokens"], "seed": config["seed"],
        "scores": [{"method": r.method, "role": "exact" if r.method == "exact" else role_of.get(
            (r.method, round(float(r.budget), 8))), "budget": float(r.budget), "n": int(r.n),
            "mean": _finite(float(r.score_mean)), "stderr": _finite(float(r.score_stderr))}
            for r in summary.itertuples()],
    }  # fmt: skip


def _claim_entry(finding, tables: dict, roles: dict) -> dict:
    from kvdiag.study.claims import EXACT_ROLE
    from kvdiag.study.paired import column_scores

    scores = {}  # every sample's mean, of each configuration a comparison involves
    for task in dict.fromkeys(c.task for c in finding.comparisons):
        involved = dict.fromkeys(r for c in finding.comparisons if c.task == task for r in (c.a, c.b))
        scores[task] = {}
        for role in involved:
            values = column_scores(tables[task], *(EXACT_ROLE if role == "exact" else roles[task][role]))
            scores[task][role] = _finite(float(values.mean())) if len(values) else None
    return {
        "id": finding.id, "claim": finding.claim, "text": finding.statement, "verdict": finding.verdict,
        "evidence": finding.evidence, "needed_n": finding.needed_n,
        "comparisons": [c.to_json() for c in finding.comparisons], "scores": scores, "numbers": finding.numbers,
    }  # fmt: skip


def write_findings(out: str | Path, info: dict, found: list, tables: dict, summaries: dict) -> Path:
    """Write out/findings.json and out/predictions/<task>.jsonl (atomically, each file) from a reproduce
    run: `info` as `write_report` gets it, `found` the `Finding`s, `tables` / `summaries` per task the
    results and score tables."""
    from kvdiag.runs import atomic_write_bytes, git_hash, versions
    from kvdiag.study import claims, paired

    out = Path(out)
    (out / PREDICTIONS_DIR).mkdir(exist_ok=True)
    for task in tables:
        lines = prediction_rows(out / f"eval_{task}", info["roles"][task])
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        atomic_write_bytes(out / PREDICTIONS_DIR / f"{task}.jsonl", data.encode())
    info_versions = versions()
    document = {
        "run": {
            "model": info["model"], "device": info["device"], "gpu": info_versions.get("gpu"), "mode": info.get("mode"),
            "family": info.get("family"), "versions": info_versions, "git": git_hash(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stages": {name: {k: r.get(k) for k in ("seconds", "git")} for name, r in info.get("stages", {}).items()},
            "complete": not info.get("unfinished"), "unfinished_stages": list(info.get("unfinished") or []),
        },
        "statistics": {"rules": claims.RULES, "margin": claims.MARGIN, "confidence": paired.CONFIDENCE,
                       "n_resamples": paired.N_RESAMPLES, "seed": paired.SEED, "interval": "BCa (percentile fallback)"},
        "tasks": [_task_entry(out / f"eval_{t}", summaries[t], info["roles"][t]) for t in tables],
        "claims": [_claim_entry(f, tables, info["roles"]) for f in found],
    }  # fmt: skip
    path = out / FINDINGS
    atomic_write_bytes(path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode())
    return path


def rescore(run_dir: str | Path) -> dict:
    """Re-score predictions/<task>.jsonl with each task's scorer (knobs from findings.json) and compare
    with the stored scores and with findings.json's per-method means.

    Returns {"rows": N, "tasks": {task: rows}, "mismatches": [one line per disagreement]}."""
    from kvdiag.tasks import Sample, get_task

    run_dir = Path(run_dir)
    path = run_dir / FINDINGS
    if not path.exists():
        raise KvdiagError(
            f"{run_dir} has no {FINDINGS}; point at a reproduce run or its exported figures folder"
        )
    document = json.loads(path.read_text())
    mismatches, counts = [], {}
    for entry in document["tasks"]:
        name = entry["task"]
        predictions = run_dir / PREDICTIONS_DIR / f"{name}.jsonl"
        if not predictions.exists():
            mismatches.append(f"{name}: {predictions} is missing")
            continue
        task = get_task(name, **entry["knobs"])
        lines = [json.loads(x) for x in predictions.read_text().splitlines() if x.strip()]
        counts[name] = len(lines)
        rescored = []
        for line in lines:
            sample = Sample(line["sample_id"], [], line["gold"])
            metrics = task.metrics(line["prediction"], sample)
            score = float(
                metrics[task.metric] if task.metric in metrics else task.score(line["prediction"], sample)
            )
            if not abs(score - float(line["score"])) <= TOLERANCE:
                mismatches.append(f"{name} {line['sample_id']} {line['method']}@{line['budget']}: stored score "
                                  f"{line['score']}, the scorer gives {score}")  # fmt: skip
            rescored.append({"method": line["method"], "budget": float(line["budget"]), "score": score})
        means = (
            pd.DataFrame(rescored, columns=["method", "budget", "score"]).groupby(["method", "budget"]).score
        )
        for stored in entry["scores"]:
            key = (stored["method"], float(stored["budget"]))
            n, mean = (
                (int(means.size()[key]), float(means.mean()[key])) if key in means.size() else (0, math.nan)
            )
            expected = math.nan if stored["mean"] is None else float(stored["mean"])
            if n != stored["n"] or not math.isclose(mean, expected, abs_tol=1e-6):
                mismatches.append(f"{name} {key[0]}@{key[1]}: findings.json has n = {stored['n']}, mean "
                                  f"{stored['mean']}; the predictions give n = {n}, mean {mean}")  # fmt: skip
    return {"rows": sum(counts.values()), "tasks": counts, "mismatches": mismatches}
