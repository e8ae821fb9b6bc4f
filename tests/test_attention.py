"""Exact attention helpers against a plain numpy full-matrix reference (float64, all heads, all L×L)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdiag.attention import attention_output, attention_weights, iter_logits, topk_tokens
from kvdiag.errors import KvdiagError


def numpy_logits(q, k, positions, scaling, window=None, softcap=None):
    """Reference masked logits [H_q, n, L]: KV heads repeated for GQA, full scores, then masked."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[0] // k.shape[0]
    k_rep = np.repeat(k, group, axis=0)  # [H_q, L, d]: query head h uses KV head h // group
    scores = np.einsum("hqd,hkd->hqk", q, k_rep) * scaling  # [H_q, Lq, L], every position
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = scores[:, positions]
    p = np.asarray(positions)[:, None]
    j = np.arange(k.shape[1])[None, :]
    allowed = j <= p
    if window:
        allowed &= j > p - window
    return np.where(allowed, scores, -np.inf)


def numpy_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_output(q, k, v, positions, scaling, window=None, softcap=None):
    weights = numpy_softmax(numpy_logits(q, k, positions, scaling, window, softcap))
    group = q.shape[0] // k.shape[0]
    return np.einsum("hqk,hkd->hqd", weights, np.repeat(np.asarray(v, np.float64), group, axis=0))


