"""Growing and resuming an eval run on tiny-llama: more samples, methods and budgets are added and give
the cells a fresh run with the final options gives; real conflicts are refused naming the field and
both values; a separate process killed mid-run (and a torn last line) resumes to the same cells; a
deadline stops cleanly and the next call finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import kvdiag.eval.harness as harness
from kvdiag.errors import KvdiagError
from kvdiag.eval.harness import run_eval

TINY = dict(model="tiny-llama", task="needle", target_tokens=600, max_new_tokens=6, progress=False,
            fidelity=False)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def cells(out) -> dict:
    """(sample, method, budget) -> prediction, from predictions.jsonl; every cell exactly once."""
    rows = [json.loads(x) for x in (Path(out) / "predictions.jsonl").read_text().splitlines()]
    keyed = {(r["sample_id"], r["method"], r["budget"]): r["prediction"] for r in rows}
    assert len(keyed) == len(rows), "a cell was written twice"
    return keyed


def count_generations(monkeypatch) -> list:
    calls, real = [], harness.decode_cells

    def wrapped(cells, *args, **kwargs):
        calls.extend((c.method.name if c.method is not None else "exact", c.budget) for c in cells)
        return real(cells, *args, **kwargs)

    monkeypatch.setattr(harness, "decode_cells", wrapped)
    return calls


def test_a_run_grows_by_samples_methods_and_budgets_like_a_fresh_run(tmp_path, monkeypatch):
    out = tmp_path / "grown"
    run_eval(**TINY, out=out, n=1, methods=["oracle"], budgets=[0.25])
    first = (out / "predictions.jsonl").read_bytes()
    calls = count_generations(monkeypatch)
    final = dict(n=2, methods=["oracle", "streaming:sinks=2"], budgets=[0.25, 0.5])
    grown = run_eval(**TINY, out=out, **final)
    # sample 0 had exact and oracle@0.25; 10 cells in all, so 8 new ones ran, the 2 old ones did not
    assert grown["new_cells"] == len(calls) == 8 and grown["complete"]
    assert (out / "predictions.jsonl").read_bytes().startswith(first)
    fresh = run_eval(**TINY, out=tmp_path / "fresh", **final)
    assert fresh["new_cells"] == 10 and cells(out) == cells(tmp_path / "fresh")
    assert len(pd.read_parquet(out / "results.parquet")) == 10

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["n"] == 2 and manifest["config"]["budgets"] == [0.25, 0.5]
    assert manifest["config"]["methods"] == ["oracle", "streaming:sinks=2"]
    assert [m["label"] for m in manifest["methods"]] == ["oracle", "streaming:sinks=2"]
    assert manifest["methods"][0]["budgets"] == [0.25, 0.5]
    assert [s["id"] for s in manifest["samples"]] == ["needle-s0-0", "needle-s0-1"]
    assert [i["n"] for i in manifest["invocations"]] == [1, 2]

    # asking for less runs nothing and keeps every cell (and the largest n) in the run
    calls.clear()
    again = run_eval(**TINY, out=out, n=1, methods=["oracle"], budgets=[0.5])
    assert calls == [] and again["new_cells"] == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 10
    assert json.loads((out / "manifest.json").read_text())["config"]["n"] == 2


def edit_manifest(out, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 1}, "seed is 0 there and 1 now"),
        ({"max_new_tokens": 7}, "max_new_tokens is 6 there and 7 now"),
        ({"target_tokens": 650}, "target_tokens is 600 there and 650 now"),
        ({"task_knobs": {"depth": 10.0}}, "task knob depth is 50.0 there and 10.0 now"),
        ({"model": "tiny-qwen3"}, "model is 'tiny-llama' there and 'tiny-qwen3' now"),
        ({"fidelity": True}, "fidelity is False there and True now"),
        ({"task": "multineedle"}, "task is 'needle' there and 'multineedle' now"),
    ],
)
def test_a_real_conflict_is_refused_naming_the_field_and_both_values(tmp_path, change, message):
    out = tmp_path / "run"
    run_eval(**TINY, out=out, n=1, methods=["oracle"], budgets=[0.25])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(KvdiagError, match=f"cannot add to {out}: {message}"):
        run_eval(**{**TINY, "out": out, "n": 2, "methods": ["oracle"], "budgets": [0.25], **change})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_changed_method_knobs_or_prompts_are_conflicts(tmp_path):
    out = tmp_path / "run"
    args = dict(**TINY, out=out, n=1, methods=["oracle"], budgets=[0.25])
    run_eval(**args)

    def knobs(manifest):  # as if the code's default for a knob of "oracle" had changed since
        manifest["methods"][0]["knobs"] = {"page": 16}

    edit_manifest(out, knobs)
    with pytest.raises(KvdiagError, match=r"the knobs of method oracle is \{'page': 16\} there and \{\} now"):
        run_eval(**args)
    run_eval(**{**args, "methods": ["streaming"]})  # another method is still fine

    def prompt(manifest):  # as if the task's generator (or its data file) had changed since
        manifest["methods"][0]["knobs"] = {}
        manifest["samples"][0]["prompt_sha256"] = "0" * 64

    edit_manifest(out, prompt)
    with pytest.raises(KvdiagError, match="sample needle-s0-0's prompt_sha256 is '0000"):
        run_eval(**args)


def test_the_data_dir_may_move_but_the_data_may_not_change(tmp_path, shared_data):
    import shutil

    for name in ("a", "b"):
        shutil.copytree(shared_data / "needlebench", tmp_path / name / "needlebench")
    out = tmp_path / "run"
    args = dict(**{**TINY, "target_tokens": 1500}, out=out, n=1, methods=["oracle"], budgets=[0.25])
    run_eval(**args, data_dir=tmp_path / "a")
    assert run_eval(**args, data_dir=tmp_path / "b")["new_cells"] == 0  # another path, the same prompts
    with pytest.raises(KvdiagError, match="sample needle-s0-0's prompt_tokens is"):
        run_eval(**args)  # no data dir: the built-in haystack, other prompts


# a CLI eval in a child process that hangs after writing its second cell, so the kill lands mid-run
CHILD = """
import sys, time
import kvdiag.eval.harness as h
real, done = h.decode_cells, []
def slow(*a, **k):
    if len(done) == 2:
        time.sleep(600)
    done.append(1)
    return real(*a, **k)
