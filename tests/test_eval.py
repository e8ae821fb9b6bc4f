"""The eval harness on tiny-llama: outputs and their columns, resuming (also after an interrupt),
exact = oracle at full budget = a hand-written greedy loop, and bad inputs that fail before anything
is written (growing a run and its conflicts: test_eval_resume.py)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import kvdiag.cli
import kvdiag.eval.harness as evaluate
from kvdiag.errors import KvdiagError
from kvdiag.eval.harness import parse_task_knobs, run_eval, score_table
from kvdiag.tasks import get_task

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

TINY = dict(model="tiny-llama", task="needle", n=2, target_tokens=600, max_new_tokens=8, progress=False)
COLUMNS = [
    "sample_id", "task", "method", "method_spec", "budget", "budget_tokens", "budget_fraction",
    "prompt_tokens", "n_facts", "score", "kl_mean", "top1_agree", "gold_logprob_exact",
    "gold_logprob_method", "answer_tokens", "resident_bytes_per_token", "fetched_tokens_per_step",
    "fetched_bytes_per_step", "decode_steps", "tokens_generated", "hit_cap", "wall_s",
    "attended_tokens_per_step",
]  # fmt: skip
# tiny-llama: 2 KV heads × head_dim 16, bf16 → K+V = 2·16·2·2 bytes per token and layer
KV_BYTES = 2 * 2 * 16 * 4  # K and V, 2 KV heads, d = 16, fp32 as the tiny model computes


pytestmark = pytest.mark.usefixtures("one_thread")


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    result = run_eval(**TINY, out=out, methods=["oracle", "streaming:sinks=2"], budgets=[0.0625, 0.25])
    from kvdiag.plots import plot_run

    plot_run(out)  # what `kvdiag eval` does once a run is complete
    return out, result


def test_a_run_writes_predictions_table_manifest_and_figures(full_run, tiny):
    out, result = full_run
    rows = lines(out / "predictions.jsonl")
    assert len(rows) == result["cells"] == 2 * (1 + 2 * 2)
    assert {(r["method"], r["budget"]) for r in rows} == {
        ("exact", 1.0), ("oracle", 0.0625), ("oracle", 0.25), ("streaming:sinks=2", 0.0625), ("streaming:sinks=2", 0.25)
    }  # fmt: skip
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns) == COLUMNS
    for row in table.itertuples():
        assert row.budget_tokens == (
            row.prompt_tokens if row.method == "exact" else math.ceil(row.budget * row.prompt_tokens)
        )
        # per token of the method's index: the shared prefill indexes the first L - 1 prompt tokens
        expected_bytes = {"exact": KV_BYTES, "oracle": KV_BYTES / 2}.get(
            row.method, KV_BYTES * row.budget_tokens / (row.prompt_tokens - 1)
        )
        assert row.resident_bytes_per_token == pytest.approx(
            expected_bytes
        )  # streaming keeps K+V of its window
        assert row.hit_cap == (row.tokens_generated == 8)  # random weights never pick <eos> here
        assert 0 <= row.score <= 100
        if row.method != "exact":
            assert row.kl_mean >= 0 and 0 <= row.top1_agree <= 1 and row.answer_tokens >= 2
    assert (table.loc[table.method == "streaming:sinks=2", "fetched_bytes_per_step"] == 0).all()
    oracle = table[table.method == "oracle"]
    assert (oracle.fetched_tokens_per_step == oracle.budget_tokens).all()  # top-k: exactly k per KV head

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "eval" and manifest["status"] == "complete"
    assert manifest["config"]["methods"] == ["oracle", "streaming:sinks=2"]
    assert manifest["methods"][1]["knobs"] == {"sinks": 2} and manifest["chat_used"] is True
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{f}.{e}"
        for f in ("score_vs_budget", "score_vs_bytes", "fidelity_vs_budget")
        for e in ("png", "pdf")
    )
    summary = score_table(out)
    assert list(summary.method) == ["exact", "oracle", "oracle", "streaming:sinks=2", "streaming:sinks=2"]
    assert (summary.n == 2).all()
    assert summary.score_mean.tolist() == pytest.approx(
        table.groupby(["method", "budget"]).score.mean().tolist()
    )

    # exact is greedy decoding: the same tokens as a hand-written argmax loop without a cache
    model, tokenizer = tiny("tiny-llama")
    sample = get_task("needle").samples(1, seed=0, tokenizer=tokenizer, target_tokens=600)[0]
    ids = tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # fmt: skip
    with torch.inference_mode():
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    exact = next(r for r in rows if r["method"] == "exact" and r["sample_id"] == sample.id)
    assert exact["prediction"] == tokenizer.decode(ids[0, -8:], skip_special_tokens=True)


def count_generations(monkeypatch, fail_on: int | None = None) -> list:
    """Wrap the harness's batched decoder: record each decoded cell's method; raise KeyboardInterrupt
    when cell number `fail_on` is about to be decoded (batch size 1: one cell per call)."""
    calls, real = [], evaluate.decode_cells

    def wrapped(cells, *args, **kwargs):
        for cell in cells:
            calls.append(cell.method)
            if fail_on is not None and len(calls) == fail_on:
                raise KeyboardInterrupt
        return real(cells, *args, **kwargs)

    monkeypatch.setattr(evaluate, "decode_cells", wrapped)
    return calls


def test_a_rerun_skips_every_finished_cell(full_run, monkeypatch):
    out, first = full_run
    before = (out / "predictions.jsonl").read_bytes()
    calls = count_generations(monkeypatch)
    again = run_eval(**TINY, out=out, methods=["oracle", "streaming:sinks=2"], budgets=[0.0625, 0.25])
    assert calls == [] and again["new_cells"] == 0 and again["cells"] == first["cells"]
    assert (out / "predictions.jsonl").read_bytes() == before


def test_an_interrupted_run_keeps_finished_cells_and_completes(tmp_path, monkeypatch):
    args = dict(**TINY, out=tmp_path / "run", methods=["oracle"], budgets=[0.25], fidelity=False)
    count_generations(monkeypatch, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_eval(**args)
    assert len(lines(tmp_path / "run" / "predictions.jsonl")) == 2
    assert not (tmp_path / "run" / "results.parquet").exists()
    calls = count_generations(monkeypatch)
    result = run_eval(**args)
    assert len(calls) == result["new_cells"] == 2
    rows = lines(tmp_path / "run" / "predictions.jsonl")
    assert len(rows) == 4 and len({(r["sample_id"], r["method"], r["budget"]) for r in rows}) == 4


def test_oracle_at_full_budget_predicts_what_exact_predicts(tmp_path):
    run_eval(**TINY, out=tmp_path / "run", methods=["oracle"], budgets=[1.0])
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    rows = lines(tmp_path / "run" / "predictions.jsonl")
    by_method = {
        m: {r["sample_id"]: r["prediction"] for r in rows if r["method"] == m} for m in ("exact", "oracle")
    }
    assert by_method["oracle"] == by_method["exact"] and len(by_method["exact"]) == 2
    oracle = table[table.method == "oracle"]
    assert (oracle.kl_mean < 1e-6).all() and (oracle.top1_agree == 1).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "neeedle"}, "unknown task 'neeedle'; did you mean 'needle'"),
        ({"task_knobs": {"deth": 10.0}}, "did you mean 'depth'"),
        ({"methods": ["orcle"]}, "unknown method 'orcle'; did you mean 'oracle'"),
        ({"methods": ["shadowkv:rnk=4"]}, "did you mean 'rank'"),
        ({"model": "tiny-lama"}, "unknown model 'tiny-lama'; did you mean 'tiny-llama'"),
        ({"budgets": [0.0]}, r"outside \(0, 1\]"),
        ({"budgets": [1.5]}, "invalid; give a fraction"),
        ({"budgets": [100000]}, r"exceeds the prompt.s \d+ tokens"),
        ({"budgets": []}, "no budgets"),
        ({"n": 0}, "n must be an integer ≥ 1"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be an integer ≥ 1"),
        ({"target_tokens": 5000}, "more than tiny-llama's context of 2048"),
        ({"max_new_tokens": 1800}, "exceed tiny-llama's context of 2048"),
        ({"data_dir": "/nonexistent/data"}, "no data for task 'needle'"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, change, message):
    out = tmp_path / "run"
    with pytest.raises(KvdiagError, match=message):
        run_eval(**{**TINY, "out": out, "methods": ["oracle"], "budgets": [0.25], **change})
    assert not out.exists()


def test_an_unwritable_out_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KvdiagError, match="not a writable directory"):
        run_eval(**TINY, out=tmp_path / "file" / "run", methods=["oracle"])


def test_a_data_dir_one_level_too_deep_gets_a_hint(tmp_path):
    (tmp_path / "longproc_html_to_tsv").mkdir()
    (tmp_path / "longproc_html_to_tsv" / "html_to_tsv_0.5k.json").write_text("[]")
    with pytest.raises(KvdiagError, match=f"it is under {tmp_path}"):
        run_eval(
            **{**TINY, "task": "html2tsv"}, out=tmp_path / "run", data_dir=tmp_path / "longproc_html_to_tsv"
        )


@pytest.mark.parametrize(
    "task, knobs",
    [("text2json", {"n_entities": 3, "n_distractors": 1}), ("needle", {}), ("multineedle", {"depths": [0.0, 50.0]}),
     ("html2tsv_synthetic", {})],
)  # fmt: skip
def test_the_serialised_gold_answer_gets_full_marks(task, knobs):
    task_obj = get_task(task, **knobs)
    for sample in task_obj.samples(2, seed=1, target_tokens=4096):
        assert task_obj.score(task_obj.answer_text(sample), sample) == 100.0


def test_task_knobs_from_the_command_line_take_their_defaults_types():
    assert parse_task_knobs("multineedle", ["depths=0,50,100", "case_sensitive=true"]) == {
        "depths": [0.0, 50.0, 100.0], "case_sensitive": True
    }  # fmt: skip
    assert parse_task_knobs("text2json", ["n_entities=4", "domain=movies"]) == {
        "n_entities": 4,
        "domain": "movies",
    }
    with pytest.raises(KvdiagError, match="expected int"):
        parse_task_knobs("text2json", ["n_entities=four"])


def test_cli_eval_and_tasks(tmp_path):
    runner = CliRunner()
    env = {"KVDIAG_DEBUG": None}
    bad = runner.invoke(kvdiag.cli.app, ["eval", "--model", "tiny-llama", "--task", "needle", "--budgets", "2.5",
                                         "--out", str(tmp_path / "bad")], env=env)  # fmt: skip
    assert bad.exit_code == 2 and "invalid; give a fraction" in bad.output and not (tmp_path / "bad").exists()
    ok = runner.invoke(kvdiag.cli.app, ["eval", "--model", "tiny-llama", "--task", "needle", "--methods", "exact",
                                        "--n", "1", "--target-tokens", "600", "--max-new-tokens", "4",
                                        "--task-knob", "depth=10", "--out", str(tmp_path / "ok")], env=env)  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "1 cells (1 run now)" in ok.output
    assert (
        json.loads((tmp_path / "ok" / "manifest.json").read_text())["config"]["task_knobs"]["depth"] == 10.0
    )
    listing = runner.invoke(kvdiag.cli.app, ["tasks"], env=env)
    assert listing.exit_code == 0
    for name in ("text2json", "needle", "multineedle", "html2tsv", "n_entities=4"):
        assert name in listing.output


# --- per-method budgets ("spec@budget") -------------------------------------------------------------


def test_a_method_may_carry_its_own_budget():
    from kvdiag.eval.harness import resolve_runs, split_method_budget
    from kvdiag.methods import get_method

    assert split_method_budget("shadowkv@1.5625%") == ("shadowkv", 0.015625)
    assert split_method_budget("yakv@2048") == ("yakv", 2048)
    spec, budget = split_method_budget("arkvale:page_size=16,n_sink_pages=2,n_win_pages=5@0.78125%")
    assert (spec, budget) == ("arkvale:page_size=16,n_sink_pages=2,n_win_pages=5", 0.0078125)
    oracle = get_method("oracle")
    assert split_method_budget((oracle, "3.125%")) == (oracle, 0.03125)
    assert split_method_budget("oracle") == ("oracle", None)

    runs = resolve_runs(
        ["shadowkv@1.5625%", "shadowkv@15.625%", "yakv", (oracle, 0.03125), "exact"], [0.0625, 0.125]
    )
    assert [(r.label, r.budgets, r.pinned) for r in runs] == [
        ("shadowkv", [0.015625, 0.15625], True), ("yakv", [0.0625, 0.125], False), ("oracle", [0.03125], True)
    ]  # fmt: skip
    assert [name for r in runs for name in r.config()] == [
        "shadowkv@0.015625", "shadowkv@0.15625", "yakv", "oracle@0.03125"
    ]  # fmt: skip
    assert resolve_runs(["oracle@0.5"], []) != []  # only pinned methods: no --budgets needed
    for bad, message in [
        (["oracle@0.5", "oracle@50%"], "oracle at budget 0.5 is given twice"),
        (["oracle@0.5", "oracle"], "both with and without its own budget"),
        (["oracle@1.5"], "invalid; give a fraction"),
        (["oracle@lots"], "is not a number"),
        (["oracle"], "no budgets"),
    ]:
        with pytest.raises(KvdiagError, match=message):
            resolve_runs(bad, [])


def test_cells_follow_each_methods_own_budgets(tmp_path):
    out = tmp_path / "run"
    run_eval(**{**TINY, "n": 1}, out=out, methods=["oracle@0.25", "streaming:sinks=2", "oracle@6.25%"],
             budgets=[0.125], fidelity=False)  # fmt: skip
    rows = lines(out / "predictions.jsonl")
    assert sorted((r["method"], r["budget"]) for r in rows) == [
        ("exact", 1.0), ("oracle", 0.0625), ("oracle", 0.25), ("streaming:sinks=2", 0.125)
    ]  # fmt: skip
    assert {r["method_spec"] for r in rows if r["method"] == "oracle"} == {"oracle"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["methods"] == ["oracle@0.25", "oracle@0.0625", "streaming:sinks=2"]

    ok = CliRunner().invoke(kvdiag.cli.app, ["eval", "--model", "tiny-llama", "--task", "needle", "--n", "1",
                                             "--target-tokens", "600", "--max-new-tokens", "2", "--no-fidelity",
                                             "--methods", "oracle@25%;streaming:sinks=2@0.125", "--budgets", "0.5",
                                             "--out", str(tmp_path / "cli")], env={"KVDIAG_DEBUG": None})  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "3 cells (3 run now)" in ok.output
    assert sorted((r["method"], r["budget"]) for r in lines(tmp_path / "cli" / "predictions.jsonl")) == [
        ("exact", 1.0), ("oracle", 0.25), ("streaming:sinks=2", 0.125)
    ]  # fmt: skip


# --- one shared prefill per sample ------------------------------------------------------------------


def shared_equals_plain(model, tokenizer, text: str, new_tokens: int) -> None:
    """Exact and oracle at the full budget from a shared prefill of prompt[:-1] (the batched greedy
    decoder the harness uses) give the tokens that plain `model.generate` gives from scratch."""
    from kvdiag.eval.harness import eos_token_ids, generate_cell, prefill_prompt
    from kvdiag.methods import get_method
    from kvdiag.offload.decode import greedy_decode

    ids = tokenizer(text, return_tensors="pt").input_ids
    eos = eos_token_ids(model, tokenizer, chat=False)
    plain, _ = generate_cell(model, ids, None, 1.0, new_tokens, eos)
    prefill = prefill_prompt(model, ids)
    assert prefill.n_tokens == ids.shape[1] - 1
    shared_exact = greedy_decode(model, [prefill], new_tokens, eos).tokens[0]
    oracle = greedy_decode(model, [prefill], new_tokens, eos, method=get_method("oracle"), budget=1.0)
    assert len(plain) == new_tokens
    assert plain.tolist() == shared_exact.tolist() == oracle.tokens[0].tolist()
    # the last prompt token is the first decode step under the simulator: L - 1 tokens indexed
    assert (
        oracle.stats[0]["prompt_tokens"] == ids.shape[1] - 1 and oracle.stats[0]["decode_steps"] == new_tokens
    )
    again = greedy_decode(model, [prefill], new_tokens, eos).tokens[0]
    assert again.tolist() == plain.tolist()  # a prefill is never consumed by a decode


def test_shared_prefill_generates_what_plain_generate_does_on_tiny_llama(tiny):
    model, tokenizer = tiny("tiny-llama")
    shared_equals_plain(model, tokenizer, "The capital of France is Paris. " * 20, 8)


@pytest.mark.slow
def test_shared_prefill_generates_what_plain_generate_does_on_smollm2(smollm2):
    from kvdiag.models.prompts import sample_text

    model, tokenizer = smollm2
    text = tokenizer.decode(tokenizer(sample_text()).input_ids[:300])
    shared_equals_plain(model, tokenizer, text, 12)


def test_a_batch_of_samples_decodes_what_one_at_a_time_does(tmp_path):
    """Batched decoding (prompts of different lengths, left-padded) gives every cell the tokens, scores
    and fetched bytes of decoding its sample alone."""
    args = dict(TINY, task="text2json", target_tokens=1400, methods=["oracle", "yakv:local=8", "shadowkv:rank=8,outlier_chunks=1,local=8"],
                budgets=[0.25], n=4, fidelity=False)  # fmt: skip
    run_eval(**args, out=tmp_path / "one", batch_size=1)
    run_eval(**args, out=tmp_path / "four", batch_size=4)
    one, four = ({(r["sample_id"], r["method"]): r for r in lines(tmp_path / d / "predictions.jsonl")}
                 for d in ("one", "four"))  # fmt: skip
    assert one.keys() == four.keys() and len(one) == 4 * 4
    assert len({r["prompt_tokens"] for r in one.values()}) > 1  # prompts of different lengths
    for key, row in one.items():
        for column in ("prediction", "score", "tokens_generated", "budget_tokens"):
            assert row[column] == four[key][column], (key, column)
        for column in ("fetched_bytes_per_step", "resident_bytes_per_token"):
            assert row[column] == pytest.approx(four[key][column]), (key, column)


def test_attended_tokens_are_counted_and_a_method_over_its_budget_is_flagged(tmp_path, caplog):
    """StreamingLLM attends exactly its budget; ShadowKV's always-kept local window and outlier chunks
    make it attend more than 2× a small budget: the table says how many, the run warns."""
    import logging

    with caplog.at_level(logging.WARNING):
        run_eval(**TINY, out=tmp_path / "run", methods=["streaming:sinks=2", "shadowkv:rank=8,outlier_chunks=4,local=32"],
                 budgets=[0.0625], fidelity=False)  # fmt: skip
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    streaming = table[table.method == "streaming:sinks=2"]
    assert (streaming.attended_tokens_per_step == streaming.budget_tokens).all()
    shadow = table[table.method.str.startswith("shadowkv")]
    assert (shadow.attended_tokens_per_step > 2 * shadow.budget_tokens).all()
    assert any("shadowkv" in r.message and "attends" in r.message for r in caplog.records)
