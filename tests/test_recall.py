"""kvdiag.analysis.recall and `kvdiag recall`: metrics against written-out numpy references on hand-built traces.

References never call kvdiag.analysis.recall: exact top-k by numpy argsort, set intersections, softmax over
the attended set written out per query position and head. Method masks, keys and values come from
the methods themselves (they are tested elsewhere); what is checked here is what recall does with them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kvdiag.analysis.recall import context_layer, recall_table
from kvdiag.capture.rope import apply_rope
from kvdiag.capture.trace import Trace
from kvdiag.errors import KvdiagError
from kvdiag.methods import get_method, list_methods

ATOL = 1e-5


def make_trace(n_kv=2, group=2, n_tokens=48, d=8, layers=(3, 4), seed=0, windows=None) -> Trace:
    """A trace as capture would record it: random keys / queries / values, the model's RoPE tables."""
    gen = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n_tokens, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    tensors = {"rope.0.cos": cos, "rope.0.sin": sin, "positions": torch.arange(n_tokens)}
    info = {}
    for i in layers:
        k_pre = torch.randn(n_kv, n_tokens, d, generator=gen)
        k_pre[:, 0] *= 3  # a loud first token, like an attention sink
        tensors[f"layers.{i}.k_pre"] = k_pre
        tensors[f"layers.{i}.k_post"] = apply_rope(k_pre, cos, sin)
        tensors[f"layers.{i}.v"] = torch.randn(n_kv, n_tokens, d, generator=gen)
        tensors[f"layers.{i}.q"] = apply_rope(
            torch.randn(n_kv * group, n_tokens, d, generator=gen) * 2, cos, sin
        )
        window = (windows or {}).get(i)
        info[str(i)] = {
            "layer": i,
            "scaling": d**-0.5,
            "sliding_window": window,
            "softcap": None,
            "group": group,
        }
    meta = {
        "model": "hand-built", "n_tokens": n_tokens, "layers": list(layers), "layer_info": info,
        "rope_of_layer": {str(i): 0 for i in layers}, "dtype": "float32",
        "shapes": {"layers": max(layers) + 1, "q_heads": n_kv * group, "kv_heads": n_kv, "head_dim": d},
    }  # fmt: skip
    return Trace(tensors, meta)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def row(table, method, budget_tokens, layer, kv_head, position):
    sel = table[(table.method == method) & (table.budget_tokens == budget_tokens) & (table.layer == layer)
                & (table.kv_head == kv_head) & (table.query_position == position)]  # fmt: skip
    assert len(sel) == 1
    return sel.iloc[0]


# --- lossless cases and the oracle ----------------------------------------------------------------


def test_exact_and_full_budget_oracle_are_lossless():
    trace = make_trace()
    table = recall_table(trace, ["oracle", "exact"], [1.0], n_queries=8, progress=False)
    assert len(table) == 2 * 2 * 2 * 8  # methods × layers × KV heads × positions
    assert set(table.budget_tokens) == {40} and np.allclose(table.budget_fraction, 1.0)
    for col in ("recall", "recall_gqa", "attention_mass"):
        np.testing.assert_allclose(table[col], 1.0, atol=ATOL)
    for col in ("err_total", "err_selection", "err_key", "err_oracle"):
        np.testing.assert_allclose(table[col], 0.0, atol=ATOL)
    exact = table[table.method == "exact"]
    assert (exact.fetched_tokens == 0).all()
    np.testing.assert_allclose(
        exact.resident_bytes_per_token, 2 * 2 * 8 * 4
    )  # fp32 K and V (as captured), 2 KV heads


