"""Per-head context intensity (`kvdiag.analysis.heads`, `kvdiag heads`): needs on hand-worked attention
patterns, a numpy brute-force reference on a captured trace, the budget allocation on hand cases, the
calibration file, and the command (tables, figures, one-line errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.analysis.heads import (
    HeadCalibration,
    allocate_budget,
    group_needs,
    head_needs,
    layer_needs,
    load_calibration,
    save_calibration,
    summarize_needs,
    tokens_to_cover,
)
from kvdiag.errors import KvdiagError

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

TAUS = (0.5, 0.9, 0.99)


def one_hot_keys(n_tokens: int, hot: list[int], d: int = 4, strength: float = 60.0):
    """Keys [1, L, d] and queries [H_q, L, d] where query head g scores `strength` on token hot[g]
    and 0 elsewhere: its attention over the context is e^60 : 1 on that token, i.e. all of it."""
    k = torch.zeros(1, n_tokens, d)
    q = torch.zeros(len(hot), n_tokens, d)
    for g, token in enumerate(hot):
        k[0, token, g] = 1.0
        q[g, :, g] = strength
    return q, k


# --- the need: hand-worked attention patterns -------------------------------------------------------


def test_all_mass_on_one_token_needs_one_token():
    weights = torch.zeros(3, 50)
    weights[0, 7] = weights[1, 0] = weights[2, 49] = 1.0
    assert tokens_to_cover(weights, TAUS).tolist() == [[1, 1, 1]] * 3
    # through exact attention: the query's logit on token 5 is 60, on every other context token 0
    q, k = one_hot_keys(40, [5])
    union, head, _ = layer_needs(q, k, torch.arange(30, 40), scaling=1.0, taus=TAUS)
    assert union.shape == (1, 10, 3)
    assert (union == 1).all() and (head == 1).all()


@pytest.mark.parametrize("n_context", [1, 10, 37, 100, 1000])
def test_uniform_attention_needs_ceil_tau_times_l0(n_context):
    hand = {1: [1, 1, 1], 10: [5, 9, 10], 37: [19, 34, 37], 100: [50, 90, 99], 1000: [500, 900, 990]}
    assert [math.ceil(t * n_context - 1e-9) for t in TAUS] == hand[n_context]  # ⌈τ·L0⌉, worked by hand
    assert tokens_to_cover(torch.full((n_context,), 0.25), TAUS).tolist() == hand[n_context]
    # zero queries: every logit is 0, attention is uniform over the context (and over the tail,
    # which is excluded from the count and from the normalisation)
    q, k = torch.zeros(2, n_context + 6, 8), torch.randn(1, n_context + 6, 8)
    union, head, context_mass = layer_needs(q, k, torch.arange(n_context, n_context + 6), 0.125, taus=TAUS)
    assert (head == np.array(hand[n_context])).all()
    # query at p sees p + 1 tokens, L0 of them context: uniform attention puts L0 / (p + 1) there
    np.testing.assert_allclose(context_mass[0], n_context / (np.arange(n_context, n_context + 6) + 1))
    assert (union == np.array(hand[n_context])).all()  # both heads pick the same tokens (ties → earliest)


def test_uneven_weights_hand_case():
    # sorted 0.5, 0.3, 0.1, 0.1 (order shuffled): 50 % needs 1 token, 90 % needs 3 (0.5+0.3+0.1), 99 % all 4
    # (float64: in float32 0.1 + 0.5 + 0.1 + 0.3 is 1 + 1.5e-8, and 0.5 is then a hair under half)
    weights = torch.tensor([0.1, 0.5, 0.1, 0.3], dtype=torch.float64)
    assert tokens_to_cover(weights, TAUS).tolist() == [1, 3, 4]
    # unnormalised weights are renormalised over the context: the same shares
    assert tokens_to_cover(10 * weights, TAUS).tolist() == [1, 3, 4]


def test_gqa_heads_on_disjoint_single_tokens_have_union_two():
    weights = torch.zeros(2, 1, 20)
    weights[0, 0, 3] = weights[1, 0, 11] = 1.0
    per_head, union = group_needs(weights, n_kv_heads=1, taus=TAUS)
    assert per_head.tolist() == [[[1, 1, 1]], [[1, 1, 1]]]
    assert union.tolist() == [[[2, 2, 2]]]
    # the same through exact attention: KV head 0 serves query heads 0 and 1 (tokens 2 and 9),
    # KV head 1 serves query heads 2 and 3, both on token 4
    q, k0 = one_hot_keys(24, [2, 9, 4, 4])
    k = k0.repeat(2, 1, 1)
    union, head, _ = layer_needs(q, k, torch.arange(16, 24), scaling=1.0, taus=TAUS)
    assert (union[0] == 2).all() and (union[1] == 1).all() and (head == 1).all()


def test_overlapping_group_union_hand_case():
    # head A: 0.6, 0.4 on tokens 0, 1; head B: 0.45, 0.55 on tokens 1, 2. At 90 % each needs its 2
    # tokens, the union is {0, 1, 2} = 3; at 50 % A needs {0}, B needs {2}: union 2
    weights = torch.tensor([[[0.6, 0.4, 0.0, 0.0]], [[0.0, 0.45, 0.55, 0.0]]])
    per_head, union = group_needs(weights, 1, TAUS)
    assert per_head[:, 0].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert union[0, 0].tolist() == [2, 3, 3]


def brute_force_needs(q, k, positions, scaling, tau):
    """numpy: per KV head and query, the union of the group's top sets, the mean of their sizes and
    the group's mean share of causal attention on the context (query head g reads KV head g // G)."""
    q, k = q.double().numpy(), k.double().numpy()
    n_kv, group, n_ctx = k.shape[0], q.shape[0] // k.shape[0], int(positions[0])
    union, head, mass = (np.zeros((n_kv, len(positions))) for _ in range(3))
    for h in range(n_kv):
        for i, p in enumerate(positions.tolist()):
            chosen, sizes, shares = set(), [], []
            for g in range(h * group, (h + 1) * group):
                causal = np.exp(k[h, : p + 1] @ q[g, p] * scaling)
                shares.append(causal[:n_ctx].sum() / causal.sum())
                w = causal[:n_ctx] / causal[:n_ctx].sum()
                order = np.argsort(-w, kind="stable")
                size = next(j + 1 for j in range(n_ctx) if w[order[: j + 1]].sum() >= tau - 1e-9)
                chosen |= set(order[:size].tolist())
                sizes.append(size)
            union[h, i], head[h, i], mass[h, i] = len(chosen), np.mean(sizes), np.mean(shares)
    return union, head, mass


