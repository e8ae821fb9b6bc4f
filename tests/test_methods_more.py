"""ArkVale, InfiniGen and LRQK against written-out numpy references on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError
from kvdiag.methods.arkvale import ArkVale
from kvdiag.methods.base import LayerKV
from kvdiag.methods.infinigen import InfiniGen
from kvdiag.methods.lrqk import LRQK, lrqk_prefill


def make_layer(n_kv=2, group=2, n_tokens=96, d=8, seed=0, layer_idx=4, dtype=torch.float32) -> LayerKV:
    gen = torch.Generator().manual_seed(seed)
    k_pre = torch.randn(n_kv, n_tokens, d, generator=gen, dtype=dtype)
    v = torch.randn(n_kv, n_tokens, d, generator=gen, dtype=dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n_tokens, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q = apply_rope(torch.randn(n_kv * group, n_tokens, d, generator=gen, dtype=dtype), cos, sin)
    return LayerKV(
        k_pre=k_pre,
        k_post=apply_rope(k_pre, cos, sin),
        v=v,
        cos=cos,
        sin=sin,
        scaling=1 / math.sqrt(d),
        q=q,
        layer_idx=layer_idx,
    )


def cold(method, built, budget):
    """A decode state without the method's GPU cache: every chosen token counts as fetched."""
    state = method.start(built, budget)
    state.cache_tokens = 0
    return state


def decode_queries(layer: LayerKV, n=3, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, layer.q.shape[0], layer.head_dim, generator=gen, dtype=layer.k_post.dtype)


# --- ArkVale --------------------------------------------------------------------------------------


def test_arkvale_box_digest_matches_loop():
    layer = make_layer(n_tokens=37, d=4)
    page = 4
    index = ArkVale(page_size=page).build(layer)
    keys = layer.k_post.numpy()
    n_digest = math.ceil(37 / page) - 1  # the last (partial) page has no digest
    assert index.resident["box_max"].shape == (2, n_digest, 4)
    for h in range(2):
        for p in range(n_digest):
            for c in range(4):
                col = [keys[h, t, c] for t in range(p * page, (p + 1) * page)]
                centre = (max(col) + min(col)) / 2
                radius = sum(abs(x - centre) for x in col) / len(col)
                assert index.resident["box_max"][h, p, c].item() == pytest.approx(centre + radius, abs=1e-5)
                assert index.resident["box_min"][h, p, c].item() == pytest.approx(centre - radius, abs=1e-5)


@pytest.mark.parametrize("group_size", [1, 0])
def test_arkvale_scores_and_pages_match_loop(group_size):
    n_kv, group, page, n_tokens = 2, 3, 4, 61  # 16 pages, the last one partial
    layer = make_layer(n_kv=n_kv, group=group, n_tokens=n_tokens, d=6)
    method = ArkVale(page_size=page, n_sink_pages=2, n_win_pages=3, group_size=group_size)
    index = method.build(layer)
    q = decode_queries(layer)
    budget = 9  # -> ceil(9 / 4) = 3 pages by score
    sel = method.select(index, q, cold(method, index, budget))

    hi, lo, qn = index.resident["box_max"].numpy(), index.resident["box_min"].numpy(), q.numpy()
    n_pages, candidates = 16, range(2, 16 - 3)
    kv_groups = [[0], [1]] if group_size == 1 else [[0, 1]]
    for i in range(q.shape[0]):
        for heads in kv_groups:
            q_heads = [h * group + g for h in heads for g in range(group)]
            scores = {}
            for p in candidates:
                per_head = []
                for qh in q_heads:
                    kv = qh // group
                    total = 0.0
                    for c in range(6):
                        total += max(qn[i, qh, c] * hi[kv, p, c], qn[i, qh, c] * lo[kv, p, c])
                    per_head.append(total)
                scores[p] = sum(per_head) / len(per_head)
            best = sorted(scores, key=scores.get, reverse=True)[:3]
            expected = np.zeros(n_tokens, dtype=bool)
            for p in list(range(2)) + list(range(n_pages - 3, n_pages)) + best:
                expected[p * page : min((p + 1) * page, n_tokens)] = True
            for h in heads:
                assert np.array_equal(sel.mask[i, h].numpy(), expected)
                fetched = np.zeros(n_tokens, dtype=bool)
                for p in best:
                    fetched[p * page : (p + 1) * page] = True
                assert np.array_equal(sel.fetched[i, h].numpy(), fetched)