def test_oracle_mass_grows_with_budget_and_recalls_its_own_topk():
    trace = make_trace(seed=1)
    budgets = [1, 2, 4, 8, 0.5, 1.0]
    table = recall_table(trace, ["oracle"], budgets, n_queries=8, progress=False)
    np.testing.assert_allclose(table.recall_gqa, 1.0)  # the oracle's KV-head top-k is its own choice
    mass = table.pivot_table(index=["layer", "kv_head", "query_position"], columns="budget_tokens",
                             values="attention_mass")  # fmt: skip
    assert (np.diff(mass.to_numpy(), axis=1) >= -1e-6).all()
    assert list(mass.columns) == [1, 2, 4, 8, 20, 40]
    # with one query head per KV head, per-query-head top-k is the oracle's too
    mha = recall_table(make_trace(group=1, seed=2), ["oracle"], [1, 3, 0.25], n_queries=8, progress=False)
    np.testing.assert_allclose(mha.recall, 1.0)


def test_recall_and_mass_match_numpy_set_intersection():
    """Quest (per query head pages) on a hand-built trace: recall and mass by written-out loops."""
    trace = make_trace(n_kv=2, group=3, n_tokens=50, seed=3)
    n_queries, budget = 6, 8
    quest = get_method("quest", page=4, min_pages=1, dense_layers=0)
    table = recall_table(trace, [quest], [budget], n_queries=n_queries, progress=False)
    n_ctx = 50 - n_queries
    for layer in trace.layers:
        full = trace.layer_kv(layer)
        index = quest.build(context_layer(full, n_ctx))
        q, k = full.q.numpy(), full.k_post.numpy()
        for p in range(n_ctx, 50):
            mask = quest.select(index, full.q[:, p][None], budget).per_query(6)[0].numpy()  # [H_q, L0]
            for h_kv in range(2):
                recalls, masses = [], []
                for g in range(3):
                    h = h_kv * 3 + g
                    scores = np.array([q[h, p] @ k[h_kv, j] for j in range(n_ctx)]) / math.sqrt(8)
                    chosen = set(np.flatnonzero(mask[h]).tolist())
                    size = len(chosen)  # recall against the exact top of the same size
                    top = set(np.argsort(-scores, kind="stable")[:size].tolist())
                    recalls.append(len(top & chosen) / size)
                    weights = softmax(np.array([q[h, p] @ k[h_kv, j] for j in range(p + 1)]) / math.sqrt(8))
                    attended = chosen | set(range(n_ctx, p + 1))
                    masses.append(sum(weights[j] for j in attended))
                got = row(table, "quest:page=4,min_pages=1,dense_layers=0", budget, layer, h_kv, p)
                assert got.recall == pytest.approx(np.mean(recalls), abs=ATOL)
                assert got.attention_mass == pytest.approx(np.mean(masses), abs=ATOL)
                assert got.attended_tokens == pytest.approx(
                    np.mean([mask[h_kv * 3 + g].sum() for g in range(3)])
                )


def np_oracle_sets(q_step: np.ndarray, k_ctx: np.ndarray, scale: float, budget: int) -> list[set[int]]:
    """Per KV head: top budget of max over the group of softmax_j(q·k_j·scale) (the oracle's rule)."""
    n_kv = k_ctx.shape[0]
    group = q_step.shape[0] // n_kv
    sets = []
    for h_kv in range(n_kv):
        best = np.max([softmax(k_ctx[h_kv] @ q_step[h_kv * group + g] * scale) for g in range(group)], axis=0)
        sets.append(set(np.argsort(-best, kind="stable")[:budget].tolist()))
    return sets