h.decode_cells = slow
sys.argv = ["kvdiag"] + sys.argv[1:]
from kvdiag.cli import main
main()
"""
PLAIN = "import sys; sys.argv = ['kvdiag'] + sys.argv[1:]; from kvdiag.cli import main; main()"
ARGS = ["eval", "--model", "tiny-llama", "--task", "needle", "--methods", "oracle;streaming", "--budgets",
        "0.25", "--n", "2", "--target-tokens", "600", "--max-new-tokens", "6", "--no-fidelity"]  # fmt: skip


def test_a_killed_process_resumes_in_another_one(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *ARGS, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "predictions.jsonl").exists() or len(cells(out)) < 2:
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child wrote no cells in 120 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with open(out / "predictions.jsonl", "ab") as f:
        f.write(b'{"sample_id": "needle-s0-1", "method": "ora')  # a kill in the middle of a write
    done = subprocess.run([sys.executable, "-c", PLAIN, *ARGS, "--out", str(out)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "6 cells (4 run now)" in done.stdout
    run_eval(**TINY, out=tmp_path / "fresh", n=2, methods=["oracle", "streaming"], budgets=[0.25])
    assert cells(out) == cells(tmp_path / "fresh")


def test_a_deadline_stops_between_cells_and_the_next_call_finishes(tmp_path):
    out = tmp_path / "run"
    args = dict(**TINY, out=out, n=2, methods=["oracle"], budgets=[0.25])
    stopped = run_eval(**args, deadline=time.monotonic())
    assert not stopped["complete"] and stopped["new_cells"] == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"
    finished = run_eval(**args, deadline=time.monotonic() + 3600)
    assert finished["complete"] and finished["new_cells"] == 4
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("task", ["text2json", "needle", "multineedle", "html2tsv_synthetic", "html2tsv"])
def test_more_samples_keep_the_fewer_ones(task, shared_data):
    """What growing a run by samples relies on: the samples for n include those for any smaller n."""
    from kvdiag.tasks import get_task

    knobs = {"data_dir": str(shared_data)} if task == "html2tsv" else {}
    few, more = (get_task(task, **knobs).samples(n, seed=3, target_tokens=1500) for n in (3, 7))
    by_id = {s.id: s for s in more}
    assert len(by_id) == 7 and all(
        by_id[s.id].messages == s.messages and by_id[s.id].gold == s.gold for s in few
    )
