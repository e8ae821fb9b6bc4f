"""`kvdiag eval` and `kvdiag reproduce` under torchrun on CPU (gloo, tiny-llama, 2 ranks in
subprocesses): the run directory equals a single process's; a rank that dies loses only its unfinished
cells and the same command resumes; a stuck rank ends in a one-line timeout error, not a hang, and a
single process resumes the run; a configuration conflict is one line per rank; a reproduction under
two ranks is one a single process finds finished. Plus the sharding and merging rules on their own.

The oracle is a plain single-process `run_eval` (the path the rest of the suite checks against
transformers' own generate); wall_s, a timing, is the only column left out of the comparisons."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvdiag.errors import KvdiagError
from kvdiag.eval.distributed import Ranks, gpu_of, shard_cells, shard_samples
from kvdiag.eval.harness import run_eval
from kvdiag.eval.store import merge_rank_files, rank_file, rank_files, read_predictions

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["eval", "--model", "tiny-llama", "--task", "needle", "--methods", "oracle;streaming", "--budgets",
        "0.25", "--n", "4", "--target-tokens", "500", "--max-new-tokens", "4", "--no-fidelity"]  # fmt: skip
SINGLE = dict(model="tiny-llama", task="needle", methods=["oracle", "streaming"], budgets=[0.25], n=4,
              target_tokens=500, max_new_tokens=4, fidelity=False, progress=False)  # fmt: skip
# the CLI in each rank; TEST_RANK1_AFTER_ONE_CELL=exit|hang stops rank 1 right after its first cell
LAUNCHER = """
import os, sys, time
import kvdiag.eval.harness as harness
stop = os.environ.get("TEST_RANK1_AFTER_ONE_CELL")
if stop and os.environ["RANK"] == "1":
    real = harness.append_row
    def append_then_stop(path, row):
        real(path, row)
        if stop == "exit":
            os._exit(1)
        time.sleep(600)
    harness.append_row = append_then_stop
