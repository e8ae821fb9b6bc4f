"""Run directories are safe: a command refuses an --out that holds another run (naming its kind) or
one of its own kind it does not resume, --overwrite replaces a run atomically, files respect the
umask, and a run can be re-run from its manifest, exported as CSV and re-analysed from a saved trace."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.errors import KvdiagError

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

TEXT = "Record R-0012: Priya Sato (beekeeper, Hobart) - 17 sextants, filed 1999. " * 3
SPECTRUM = ["spectrum", "--model", "tiny-llama", "--text", TEXT, "--queries", "4"]
RECALL = ["recall", "--model", "tiny-llama", "--text", TEXT, "--methods", "oracle;shadowkv:rank=4",
          "--budgets", "0.1,16", "--layers", "1,-1", "--queries", "4"]  # fmt: skip
EVAL = ["eval", "--model", "tiny-llama", "--task", "needle", "--methods", "oracle@0.0625", "--n", "1",
        "--target-tokens", "520", "--max-new-tokens", "2", "--no-fidelity"]  # fmt: skip


def kvdiag_cli(*args):
    return CliRunner().invoke(kvdiag.cli.app, [str(a) for a in args], env={"KVDIAG_DEBUG": None})


def ok(*args):
    result = kvdiag_cli(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *messages):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvdiag: error: "), result.stderr
    for message in messages:
        assert message in lines[0], lines[0]
    return lines[0]


def snapshot(directory):
    """Every file under `directory` with its bytes (a run left untouched has the same snapshot)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real run of each one-shot kind and one eval run, made by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    ok(*SPECTRUM, "--save-trace", "--out", root / "spectrum")
    ok(*RECALL, "--out", root / "recall")
    ok(*EVAL, "--out", root / "eval")
    return root


def copy_run(runs, kind, tmp_path):
    shutil.copytree(runs / kind, tmp_path / kind)
    return tmp_path / kind


# --- refusing and replacing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, held",
    [("spectrum", "recall"), ("recall", "spectrum"), ("eval", "spectrum"), ("reproduce", "eval"),
     ("spectrum", "spectrum"), ("recall", "recall")],
)  # fmt: skip
def test_a_run_directory_of_another_kind_or_not_resumed_is_refused_and_left_alone(
    runs, tmp_path, command, held
):
    out = copy_run(runs, held, tmp_path)
    before = snapshot(out)
    args = {"spectrum": SPECTRUM, "recall": RECALL, "eval": EVAL,
            "reproduce": ["reproduce", "--quick", "--model", "tiny-llama"]}[command]  # fmt: skip
    result = kvdiag_cli(*args, "--out", out)
    kind = (
        f"holds a {held} run (model tiny-llama, created "
        if held != command
        else f"already holds a {held} run"
    )
    one_line_error(result, f"--out {out}", kind, "pass --overwrite to replace it")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [held]  # no staging left beside it


def test_overwrite_replaces_the_whole_run_and_a_failed_overwrite_keeps_it(runs, tmp_path):
    out = copy_run(runs, "recall", tmp_path)
    (out / "notes.txt").write_text("written by the old run's user")
    before = snapshot(out)
    one_line_error(kvdiag_cli(*SPECTRUM, "--layers", "9", "--overwrite", "--out", out), "layer index 9")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["recall"]

    ok(*SPECTRUM, "--overwrite", "--out", out)
    fresh = tmp_path / "fresh"
    ok(*SPECTRUM, "--out", fresh)
    assert sorted(snapshot(out)) == sorted(snapshot(fresh))  # nothing of the recall run is left
    assert json.loads((out / "manifest.json").read_text())["command"] == "spectrum"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "recall"]


