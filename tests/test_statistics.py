"""Paired bootstrap intervals checked against scipy directly (two ways) and a normal approximation, the
special cases (n = 1, all-equal differences, BCa undefined), the sample-size estimate by hand, and every
claim's decision rule on hand-made per-sample score tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kvdiag.study.claims import FAILS, HOLDS, UNSURE, claim1, claim2, claim3, claim4, compare_to_exact
from kvdiag.study.paired import PairedDifference, needed_n, paired_difference, paired_scores

SEED = 20240611  # of the random scores below


def test_the_interval_is_scipys_paired_bootstrap():
    rng = np.random.default_rng(SEED)
    exact = rng.uniform(20, 80, 30)
    method = exact - rng.normal(8, 10, 30)
    diff = paired_difference(method, exact)
    assert diff.interval == "BCa" and diff.n == 30
    assert diff.mean == pytest.approx(np.mean(method - exact))
    direct = stats.bootstrap((method, exact), lambda a, b, axis: np.mean(a - b, axis=axis), paired=True,
                             vectorized=True, method="BCa", rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    assert (diff.low, diff.high) == (direct.low, direct.high)
    # the same interval from a one-sample bootstrap of the differences (scipy resamples the pairs' indices)
    one = stats.bootstrap(
        (method - exact,), np.mean, method="BCa", rng=np.random.default_rng(0)
    ).confidence_interval
    assert (diff.low, diff.high) == pytest.approx((one.low, one.high), abs=1e-9)


def test_the_interval_is_close_to_the_normal_one_for_many_samples():
    rng = np.random.default_rng(SEED)
    d = rng.normal(-3.0, 10.0, 400)
    diff = paired_difference(d, np.zeros(400))
    half = 1.96 * d.std(ddof=1) / math.sqrt(400)
    assert diff.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert diff.high == pytest.approx(d.mean() + half, abs=0.15 * half)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's own percentile run with 1 resample
def test_special_cases():
    one = paired_difference([40.0], [55.0])
    assert one.n == 1 and one.mean == -15 and one.interval == "none" and math.isnan(one.low)
    assert not one.above(-100) and not one.below(100) and needed_n(one) is None
    assert one.text() == "-15.0 (n = 1, no interval)"
    same = paired_difference([100, 100, 90], [100, 100, 90])
    assert (same.mean, same.low, same.high, same.interval) == (0, 0, 0, "exact")
    assert needed_n(same, -5.0) == 3 and needed_n(same, 0.0) is None
    shifted = paired_difference([10, 20, 30], [40, 50, 60])  # every difference -30: a zero-width interval
    assert (shifted.low, shifted.high) == (-30, -30) and shifted.below(-5)
    dropped = paired_difference([10, float("nan"), 30], [20, 0, 40])  # NaN pairs are left out
    assert dropped.n == 2 and dropped.mean == -10
    # with a single resample BCa is undefined: the percentile interval of the same resample
    fallback = paired_difference([0, 1, 2, 3], [0, 0, 0, 0], n_resamples=1)
    direct = stats.bootstrap(([0.0, 1, 2, 3], [0.0] * 4), lambda a, b, axis: np.mean(a - b, axis=axis),
                             paired=True, vectorized=True, method="percentile", n_resamples=1,
                             rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    assert fallback.interval == "percentile" and (fallback.low, fallback.high) == (direct.low, direct.high)


def test_needed_n_by_hand():
    # mean -2, interval [-6, 2] (half-width 4) at n = 10: excluding 0 needs 10 * (4 / 2)^2 = 40 samples
    diff = PairedDifference(10, -2.0, -6.0, 2.0, "BCa", 30.0, 32.0)
    assert needed_n(diff, 0.0) == 40
    # against -5: |mean - (-5)| = 3, 10 * (4 / 3)^2 = 17.8 -> 18
    assert needed_n(diff, -5.0) == 18
    assert needed_n(PairedDifference(10, -8.0, -12.0, -6.0, "BCa", 0, 0), -5.0) == 10  # already below
    assert (
        needed_n(PairedDifference(10, -5.0, -9.0, -1.0, "BCa", 0, 0), -5.0) is None
    )  # mean on the threshold


def test_paired_scores_align_by_sample_and_drop_the_unpaired():
    table = pd.DataFrame({
        "sample_id": ["s1", "s0", "s2", "s0", "s1", "s3"],
        "method": ["exact", "exact", "exact", "m", "m", "m"],
        "budget": [1.0, 1.0, 1.0, 0.5, 0.5, 0.5],
        "score": [10.0, 20.0, 30.0, 1.0, 2.0, 9.0],
    })  # fmt: skip
    a, b = paired_scores(table, ("m", 0.5), ("exact", 1.0))
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [20.0, 10.0]  # s0, s1; s2 and s3 have one side only


# --- the decision rules on hand-made per-sample tables ----------------------------------------------

ROLES = {"shadowkv": ("shadowkv", 0.015625), "shadowkv_10x": ("shadowkv", 0.15625),
         "arkvale": ("arkvale", 0.0078125), "lrqk": ("lrqk", 0.00258), "infinigen": ("infinigen", 0.2),
         "yakv": ("yakv", 0.03125), "yakv_centered": ("yakv:center=True", 0.03125)}  # fmt: skip
EXACT = [40.0, 50.0, 30.0, 45.0, 35.0, 60.0]


def table(**by_role) -> pd.DataFrame:
    """A results table: role=[score per sample] (exact=... too)."""
    rows = []
    for role, values in by_role.items():
        label, budget = ("exact", 1.0) if role == "exact" else ROLES[role]
        rows += [
            {"sample_id": f"s{i}", "method": label, "budget": budget, "score": v}
            for i, v in enumerate(values)
        ]
    return pd.DataFrame(rows)


def shift(delta, values=EXACT):
    return [v + delta for v in values]


NOISE = [-30.0, 25.0, -20.0, 15.0, -25.0, 20.0]  # mean -2.5, spread wide: an interval around -5 and 0
NEEDLE_OK = table(
    exact=[100.0] * 6, shadowkv=[100.0] * 6, arkvale=[100.0] * 6, lrqk=[100.0] * 6, infinigen=[100.0] * 6
)
BOTH = {"needle": ROLES, "text2json": ROLES}


def test_method_vs_exact_outcomes():
    t2j = {"text2json": table(exact=EXACT, shadowkv=shift(-30), arkvale=shift(-4), lrqk=[e + d for e, d in zip(EXACT, NOISE)],
                              infinigen=[0.0] * 6)}  # fmt: skip
    roles = {"text2json": ROLES}
    assert compare_to_exact(t2j, roles, "text2json", "shadowkv").outcome == "loss"  # [-30, -30] < -5
    assert compare_to_exact(t2j, roles, "text2json", "arkvale").outcome == "lossless"  # [-4, -4] >= -5
    unclear = compare_to_exact(t2j, roles, "text2json", "lrqk")
    assert unclear.outcome == "unclear" and unclear.diff.low < -5 < unclear.diff.high
    floor = {"text2json": table(exact=[0.0, 5.0, 0.0], shadowkv=[0.0, 0.0, 0.0])}
    assert compare_to_exact(floor, roles, "text2json", "shadowkv").outcome == "floor"
    assert compare_to_exact(t2j, roles, "needle", "shadowkv") is None


def test_claim1_holds_fails_or_is_inconclusive():
    t2j = table(exact=EXACT, shadowkv=shift(-30), shadowkv_10x=shift(-20), arkvale=shift(-25), lrqk=shift(-2),
                infinigen=[e + d for e, d in zip(EXACT, NOISE)])  # fmt: skip
    main, ten = claim1({"needle": NEEDLE_OK, "text2json": t2j}, BOTH)
    assert main.verdict == HOLDS and "2 of 4 (method, task) pairs lose" in main.evidence  # shadowkv, arkvale
    assert "ShadowKV − exact -30.0 [-30.0, -30.0] (n = 6) (loss)" in main.evidence
    assert ten.verdict == HOLDS and "ShadowKV 10× − exact -20.0 [-20.0, -20.0] (n = 6) (loss)" in ten.evidence

    close = table(
        exact=EXACT, shadowkv=shift(-1), shadowkv_10x=EXACT, arkvale=shift(-3), lrqk=EXACT, infinigen=shift(1)
    )
    main, ten = claim1({"needle": NEEDLE_OK, "text2json": close}, BOTH)
    assert main.verdict == FAILS and "0 of 4" in main.evidence  # every pair lossless
    assert ten.verdict == UNSURE and "nothing to fix" in ten.evidence
    needle_bad = table(
        exact=[100.0] * 6, shadowkv=[0.0] * 6, arkvale=[50.0] * 6, lrqk=[100.0] * 6, infinigen=[100.0] * 6
    )
    assert (
        claim1({"needle": needle_bad, "text2json": close}, BOTH)[0].verdict == FAILS
    )  # 2 of 4 lose on needle

    noisy = table(**{r: [e + d for e, d in zip(EXACT, NOISE)] for r in ROLES}, exact=EXACT)
    main, _ = claim1({"needle": NEEDLE_OK, "text2json": noisy}, BOTH)
    assert main.verdict == UNSURE and main.needed_n is not None and main.needed_n > 6

    fixed = table(exact=EXACT, shadowkv=shift(-30), shadowkv_10x=shift(-2), arkvale=shift(-30), lrqk=shift(-30),
                  infinigen=shift(-30))  # fmt: skip
    assert (
        claim1({"needle": NEEDLE_OK, "text2json": fixed}, BOTH)[1].verdict == FAILS
    )  # 10x budget is lossless
    one = {"needle": NEEDLE_OK.iloc[::6], "text2json": t2j[t2j.sample_id == "s0"]}  # n = 1: no interval
    main, ten = claim1(one, BOTH)
    assert main.verdict == UNSURE and ten.verdict == UNSURE and main.needed_n is None


def test_claim3_and_claim4_by_hand():
    roles = {"text2json": ROLES}
    held = claim3({"text2json": table(exact=EXACT, yakv=shift(-5), shadowkv=shift(-30))}, roles)
    assert held.verdict == HOLDS and held.evidence.startswith(
        "YAKV − ShadowKV +25.0 [+25.0, +25.0] (n = 6) (above)"
    )
    assert "YAKV recovers 83 % of ShadowKV's gap" in held.evidence
    worse = claim3({"text2json": table(exact=EXACT, yakv=shift(-30), shadowkv=shift(-20))}, roles)
    assert worse.verdict == FAILS
    little = claim3({"text2json": table(exact=EXACT, yakv=shift(-27), shadowkv=shift(-30))}, roles)
    assert little.verdict == FAILS  # significantly better, but recovers 10 % (< half) of a real loss
    noisy = claim3({"text2json": table(exact=EXACT, yakv=[e - 15 + d for e, d in zip(EXACT, NOISE)],
                                       shadowkv=shift(-20))}, roles)  # fmt: skip
    assert noisy.verdict == UNSURE and noisy.needed_n is not None
    assert claim3({}, roles).verdict == UNSURE

    better = table(yakv=shift(-20), yakv_centered=shift(-5))
    assert claim4({"text2json": better}, roles, "qwen").verdict == HOLDS
    same = table(yakv=shift(-20), yakv_centered=shift(-20))  # [0, 0]: no gain
    assert claim4({"text2json": same}, roles).verdict == FAILS
    noisy = table(yakv=EXACT, yakv_centered=[e + d for e, d in zip(EXACT, NOISE)])
    found = claim4({"text2json": noisy}, roles)
    assert found.verdict == UNSURE and found.needed_n == needed_n(found.comparisons[0].diff, 0.0) > 6


def recall_rows(method: str, budget: float, **metrics) -> list[dict]:
    base = {"attention_mass": 0.5, "recall": 0.5, "err_selection": 0.1, "err_key": 0.0, "err_total": 0.1,
            "resident_bytes_per_token": 1.0}  # fmt: skip
    return [{"method": method, "budget": budget, **base, **metrics, "layer": layer} for layer in (0, 1)]


def test_claim2_by_hand():
    roles = {"shadowkv": ("shadowkv", 0.015625), "yakv": ("yakv", 0.03125), "oracle": ("oracle", 0.03125)}
    b = 0.015625
    recall = pd.DataFrame(
        recall_rows("shadowkv", b, err_key=0.3, err_selection=0.4, attention_mass=0.5)
        + recall_rows("yakv", b, err_key=0.1, err_selection=0.2, attention_mass=0.7)
        + recall_rows("oracle", 0.0078125, attention_mass=0.6) + recall_rows("oracle", b, attention_mass=0.9)
    )  # fmt: skip
    low, chunk = claim2(recall, roles)
    assert (low.id, chunk.id) == ("2a", "2b")
    assert low.verdict == HOLDS and "err_key ShadowKV 0.300 (err_total 0.100) vs YAKV 0.100" in low.evidence
    assert chunk.verdict == HOLDS and "reaches ShadowKV's attention mass at 0.7812 %" in chunk.evidence
    assert chunk.numbers["oracle_budget_for_shadowkv_mass"] == 0.0078125
    oracle_half = (recall.method == "oracle") & (recall.budget == 0.0078125)
    recall.loc[oracle_half, "attention_mass"] = 0.4  # the oracle now needs ShadowKV's own budget
    low, chunk = claim2(recall, roles)
    assert low.verdict == HOLDS and chunk.verdict == UNSURE and "mass at 1.562 %" in chunk.evidence
    recall.loc[recall.method == "shadowkv", ["err_key", "err_selection"]] = [0.15, 0.22]
    assert [f.verdict for f in claim2(recall, roles)] == [
        UNSURE,
        UNSURE,
    ]  # 1.5x and 1.1x: between the thresholds
    recall.loc[recall.method == "shadowkv", ["err_key", "err_selection"]] = [0.05, 0.2]
    assert [f.verdict for f in claim2(recall, roles)] == [FAILS, FAILS]
    assert [f.verdict for f in claim2(None, roles)] == [UNSURE, UNSURE]