sys.argv = ["kvdiag", *sys.argv[1:]]
from kvdiag.cli import main
main()
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: the same eval in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_eval(**SINGLE, out=out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -- launcher.py ARGS` (the kvdiag CLI) on gloo, on a free port."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "--", str(launcher), *map(str, args)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KVDIAG_DEBUG": "", **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def cells(out) -> dict:
    """(sample, method, budget) -> the predictions.jsonl row without wall_s; every cell exactly once."""
    rows = read_predictions(out)
    keyed = {
        (r["sample_id"], r["method"], r["budget"]): {k: v for k, v in r.items() if k != "wall_s"}
        for r in rows
    }
    assert len(keyed) == len(rows), "a cell was written twice"
    return keyed


def table(out) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").drop(columns="wall_s")


def test_two_ranks_write_what_one_process_writes(tmp_path, single):
    out = tmp_path / "run"
    done = torchrun(tmp_path, *ARGS, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("12 cells (12 run now)") == 1  # rank 0 alone prints the summary
    assert list(cells(out)) == list(cells(single)) and cells(out) == cells(single)  # same rows, same order
    pd.testing.assert_frame_equal(table(out), table(single))
    assert rank_files(out) == [] and sorted(p.name for p in (out / "figures").iterdir())
    manifest, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    for key in ("config", "methods", "samples", "status", "cells", "new_cells"):
        assert manifest[key] == reference[key], key
    assert manifest["invocations"][-1]["torchrun_ranks"] == 2


def test_ranks_sharing_out_methods_write_what_one_process_writes(tmp_path, single):
    out = tmp_path / "run"
    done = torchrun(tmp_path, *ARGS, "--shard-by", "methods", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    # exact and streaming ran on rank 0, oracle on rank 1: both prefilled every sample
    assert list(cells(out)) == list(cells(single)) and cells(out) == cells(single)
    pd.testing.assert_frame_equal(table(out), table(single))


def test_a_rank_that_dies_loses_only_its_unfinished_cells_and_the_same_command_resumes(tmp_path, single):
    out = tmp_path / "run"
    killed = torchrun(tmp_path, *ARGS, "--out", out, env={"TEST_RANK1_AFTER_ONE_CELL": "exit"})
    assert killed.returncode != 0
    # rank 1 (samples 1 and 3) wrote one cell and died; rank 0's finished cells are on disk as well
    assert [r["sample_id"] for r in read_predictions(out, rank_file(out, 1).name)] == ["needle-s0-1"]
    kept = {k for path in rank_files(out) for k in cells_of(path)}
    assert not (out / "predictions.jsonl").exists() and not (out / "results.parquet").exists()

    again = torchrun(tmp_path, *ARGS, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"12 cells ({12 - len(kept)} run now)" in again.stdout
    assert cells(out) == cells(single) and list(cells(out)) == list(cells(single))
    pd.testing.assert_frame_equal(table(out), table(single))
    assert rank_files(out) == []


def cells_of(path: Path) -> list[tuple]:
    return [(r["sample_id"], r["method"], r["budget"]) for r in read_predictions(path.parent, path.name)]


def test_a_stuck_rank_ends_in_a_timeout_error_and_one_process_resumes(tmp_path, single):
    out = tmp_path / "run"
    stuck = torchrun(
        tmp_path, *ARGS, "--out", out, env={"TEST_RANK1_AFTER_ONE_CELL": "hang", "KVDIAG_DIST_TIMEOUT_S": "3"}
    )
    assert stuck.returncode != 0
    errors = [line for line in stuck.stderr.splitlines() if line.startswith("kvdiag: error")]
    assert len(errors) == 1 and errors[0].startswith("kvdiag: error (rank 0/2): rank 0 of 2: the ranks did")
    assert "timeout of 3 s" in errors[0] and "Ranks 1 failed to pass monitoredBarrier" in errors[0]
    assert len(cells_of(rank_file(out, 0))) == 6 and len(cells_of(rank_file(out, 1))) == 1

    resumed = run_eval(**SINGLE, out=out)  # no torchrun: the rank files count as finished, then merge
    assert resumed["new_cells"] == 5 and rank_files(out) == []
    assert cells(out) == cells(single)
    pd.testing.assert_frame_equal(
        table(out).sort_values(["sample_id", "method"], ignore_index=True),
        table(single).sort_values(["sample_id", "method"], ignore_index=True),
    )


def test_a_configuration_conflict_is_one_line_per_rank(tmp_path, single):
    out = tmp_path / "run"
    run_eval(**{**SINGLE, "n": 1}, out=out, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = torchrun(tmp_path, *ARGS, "--out", out, timeout=120)
    assert refused.returncode != 0
    errors = sorted(line for line in refused.stderr.splitlines() if line.startswith("kvdiag: error"))
    assert len(errors) == 2 and all("seed is 1 there and 0 now" in line for line in errors), errors
    assert errors[0].startswith("kvdiag: error (rank 0/2)") and errors[1].startswith(
        "kvdiag: error (rank 1/2)"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_write_what_one_gpu_writes(tmp_path):
    """NCCL, one GPU per rank; the reference is the same eval on one GPU in this process."""
    reference, out = tmp_path / "single", tmp_path / "run"
    run_eval(**SINGLE, out=reference, device="cuda")
    done = torchrun(tmp_path, *ARGS, "--device", "cuda", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cells(out) == cells(reference) and list(cells(out)) == list(cells(reference))
    pd.testing.assert_frame_equal(table(out), table(reference))


SMALL_STUDY = """
tasks:
  - {task: needle, n: 1, target_tokens: 1000, max_new_tokens: 2}
analysis_tokens: 1000
analysis_knobs: {n_entities: 2, n_distractors: 1}
recall_layer_stride: 4
recall_queries: 2
scale_outliers: true
html2tsv_real: false
"""


def test_reproduce_under_two_ranks_writes_stages_one_process_takes_as_finished(tmp_path):
    from typer.testing import CliRunner

    import kvdiag.cli

    (tmp_path / "small.yaml").write_text(SMALL_STUDY)
    out = tmp_path / "rep"
    base = [
        "reproduce",
        "--model",
        "tiny-llama",
        "--config",
        tmp_path / "small.yaml",
        "--out",
        out,
        "--stages",
        "spectrum,needle",
    ]  # fmt: skip  (recall and the report: the same path as spectrum)
    done = torchrun(tmp_path, *base)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("[1/3] spectrum: done", "[2/3] recall: not selected", "[3/3] eval_needle: done",
                 "partial: 1 of 3 stages left (recall)"):  # fmt: skip
        assert done.stderr.count(line) == 1, line  # rank 0 alone decides and prints
    assert (out / "spectrum" / "spectrum.parquet").exists() and not (out / "recall").exists()
    # one sample: rank 1 had no share of eval_needle and waited (reproduce allows idle ranks)
    assert len(cells(out / "eval_needle")) == 9 and rank_files(out / "eval_needle") == []
    assert json.loads((out / "manifest.json").read_text())["stages"]["eval_needle"]["status"] == "complete"

    if not kvdiag.cli.app.registered_commands:
        kvdiag.cli._register()
    again = CliRunner().invoke(kvdiag.cli.app, [str(a) for a in base])  # one process, the same command
    assert again.exit_code == 0, again.output
    assert "spectrum: already in" in again.output and "eval_needle: already in" in again.output


def test_samples_are_shared_round_robin_and_a_surplus_of_ranks_is_refused():
    ids = [f"s{i}" for i in range(5)]
    assert [shard_samples(ids, Ranks(rank, 2)) for rank in (0, 1)] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert shard_samples(ids, Ranks()) == ids  # one process: everything
    with pytest.raises(KvdiagError, match=r"torchrun started 3 ranks but only 2 sample\(s\) have cells left.*"
                                          r"use --nproc-per-node 2 or fewer"):  # fmt: skip
        shard_samples(ids[:2], Ranks(0, 3))
    with pytest.raises(KvdiagError, match="only 1 sample.*--nproc-per-node 1 or run without torchrun"):
        shard_samples(ids[:1], Ranks(1, 2))
    assert shard_samples(ids[:1], Ranks(1, 2), idle_ok=True) == []  # reproduce's small stages: rank 1 waits
    assert shard_samples([], Ranks(1, 4)) == []  # nothing left: nothing to refuse


def test_methods_are_shared_round_robin_with_all_their_samples_and_ranks_share_gpus():
    from types import SimpleNamespace

    cells = [SimpleNamespace(sample=SimpleNamespace(id=s), label=m, budget=b)
             for s in ("s0", "s1") for m, b in (("exact", 1.0), ("oracle", 0.25), ("oracle", 0.5), ("yakv", 0.25))]  # fmt: skip
    mine = [
        [(c.sample.id, c.label, c.budget) for c in shard_cells(cells, Ranks(r, 3), "methods")]
        for r in range(3)
    ]
    assert mine == [[("s0", "exact", 1.0), ("s0", "yakv", 0.25), ("s1", "exact", 1.0), ("s1", "yakv", 0.25)],
                    [("s0", "oracle", 0.25), ("s1", "oracle", 0.25)], [("s0", "oracle", 0.5), ("s1", "oracle", 0.5)]]  # fmt: skip
    assert shard_cells(cells, Ranks(), "methods") == cells
    assert [c.sample.id for c in shard_cells(cells, Ranks(1, 2), "samples")] == ["s1"] * 4
    with pytest.raises(
        KvdiagError, match=r"5 ranks but only 4 method configuration\(s\).*--nproc-per-node 4"
    ):
        shard_cells(cells, Ranks(0, 5), "methods")
    assert shard_cells(cells, Ranks(4, 5), "methods", idle_ok=True) == []
    with pytest.raises(KvdiagError, match="shard_by 'layers' is unknown"):
        shard_cells(cells, Ranks(), "layers")
    assert [gpu_of(r, 1) for r in range(3)] == [0, 0, 0] and [gpu_of(r, 2) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(KvdiagError, match="no GPU"):
        gpu_of(0, 0)


def row(sample: str, method: str = "exact") -> dict:
    return {"sample_id": sample, "method": method, "budget": 1.0, "prediction": sample}


def test_the_merge_orders_new_cells_skips_known_ones_and_survives_a_crash(tmp_path):
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (tmp_path / "predictions.jsonl").write_text(lines([row("a")]))
    rank_file(tmp_path, 0).write_text(lines([row("c"), row("a"), row("x")]))
    rank_file(tmp_path, 1).write_text(lines([row("b")]) + '{"sample_id": "d", "meth')  # torn by a kill
    rank_file(tmp_path, 10).write_text(lines([row("c")]))
    order = [(s, "exact", "1.0") for s in "abcd"]
    assert [p.name for p in rank_files(tmp_path)] == [f"predictions.rank{r}.jsonl" for r in (0, 1, 10)]
    assert merge_rank_files(tmp_path, order) == 3  # b, c and x; a was there, the second c is a duplicate
    assert [r["sample_id"] for r in read_predictions(tmp_path)] == ["a", "b", "c", "x"]  # x: not in order
    assert rank_files(tmp_path) == [] and merge_rank_files(tmp_path, order) == 0

    # a crash after the rename and before the rank files went: the next merge adds nothing twice
    rank_file(tmp_path, 1).write_text(lines([row("b"), row("d")]))
    assert merge_rank_files(tmp_path, order) == 1
    assert [r["sample_id"] for r in read_predictions(tmp_path)] == ["a", "b", "c", "x", "d"]


@pytest.mark.parametrize("code,expected", [(None, 0), (0, 0), (3, None), ("bad value", None)])
def test_a_torchrun_rank_that_succeeded_ends_through_os_exit(monkeypatch, code, expected):
    """Under torchrun the CLI ends a rank that succeeded with os._exit(0) (gloo threads must not
    outlive the interpreter's finalisation); a rank that failed, and a plain process, exit normally
    (a failed rank leaving at once would cut off the other ranks' error lines)."""
    import kvdiag.cli
    import kvdiag.eval.distributed as distributed

    ended = []

    class Ended(Exception):
        pass

    def fake_exit(status):
        ended.append(status)
        raise Ended

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    monkeypatch.setattr(distributed, "_shutdown", lambda: ended.append("destroyed"))
    monkeypatch.setattr(kvdiag.cli, "_register", lambda: None)
    monkeypatch.setattr(kvdiag.cli, "app", lambda: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(distributed, "_current", Ranks())  # a single process: SystemExit as usual
    with pytest.raises(SystemExit):
        kvdiag.cli.main()
    assert ended == []
    monkeypatch.setattr(distributed, "_current", Ranks(rank=1, world=2))
    with pytest.raises(SystemExit if expected is None else Ended):
        kvdiag.cli.main()
    assert ended == ([] if expected is None else ["destroyed", expected])
