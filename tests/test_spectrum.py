"""Key spectra and low-rank damage against numpy: SVD, Eckart–Young truncation, RoPE and attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvdiag.analysis.lowrank import TOPK_FRACTION, default_ranks, lowrank_damage, rebuild_keys, shadowkv_rank
from kvdiag.analysis.spectrum import cumulative_energy, effective_rank, key_spectrum, rank_for_energy
from kvdiag.capture import capture_prompt

PROMPT = (
    "Record R-0007: Hana Okafor (luthier, Bergen) - 41 metronomes, filed 1988. "
    "The archive was moved to a new building, and the index was rebuilt."
)
SPECTRUM_COLUMNS = ["layer", "kv_head", "stage", "index", "singular_value", "energy"]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def trace(request, tiny):
    model, tokenizer = tiny(request.param)
    return capture_prompt(model, tokenizer, PROMPT)


def numpy_key_matrices(keys):
    """{kv_head: matrix}: −1 → the KV heads side by side [L, H_kv·d], h → head h's keys [L, d]."""
    keys = keys.double().numpy()
    mats = {-1: np.concatenate(list(keys), axis=1)}
    mats.update({h: keys[h] for h in range(keys.shape[0])})
    return mats


def select(table, layer, stage, kv_head):
    return table[(table.layer == layer) & (table.stage == stage) & (table.kv_head == kv_head)]


