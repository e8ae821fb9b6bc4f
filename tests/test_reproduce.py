"""`kvdiag reproduce`: the markdown writer and the verdicts on hand-made tables, and a whole tiny run
on tiny-llama (every stage, the report's sections, the export, and a second run that reuses it all)."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.errors import KvdiagError

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

# --- a whole run on tiny-llama ----------------------------------------------------------------------


def tiny_config():
    from kvdiag.study.reproduce import ReproduceConfig, TaskPlan

    # tiny-llama's byte tokenizer: ~1000 tokens is the shortest prompt these tasks fit in
    return ReproduceConfig(
        tasks=[TaskPlan("text2json", 1, 1000, 4, {"n_entities": 2, "n_distractors": 1}),
               TaskPlan("multineedle", 1, 1000, 4, {"depths": [0.0, 100.0]}),
               TaskPlan("html2tsv", 1, 1900, 4, {"n_items": 2}), TaskPlan("needle", 1, 1000, 4)],
        analysis_tokens=1000, analysis_knobs={"n_entities": 2, "n_distractors": 1}, recall_layer_stride=2,
        recall_queries=4, scale_outliers=True, html2tsv_real=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_thread):
    from kvdiag.study.reproduce import run_reproduce

    tmp = tmp_path_factory.mktemp("reproduce")
    said = []
    result = run_reproduce("tiny-llama", tmp / "rep", config=tiny_config(), progress=False, echo=said.append,
                           figures_dir=tmp / "figures")  # fmt: skip
    return tmp, result, said


STAGES = [
    "spectrum",
    "recall",
    "eval_text2json",
    "eval_multineedle",
    "eval_html2tsv_synthetic",
    "eval_needle",
]
TASKS = ["text2json", "multineedle", "html2tsv_synthetic", "needle"]


def test_reproduce_end_to_end(full_run):
    tmp, result, said = full_run
    out = tmp / "rep"
    assert result["complete"] and result["remaining"] == []
    assert list(result["stages"]) == STAGES and all(isinstance(s, float) for s in result["stages"].values())
    assert [line for line in said if line.startswith("[")][:2] == ["[1/6] spectrum: running ...", said[1]]
    for stage in STAGES:
        assert (out / stage / "manifest.json").exists()
    report = (out / "report.md").read_text()
    for heading in ["## Findings", "## Configuration", "## text2json", "## multineedle", "## html2tsv_synthetic",
                    "## needle", "## Recall and error decomposition", "## Key spectra"]:  # fmt: skip
        assert heading in report
    assert (
        re.findall(r"^- \*\*Claim (\w+): .*: (?:holds|does not hold|inconclusive)\.\*\*", report, re.M)
        == ["1a", "1b", "2a", "2b", "3", "3c", "4"]  # 3c: claim 3 for kvdiag's centred YAKV; 4: its gain
    )
    assert "How the verdicts are decided" in report and "paired=True, BCa" in report
    assert "centred K/V, a kvdiag addition" in report
    assert "`html2tsv_synthetic` (kvdiag's synthetic pages" in report
    assert "− exact [95 % CI]" in report and re.search(r"\(n = 1, no interval\) (floor|unclear) \|", report)
    t2j = pd.read_parquet(out / "eval_text2json" / "results.parquet")
    assert sorted(zip(t2j.method, t2j.budget)) == sorted([
        ("exact", 1.0), ("shadowkv:outlier_chunks=1", 0.015625), ("shadowkv:outlier_chunks=1", 0.15625),
        ("arkvale:page_size=16,n_win_pages=5,group_size=1", 0.0078125), ("lrqk", 0.00258),
        ("infinigen:alpha=inf", 0.2), ("yakv", 0.03125), ("yakv:center=True", 0.03125),
        ("oracle", 0.03125)])  # fmt: skip
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "figures/study_scores.png" in links and all((out / link).exists() for link in links)
    exported = (tmp / "figures" / "report.md").read_text()
    flat = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", exported)
    assert len(flat) == len(links) and all((tmp / "figures" / f).exists() for f in flat)
    assert "eval_text2json-score_vs_bytes.png" in flat
    assert {p.suffix for p in (tmp / "figures").iterdir() if p.is_file()} == {".md", ".png", ".json", ".csv"}
    assert sorted(p.name for p in (tmp / "figures" / "predictions").iterdir()) == sorted(
        f"{t}.jsonl" for t in TASKS
    )
    scores = pd.read_csv(tmp / "figures" / "eval_text2json-scores.csv")
    by_hand = t2j.groupby("method").score.mean()  # the reference numbers a notebook loads
    for method, mean in by_hand.items():
        assert scores.loc[scores.method == method, "score_mean"].mean() == pytest.approx(mean)

    from kvdiag.plots import plot_run

    for figure in (out / "eval_needle" / "figures").iterdir():
        figure.unlink()
    redrawn = plot_run(out)  # `kvdiag plot` on the whole reproduce directory redraws every stage
    assert (out / "eval_needle" / "figures" / "score_vs_budget.png") in redrawn
    assert {p.parent.parent.name for p in redrawn} >= {"spectrum", "recall", "eval_text2json", "eval_needle"}


def test_findings_json_and_the_predictions_hold_every_cell(full_run):
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task

    tmp, _, _ = full_run
    out = tmp / "rep"
    findings = json.loads((out / "findings.json").read_text())
    assert findings == json.loads((tmp / "figures" / "findings.json").read_text())
    run = findings["run"]
    assert (
        run["model"] == "tiny-llama"
        and run["device"] == "cpu"
        and run["versions"]["torch"] == torch.__version__
    )
    assert run["git"] and run["date"] and set(run["stages"]) == set(STAGES)
    assert findings["statistics"]["seed"] == 0 and findings["statistics"]["margin"] == 5.0
    assert [t["task"] for t in findings["tasks"]] == TASKS
    for entry in findings["tasks"]:
        manifest = json.loads((out / f"eval_{entry['task']}" / "manifest.json").read_text())
        lengths = [s["prompt_tokens"] for s in manifest["samples"]]
        assert entry["n"] == 1 and (entry["prompt_tokens_min"], entry["prompt_tokens_max"]) == (
            min(lengths),
            max(lengths),
        )
        assert len(entry["scores"]) == 9 and entry["scores"][0]["role"] == "exact"
    claims = {c["id"]: c for c in findings["claims"]}
    assert list(claims) == ["1a", "1b", "2a", "2b", "3", "3c", "4"]
    assert all(c["verdict"] in ("holds", "does not hold", "inconclusive") for c in claims.values())
    # n = 1 per task: no interval anywhere, so the sample-based claims stay undecided, with no n estimate
    for key in ("1a", "3", "4"):
        assert claims[key]["verdict"] == "inconclusive" and claims[key]["needed_n"] is None
        assert {c["interval"] for c in claims[key]["comparisons"]} == {"none"}
    versus = claims["4"]["comparisons"][0]
    assert (versus["a"], versus["b"], versus["task"]) == ("yakv_centered", "yakv", "text2json")
    assert versus["mean_difference"] == pytest.approx(claims["4"]["scores"]["text2json"]["yakv_centered"]
                                                      - claims["4"]["scores"]["text2json"]["yakv"])  # fmt: skip
    assert "err_key" in claims["2a"]["numbers"]["shadowkv"]

    tokenizer = load_tokenizer("tiny-llama")
    plans = {p.task.replace("html2tsv", "html2tsv_synthetic"): p for p in tiny_config().tasks}
    for task in TASKS:
        lines = [json.loads(x) for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        results = pd.read_parquet(out / f"eval_{task}" / "results.parquet")
        assert len(lines) == len(results) == 9
        assert {(x["method"], x["budget"]) for x in lines} == set(zip(results.method, results.budget))
        assert {x["role"] for x in lines} == {"exact", *ROLE_NAMES}
        plan = plans[task]  # the gold answers, generated again from the task
        knobs = {k: v for k, v in plan.knobs.items() if k in get_task(task).knobs()}
        sample = get_task(task, **knobs).samples(
            1, seed=0, tokenizer=tokenizer, target_tokens=plan.target_tokens
        )[0]
        assert all(
            x["gold"] == json.loads(json.dumps(sample.gold)) and x["sample_id"] == sample.id for x in lines
        )
        assert sorted(x["score"] for x in lines) == sorted(results.score)


def test_runs_whose_rows_lack_the_gold_get_it_from_the_task(full_run, tmp_path):
    from kvdiag.study.findings import prediction_rows

    tmp, _, _ = full_run
    old = tmp_path / "eval_needle"  # as written before prediction rows carried their gold answer
    shutil.copytree(tmp / "rep" / "eval_needle", old)
    rows = [json.loads(x) for x in (old / "predictions.jsonl").read_text().splitlines()]
    (old / "predictions.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gold"}) + "\n"
                                                   for r in rows))  # fmt: skip
    exported = prediction_rows(old, {})
    assert [x["gold"] for x in exported] == [r["gold"] for r in rows] and len(rows) == 9


ROLE_NAMES = {"shadowkv", "shadowkv_10x", "arkvale", "lrqk", "infinigen", "yakv", "yakv_centered", "oracle"}


def test_rescore_agrees_and_catches_a_tampered_export(full_run):
    from kvdiag.study.findings import rescore

    tmp, _, _ = full_run
    assert rescore(tmp / "rep") == {"rows": 36, "tasks": dict.fromkeys(TASKS, 9), "mismatches": []}
    ok = CliRunner().invoke(kvdiag.cli.app, ["rescore", str(tmp / "figures")])
    assert ok.exit_code == 0 and "all 36 stored scores" in ok.output

    tampered = tmp / "tampered"
    shutil.copytree(tmp / "figures", tampered)
    path = tampered / "predictions" / "needle.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["score"] += 50
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))  # one score changed, one cell dropped
    mismatches = rescore(tampered)["mismatches"]
    assert any(
        f"needle {lines[0]['sample_id']} {lines[0]['method']}" in m and "stored score" in m
        for m in mismatches
    )
    assert any(
        f"{lines[-1]['method']}@{float(lines[-1]['budget'])}: findings.json has n = 1" in m
        for m in mismatches
    )
    bad = CliRunner().invoke(kvdiag.cli.app, ["rescore", str(tampered)])
    assert bad.exit_code == 1 and "disagreements in 35 predictions" in bad.output
    with pytest.raises(KvdiagError, match="has no findings.json"):
        rescore(tmp)


def test_a_finished_run_is_reused_and_a_conflict_refused(full_run, monkeypatch):
    import dataclasses

    import kvdiag.analysis.recall
    import kvdiag.analysis.spectrum
    import kvdiag.eval.harness
    from kvdiag.study.reproduce import run_reproduce

    tmp, _, said = full_run
    out = tmp / "rep"
    report = (out / "report.md").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in [(kvdiag.analysis.spectrum, "run_spectrum"), (kvdiag.analysis.recall, "run_recall"),
                         (kvdiag.eval.harness, "run_eval")]:  # fmt: skip
        monkeypatch.setattr(module, name, fail)
    said.clear()
    again = run_reproduce("tiny-llama", out, config=tiny_config(), progress=False, echo=said.append)
    assert set(again["stages"].values()) == {"skipped"}
    assert (out / "report.md").read_text() == report  # seeded intervals: the same report
    config = tiny_config()
    config.tasks[3] = dataclasses.replace(config.tasks[3], max_new_tokens=5)
    with pytest.raises(KvdiagError, match=r"has tasks\[needle\]\.max_new_tokens = 4 and now 5"):
        run_reproduce("tiny-llama", out, config=config, progress=False, echo=said.append)


def test_cli_reproduce_errors_in_one_line(tmp_path):
    bad = CliRunner().invoke(kvdiag.cli.app, ["reproduce", "--model", "tiny-lama", "--out", str(tmp_path / "r")],
                             env={"KVDIAG_DEBUG": None})  # fmt: skip
    assert bad.exit_code == 2 and "did you mean 'tiny-llama'" in bad.output
    assert not (tmp_path / "r").exists()


def test_quick_plans_fit_a_tiny_model_before_any_stage_runs():
    """`reproduce --quick --model tiny-llama` failed at its 5th stage: HTML→TSV's prompt without filler
    has ~2400 byte tokens, over the 1200 planned and over the model's 2048-token context."""
    from kvdiag.study.reproduce import TaskPlan, fit_plans

    said = []
    plans = [TaskPlan("html2tsv_synthetic", 1, 1200, 112, {"n_items": 4}),
             TaskPlan("html2tsv_synthetic", 1, 1200, 8, {"n_items": 1}), TaskPlan("needle", 2, 1200, 24)]  # fmt: skip
    kept, skipped = fit_plans("tiny-llama", plans, said.append)
    assert list(skipped) == ["html2tsv_synthetic"]
    assert "112 new tokens exceed tiny-llama's context of 2048" in skipped["html2tsv_synthetic"]
    assert [p.task for p in kept] == ["html2tsv_synthetic", "needle"]
    raised, needle = kept
    assert 1200 < raised.target_tokens <= 2048 - 8 and needle.target_tokens == 1200
    assert any(f"using {raised.target_tokens}" in line for line in said)
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task

    (sample,) = get_task("html2tsv_synthetic", n_items=1).samples(
        1, seed=0, tokenizer=load_tokenizer("tiny-llama"), target_tokens=raised.target_tokens
    )
    assert len(sample.prompt_text.encode("utf-8")) == raised.target_tokens  # the page without filler
