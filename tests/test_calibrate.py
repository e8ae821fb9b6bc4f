"""The calibrate stage of `kvdiag reproduce` (`kvdiag.study.calibrate`): the choice rule on hand-made
per-candidate results, its validation, and a reproduction on tiny-llama whose Text2JSON stage waits
for the calibration and then runs with the chosen knobs; plus the GPU configuration that uses it and
html2tsv's prompt-length limit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.errors import KvdiagError
from kvdiag.runs import write_table
from kvdiag.study.calibrate import RESULT, Calibration, candidate_dir, choose
from kvdiag.study.configs import config_from_dict, gpu_config

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

CANDIDATES = [
    {"knobs": {"n_entities": 2, "n_distractors": 1}, "max_new_tokens": 16},
    {"knobs": {"n_entities": 4, "n_distractors": 2}, "max_new_tokens": 24},
    {"knobs": {"n_entities": 8, "n_distractors": 4}, "max_new_tokens": 32},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_results(out: Path, exact_scores: list[list[float]]) -> None:
    """results.parquet of each candidate with these exact scores (and a method row that must be ignored)."""
    for i, scores in enumerate(exact_scores):
        rows = [{"method": "exact", "score": s, "prompt_tokens": 1000 + i, "tokens_generated": 10 + j,
                 "hit_cap": j == 0} for j, s in enumerate(scores)]  # fmt: skip
        rows.append(
            {
                "method": "oracle",
                "score": 100.0,
                "prompt_tokens": 1000,
                "tokens_generated": 1,
                "hit_cap": False,
            }
        )
        candidate_dir(out, i).mkdir(parents=True)
        write_table(pd.DataFrame(rows), candidate_dir(out, i) / "results.parquet")


def test_the_hardest_candidate_that_exact_still_solves_is_chosen(tmp_path):
    cal = Calibration("text2json", n=2, seed=7, min_score=50.0, candidates=CANDIDATES)
    fake_results(tmp_path, [[90.0, 70.0], [60.0, 50.0], [40.0, 30.0]])  # means 80, 55, 35
    chosen = choose(cal, tmp_path)
    assert chosen["candidate"] == 1 and chosen["knobs"] == CANDIDATES[1]["knobs"]
    assert chosen["max_new_tokens"] == 24 and chosen["exact_mean"] == 55.0
    saved = json.loads((tmp_path / RESULT).read_text())
    assert saved["chosen"] == chosen and [r["exact_mean"] for r in saved["table"]] == [80.0, 55.0, 35.0]
    assert [r["hit_cap_share"] for r in saved["table"]] == [0.5, 0.5, 0.5]


def test_when_no_candidate_passes_the_best_one_is_chosen_and_said(tmp_path):
    cal = Calibration("text2json", n=2, seed=7, min_score=90.0, candidates=CANDIDATES)
    fake_results(tmp_path, [[10.0, 20.0], [40.0, 50.0], [0.0, 30.0]])
    chosen = choose(cal, tmp_path)
    assert chosen["candidate"] == 1 and "no candidate reaches exact mean 90" in chosen["reason"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seed": 0}, "seed 0 is the evaluation's"),
        ({"candidates": []}, "at least one candidate"),
        ({"candidates": [{"knobs": {}}]}, "candidate 0 must be"),
        ({"candidates": [{"knobs": {}, "max_new_tokens": 0}]}, "max_new_tokens must be an integer ≥ 1"),
    ],
)
def test_bad_calibrations_are_refused(fields, message):
    with pytest.raises(KvdiagError, match=message):
        Calibration(
            **{"task": "text2json", "n": 2, "seed": 7, "min_score": 50.0, "candidates": CANDIDATES, **fields}
        )


def test_configuration_checks_the_calibration():
    base = {"base": "quick"}
    with pytest.raises(KvdiagError, match="exactly the fields"):
        config_from_dict({**base, "calibration": {"task": "text2json"}})
    cal = {"task": "needle", "n": 2, "seed": 3, "min_score": 50.0, "candidates": CANDIDATES}
    with pytest.raises(KvdiagError, match="unknown knob of task 'needle'"):
        config_from_dict({**base, "calibration": cal})
    with pytest.raises(KvdiagError, match="shard_by 'layers' is unknown; use one of samples, methods"):
        config_from_dict({**base, "shard_by": "layers"})


def test_the_gpu_configuration_calibrates_text2json_and_shares_methods_out():
    config = gpu_config()
    cal = Calibration.from_dict(config.calibration)
    assert cal.task == "text2json" and cal.seed != 0 and len(cal.candidates) >= 2
    entities = [c["knobs"]["n_entities"] for c in cal.candidates]
    assert entities == sorted(entities)  # easy → hard
    assert config.shard_by == "methods"
    html = next(p for p in config.tasks if p.task == "html2tsv")
    assert html.knobs["max_prompt_tokens"] + html.max_new_tokens <= 32768  # within the model's context


STUDY = """
tasks:
  - {task: text2json, n: 1, target_tokens: 1200, max_new_tokens: 99}