def numpy_rope(x, cos, sin):
    """Rotate-half RoPE: [..., L, d] with tables [L, d]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- hand-worked cases


def test_cumulative_energy_hand_cases():
    np.testing.assert_allclose(cumulative_energy(np.array([4.0, 3.0])), [16 / 25, 1.0])
    np.testing.assert_allclose(cumulative_energy(np.array([3.0, 4.0])), [9 / 25, 1.0])
    energy = cumulative_energy(np.array([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(energy, [0.25, 0.5, 0.75, 1.0])
    assert energy[-1] == 1.0
    assert list(cumulative_energy(np.zeros(3))) == [1.0, 1.0, 1.0]


def test_rank_for_energy_hand_cases():
    energy = cumulative_energy(np.array([3.0, 1.0, 1.0, 1.0]))  # 9/12, 10/12, 11/12, 1
    levels = (0.5, 0.75, 0.8, 0.9, 0.95, 1.0)
    assert [rank_for_energy(energy, level) for level in levels] == [1, 1, 2, 3, 4, 4]
    flat = cumulative_energy(np.ones(10))  # 0.1, 0.2, ..., 1.0 (with rounding in the cumsum)
    assert [rank_for_energy(flat, level) for level in (0.9, 0.95, 0.99)] == [9, 10, 10]
    assert rank_for_energy(cumulative_energy(np.array([5.0, 0.0, 0.0])), 0.99) == 1


def test_effective_rank_hand_cases():
    assert effective_rank(np.full(7, 2.5)) == pytest.approx(7.0)
    assert effective_rank(np.array([3.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2^1.5
    assert effective_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)


def test_shadowkv_rank_rule():
    assert shadowkv_rank(1024) == 160
    assert shadowkv_rank(192) == 30
    assert shadowkv_rank(512) == 80
    assert shadowkv_rank(2) == 1  # never below 1
    assert default_ranks(32) == [1, 2, 4, 5, 8, 16, 32]  # powers of two, round(160·32/1024) = 5, full


# --------------------------------------------------------------------------- spectra of a real capture


@pytest.mark.parametrize("center", [False, True])
def test_singular_values_equal_numpy_svd(trace, center):
    spectrum, summary = key_spectrum(trace, center=center, progress=False)
    assert list(spectrum.columns) == SPECTRUM_COLUMNS
    h_kv = trace.k_pre(0).shape[0]
    assert set(spectrum.kv_head) == {-1, *range(h_kv)}
    assert set(spectrum.stage) == {"pre_rope", "post_rope"}
    assert sorted(spectrum.layer.unique()) == trace.layers
    for layer in trace.layers:
        for stage, keys in (("pre_rope", trace.k_pre(layer)), ("post_rope", trace.k_post(layer))):
            for kv_head, matrix in numpy_key_matrices(keys).items():
                if center:
                    matrix = matrix - matrix.mean(axis=0, keepdims=True)
                expected = np.linalg.svd(matrix, compute_uv=False)
                rows = select(spectrum, layer, stage, kv_head)
                assert list(rows["index"]) == list(range(len(expected)))
                np.testing.assert_allclose(rows.singular_value, expected, rtol=1e-7, atol=1e-9 * expected[0])
                energy = rows.energy.to_numpy()
                assert np.all(np.diff(energy) >= 0) and energy[-1] == 1.0
                np.testing.assert_allclose(energy, np.cumsum(expected**2) / np.sum(expected**2), rtol=1e-9)

                (row,) = select(summary, layer, stage, kv_head).to_dict("records")
                assert (row["n_tokens"], row["dim"], row["centered"]) == (*matrix.shape, center)
                share = np.cumsum(expected**2) / np.sum(expected**2)
                for level in (90, 95, 99):
                    assert row[f"rank{level}"] == int(np.argmax(share >= level / 100 - 1e-12)) + 1
                p = expected / expected.sum()
                p = p[p > 0]
                assert row["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_summary_columns(trace):
    _, summary = key_spectrum(trace, layers=trace.layers[:1], progress=False)
    for column in ("layer", "kv_head", "stage", "centered", "n_tokens", "dim", "rank90", "rank95", "rank99",
                   "effective_rank"):  # fmt: skip
        assert column in summary.columns
    h_kv = trace.k_pre(0).shape[0]
    assert len(summary) == 2 * (1 + h_kv)  # 2 stages × (joint + each head)
    assert (summary.rank90 <= summary.rank95).all() and (summary.rank95 <= summary.rank99).all()


# --------------------------------------------------------------------------- low-rank damage


def numpy_rank_r_post_rope(trace, layer, r):
    """Eckart–Young: the best rank-r approximation of the joint pre-RoPE keys, re-rotated, [H_kv, L, d]."""
    k_pre = trace.k_pre(layer).double().numpy()
    h_kv, length, d = k_pre.shape
    joint = np.concatenate(list(k_pre), axis=1)  # [L, H_kv·d]
    u, s, vh = np.linalg.svd(joint, full_matrices=False)
    low = (u[:, :r] * s[:r]) @ vh[:r]
    per_head = np.stack([low[:, h * d : (h + 1) * d] for h in range(h_kv)])
    cos, sin = (t.double().numpy() for t in trace.rope(layer))
    return numpy_rope(per_head, cos, sin)


def test_rebuilt_keys_are_numpys_best_rank_r_approximation_re_rotated(trace):
    layer = trace.layers[-1]
    h_kv, _, d = trace.k_pre(layer).shape
    ranks = [1, 3, 8, h_kv * d]
    rebuilt = dict(rebuild_keys(trace.k_pre(layer), *trace.rope(layer), ranks))
    assert sorted(rebuilt) == ranks
    for r in ranks:
        expected = numpy_rank_r_post_rope(trace, layer, r)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(rebuilt[r].double().numpy(), expected, rtol=0, atol=1e-5 * scale)
    # full rank re-rotated is what the model's attention saw
    torch.testing.assert_close(rebuilt[h_kv * d], trace.k_post(layer), rtol=1e-5, atol=1e-5)


def test_full_rank_damage_is_zero(trace):
    damage = lowrank_damage(trace, n_queries=16, progress=False)
    h_kv, _, d = trace.k_pre(0).shape
    full = damage[damage["rank"] == h_kv * d]
    assert len(full) == len(trace.layers) * h_kv
    assert (full.logit_rel_error < 1e-5).all() and (full.output_rel_error < 1e-5).all()
    assert (full.topk_recall == 1.0).all()
    assert set(damage["rank"]) == set(default_ranks(h_kv * d))
    assert (damage.n_queries == 16).all()
    assert (damage.top_k == max(1, math.ceil(TOPK_FRACTION * trace.n_tokens))).all()


def test_damage_at_rank_r_matches_numpy_attention(trace):
    """logit / output errors and top-k recall recomputed with numpy from the numpy rank-r keys."""
    layer, r, n = trace.layers[0], 3, 12
    info = trace.layer_meta(layer)
    scaling, window = info["scaling"], info["sliding_window"]
    q = trace.q(layer).double().numpy()
    k = trace.k_post(layer).double().numpy()
    v = trace.v(layer).double().numpy()
    k_r = numpy_rank_r_post_rope(trace, layer, r)
    h_q, length, _ = q.shape
    h_kv = k.shape[0]
    group = h_q // h_kv
    positions = np.arange(length - n, length)
    j = np.arange(length)[None, :]
    visible = (j <= positions[:, None]) & ((j > positions[:, None] - window) if window else True)
    top_k = max(1, math.ceil(TOPK_FRACTION * length))

    def attend(keys):
        s = np.einsum("hqd,hkd->hqk", q[:, positions], np.repeat(keys, group, axis=0)) * scaling
        s = np.where(visible, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return s, np.einsum("hqk,hkd->hqd", w, np.repeat(v, group, axis=0))

    s, o = attend(k)
    s_r, o_r = attend(k_r)
    s0, sr0 = np.where(visible, s, 0.0), np.where(visible, s_r, 0.0)
    logit_err = np.linalg.norm(sr0 - s0, axis=-1) / np.linalg.norm(s0, axis=-1)
    out_err = np.linalg.norm(o_r - o, axis=-1) / np.linalg.norm(o, axis=-1)
    top = np.argsort(-s, axis=-1)[..., :top_k]
    top_r = np.argsort(-s_r, axis=-1)[..., :top_k]
    recall = np.array([[len(set(a) & set(b)) / top_k for a, b in zip(x, y)] for x, y in zip(top, top_r)])

    damage = lowrank_damage(trace, layers=[layer], ranks=[r], n_queries=n, progress=False)
    assert list(damage.kv_head) == list(range(h_kv)) and (damage["rank"] == r).all()
    for h, row in damage.set_index("kv_head").iterrows():
        heads = slice(h * group, (h + 1) * group)
        assert row.logit_rel_error == pytest.approx(logit_err[heads].mean(), rel=1e-4)
        assert row.output_rel_error == pytest.approx(out_err[heads].mean(), rel=1e-4)
        assert row.topk_recall == pytest.approx(recall[heads].mean())
        assert row.rank_fraction == pytest.approx(r / (h_kv * k.shape[-1]))


def test_energy_figure_names_the_true_channel_count_for_short_prompts(tiny):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvdiag.plots.spectrum import energy_vs_rank

    model, tokenizer = tiny("tiny-llama")
    short = capture_prompt(model, tokenizer, "short one")  # 10 tokens < H_kv·d = 32 channels
    spectrum, summary = key_spectrum(short, progress=False)
    fig = energy_vs_rank(spectrum, channels=int(summary.loc[summary.kv_head == -1, "dim"].max()))
    try:
        ax = fig.axes[0]
        assert "of 32 channels" in ax.get_xlabel(), ax.get_xlabel()
        (line,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert line.get_xdata()[0] == pytest.approx(160 * 32 / 1024)
    finally:
        plt.close(fig)