def test_eval_resumes_its_own_run_and_overwrite_starts_afresh(runs, tmp_path):
    out = copy_run(runs, "eval", tmp_path)
    again = ok(*EVAL, "--out", out)
    assert "2 cells (0 run now)" in again.stdout  # resumed: every cell was there
    (out / "predictions.jsonl").write_text((out / "predictions.jsonl").read_text().splitlines()[0] + "\n")
    fresh = ok(*EVAL, "--overwrite", "--out", out)
    assert "2 cells (2 run now)" in fresh.stdout  # the kept cell was not reused: a new run
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_the_eval_summary_prints_budgets_as_asked(runs, tmp_path):
    out = copy_run(runs, "eval", tmp_path)
    lines = ok(*EVAL, "--out", out).stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "budget", "budget_tokens"]
    exact = next(line for line in lines if line.startswith(" exact") or line.startswith("exact"))
    oracle = next(line for line in lines if line.strip().startswith("oracle"))
    assert exact.split()[1] == "all"  # not "1", which the CLI's own budget rule reads as one token
    prompt_tokens = json.loads((out / "manifest.json").read_text())["samples"][0]["prompt_tokens"]
    assert oracle.split()[1:4] == ["6.25", "%", str(-(-prompt_tokens // 16))]  # ceil(L / 16) tokens


def test_a_damaged_manifest_is_named_and_overwrite_replaces_it(runs, tmp_path):
    out = copy_run(runs, "spectrum", tmp_path)
    (out / "manifest.json").write_text('{"command": "spectrum", ')
    one_line_error(kvdiag_cli(*SPECTRUM, "--out", out), "manifest.json is damaged", "--overwrite")
    one_line_error(kvdiag_cli(*EVAL, "--out", out), "manifest.json is damaged")
    one_line_error(kvdiag_cli("plot", out), "manifest.json is damaged")
    ok(*SPECTRUM, "--overwrite", "--out", out)
    assert json.loads((out / "manifest.json").read_text())["command"] == "spectrum"


def test_a_caller_that_does_not_name_its_kind_is_refused_any_run(runs, tmp_path):
    from kvdiag.runs import staged_run_dir

    out = copy_run(runs, "recall", tmp_path)
    with pytest.raises(
        KvdiagError, match=r"holds a recall run \(model tiny-llama, created .*\); choose a new"
    ):
        with staged_run_dir(out):
            pass
    with staged_run_dir(tmp_path / "new") as stage:  # a new directory is fine
        (stage / "table.parquet").write_bytes(b"x")
    assert (tmp_path / "new" / "table.parquet").exists()


def test_overwrite_under_torchrun_is_refused_before_anything_changes(runs, tmp_path):
    from kvdiag.runs import replaces_run

    out = copy_run(runs, "eval", tmp_path)
    before = sorted(p.name for p in out.iterdir())
    assert replaces_run(out, overwrite=True) and not replaces_run(out, overwrite=False)
    assert not replaces_run(tmp_path / "empty", overwrite=True, distributed=True)  # nothing to replace
    with pytest.raises(KvdiagError, match="--overwrite of .* under torchrun"):
        replaces_run(out, overwrite=True, distributed=True)
    assert sorted(p.name for p in out.iterdir()) == before


def test_swapping_without_an_atomic_exchange_still_replaces(monkeypatch, tmp_path):
    import kvdiag.runs as runs_module

    monkeypatch.setattr(runs_module, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with runs_module.replacing_run_dir(out) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["run"]


# --- permissions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_directories_follow_the_umask(runs, tmp_path, umask):
    old = os.umask(umask)
    try:
        fresh, replaced = tmp_path / "fresh", copy_run(runs, "recall", tmp_path)
        ok(*SPECTRUM, "--out", fresh)
        ok(*SPECTRUM, "--overwrite", "--out", replaced)
    finally:
        os.umask(old)
    for run in (fresh, replaced):
        for path in [run, *run.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


# --- reusing a saved trace --------------------------------------------------------------------------


def test_spectrum_and_recall_reuse_a_saved_trace_without_loading_the_model(runs, tmp_path, monkeypatch):
    import kvdiag.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvdiag.models, "load_model", no_model)
    ok("spectrum", "--trace", runs / "spectrum", "--queries", "4", "--out", tmp_path / "again")
    for table in ("spectrum", "spectrum_summary", "lowrank_damage"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "again" / f"{table}.parquet"),
            pd.read_parquet(runs / "spectrum" / f"{table}.parquet"),
        )
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["config"]["model"] == "tiny-llama" and manifest["trace"] == str(
        runs / "spectrum" / "trace"
    )
    ok("recall", "--trace", runs / "spectrum" / "trace", "--methods", "oracle", "--budgets", "0.1", "--layers", "-1",
       "--queries", "4", "--out", tmp_path / "recall")  # fmt: skip
    table = pd.read_parquet(tmp_path / "recall" / "recall.parquet")
    assert sorted(table.layer.unique()) == [3]
    assert np.allclose(table.recall_gqa, 1.0)  # the oracle attends its own GQA top-k: 1 by definition


@pytest.mark.parametrize(
    "args, message",
    [(["--model", "tiny-qwen3"], "was captured from model 'tiny-llama', not 'tiny-qwen3'"),
     (["--text", "hello"], "--trace analyses a saved capture; --text cannot change it"),
     (["--max-tokens", "8", "--chat"], "--max-tokens, --chat cannot change it")],
)  # fmt: skip
def test_a_trace_that_does_not_match_is_refused(runs, tmp_path, args, message):
    for command in ("spectrum", "recall"):
        result = kvdiag_cli(command, "--trace", runs / "spectrum", *args, "--out", tmp_path / command)
        one_line_error(result, message)
        assert not (tmp_path / command).exists()


def test_a_trace_whose_tensor_bytes_were_damaged_is_refused(runs, tmp_path):
    from kvdiag.capture.trace import Trace

    trace_dir = tmp_path / "trace"
    shutil.copytree(runs / "spectrum" / "trace", trace_dir)
    assert Trace.load(trace_dir).n_tokens > 0
    data = bytearray((trace_dir / "trace.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one tensor value: the file still parses
    (trace_dir / "trace.safetensors").write_bytes(bytes(data))
    with pytest.raises(KvdiagError, match="does not match the SHA-256 in trace.json"):
        Trace.load(trace_dir)
    one_line_error(
        kvdiag_cli("spectrum", "--trace", trace_dir, "--out", tmp_path / "s"), "does not match the SHA-256"
    )


# --- rerun and export -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["spectrum", "recall"])
def test_rerun_repeats_a_run_from_its_manifest(runs, tmp_path, kind):
    again = tmp_path / "again"
    ok("rerun", runs / kind, "--out", again)
    first, second = (
        json.loads((runs / kind / "manifest.json").read_text()),
        json.loads((again / "manifest.json").read_text()),
    )
    assert second["command"] == kind and second["config"] == {
        **first["config"],
        "prompt_source": str(runs / kind / "prompt.txt"),
    }
    for table in runs.joinpath(kind).glob("*.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(again / table.name), pd.read_parquet(table))
    one_line_error(kvdiag_cli("rerun", runs / kind), f"already holds a {kind} run")  # same dir: not resumable


def test_rerun_of_an_eval_resumes_it(runs, tmp_path):
    out = copy_run(runs, "eval", tmp_path)
    assert "2 cells (0 run now)" in ok("rerun", out).stdout
    moved = tmp_path / "moved"
    assert "2 cells (2 run now)" in ok("rerun", out, "--out", moved).stdout
    scores = pd.read_parquet(moved / "results.parquet").set_index("method").score
    assert scores.equals(pd.read_parquet(out / "results.parquet").set_index("method").score)


def test_rerun_refuses_a_prompt_that_changed(runs, tmp_path):
    out = copy_run(runs, "spectrum", tmp_path)
    (out / "prompt.txt").write_text(TEXT + " (edited)")
    one_line_error(kvdiag_cli("rerun", out, "--out", tmp_path / "x"), "does not match the prompt SHA-256")


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
def test_export_writes_every_table_as_text(runs, tmp_path, fmt, sep):
    out = copy_run(runs, "recall", tmp_path)
    args = ["--csv"] if fmt == "csv" else ["--format", fmt]
    ok("export", out, *args)
    exported = pd.read_csv(out / f"recall.{fmt}", sep=sep)
    pd.testing.assert_frame_equal(exported, pd.read_parquet(out / "recall.parquet"), check_dtype=False)


def test_export_of_an_eval_adds_its_score_summary(runs, tmp_path):
    ok("export", runs / "eval", "--to", tmp_path / "csv")
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["results.csv", "scores.csv"]
    results = pd.read_parquet(runs / "eval" / "results.parquet")
    scores = pd.read_csv(tmp_path / "csv" / "scores.csv").set_index("method")
    for method, rows in results.groupby("method"):  # the mean by hand
        assert scores.loc[method, "score_mean"] == pytest.approx(rows.score.mean())
        assert scores.loc[method, "n"] == len(rows)


def test_export_errors(runs, tmp_path):
    one_line_error(kvdiag_cli("export", tmp_path / "nowhere"), "nowhere does not exist")
    one_line_error(
        kvdiag_cli("export", runs / "recall", "--format", "xlsx", "--to", tmp_path),
        "unknown export format 'xlsx'. Known: csv, jsonl, tsv.",
    )
    out = copy_run(runs, "spectrum", tmp_path)
    (out / "spectrum.parquet").write_bytes(b"PAR1 not really")
    one_line_error(kvdiag_cli("export", out), "spectrum.parquet is not a readable parquet table")
    one_line_error(kvdiag_cli("plot", out), "spectrum.parquet is not a readable parquet table")


# --- quiet ------------------------------------------------------------------------------------------


def test_quiet_prints_no_progress_and_no_summary(tmp_path):
    loud = ok(*SPECTRUM, "--out", tmp_path / "loud")
    assert "tokens, layers 0-3" in loud.stdout and "spectrum: 100%" in loud.stderr
    quiet = ok("--quiet", *SPECTRUM, "--out", tmp_path / "quiet")
    assert quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "quiet" / "manifest.json").exists()
    assert ok("-q", *EVAL, "--out", tmp_path / "eval").stdout == ""
    assert "tokens" in ok(*SPECTRUM, "--out", tmp_path / "again").stdout  # --quiet lasted one invocation