def test_output_error_decomposition_matches_numpy():
    """ShadowKV with a low rank (approximate keys): all four errors by a written-out softmax."""
    n_tokens, n_queries, budget, d = 40, 5, 6, 8
    trace = make_trace(n_kv=2, group=2, n_tokens=n_tokens, d=d, layers=(2,), seed=4)
    svd = get_method(
        "shadowkv", rank=3, rank_channels=16, chunk=2, outlier_chunks=1, local=2, factor_dtype="fp32"
    )
    table = recall_table(trace, [svd], [budget], n_queries=n_queries, progress=False)
    n_ctx, scale = n_tokens - n_queries, d**-0.5
    full = trace.layer_kv(2)
    index = svd.build(context_layer(full, n_ctx))
    k_method, v_method = (t.numpy() for t in svd.dense_view(index))
    q, k, v = full.q.numpy(), full.k_post.numpy(), full.v.numpy()
    assert np.abs(k_method - k[:, :n_ctx]).max() > 1e-2  # the keys really are approximate

    def output(h, p, attended, keys, values):
        ids = sorted(attended)
        logits = np.array([q[h, p] @ (keys[h // 2, j] if j < n_ctx else k[h // 2, j]) for j in ids]) * scale
        vals = np.stack([values[h // 2, j] if j < n_ctx else v[h // 2, j] for j in ids])
        return softmax(logits) @ vals

    for p in range(n_ctx, n_tokens):
        chosen = svd.select(index, full.q[:, p][None], budget).per_query(4)[0].numpy()
        tail = set(range(n_ctx, p + 1))
        for h_kv in range(2):
            # the oracle at the same number of attended context tokens as the method's KV head
            size = int(chosen[2 * h_kv].sum())
            oracle = {h_kv: np_oracle_sets(q[:, p], k[:, :n_ctx], scale, size)[h_kv]}
            errs = {"err_total": [], "err_selection": [], "err_key": [], "err_oracle": []}
            for h in (2 * h_kv, 2 * h_kv + 1):
                exact = output(h, p, set(range(p + 1)), k, v)
                mask = set(np.flatnonzero(chosen[h]).tolist()) | tail
                best = oracle[h_kv] | tail
                norm = np.linalg.norm(exact)
                errs["err_total"].append(
                    np.linalg.norm(output(h, p, mask, k_method, v_method) - exact) / norm
                )
                errs["err_selection"].append(np.linalg.norm(output(h, p, mask, k, v) - exact) / norm)
                ideal = output(h, p, best, k, v)
                errs["err_key"].append(np.linalg.norm(output(h, p, best, k_method, v_method) - ideal) / norm)
                errs["err_oracle"].append(np.linalg.norm(ideal - exact) / norm)
            got = row(table, "shadowkv:rank=3,rank_channels=16,chunk=2,outlier_chunks=1,local=2,factor_dtype=fp32",
                      budget, 2, h_kv, p)  # fmt: skip
            for name, values in errs.items():
                assert got[name] == pytest.approx(np.mean(values), abs=1e-5, rel=1e-4), name
            assert got.err_key > 1e-3


def test_exact_key_methods_have_no_key_loss_and_full_rank_shadowkv_almost_none():
    trace = make_trace(n_kv=2, group=2, n_tokens=64, seed=5)
    methods = [
        get_method("quest", dense_layers=0), get_method("arkvale", page_size=4), get_method("streaming"),
        get_method("infinigen", dense_layers=0), get_method("lrqk", rank=4, rank_head_dim=0, n_recent=4),
        get_method("shadowkv", rank=16, rank_channels=16, chunk=2, outlier_chunks=2, local=2, factor_dtype="fp32"),
        get_method("yakv", local=4),
    ]  # fmt: skip
    table = recall_table(trace, methods, [0.125, 0.25], n_queries=8, progress=False)
    key_loss = table.groupby("method_name").err_key.max()
    for name in ("quest", "arkvale", "streaming", "infinigen", "lrqk"):
        assert key_loss[name] == 0.0, name
    assert key_loss["shadowkv"] < 1e-5
    assert key_loss["yakv"] > 1e-3  # 4-bit K/V: a key loss that is really measured
    assert table.fetched_bytes.notna().all()


# --- granularity, positions, layers, errors -------------------------------------------------------


def test_aggregated_rows_are_means_with_counts_and_explicit_positions():
    trace = make_trace(seed=6)
    per_pos = recall_table(trace, ["oracle", "yakv:local=4"], [4, 0.25], n_queries=8, progress=False)
    means = recall_table(trace, ["oracle", "yakv:local=4"], [4, 0.25], n_queries=8, progress=False,
                         per_position=False)  # fmt: skip
    assert "query_position" not in means and (means.n_queries == 8).all()
    expected = per_pos.groupby(["method", "budget_tokens", "layer", "kv_head"], sort=False).err_total.mean()
    np.testing.assert_allclose(means.err_total.to_numpy(), expected.to_numpy(), rtol=1e-5)
    teacher = recall_table(trace, ["oracle"], [4], query_positions=[30, 41, 35], progress=False)
    assert sorted(teacher.query_position.unique()) == [30, 35, 41]
    assert teacher.attrs["recall"]["n_context"] == 30


def test_sliding_window_layers_are_skipped():
    trace = make_trace(windows={3: 16})
    table = recall_table(trace, ["oracle"], [4], n_queries=8, progress=False)
    assert set(table.layer) == {4}
    assert "3" in table.attrs["recall"]["skipped_layers"]
    wide = recall_table(make_trace(windows={3: 4096}), ["oracle"], [4], n_queries=8, progress=False)
    assert set(wide.layer) == {3, 4}  # a window longer than the prompt is full attention
    with pytest.raises(KvdiagError, match="sliding-window"):
        recall_table(trace, ["oracle"], [4], layers=[3], n_queries=8, progress=False)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"methods": ["shadowkvv"], "budgets": [4]}, "did you mean 'shadowkv'"),
        ({"methods": ["shadowkv:rnk=3"], "budgets": [4]}, "did you mean 'rank'"),
        ({"methods": [], "budgets": [4]}, "no methods"),
        ({"methods": ["oracle"], "budgets": [41]}, "exceeds the prompt's 40 tokens"),
        ({"methods": ["oracle"], "budgets": [1.5]}, "invalid; give a fraction"),
        ({"methods": ["oracle"], "budgets": []}, "no budgets"),
        ({"methods": ["oracle", "oracle"], "budgets": [4]}, "given twice"),
        ({"methods": ["oracle"], "budgets": [4], "n_queries": 48}, "leaves no context"),
    ],
)
def test_bad_inputs_are_clear_errors(kwargs, words):
    kwargs = {"n_queries": 8, **kwargs}
    with pytest.raises(KvdiagError, match=words):
        recall_table(make_trace(), kwargs.pop("methods"), kwargs.pop("budgets"), progress=False, **kwargs)


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from kvdiag.cli import _register, app

    _register()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_recall_end_to_end_and_plot(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("recall", "--model", "tiny-llama", "--max-tokens", "200", "--queries", "16",
                 "--methods", "oracle; shadowkv:rank=160,chunk=8", "--method", "yakv",
                 "--budgets", "0.0625,3.125%", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_parquet(out / "recall.parquet")
    assert set(table.method) == {"oracle", "shadowkv", "yakv"}
    assert sorted(table.budget_tokens.unique()) == [6, 12]  # ceil(0.03125·184), ceil(0.0625·184)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "recall" and manifest["config"]["n_context"] == 184
    shadow = next(m for m in manifest["config"]["methods"] if m["name"] == "shadowkv")
    assert shadow["knobs"]["rank"] == 160 and shadow["resolved"]["rank"] == 5  # 160 · 32 / 1024
    assert [b["tokens"] for b in manifest["config"]["budgets"]] == [12, 6]
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["accuracy_vs_bytes.png", "error_decomposition.png", "error_vs_attended.png",
                       "recall_heatmap.png", "recall_vs_budget.png"]  # fmt: skip
    for path in (out / "figures").iterdir():
        path.unlink()
    redraw = cli("plot", out)
    assert redraw.exit_code == 0, redraw.output
    assert len(list((out / "figures").glob("*"))) == 10


@pytest.mark.parametrize(
    "args, words",
    [
        (["--methods", "oracle;shadowkvv"], "did you mean 'shadowkv'"),
        (["--methods", " ; "], "method list is empty"),
        (["--methods", "shadowkv:rnk=3"], "did you mean 'rank'"),
        (["--budgets", "0.03,1.5"], "invalid; give a fraction"),
        (["--budgets", "0"], "invalid; give a fraction"),
        (["--budgets", "abc"], "not a number"),
        (["--budgets", "5000"], "exceeds the prompt's 84 tokens"),
        (["--queries", "0"], "≥ 1"),
    ],
)
def test_cli_bad_inputs_error_in_one_line_and_write_nothing(cli, tmp_path, args, words):
    import re

    out = tmp_path / "never"
    result = cli(
        "recall", "--model", "tiny-llama", "--max-tokens", "100", "--queries", "16", "--out", out, *args
    )
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("kvdiag: error:")
    assert re.search(words, message[0]), message[0]
    assert not out.exists()


def test_cli_methods_lists_every_method_with_knobs(cli):
    result = cli("methods")
    assert result.exit_code == 0, result.output
    for entry in list_methods():
        assert f"{entry['name']}:" in result.output
        for knob, default in entry["knobs"].items():
            assert f"{knob}={default!r}" in result.output or f"{knob}={default}" in result.output
    rows = json.loads(cli("methods", "--json").output)
    assert [r["name"] for r in rows] == [e["name"] for e in list_methods()]


def test_a_gpu_cache_of_fetched_tokens_saves_what_earlier_steps_fetched():
    """With a cache larger than everything fetched, a step reads only the tokens no earlier step of
    the same decode chose (written out with sets); without one, every chosen token; reuse_prev is
    the overlap with the previous step's choice."""
    trace = make_trace(n_kv=2, group=2, n_tokens=60, seed=11)
    n_queries, budget = 8, 6
    warm = recall_table(trace, ["oracle"], [budget], n_queries=n_queries, progress=False, cache_tokens=10_000)
    cold = recall_table(trace, ["oracle"], [budget], n_queries=n_queries, progress=False, cache_tokens=0)
    oracle = get_method("oracle")
    n_ctx = 60 - n_queries
    for layer in trace.layers:
        full = trace.layer_kv(layer)
        built = oracle.build(context_layer(full, n_ctx))
        seen: list[set[int]] = [set(), set()]
        previous: list[set[int]] = [set(), set()]
        for p in range(n_ctx, 60):
            sel = oracle.select(built, full.q[:, p][None], budget)
            for h in range(2):
                chosen = set(sel.ids[0, h].tolist())
                got_warm = row(warm, "oracle", budget, layer, h, p)
                got_cold = row(cold, "oracle", budget, layer, h, p)
                assert got_cold.fetched_tokens == len(chosen)
                assert got_warm.fetched_tokens == len(chosen - seen[h])
                assert got_warm.fetched_tokens_cold == len(chosen)
                if p > n_ctx:
                    assert got_warm.reuse_prev == pytest.approx(len(chosen & previous[h]) / len(chosen))
                seen[h] |= chosen
                previous[h] = chosen


def test_methods_attending_far_beyond_their_budget_are_named_once_per_budget(caplog):
    from kvdiag.analysis.recall import warn_over_budget

    table = pd.DataFrame(
        {
            "method": ["shadowkv"] * 4 + ["oracle"] * 2,
            "budget": [0.03125, 0.03125, 0.0625, 0.0625, 0.03125, 0.03125],
            "budget_tokens": [30, 40, 60, 80, 30, 40],
            "attended_tokens": [90, 100, 100, 120, 30, 40],
        }
    )  # fmt: skip  (two prompt lengths per budget)
    with caplog.at_level("WARNING"):
        lines = warn_over_budget(table)
    assert lines == ["shadowkv at 35 tokens attends 95 tokens on average (> 2×)"]  # 110 < 2 × 70 at 6.25 %
    assert len(caplog.records) == 1 and "always-kept tokens dominate" in caplog.records[0].getMessage()