def make_inputs(h_q, h_kv, length, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(h_q, length, d, generator=gen)
    k = torch.randn(h_kv, length, d, generator=gen)
    v = torch.randn(h_kv, length, d, generator=gen)
    return q, k, v


# (H_q, H_kv, L, d, sliding window, soft-cap): GQA and MHA, odd L, window and cap on and off
CASES = [
    (6, 2, 37, 8, None, None),
    (6, 2, 37, 8, 5, None),
    (6, 2, 37, 8, None, 1.5),
    (6, 2, 37, 8, 7, 2.0),
    (4, 4, 23, 16, None, None),
    (4, 4, 23, 16, 3, 3.0),
    (3, 1, 11, 5, 1, None),  # window 1: each query sees only itself
]
CHUNKS = [1, 5, 1000]


def positions_for(length, seed):
    """Chosen query positions in a scrambled order, including the first and last position."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(length, size=min(length, 13), replace=False)
    return np.concatenate([[length - 1], chosen, [0]])


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("h_q", "h_kv", "length", "d", "window", "cap"), CASES)
def test_weights_and_output_match_numpy(h_q, h_kv, length, d, window, cap, chunk):
    q, k, v = make_inputs(h_q, h_kv, length, d, seed=h_q * 100 + length)
    positions = positions_for(length, seed=length)
    scaling = d**-0.5
    ref_w = numpy_softmax(numpy_logits(q.numpy(), k.numpy(), positions, scaling, window, cap))
    ref_o = numpy_output(q.numpy(), k.numpy(), v.numpy(), positions, scaling, window, cap)

    weights = attention_weights(q, k, torch.as_tensor(positions), scaling, window, cap, chunk)
    assert weights.shape == (h_q, len(positions), length) and weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-5, atol=1e-6)

    out = attention_output(q, k, v, positions.tolist(), scaling, window, cap, chunk)
    assert out.shape == (h_q, len(positions), d) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("h_q", "h_kv", "length", "d", "window", "cap"), CASES[:4])
def test_iter_logits_chunks_tile_the_positions_and_match_numpy(h_q, h_kv, length, d, window, cap, chunk):
    q, k, _ = make_inputs(h_q, h_kv, length, d, seed=7)
    positions = positions_for(length, seed=3)
    ref = numpy_logits(q.numpy(), k.numpy(), positions, 0.3, window, cap)
    covered = []
    for part, logits in iter_logits(q, k, torch.as_tensor(positions), 0.3, window, cap, chunk):
        covered.extend(range(len(positions))[part])
        assert logits.shape == (h_q, len(range(len(positions))[part]), length)
        assert logits.shape[1] <= chunk
        r = ref[:, part]
        assert np.array_equal(np.isneginf(logits.numpy()), np.isneginf(r))  # same mask exactly
        finite = np.isfinite(r)
        np.testing.assert_allclose(logits.numpy()[finite], r[finite], rtol=1e-5, atol=1e-5)
    assert covered == list(range(len(positions)))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("h_q", "h_kv", "length", "d", "window", "cap"), [CASES[0], CASES[3], CASES[4]])
def test_topk_tokens_are_numpys_top_scores(h_q, h_kv, length, d, window, cap, chunk):
    q, k, _ = make_inputs(h_q, h_kv, length, d, seed=11)
    # late positions only, so every query sees at least top_k keys (window permitting)
    positions = np.array([length - 1, length - 9, length - 3, length - 2, 20])
    top_k = min(window or length, 4)
    ref = numpy_logits(q.numpy(), k.numpy(), positions, d**-0.5, window, cap)
    idx = topk_tokens(q, k, torch.as_tensor(positions), top_k, d**-0.5, window, cap, chunk)
    assert idx.shape == (h_q, len(positions), top_k)
    ref_idx = np.argsort(-ref, axis=-1, kind="stable")[..., :top_k]
    # random scores have no ties: compare as sets, and check the ranking order by score
    assert np.array_equal(np.sort(idx.numpy(), axis=-1), np.sort(ref_idx, axis=-1))
    picked = np.take_along_axis(ref, idx.numpy(), axis=-1)
    assert np.all(np.diff(picked, axis=-1) <= 0)


def test_topk_all_keys_and_sliding_window_keys_are_visible_ones():
    q, k, _ = make_inputs(4, 2, 19, 8, seed=5)
    everything = topk_tokens(q, k, [18], 19, 0.5)
    assert sorted(everything[0, 0].tolist()) == list(range(19))
    windowed = topk_tokens(q, k, [18, 10], 3, 0.5, sliding_window=3)
    assert sorted(windowed[2, 0].tolist()) == [16, 17, 18]
    assert sorted(windowed[2, 1].tolist()) == [8, 9, 10]


def test_first_position_attends_only_to_itself():
    q, k, v = make_inputs(6, 2, 9, 4, seed=1)
    w = attention_weights(q, k, [0], 1.0)
    assert torch.equal(w[:, 0, 0], torch.ones(6)) and torch.count_nonzero(w[:, 0, 1:]) == 0
    out = attention_output(q, k, v, [0], 1.0)
    expected = v[:, 0].repeat_interleave(3, dim=0)  # query head h reads KV head h // 3
    torch.testing.assert_close(out[:, 0], expected)


def test_bfloat16_inputs_give_float32_results_close_to_numpy():
    q, k, v = make_inputs(6, 2, 37, 8, seed=2)
    positions = positions_for(37, seed=9)
    rounded = [t.bfloat16().float().numpy() for t in (q, k, v)]
    ref = numpy_output(*rounded, positions, 0.35)
    out = attention_output(q.bfloat16(), k.bfloat16(), v.bfloat16(), positions, 0.35, chunk_size=4)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda q, k, v: attention_weights(q[:5], k, [3], 1.0), "5 query heads are not a multiple of 2"),
        (lambda q, k, v: attention_output(q[:3], k, v, [3], 1.0), "not a multiple"),
        (lambda q, k, v: list(iter_logits(q[:4], torch.cat([k, k[:1]]), [3], 1.0)), "not a multiple of 3"),
        (lambda q, k, v: attention_weights(q, k, [0, 37], 1.0), r"0\.\.36"),
        (lambda q, k, v: attention_output(q, k, v, [-1], 1.0), r"0\.\.36"),
        (lambda q, k, v: list(iter_logits(q, k, torch.tensor([40]), 1.0)), r"0\.\.36"),
        (lambda q, k, v: topk_tokens(q, k, [36], 0, 1.0), "top_k 0 is outside 1..37"),
        (lambda q, k, v: topk_tokens(q, k, [36], 38, 1.0), "top_k 38 is outside 1..37"),
        (lambda q, k, v: topk_tokens(q, k, [99], 2, 1.0), r"0\.\.36"),
    ],
)
def test_bad_inputs_raise_kvdiag_error(call, message):
    q, k, v = make_inputs(6, 2, 37, 8, seed=0)
    with pytest.raises(KvdiagError, match=message):
        call(q, k, v)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda q, k, v: attention_weights(q, k[..., :4], [3], 1.0),
            id="head_dim_mismatch",
        ),
        pytest.param(
            lambda q, k, v: attention_output(q[:, :10], k, v, [20], 1.0),
            id="position_beyond_q",
        ),
        pytest.param(
            lambda q, k, v: attention_weights(q, k, [], 1.0),
            id="no_positions",
        ),
        pytest.param(
            lambda q, k, v: attention_output(q, k, v, [3], 1.0, chunk_size=0),
            id="chunk_size_0",
        ),
    ],
)
def test_inconsistent_inputs_get_a_clear_error(call):
    """Inputs the helpers cannot serve should raise a KvdiagError naming the problem (or, for no
    positions, return an empty result) instead of a wrong shape or a bare torch/python error."""
    q, k, v = make_inputs(6, 2, 37, 8, seed=0)
    try:
        result = call(q, k, v)
    except KvdiagError:
        return
    except Exception as err:  # noqa: BLE001 - any other error type is the failure being reported
        raise AssertionError(f"{type(err).__name__}: {err}") from err
    assert result.shape[1] == 0, f"wrong result of shape {tuple(result.shape)} instead of an error"
