"""The `headwise` wrapper method: the base's selection with its per-layer total split across KV heads.

References: hand-worked allocations, plain `torch.topk` of the base method's own scores per head,
the base method's selections and measured bytes (what must stay equal), hashlib for the file digest.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch

from kvdiag.analysis.heads import HeadCalibration, save_calibration
from kvdiag.analysis.recall import recall_table
from kvdiag.capture import capture_prompt
from kvdiag.errors import KvdiagError
from kvdiag.eval.resume import merge_manifest
from kvdiag.methods import default_methods, get_method, parse_method_spec
from kvdiag.offload.decode import greedy_decode, prefill_prompt
from tests.test_methods_core import random_layer, random_queries

LAYER = 5  # random_layer's layer index
BASES = ["yakv", "yakv:rule=mean_query", "shadowkv:rank=8,outlier_chunks=2", "oracle", "arkvale"]


def calibration(tmp_path, need: dict[int, list[float]], name: str = "calib.json", model: str = "test-model"):
    """Write a heads_calibration file with the given need per layer; returns its path as a string."""
    cal = HeadCalibration(model=model, tau=0.9, need=need, source={"task": "text2json", "seed": 100,
                          "sample_ids": ["text2json-s100-0"]})  # fmt: skip
    return str(save_calibration(cal, tmp_path / name))


def headwise(base: str, calib: str, **knobs) -> object:
    return get_method("headwise", base=base, calib=calib, **knobs)


def chosen_per_head(sel) -> torch.Tensor:
    """[n, H_kv] tokens chosen by score at each step."""
    return (sel.ids >= 0).sum(dim=-1)


# --- the allocation, measured through Selection ---------------------------------------------------


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        ([0.5, 0.25, 0.25], [60, 30, 30]),  # proportional, exact
        ([0.3, 0.0, 0.1], [89, 1, 30]),  # 1 to the zero-need head; 119 split 3:1 = 89.25 / 29.75, +1 to .75
        ([0.2, 0.2, 0.2], [40, 40, 40]),  # equal need: the base's own 40 per head
    ],
)
def test_allocation_sums_to_the_base_total_and_follows_the_need(tmp_path, need, expected):
    layer = random_layer(3, 16, 200, seed=1)
    method = headwise("oracle", calibration(tmp_path, {LAYER: need}))
    sel = method.select(method.build(layer), random_queries(4, 6, 16, seed=2), 40)
    assert chosen_per_head(sel).tolist() == [expected] * 4
    assert int(chosen_per_head(sel).sum(dim=-1)[0]) == 3 * 40


@pytest.mark.parametrize(
    ("power", "expected"), [(1.0, [96, 24, 24]), (0.5, [72, 36, 36]), (0.0, [48, 48, 48]), (2.0, [128, 8, 8])]
)
def test_power_softens_or_sharpens_the_split(tmp_path, power, expected):
    # need 0.16 / 0.04 / 0.04 (4:1:1); square roots 0.4 / 0.2 / 0.2 (2:1:1); squares 16:1:1; of 3 · 48 = 144
    layer = random_layer(3, 16, 200, seed=1)
    method = headwise("oracle", calibration(tmp_path, {LAYER: [0.16, 0.04, 0.04]}), power=power)
    sel = method.select(method.build(layer), random_queries(2, 6, 16, seed=2), 48)
    assert chosen_per_head(sel).tolist() == [expected] * 2


def test_each_head_takes_its_own_top_k_of_the_base_scores(tmp_path):
    """Head h attends exactly the k_h best of the base's scores (plain torch.topk per head), plus the
    base's local window."""
    layer = random_layer(3, 16, 200, seed=3)
    base = get_method("yakv", local=16)
    method = headwise("yakv:local=16", calibration(tmp_path, {LAYER: [0.5, 0.25, 0.25]}))
    built = method.build(layer)
    q = random_queries(3, 6, 16, seed=4)
    sel = method.select(built, q, 30)
    scores = base.score(base.build(layer), q)  # [n, H_kv, 184] the scored (non-local) tokens
    for step in range(3):
        for h, k in enumerate([45, 23, 22]):  # 90 split 2:1:1 = 45 / 22.5 / 22.5: the .5 to the lower head
            expected = torch.topk(scores[step, h], k).indices.sort().values
            got = sel.ids[step, h]
            assert torch.equal(got[got >= 0], expected)
    assert torch.equal(sel.always, torch.arange(184, 200).expand(3, -1))


