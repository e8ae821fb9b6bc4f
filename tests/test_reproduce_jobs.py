"""`kvdiag reproduce` as several short jobs on tiny-llama (a time budget, a subset of stages, growing by
samples), and its configurations: the GPU one, YAML files and --task-knob overrides."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kvdiag.cli
import kvdiag.eval.harness as harness
from kvdiag.errors import KvdiagError
from kvdiag.study.configs import config_from_dict, gpu_config, load_config, override_knobs, quick_config

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

SMALL = """
tasks:
  - {task: needle, n: 1, target_tokens: 1000, max_new_tokens: 2}
analysis_tokens: 1000
analysis_knobs: {n_entities: 2, n_distractors: 1}
recall_layer_stride: 4
recall_queries: 2
scale_outliers: true
html2tsv_real: false
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def reproduce(*args):
    result = CliRunner().invoke(
        kvdiag.cli.app, ["reproduce", "--model", "tiny-llama", *args], env={"KVDIAG_DEBUG": None}
    )
    return result


def test_a_reproduction_runs_as_several_short_jobs(tmp_path, monkeypatch):
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "rep"
    base = ["--config", str(tmp_path / "small.yaml"), "--out", str(out)]

    spent = reproduce(*base, "--max-minutes", "0.000001")  # the budget is spent before the first stage
    assert spent.exit_code == 0, spent.output
    assert "spectrum: time budget spent, left for the next run" in spent.output
    assert "partial: spectrum, recall, eval_needle left" in spent.output and not (out / "report.md").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"

    first = reproduce(*base, "--stages", "spectrum")
    assert "[1/3] spectrum: done" in first.output and "[2/3] recall: not selected" in first.output
    assert "partial: recall, eval_needle left" in first.output

    early = reproduce(*base, "--stages", "spectrum", "--partial-report")  # a report from what is done so far
    assert early.exit_code == 0, early.output
    assert "report: writing a partial report.md" in early.output
    assert (
        "Not finished: `recall` (no results), `eval_needle` (no results)" in (out / "report.md").read_text()
    )
    findings = json.loads((out / "findings.json").read_text())
    assert findings["run"]["complete"] is False and findings["run"]["unfinished_stages"] == [
        "recall",
        "eval_needle",
    ]
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"

    second = reproduce(*base, "--stages", "needle,recall", "--max-minutes", "60")
    assert "spectrum: already in" in second.output and "eval_needle: done" in second.output
    assert "report: writing report.md" in second.output and (out / "report.md").exists()
    findings = json.loads((out / "findings.json").read_text())
    assert findings["run"]["complete"] is True and "Partial report" not in (out / "report.md").read_text()
    assert (
        findings["tasks"][0]["n"] == 1
        and findings["run"]["mode"] == f"configuration {tmp_path / 'small.yaml'}"
    )

    calls = []
    real = harness.decode_cells
    monkeypatch.setattr(
        harness, "decode_cells", lambda cells, *a, **k: calls.extend(cells) or real(cells, *a, **k)
    )
    grown = reproduce(*base, "--n", "2")  # one more sample: only its 9 cells run
    assert grown.exit_code == 0, grown.output
    assert "spectrum: already in" in grown.output and "recall: already in" in grown.output
    assert len(calls) == 9
    findings = json.loads((out / "findings.json").read_text())
    assert findings["tasks"][0]["n"] == 2 and all(s["n"] == 2 for s in findings["tasks"][0]["scores"])

    bad = reproduce(*base, "--stages", "neddle")
    assert bad.exit_code == 2 and "unknown stage 'neddle'; did you mean 'needle'" in bad.output
    bad = reproduce(*base, "--max-minutes", "0")
    assert bad.exit_code == 2 and "--max-minutes must be a positive number, got 0.0" in bad.output