analysis_tokens: 1200
analysis_knobs: {n_entities: 2, n_distractors: 1}
recall_layer_stride: 4
recall_queries: 2
scale_outliers: true
html2tsv_real: false
calibration:
  task: text2json
  n: 1
  seed: 5
  min_score: 50.0
  candidates:
    - {knobs: {n_entities: 2, n_distractors: 1}, max_new_tokens: 3}
    - {knobs: {n_entities: 3, n_distractors: 1}, max_new_tokens: 4}
"""


def test_text2json_waits_for_the_calibration_then_runs_with_its_choice(tmp_path):
    (tmp_path / "study.yaml").write_text(STUDY)
    out = tmp_path / "rep"
    base = ["reproduce", "--model", "tiny-llama", "--config", str(tmp_path / "study.yaml"), "--out", str(out)]
    run = lambda *a: CliRunner().invoke(kvdiag.cli.app, [*base, *a], env={"KVDIAG_DEBUG": None})  # noqa: E731

    waiting = run("--stages", "text2json")
    assert waiting.exit_code == 0, waiting.output
    assert "[4/4] eval_text2json: waits for the calibrate stage" in waiting.output
    assert "[1/4] calibrate: not selected" in waiting.output and not (out / "eval_text2json").exists()

    done = run("--stages", "calibrate,text2json")
    assert done.exit_code == 0, done.output
    assert "[1/4] calibrate: done" in done.output and "[4/4] eval_text2json: done" in done.output
    saved = json.loads((out / "calibrate" / RESULT).read_text())
    assert [r["n"] for r in saved["table"]] == [1, 1]  # exact alone, one sample of seed 5 per candidate
    chosen = saved["chosen"]
    manifest = json.loads((out / "eval_text2json" / "manifest.json").read_text())["config"]
    assert (
        manifest["task_knobs"] == {"domain": "mixed", **chosen["knobs"]}
        and manifest["max_new_tokens"] == chosen["max_new_tokens"]
    )
    samples = json.loads((out / "calibrate" / "candidate_0" / "manifest.json").read_text())["samples"]
    assert [s["id"] for s in samples] == ["text2json-s5-0"]

    final = run()
    assert final.exit_code == 0, final.output
    assert "calibrate: already in" in final.output and "eval_text2json: already in" in final.output
    report = (out / "report.md").read_text()
    assert "Calibration of text2json" in report and "**chosen**" in report


def test_html2tsv_keeps_pages_within_the_prompt_limit_and_stays_nested(shared_data):
    from kvdiag.tasks import get_task
    from kvdiag.tasks.base import token_counter

    every = get_task("html2tsv", data_dir=str(shared_data)).samples()
    lengths = {s.id: token_counter(None)(s.prompt_text) for s in every}
    limit = sorted(lengths.values())[40]  # 41 pages fit
    task = get_task("html2tsv", data_dir=str(shared_data), max_prompt_tokens=limit)
    fitting = task.samples()
    assert {s.id for s in fitting} == {i for i, n in lengths.items() if n <= limit} and len(fitting) == 41
    ten, eleven = task.samples(10, seed=3), task.samples(11, seed=3)
    assert {s.id for s in ten} < {s.id for s in eleven} and all(s.meta["tokens"] <= limit for s in eleven)
    with pytest.raises(KvdiagError, match=f"n must be between 0 and 41 .*≤ {limit} prompt tokens"):
        task.samples(42)
    with pytest.raises(KvdiagError, match="max_prompt_tokens must be an integer ≥ 1"):
        get_task("html2tsv", max_prompt_tokens=0)