def test_arkvale_sinks_window_always_kept_and_budget():
    layer = make_layer(n_tokens=200, d=8)
    method = ArkVale.study()  # pages of 16, 2 sinks, 5 window pages
    index = method.build(layer)
    q = decode_queries(layer, n=4)
    for budget in (1, 16, 17, 40):
        sel = method.select(index, q, cold(method, index, budget))
        assert sel.mask[..., :32].all()  # 2 sink pages
        assert sel.mask[..., (13 - 5) * 16 :].all()  # 13 pages, the last 5 are the window
        n_fetched = sel.fetched.sum(dim=-1)
        assert (n_fetched == math.ceil(budget / 16) * 16).all()
        assert not (sel.fetched & ~sel.mask).any()
        # 2 KV heads × the chosen pages' tokens × K and V of d = 8 at the captured fp32
        assert sel.fetched_bytes() == pytest.approx(2 * math.ceil(budget / 16) * 16 * 2 * 8 * 4)


def test_arkvale_page_cache_fetches_only_misses():
    """Upstream keeps the pages recalled at the previous step on the GPU: a page chosen again is a
    hit, not fetched again. Steps run in order through one decode state."""
    layer = make_layer(n_tokens=200, d=8)
    method = ArkVale.study()
    built = method.build(layer)
    q = decode_queries(layer, n=5, seed=7)
    q[2] = q[1]  # a repeated query chooses the same pages: all hits
    sel = method.select(built, q, method.start(built, 40))  # 3 pages of 16 per step
    chosen = sel.selected_mask  # [n, H_kv, L]
    assert torch.equal(sel.fetched[0], chosen[0])  # the first step is cold
    for step in range(1, 5):
        assert torch.equal(sel.fetched[step], chosen[step] & ~chosen[step - 1]), step
    assert not sel.fetched[2].any()


def test_arkvale_short_prompt_and_dense_layer_attend_everything():
    layer = make_layer(n_tokens=50, d=4)
    for method, lay in ((ArkVale(page_size=16), layer), (ArkVale(dense_layers=5), layer)):
        sel = method.select(method.build(lay), decode_queries(lay), 8)
        assert sel.mask.all() and not sel.fetched.any()


@pytest.mark.parametrize(
    "knobs",
    [{"page_size": 0}, {"n_win_pages": 0}, {"n_sink_pages": -1}, {"group_size": -1}, {"dense_layers": -1}],
)
def test_arkvale_bad_knobs(knobs):
    with pytest.raises(KvdiagError):
        ArkVale(**knobs)


def test_arkvale_group_must_divide_kv_heads():
    with pytest.raises(KvdiagError, match="group_size"):
        ArkVale(group_size=3).build(make_layer(n_kv=2))


# --- InfiniGen ------------------------------------------------------------------------------------