def test_the_gpu_configuration():
    config = load_config("gpu")
    assert config == gpu_config() and config.name == "gpu" and config.fidelity and config.html2tsv_real
    plans = {p.task: p for p in config.tasks}
    assert plans["text2json"].n >= 50 and 8192 <= plans["text2json"].target_tokens <= 16384
    assert plans["multineedle"].n >= 20 and plans["needle"].n >= 20 and plans["html2tsv"].n >= 20
    assert all(8192 <= p.target_tokens <= 16384 for p in config.tasks)
    assert config.recall_layer_stride == 1 and config.scale_outliers
    assert load_config("quick") == quick_config()


def test_yaml_files_and_knob_overrides(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base: gpu\ntasks:\n  - {task: text2json, knobs: {n_entities: 6}}\n  - {task: needle, n: 40}\n"
                    "recall_queries: 16\n")  # fmt: skip
    config = load_config(path)
    assert [p.task for p in config.tasks] == ["text2json", "needle"]
    t2j, needle = config.tasks
    assert t2j.knobs == {"n_entities": 6} and (t2j.n, t2j.target_tokens) == (50, 8192)  # the rest from gpu
    assert needle.n == 40 and needle.max_new_tokens == 32 and config.recall_queries == 16
    assert config.name == str(path) and config.analysis_tokens == 8192 and config.calibration is not None

    assert override_knobs(config, ["text2json:domain=movies"]).calibration == config.calibration
    overridden = override_knobs(config, ["text2json:n_entities=8", "text2json:domain=movies"])
    assert overridden.tasks[0].knobs == {"n_entities": 8, "domain": "movies"} and config.tasks[0].knobs == {
        "n_entities": 6
    }
    assert overridden.calibration is None  # a knob set by hand replaces the calibration of that knob
    html = override_knobs(quick_config(), ["html2tsv_synthetic:n_items=3", "html2tsv:subset=2k"])
    assert next(p for p in html.tasks if p.task == "html2tsv").knobs == {"n_items": 3, "subset": "2k"}

    for data, message in [
        (
            {"base": "gpu", "recal_queries": 2},
            "unknown field in here 'recal_queries'; did you mean 'recall_queries'",
        ),
        ({"base": "cpu"}, "unknown base configuration in here 'cpu'"),
        (
            {"base": "gpu", "tasks": [{"task": "needel"}]},
            "unknown task in here 'needel'; did you mean 'needle'",
        ),
        ({"base": "gpu", "tasks": [{"task": "needle", "knobs": {"dept": 5}}]}, "did you mean 'depth'"),
        (
            {"base": "gpu", "tasks": [{"task": "needle", "n": 0}]},
            "here: needle n must be an integer ≥ 1, got 0",
        ),
        (
            {"tasks": [{"task": "needle", "n": 2}], "analysis_tokens": 100},
            "task needle lacks max_new_tokens, target_tokens",
        ),
        ({"tasks": []}, "lacks 'analysis_tokens'"),
        ([1, 2], "must be a mapping"),
    ]:
        with pytest.raises(KvdiagError, match=message):
            config_from_dict(data, where="here")
    for items, message in [
        (["n_entities=8"], "is not task:knob=value"),
        (
            ["text2jsn:n_entities=8"],
            "unknown task of this configuration 'text2jsn'; did you mean 'text2json'",
        ),
        (["text2json:n_entites=8"], "did you mean 'n_entities'"),
        (["text2json:n_entities=eight"], "expected int"),
    ]:
        with pytest.raises(KvdiagError, match=message):
            override_knobs(gpu_config(), items)
    with pytest.raises(KvdiagError, match="unknown configuration .*'gpux'"):
        load_config("gpux")
    (tmp_path / "broken.yaml").write_text("tasks: [")
    with pytest.raises(KvdiagError, match="is not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_cli_configuration_errors_in_one_line(tmp_path):
    bad = reproduce("--quick", "--config", "gpu", "--out", str(tmp_path / "r"))
    assert bad.exit_code == 2 and "--quick and --config gpu contradict each other" in bad.output
    bad = reproduce("--config", "gpu", "--task-knob", "text2json:n_entities=x", "--out", str(tmp_path / "r"))
    assert bad.exit_code == 2 and "text2json knob n_entities='x' is invalid; expected int" in bad.output
    assert not (tmp_path / "r").exists()