def synthetic_trace(n_q: int, n_kv: int, n_tokens: int, seed: int):
    """A Trace of random, strongly peaked attention (q, k ~ N(0, 2²)), one layer, no sliding window."""
    from kvdiag.capture import Trace

    gen = torch.Generator().manual_seed(seed)
    tensors = {"layers.0.q": 2 * torch.randn(n_q, n_tokens, 8, generator=gen),
               "layers.0.k_post": 2 * torch.randn(n_kv, n_tokens, 8, generator=gen)}  # fmt: skip
    info = {"0": {"scaling": 8**-0.5, "sliding_window": None, "softcap": None, "group": n_q // n_kv}}
    return Trace(tensors, {"layers": [0], "n_tokens": n_tokens, "layer_info": info})


@pytest.mark.parametrize("n_q, n_kv", [(6, 2), (4, 4), (8, 1)])
def test_peaked_attention_needs_match_a_numpy_brute_force(n_q, n_kv):
    trace = synthetic_trace(n_q, n_kv, 70, seed=n_q + n_kv)
    positions = torch.arange(50, 70)
    table = head_needs(trace, positions, taus=TAUS, progress=False, chunk_size=7)
    assert table.need_union.nunique() > 5  # peaked and varied: the check below is not about ⌈τ·L0⌉
    for tau in TAUS:
        union, head, mass = brute_force_needs(trace.q(0), trace.k_post(0), positions, 8**-0.5, tau)
        rows = table[table.tau == tau].sort_values(["kv_head", "query_position"])
        np.testing.assert_array_equal(rows.need_union.to_numpy(), union.reshape(-1))
        np.testing.assert_allclose(rows.need_head.to_numpy(), head.reshape(-1))
        np.testing.assert_allclose(rows.context_mass.to_numpy(), mass.reshape(-1), rtol=1e-6)


def test_trace_needs_match_a_numpy_brute_force(tiny):
    from kvdiag.capture import capture_prompt

    torch.manual_seed(0)
    model, tokenizer = tiny("tiny-llama")
    trace = capture_prompt(model, tokenizer, "The archive was moved to a new building in 1999. " * 3)
    positions = torch.tensor([120, 125, trace.n_tokens - 1])
    table = head_needs(trace, positions, taus=(0.5, 0.9), progress=False)
    assert table.attrs["heads"]["n_context"] == 120
    assert set(table.columns) >= {"layer", "kv_head", "tau", "query_position", "need_union", "need_head"}
    for layer in (0, 3):
        info = trace.layer_meta(layer)
        for tau in (0.5, 0.9):
            union, head, mass = brute_force_needs(trace.q(layer), trace.k_post(layer), positions,
                                                  info["scaling"], tau)  # fmt: skip
            rows = table[(table.layer == layer) & (table.tau == tau)].sort_values(
                ["kv_head", "query_position"]
            )
            np.testing.assert_array_equal(rows.need_union.to_numpy(), union.reshape(-1))
            np.testing.assert_allclose(rows.need_head.to_numpy(), head.reshape(-1))
            np.testing.assert_allclose(rows.context_mass.to_numpy(), mass.reshape(-1), rtol=1e-6)


def test_sliding_window_layers_are_skipped_and_a_group_of_four_matches_numpy(tiny):
    from kvdiag.capture import capture_prompt

    model, tokenizer = tiny("tiny-gemma3")  # window 32 on layers 0-2, full layer 3; 4 query heads, 1 KV head
    trace = capture_prompt(
        model, tokenizer, "Weather delayed two shipments that spring; no records were lost."
    )
    positions = torch.arange(trace.n_tokens - 8, trace.n_tokens)
    table = head_needs(trace, positions, taus=(0.9,), progress=False)
    assert sorted(table.attrs["heads"]["skipped_layers"]) == ["0", "1", "2"]
    assert table.layer.unique().tolist() == [3]
    union, head, mass = brute_force_needs(
        trace.q(3), trace.k_post(3), positions, trace.layer_meta(3)["scaling"], 0.9
    )
    np.testing.assert_array_equal(table.sort_values("query_position").need_union.to_numpy(), union[0])
    np.testing.assert_allclose(table.sort_values("query_position").need_head.to_numpy(), head[0])


def test_summarize_spread_over_queries_hand_case():
    per_query = pd.DataFrame({"layer": 0, "kv_head": 0, "tau": 0.9, "query_position": [10, 11, 12, 13],
                              "n_context": 10, "need_union": [1, 2, 3, 10], "need_head": [1.0, 1, 1, 1],
                              "context_mass": [0.2, 0.4, 0.6, 0.8]})  # fmt: skip
    summary = summarize_needs(per_query).set_index("measure")
    union = summary.loc["union"]
    # mean 4, population std √((9 + 4 + 1 + 36) / 4) = √12.5, median (2 + 3) / 2
    assert (union.tokens_mean, union.tokens_min, union.tokens_median, union.tokens_max) == (4, 1, 2.5, 10)
    assert union.tokens_std == pytest.approx(math.sqrt(12.5))
    assert union.fraction_median == pytest.approx(0.25) and union.fraction_max == pytest.approx(1.0)
    assert union.n_queries == 4 and summary.loc["head"].tokens_std == 0
    assert union.context_mass_mean == pytest.approx(0.5)


def test_bad_needs_input():
    with pytest.raises(KvdiagError, match="tau 1.5 must be"):
        tokens_to_cover(torch.ones(4), (0.5, 1.5))
    with pytest.raises(KvdiagError, match="not a multiple"):
        group_needs(torch.ones(3, 1, 4), 2)


# --- allocation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "need, total, low, high, expected",
    [
        ([1, 1, 2], 8, 1, None, [2, 2, 4]),  # exactly proportional
        ([1, 2, 3, 4], 10, 1, None, [1, 2, 3, 4]),
        ([0.5, 0.25, 0.25], 7, 1, None, [3, 2, 2]),  # 3.5, 1.75, 1.75: floors 3, 1, 1; +1 to the .75s
        ([1, 1, 1], 10, 1, None, [4, 3, 3]),  # ties go to the lower head
        ([0, 1, 9], 12, 1, None, [1, 1, 10]),  # zero need gets the minimum; 1.1, 9.9 -> 1, 10
        ([1, 1, 8], 12, 1, 6, [3, 3, 6]),  # capped at 6, the rest split 1:1
        ([0, 0, 0], 13, 1, None, [5, 4, 4]),  # no need anywhere: even split
        ([0, 5], 10, 2, 6, [4, 6]),  # the needy head is full: the rest goes to the zero-need head
        ([3, 1], 0, 0, None, [0, 0]),
    ],
)
def test_allocate_budget_hand_cases(need, total, low, high, expected):
    tokens = allocate_budget(np.array(need, dtype=float), total, min_per_head=low, max_per_head=high)
    assert tokens.tolist() == expected
    assert tokens.dtype == np.int64


def test_allocate_budget_sums_and_bounds_on_random_needs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        need = rng.exponential(size=n) * (rng.random(n) < 0.8)
        low = int(rng.integers(0, 4))
        high = None if rng.random() < 0.3 else int(rng.integers(low + 1, low + 200))
        total = int(rng.integers(low * n, (high or 300) * n + 1))
        tokens = allocate_budget(torch.tensor(need), total, low, high)
        assert tokens.sum() == total
        assert (tokens >= low).all() and (high is None or (tokens <= high).all())


def test_allocate_budget_errors():
    with pytest.raises(KvdiagError, match=r"total_tokens 2 cannot be split over 3 KV heads"):
        allocate_budget([1, 1, 1], 2)
    with pytest.raises(KvdiagError, match=r"\[3, 18\]"):
        allocate_budget([1, 1, 1], 20, max_per_head=6)
    with pytest.raises(KvdiagError, match="finite and ≥ 0"):
        allocate_budget([1, -1], 10)
    with pytest.raises(KvdiagError, match="finite and ≥ 0"):
        allocate_budget([1, float("nan")], 10)
    with pytest.raises(KvdiagError, match="1-D"):
        allocate_budget([[1, 2]], 10)
    with pytest.raises(KvdiagError, match="max_per_head 1 is below min_per_head 2"):
        allocate_budget([1, 2], 4, min_per_head=2, max_per_head=1)
    with pytest.raises(KvdiagError, match="total_tokens 2.5 must be an integer"):
        allocate_budget([1, 2], 2.5)


# --- calibration file --------------------------------------------------------------------------------


def test_calibration_round_trip_and_errors(tmp_path):
    calibration = HeadCalibration(model="tiny-llama", tau=0.9, need={0: [0.1, 0.3], 2: [0.05, 0.0]},
                                  source={"task": "text2json", "sample_ids": ["a", "b"]})  # fmt: skip
    path = save_calibration(calibration, tmp_path)
    assert path.name == "heads_calibration.json"
    data = json.loads(path.read_text())
    assert data["format"] == "kvdiag.heads_calibration"
    assert data["layers"] == {"0": [0.1, 0.3], "2": [0.05, 0.0]}
    loaded = load_calibration(tmp_path)
    assert loaded == calibration
    assert loaded.layer_need(2).tolist() == [0.05, 0.0]
    with pytest.raises(KvdiagError, match="no layer 1"):
        loaded.layer_need(1)
    with pytest.raises(KvdiagError, match="no head calibration"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(KvdiagError, match="not valid JSON"):
        load_calibration(bad)
    bad.write_text(json.dumps({**data, "layers": {"0": [0.1, -1]}}))
    with pytest.raises(KvdiagError, match="negative or non-finite"):
        load_calibration(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(KvdiagError, match="not a kvdiag head calibration"):
        load_calibration(bad)


# --- the command ------------------------------------------------------------------------------------

KEY_COLUMNS = "task sample layer kv_head tau measure n_context n_queries context_mass_mean".split()
STATS = ("mean", "std", "min", "median", "max")
COLUMNS = KEY_COLUMNS + [f"{unit}_{stat}" for unit in ("tokens", "fraction") for stat in STATS]
FIGURES = sorted(f"{name}.{ext}" for name in ("need_heatmap", "need_comparison") for ext in ("png", "pdf"))


def heads_cli(*args):
    return CliRunner().invoke(kvdiag.cli.app, ["heads", *map(str, args)], env={"KVDIAG_DEBUG": None})


def check_heads_run(out, tasks):
    assert sorted(p.name for p in out.iterdir()) == ["figures", "heads.parquet", "heads_calibration.json",
                                                     "manifest.json"]  # fmt: skip
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    table = pd.read_parquet(out / "heads.parquet")
    assert list(table.columns) == COLUMNS
    assert list(dict.fromkeys(table.task)) == tasks
    assert sorted(table.layer.unique()) == [0, 1, 2, 3] and sorted(table.kv_head.unique()) == [0, 1]
    assert sorted(table.tau.unique()) == list(TAUS) and sorted(table.measure.unique()) == ["head", "union"]
    assert (table.tokens_min <= table.tokens_median).all() and (table.tokens_median <= table.tokens_max).all()
    assert (table.tokens_max <= table.n_context).all() and (table.tokens_min >= 1).all()
    wide = table.pivot_table(index=["task", "sample", "layer", "kv_head", "tau"], columns="measure",
                             values="tokens_mean")  # fmt: skip
    assert (wide["head"] <= wide["union"] + 1e-9).all() and (wide["union"] <= 2 * wide["head"] + 1e-9).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "heads" and manifest["calibration"] == "heads_calibration.json"
    calibration = load_calibration(out)
    assert calibration.model == "tiny-llama" and sorted(calibration.need) == [0, 1, 2, 3]
    return table, manifest, calibration


def test_heads_on_a_prompt(tmp_path):
    out = tmp_path / "run"
    text = "Record R-0012: Priya Sato (beekeeper, Hobart) - 17 sextants, filed 1999. " * 3
    result = heads_cli("--model", "tiny-llama", "--text", text, "--queries", 12, "--out", out)
    assert result.exit_code == 0, result.output
    table, manifest, calibration = check_heads_run(out, ["prompt"])
    n_tokens = len(text.encode()) + 1  # byte tokenizer plus <bos>
    assert (table.n_context == n_tokens - 12).all() and (table.n_queries == 12).all()
    assert manifest["config"]["queries"] == 12 and manifest["config"]["prompt_source"] == "--text"
    assert "prompt:" in result.stdout and "median union need at τ = 0.9" in result.stdout
    at_90 = table[(table.measure == "union") & (table.tau == 0.9)].set_index(["layer", "kv_head"])
    assert calibration.layer_need(3).tolist() == at_90.loc[3].fraction_median.tolist()


def test_heads_on_a_task_with_the_needle_baseline(tmp_path):
    out = tmp_path / "run"
    result = heads_cli("--model", "tiny-llama", "--task", "text2json", "--task-knob", "n_entities=1",
                       "--task-knob", "n_distractors=0", "--n", 1, "--target-tokens", 900, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    table, manifest, calibration = check_heads_run(out, ["text2json", "needle"])
    samples = manifest["samples"]
    assert [s["task"] for s in samples] == ["text2json", "needle"]
    for s in samples:  # teacher forcing: the queries are the gold answer's tokens, the context the prompt
        assert s["n_queries"] == s["answer_tokens"] and s["n_tokens"] == s["n_context"] + s["answer_tokens"]
        assert (table[table["sample"] == s["sample"]].n_context == s["n_context"]).all()
    config = manifest["config"]
    assert config["needle_baseline"] and config["task_knobs"]["text2json"]["n_entities"] == 1
    assert calibration.source["task"] == "text2json"
    assert calibration.source["sample_ids"] == [samples[0]["sample"]]
    redraw = CliRunner().invoke(kvdiag.cli.app, ["plot", str(out)])
    assert redraw.exit_code == 0, redraw.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "text2jsn"], "unknown task 'text2jsn'; did you mean 'text2json'?"),
        (["--task", "needle", "--n", "0"], "--n 0 must be an integer ≥ 1"),
        (["--task", "needle", "--text", "hi"], "give --task or a prompt (--text / --prompt-file), not both"),
        (["--task", "needle", "--prompt-file", "p.txt"], "give --task or a prompt"),
        (["--text", "hi", "--prompt-file", "p.txt"], "give either --prompt-file or --text, not both"),
        (["--prompt-file", "missing.txt"], "prompt file missing.txt does not exist"),
        (["--text", "hello", "--queries", "10"], "the prompt has 6 tokens: --queries 10 leaves no context"),
        (["--text", "hello", "--taus", "0.5,2"], "tau 2.0 must be a number in (0, 1]"),
        (["--text", "hello", "--taus", "a"], "--taus 'a' is not a ','-separated list"),
        (["--text", "hello", "--taus", "0.5", "--queries", "2"], "calibration tau 0.9 is not among"),
        (["--text", "hello", "--task-knob", "n_entities=2"], "--task-knob needs --task"),
        (["--task", "text2json", "--task-knob", "colour=red"], "unknown knob of task 'text2json' 'colour'"),
        (["--text", "hello", "--queries", "2", "--layers", "7"], "layer index 7 is out of range"),
    ],
)
def test_heads_bad_input_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = heads_cli("--model", "tiny-llama", "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvdiag: error: ") and message in lines[0], result.stderr
    assert not out.exists()