@pytest.mark.parametrize("base", BASES)
def test_equal_selected_tokens_fetched_and_resident_bytes(tmp_path, base):
    layer = random_layer(3, 32, 640, seed=5)
    base_method = parse_method_spec(base)
    method = headwise(base, calibration(tmp_path, {LAYER: [0.7, 0.05, 0.25]}))
    q = random_queries(5, 6, 32, seed=6)
    base_built, built = base_method.build(layer), method.build(layer)
    for budget in (48, 96):
        ref = base_method.select(base_built, q, base_method.start(base_built, budget))
        sel = method.select(built, q, method.start(built, budget))
        assert not torch.equal(chosen_per_head(sel), chosen_per_head(ref))  # the split moved tokens
        assert torch.equal(chosen_per_head(sel).sum(-1), chosen_per_head(ref).sum(-1))
        assert torch.equal(sel.always, ref.always)
        assert sel.entry_bytes == ref.entry_bytes > 0
        cold_ref = base_method.select(base_built, q[:1], budget).fetched_entries().sum()
        assert method.select(built, q[:1], budget).fetched_entries().sum() == cold_ref
        if base != "arkvale":  # ArkVale's page cache makes later steps' fetches depend on the heads
            assert torch.equal(sel.fetched_entries().sum(-1), ref.fetched_entries().sum(-1))
            assert sel.fetched_bytes() == pytest.approx(ref.fetched_bytes(), rel=1e-12)
        state_ref, state = base_method.start(base_built, budget), method.start(built, budget)
        assert method.resident_bytes(built, state) == base_method.resident_bytes(base_built, state_ref)


@pytest.mark.parametrize("base", [*BASES, "streaming", "exact"])
def test_uniform_calibration_reproduces_the_base_selection(tmp_path, base):
    lengths = (200, 137, 170)
    layers = [random_layer(3, 16, n, seed=n) for n in lengths]
    base_method = parse_method_spec(base)
    for calib in ("uniform", calibration(tmp_path, {LAYER: [0.07, 0.07, 0.07]})):
        method = headwise(base, calib)
        q = random_queries(4, 6, 16, seed=7)
        for layer in layers:
            ref = base_method.select(base_method.build(layer), q, 0.2)
            sel = method.select(method.build(layer), q, 0.2)
            assert torch.equal(sel.ids, ref.ids) and torch.equal(sel.always, ref.always), (base, calib)
        # batched over prompts of different lengths, as the simulator decodes
        builts_ref = [base_method.build(x) for x in layers]
        builts = [method.build(x) for x in layers]
        q_rows = random_queries(3, 6, 16, seed=8)[:, None]
        ref = base_method.select_batch(
            base_method.stack(builts_ref), q_rows, [base_method.start(b, 0.2) for b in builts_ref]
        )
        sel = method.select_batch(method.stack(builts), q_rows, [method.start(b, 0.2) for b in builts])
        assert torch.equal(sel.mask(), ref.mask())


@pytest.mark.parametrize("min_blocks", [1, 4])
def test_a_head_with_zero_need_still_gets_its_minimum(tmp_path, min_blocks):
    layer = random_layer(3, 16, 200, seed=9)
    method = headwise("yakv:local=0", calibration(tmp_path, {LAYER: [0.6, 0.0, 0.4]}), min_blocks=min_blocks)
    sel = method.select(method.build(layer), random_queries(2, 6, 16, seed=10), 20)
    counts = chosen_per_head(sel)
    assert counts[:, 1].tolist() == [min_blocks] * 2 and counts.sum(-1).tolist() == [60, 60]


def test_chunk_base_splits_blocks_not_tokens(tmp_path):
    """ShadowKV chooses chunks of 8: the split is in chunks, the total the base's (5 chunks per head)."""
    layer = random_layer(2, 16, 400, seed=11)
    method = headwise("shadowkv:rank=8,outlier_chunks=2", calibration(tmp_path, {LAYER: [3.0, 1.0]}))
    sel = method.select(method.build(layer), random_queries(2, 4, 16, seed=12), 40)
    assert chosen_per_head(sel).tolist() == [[64, 16]] * 2  # 10 chunks split 3:1 = 7.5 / 2.5 → 8 / 2


# --- specs, provenance, errors --------------------------------------------------------------------