def test_infinigen_skew_is_orthogonal_and_keeps_logits():
    layer = make_layer(n_kv=2, group=2, n_tokens=40, d=8, dtype=torch.float64)
    index = InfiniGen().build(layer)
    skew = index.info["skew"].double().numpy()  # [H_q, d, d]
    q, k = layer.q.numpy(), layer.k_post.numpy()
    for h in range(4):
        a = skew[h]
        np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-5)
        kh = k[h // 2]
        np.testing.assert_allclose((q[h] @ a) @ (kh @ a).T, q[h] @ kh.T, atol=1e-4)
        # columns are q's right singular vectors, in reverse order of s_q·s_k (both descending)
        _, _, vt = np.linalg.svd(q[h], full_matrices=False)
        for j in range(8):
            assert abs(abs(a[:, 7 - j] @ vt[j]) - 1) < 1e-4


def test_infinigen_partial_channels_match_loop():
    layer = make_layer(n_kv=1, group=2, n_tokens=30, d=10)
    index = InfiniGen(partial_weight_ratio=0.2).build(layer)
    skew = index.info["skew"].numpy()
    for h in range(2):
        sums_q = np.abs(layer.q[h].numpy() @ skew[h]).sum(axis=0)
        sums_k = np.abs(layer.k_post[0].numpy() @ skew[h]).sum(axis=0)
        expected = set(np.argsort(-sums_q)[:2]) | set(np.argsort(-sums_k)[:2])
        assert set(np.flatnonzero(index.info["partial"][h].numpy())) == expected


def test_infinigen_full_channels_speculate_exact_logits_and_select_all():
    layer = make_layer(n_tokens=50, d=8)
    method = InfiniGen(partial_weight_ratio=1.0, alpha=math.inf)
    index = method.build(layer)
    q = decode_queries(layer)
    exact = torch.einsum("nhd,hld->nhl", q, layer.k_post.repeat_interleave(2, dim=0)) / math.sqrt(8)
    torch.testing.assert_close(method.speculated_logits(index, q), exact, atol=1e-4, rtol=1e-4)
    sel = method.select(index, q, 50)
    assert sel.mask.all() and sel.fetched.all() and sel.per_query_head


def test_infinigen_threshold_rule_matches_loop():
    layer = make_layer(n_kv=2, group=2, n_tokens=60, d=8)
    q = decode_queries(layer, n=4) * 6  # spread the logits so the threshold bites
    for alpha, budget in ((1.5, 60), (1.5, 7), (0.0, 60), (math.inf, 11)):
        method = InfiniGen(partial_weight_ratio=1.0, alpha=alpha)
        sel = method.select(method.build(layer), q, budget)
        qn, kn = q.numpy().astype(np.float64), layer.k_post.numpy().astype(np.float64)
        for i in range(4):
            logits = [[float(qn[i, h] @ kn[h // 2, t]) / math.sqrt(8) for t in range(60)] for h in range(4)]
            counts = [sum(x >= max(row) - alpha for x in row) for row in logits]
            keep = min(int(sum(counts) / 4), budget)
            for h in range(4):
                expected = np.zeros(60, dtype=bool)
                expected[np.argsort(-np.array(logits[h]), kind="stable")[:keep]] = True
                assert np.array_equal(sel.mask[i, h].numpy(), expected)


def test_infinigen_dense_layers_and_budget():
    method = InfiniGen()
    dense = make_layer(layer_idx=1)
    sel = method.select(method.build(dense), decode_queries(dense), 5)
    assert sel.mask.all() and not sel.fetched.any()
    layer = make_layer(layer_idx=2)
    for budget in (1, 5, 20):
        sel = method.select(method.build(layer), decode_queries(layer), budget)
        assert (sel.mask.sum(dim=-1) <= budget).all()


def test_infinigen_calibration_layer_and_missing_queries():
    layer, calib = make_layer(seed=0), make_layer(seed=7, n_tokens=20)
    index = InfiniGen().build(layer, calibration=calib)
    assert index.info["skew"].shape == (4, 8, 8)
    calib.q = None
    with pytest.raises(KvdiagError, match="queries"):
        InfiniGen().build(layer, calibration=calib)


@pytest.mark.parametrize(
    "knobs",
    [{"alpha": -1.0}, {"partial_weight_ratio": 0.0}, {"partial_weight_ratio": 1.5}, {"dense_layers": -2}],
)
def test_infinigen_bad_knobs(knobs):
    with pytest.raises(KvdiagError):
        InfiniGen(**knobs)


# --- LRQK -----------------------------------------------------------------------------------------


def lrqk_objective(q, k, a_q, b_q, a_k, b_k, lam_q=1.0, lam_k=1.0) -> float:
    """‖Q Kᵀ − A_Q A_Kᵀ‖² + λ_Q‖Q − A_Q B_Q‖² + λ_K‖K − A_K B_K‖², summed over heads (numpy)."""
    total = 0.0
    for h in range(q.shape[0]):
        total += np.sum((q[h] @ k[h].T - a_q[h] @ a_k[h].T) ** 2)
        total += lam_q * np.sum((q[h] - a_q[h] @ b_q[h]) ** 2) + lam_k * np.sum((k[h] - a_k[h] @ b_k[h]) ** 2)
    return float(total)


def test_lrqk_full_rank_reconstructs_qk():
    layer = make_layer(n_kv=2, group=1, n_tokens=40, d=6, dtype=torch.float64)
    a_q, _, a_k, _ = lrqk_prefill(layer.q, layer.k_post, 6, iters=3, tol=0.0)
    exact = np.einsum("hld,hmd->hlm", layer.q.numpy(), layer.k_post.numpy())
    approx = np.einsum("hlr,hmr->hlm", a_q.numpy(), a_k.numpy())
    np.testing.assert_allclose(approx, exact, atol=1e-8 * np.abs(exact).max())


@pytest.mark.parametrize("init", ["topcol", "top", "randn"])
def test_lrqk_alternating_steps_decrease_objective(init):
    layer = make_layer(n_kv=2, group=1, n_tokens=50, d=8, dtype=torch.float64)
    q, k = layer.q.numpy(), layer.k_post.numpy()
    values = []
    for iters in range(7):
        factors = lrqk_prefill(layer.q, layer.k_post, 3, iters=iters, tol=0.0, lambda_q=0.5, init=init)
        values.append(lrqk_objective(q, k, *(f.numpy() for f in factors), lam_q=0.5))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < values[0]


def test_lrqk_recent_always_kept_and_budget():
    layer = make_layer(n_kv=2, group=2, n_tokens=200, d=8)
    method = LRQK(rank=4, rank_head_dim=0)
    index = method.build(layer)
    q = decode_queries(layer)
    for budget in (1, 10, 50):
        sel = method.select(index, q, cold(method, index, budget))
        assert sel.mask[..., -64:].all() and sel.per_query_head
        assert (sel.fetched.sum(dim=-1) == budget).all()
        assert not sel.fetched[..., -64:].any()
        assert (sel.mask.sum(dim=-1) == budget + 64).all()
    short = method.select(index, q, 136)  # the 136 older tokens fit the budget
    assert short.mask.all()


def test_lrqk_decode_projection_matches_loop():
    layer = make_layer(n_kv=1, group=2, n_tokens=40, d=6, dtype=torch.float64)
    method = LRQK(rank=3, rank_head_dim=0, n_recent=8, lambda_active=0.7)
    index = method.build(layer)
    q = decode_queries(layer, n=2)
    budget = 5
    sel = method.select(index, q, budget)
    a_k, b_q, a_q_last = (
        index.resident["a_k"].numpy(),
        index.resident["b_q"].numpy(),
        index.resident["a_q_last"].numpy(),
    )
    keys = layer.k_post[0].numpy()
    for h in range(2):
        hits = list(np.argsort(-(a_k[h, :32] @ a_q_last[h]), kind="stable")[:budget])
        omega = hits + list(range(32, 40))
        k_om, a_om = keys[omega], a_k[h, omega]
        gram = b_q[h] @ b_q[h].T + 0.7 * a_om.T @ a_om
        for i in range(2):
            qi = q[i, h].numpy()
            q_hat = np.linalg.solve(gram.T, (qi @ b_q[h].T + 0.7 * (qi @ k_om.T) @ a_om).T).T
            scores = a_k[h, :32] @ q_hat
            expected = np.zeros(40, dtype=bool)
            expected[np.argsort(-scores)[:budget]] = True
            expected[32:] = True
            assert np.array_equal(sel.mask[i, h].numpy(), expected)


def test_lrqk_rank_rule_and_study():
    assert LRQK().effective_rank(128) == 16 and LRQK().effective_rank(64) == 8
    assert LRQK.study("qwen").effective_rank(128) == 32
    index = LRQK().build(make_layer(d=8))
    assert index.resident["a_k"].shape[-1] == 1  # round(16 · 8 / 128)


@pytest.mark.parametrize(
    "knobs",
    [
        {"rank": 0},
        {"rank": 200},
        {"n_recent": -1},
        {"init": "svd"},
        {"lambda_q": -1.0},
        {"prefill_iters": -1},
        {"rank_head_dim": -1},
    ],
)
def test_lrqk_bad_knobs(knobs):
    with pytest.raises(KvdiagError):
        LRQK(**knobs)


def test_lrqk_rank_above_head_dim_and_missing_queries():
    with pytest.raises(KvdiagError, match="head_dim"):
        LRQK(rank=9, rank_head_dim=0).build(make_layer(d=8))
    layer = make_layer()
    layer.q = None
    with pytest.raises(KvdiagError, match="queries"):
        LRQK().build(layer)


# --- shared contract checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", [ArkVale(page_size=8), InfiniGen(), LRQK(rank=2, rank_head_dim=0, n_recent=16)]
)
def test_exact_keys_values_and_shapes(method):
    layer = make_layer(n_tokens=120)
    index = method.build(layer)
    keys, values = method.dense_view(index)
    assert torch.equal(keys, layer.k_post) and torch.equal(values, layer.v)
    ids = torch.tensor([[0, 5, 7], [3, 3, 119]])
    torch.testing.assert_close(
        method.materialize(index, ids)[0], torch.stack([layer.k_post[h, ids[h]] for h in range(2)])
    )
    sel = method.select(index, decode_queries(layer), 12)
    heads = 4 if sel.per_query_head else 2
    assert sel.mask.shape == sel.fetched.shape == (3, heads, 120)
    assert sel.per_query(4).shape == (3, 4, 120)
    assert method.resident_bytes(index) > 0 and sel.fetched_bytes() > 0
    with pytest.raises(KvdiagError):
        method.select(index, torch.zeros(3, 4, 5), 12)


def _lru_reference(cache: list[list[int]], capacity: int, steps: list[list[list[int]]]) -> tuple[list, list]:
    """The GPU cache of fetched tokens as plain Python lists, step by step: per KV head, the chosen ids
    (a group's union) that were cached move to the recent end in cache order, the fetched ones enter
    in ascending order, the oldest leave beyond capacity. steps[s][kv] = chosen ids (-1 = none)."""
    hits = []
    for chosen_per_head in steps:
        step_hits = []
        for kv, chosen in enumerate(chosen_per_head):
            step_hits.append([c >= 0 and c in cache[kv] for c in chosen])
            picked = {c for c in chosen if c >= 0}
            kept = [c for c in cache[kv] if c not in picked]
            reused = [c for c in cache[kv] if c in picked]
            new = sorted(picked - set(cache[kv]))
            order = kept + reused + new
            cache[kv] = order[max(0, len(order) - capacity) :] if capacity else []
        hits.append(step_hits)
    return cache, hits


@pytest.mark.parametrize("group, capacity", [(1, 6), (3, 5), (2, 1), (1, 0)])
def test_batched_lru_cache_update_matches_the_plain_list_walk(group, capacity):
    from kvdiag.methods.selection import DecodeState, cached_ids, update_caches

    gen = torch.Generator().manual_seed(group * 10 + capacity)
    n_rows, steps, n_kv, k, length = 3, 7, 2, 3, 12
    ids = torch.randint(-1, length, (n_rows, steps, n_kv * group, k), generator=gen)  # duplicates, -1 padding
    states = [DecodeState(budget_tokens=k, cache_tokens=capacity if row != 1 else 0) for row in range(n_rows)]
    warm = torch.tensor([[4, 7, -1], [2, 9, 0]]).repeat_interleave(group, dim=0)  # [H_sel, k], one step
    update_caches([states[2]], warm[None, None], n_kv, length)  # carried over from an earlier batch
    hits = update_caches(states, ids, n_kv, length)
    for row, state in enumerate(states):
        cap = state.cache_tokens
        warm_steps = [[warm[kv * group : (kv + 1) * group].reshape(-1).tolist() for kv in range(n_kv)]]
        start = _lru_reference([[], []], cap, warm_steps)[0] if row == 2 else [[], []]
        per_step = [[ids[row, s, kv * group : (kv + 1) * group].reshape(-1).tolist() for kv in range(n_kv)]
                    for s in range(steps)]  # fmt: skip
        cache, expected = _lru_reference([list(c) for c in start], cap, per_step)
        got = [[hits[row, s, kv * group : (kv + 1) * group].reshape(-1).tolist() for kv in range(n_kv)]
               for s in range(steps)]  # fmt: skip
        assert got == expected, (row, got, expected)
        if cap:
            assert [[c for c in head if c >= 0] for head in cached_ids(state).tolist()] == cache
        else:
            assert not hits[row].any()  # no cache: nothing is ever a hit
    # the same steps as two decode calls (the second finds the batch's shared ranks): the same hits
    again = [DecodeState(budget_tokens=k, cache_tokens=st.cache_tokens) for st in states]
    update_caches([again[2]], warm[None, None], n_kv, length)
    split = torch.cat(
        [update_caches(again, ids[:, :3], n_kv, length), update_caches(again, ids[:, 3:], n_kv, length)], 1
    )
    assert torch.equal(split, hits) and again[0].cache is again[2].cache