def test_spec_label_round_trip_and_provenance(tmp_path):
    path = calibration(tmp_path, {LAYER: [0.1, 0.2, 0.3]})
    method = parse_method_spec(f"headwise:base=yakv,base.center=true,base.local=32,calib={path},min_blocks=2")
    assert method.base == "yakv:local=32,center=True"
    assert method.label() == f"headwise:base=yakv,base.local=32,base.center=True,calib={path},min_blocks=2"
    assert parse_method_spec(method.label()) == method
    assert parse_method_spec(f"headwise:base=yakv:center=True,calib={path}").base == "yakv:center=True"
    info = method.provenance()["calibration"]
    with open(path, "rb") as fh:
        assert info["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert info["model"] == "test-model" and info["source"]["sample_ids"] == ["text2json-s100-0"]
    resolved = method.resolved(random_layer(3, 16, 100))
    assert resolved["base"] == "yakv:local=32,center=True" and resolved["need"] == [0.1, 0.2, 0.3]
    assert resolved["calibration"]["sha256"] == info["sha256"]
    # a run directory of `kvdiag heads` works as well as the file
    save_calibration(HeadCalibration("m", 0.9, {LAYER: [1.0, 1.0, 1.0]}), tmp_path)
    assert (
        get_method("headwise", calib=str(tmp_path))
        .provenance()["calibration"]["path"]
        .endswith("heads_calibration.json")
    )
    assert "headwise" not in default_methods()  # a copy of its base by default: not run by default


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("headwise:base=quest", "selects per query head"),
        ("headwise:base=lrqk", "selects per query head"),
        ("headwise:base=infinigen", "selects per query head"),
        ("headwise:base=headwise", "cannot be headwise"),
        ("headwise:base=yakvv", "did you mean 'yakv'"),
        ("headwise:base.rnak=3,base=shadowkv", "did you mean 'rank'"),
        ("headwise:min_blocks=-1", "min_blocks"),
        ("headwise:power=-1", "power=-1.0 is invalid"),
        ("headwise:calib=/no/such/calibration", "no head calibration at /no/such/calibration"),
        ("headwise:calb=runs/heads", "did you mean 'calib'"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(KvdiagError, match=words) as err:
        parse_method_spec(spec)
    assert "\n" not in str(err.value)


def test_bad_or_mismatched_calibration_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    for path, words in (
        (bad, "not valid JSON"),
        (other, "not a kvdiag head calibration"),
        (tmp_path / "x", "no head"),
    ):
        with pytest.raises(KvdiagError, match=words) as err:
            get_method("headwise", calib=str(path))
        assert "\n" not in str(err.value)
    layer = random_layer(3, 16, 100)
    two_heads = headwise("yakv", calibration(tmp_path, {LAYER: [0.1, 0.2]}, "two.json", model="other-model"))
    with pytest.raises(KvdiagError, match="2 KV heads in layer 5, this model 3") as err:
        two_heads.build(layer)
    assert "other-model" in str(err.value) and "\n" not in str(err.value)
    few_layers = headwise(
        "yakv", calibration(tmp_path, {0: [1, 1, 1], 1: [1, 1, 1], 2: [1, 1, 1]}, "few.json")
    )
    with pytest.raises(KvdiagError, match=r"no layer 5; it has layers 0-2"):
        few_layers.build(layer)


def test_cli_names_a_missing_calibration_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from kvdiag.cli import _register, app

    _register()
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["recall", "--model", "tiny-llama", "--methods", "headwise:calib=/no/calib",
                                      "--out", str(out)])  # fmt: skip
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "no head calibration at /no/calib" in lines[0]
    assert not out.exists()


def test_resumed_eval_refuses_a_changed_calibration(tmp_path):
    first = {"label": "headwise:calib=c", "knobs": {"calib": "c"}, "budgets": [0.03],
             "provenance": {"calibration": {"path": "/a/c", "sha256": "aa"}}}  # fmt: skip
    config = {"n": 1, "methods": ["headwise:calib=c"], "budgets": [0.03]}
    previous = {"config": config, **merge_manifest(tmp_path, None, config, [first], [])}
    moved = dict(first, provenance={"calibration": {"path": "/b/c", "sha256": "aa"}})
    assert merge_manifest(tmp_path, previous, config, [moved], [])["methods"][0]["label"] == first["label"]
    changed = dict(first, provenance={"calibration": {"path": "/a/c", "sha256": "bb"}})
    with pytest.raises(KvdiagError, match="SHA-256 of the files read by method headwise:calib=c"):
        merge_manifest(tmp_path, previous, config, [changed], [])


# --- through recall and the simulator on a tiny model ---------------------------------------------

PROMPT = "Record R-0006: Zofia Romano (beekeeper, Lisbon) - 94 barometers, filed 2014. " * 8


def tiny_calibration(tmp_path, n_layers: int = 4) -> str:
    return calibration(
        tmp_path, {i: [0.9, 0.1 * (i + 1)] for i in range(n_layers)}, "tiny.json", "tiny-llama"
    )


def test_headwise_through_recall_table(tiny, tmp_path):
    model, tokenizer = tiny("tiny-llama")
    trace = capture_prompt(model, tokenizer, PROMPT)
    method = headwise("yakv:local=8", tiny_calibration(tmp_path))
    table = recall_table(trace, ["yakv:local=8", method], [0.125], n_queries=8, progress=False)
    keys = ["layer", "query_position"]
    base, hw = (
        table[table.method == label].sort_values([*keys, "kv_head"])
        for label in ("yakv:local=8", method.label())
    )
    per_step = [frame.groupby(keys)[["fetched_tokens", "fetched_bytes"]].sum() for frame in (base, hw)]
    assert per_step[0].equals(per_step[1])  # equal fetched tokens and bytes per layer and step
    assert (base.resident_bytes_per_token.to_numpy() == hw.resident_bytes_per_token.to_numpy()).all()
    budget = int(base.budget_tokens.iloc[0])
    attended = hw.groupby(["layer", "kv_head"]).attended_tokens.mean().unstack()
    assert (attended[0] > budget + 8).all() and (attended[1] < budget + 8).all()  # head 0 needs more
    assert hw.attention_mass.notna().all()
    entry = next(m for m in table.attrs["recall"]["methods"] if m["name"] == "headwise")
    assert entry["resolved"]["calibration"]["model"] == "tiny-llama"


def test_headwise_through_the_simulator(tiny, tmp_path):
    model, tokenizer = tiny("tiny-llama")
    prompts = [
        tokenizer(PROMPT, return_tensors="pt").input_ids,
        tokenizer(PROMPT[:300], return_tensors="pt").input_ids,
    ]
    prefills = [prefill_prompt(model, ids) for ids in prompts]
    runs = {}
    for spec in ("yakv:local=8", f"headwise:base=yakv,base.local=8,calib={tiny_calibration(tmp_path)}",
                 "headwise:base=yakv,base.local=8"):  # fmt: skip
        runs[spec] = greedy_decode(model, prefills, 4, [], method=parse_method_spec(spec), budget=0.125)
    base, calibrated, uniform = runs.values()
    for b in range(2):
        assert base.stats[b]["fetched_bytes_per_step_layer"] == pytest.approx(
            calibrated.stats[b]["fetched_bytes_per_step_layer"], rel=1e-9
        )
        assert (
            base.stats[b]["resident_bytes_per_token_layer"]
            == calibrated.stats[b]["resident_bytes_per_token_layer"]
        )
        assert torch.equal(uniform.tokens[b], base.tokens[b])  # uniform need: the base's own decode


# --- the study's paired comparison ------------------------------------------------------------------


def test_study_pairs_headwise_with_its_base_by_sample(tmp_path):
    from kvdiag.study.headwise import paired_rows, run_headwise_study

    # kl of 3 samples, rows shuffled: base 0.5 / 0.4 / 0.3, headwise 0.4 / 0.4 / 0.1 → differences
    # −0.1, 0, −0.2 (mean −0.1), means 0.3 vs 0.4
    table = pd.DataFrame({
        "sample_id": ["s2", "s0", "s1", "s1", "s0", "s2"], "method": ["hw", "base", "hw", "base", "hw", "base"],
        "budget": 0.03125, "kl_mean": [0.1, 0.5, 0.4, 0.4, 0.4, 0.3],
    })  # fmt: skip
    (row,) = paired_rows(table, "eval", "t", "base", "hw", [0.03125], ["kl_mean"])
    assert row["n"] == 3 and row["difference"] == pytest.approx(-0.1)
    assert (row["base_mean"], row["headwise_mean"]) == (pytest.approx(0.4), pytest.approx(0.3))
    assert row["ci_low"] <= row["difference"] <= row["ci_high"]
    with pytest.raises(KvdiagError, match="calibration seed"):
        run_headwise_study(tmp_path, seed=100, calib_seed=100)
    with pytest.raises(KvdiagError, match="unknown stages"):
        run_headwise_study(tmp_path, stages=["plot"])
