"""Core methods (exact, oracle, streaming, shadowkv, yakv, quest) and the registry.

References are independent of the code under test: hand-worked toys, written-out numpy loops and
numpy's SVD. The matrix test at the end runs every registered method, including later ones.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError
from kvdiag.methods import get_method, list_methods, parse_method_spec
from kvdiag.methods.base import LayerKV, resolve_budget

# --- fixtures and numpy references ----------------------------------------------------------------


def rope_tables(n_tokens: int, d: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(n_tokens).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def random_layer(
    n_kv: int, d: int, n_tokens: int, seed: int = 0, layer_idx: int = 5, rope: bool = True
) -> LayerKV:
    gen = torch.Generator().manual_seed(seed)
    k_pre = torch.randn(n_kv, n_tokens, d, generator=gen)
    v = torch.randn(n_kv, n_tokens, d, generator=gen)
    if rope:
        cos, sin = rope_tables(n_tokens, d)
    else:
        cos, sin = torch.ones(n_tokens, d), torch.zeros(n_tokens, d)
    return LayerKV(k_pre, apply_rope(k_pre, cos, sin), v, cos, sin, scaling=d**-0.5, layer_idx=layer_idx)


def layer_from_keys(k: torch.Tensor, layer_idx: int = 5) -> LayerKV:
    """A layer whose RoPE is the identity, so k_pre = k_post = k [H_kv, L, d]."""
    n_kv, n_tokens, d = k.shape
    cos, sin = torch.ones(n_tokens, d), torch.zeros(n_tokens, d)
    return LayerKV(
        k.clone(), k.clone(), torch.randn(n_kv, n_tokens, d), cos, sin, d**-0.5, layer_idx=layer_idx
    )


def random_queries(n: int, n_q: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, n_q, d, generator=torch.Generator().manual_seed(seed))


def np_gqa_topk(q: np.ndarray, k: np.ndarray, scale: float, budget: int) -> list[list[set[int]]]:
    """Written-out oracle rule: per KV head, max over its query heads of softmax_j(q·k_j·scale), top budget.

    q [n, H_q, d], k [H_kv, L, d] -> per step, per KV head, the set of chosen token ids.
    """
    n, n_q, _ = q.shape
    n_kv, n_tokens, _ = k.shape
    group = n_q // n_kv
    out = []
    for step in range(n):
        per_head = []
        for h in range(n_kv):
            best = np.full(n_tokens, -np.inf)
            for g in range(group):
                logits = np.array([q[step, h * group + g] @ k[h, j] for j in range(n_tokens)]) * scale
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                best = np.maximum(best, probs)
            per_head.append(set(np.argsort(-best, kind="stable")[:budget].tolist()))
        out.append(per_head)
    return out


def chosen_sets(mask: torch.Tensor) -> list[list[set[int]]]:
    return [[set(torch.nonzero(row).flatten().tolist()) for row in step] for step in mask]


# --- exact, oracle, streaming ---------------------------------------------------------------------


def test_exact_and_full_budget_oracle_attend_everything():
    layer = random_layer(2, 16, 50)
    q = random_queries(3, 4, 16)
    for name, budget in (("exact", 7), ("oracle", 50), ("oracle", 1.0)):
        method = get_method(name)
        sel = method.select(method.build(layer), q, budget)
        assert sel.mask.shape == (3, 2, 50) and bool(sel.mask.all()), name
    exact = get_method("exact")
    assert not exact.select(exact.build(layer), q, 7).fetched.any()
    assert exact.select(exact.build(layer), q, 7).fetched_bytes() == 0


def test_oracle_matches_written_out_gqa_topk():
    layer = random_layer(3, 16, 40, seed=3)
    q = random_queries(2, 9, 16, seed=4)
    oracle = get_method("oracle")
    sel = oracle.select(oracle.build(layer), q, 7)
    expected = np_gqa_topk(q.numpy(), layer.k_post.numpy(), layer.scaling, 7)
    assert chosen_sets(sel.mask) == expected
    assert torch.equal(sel.fetched, sel.mask)  # the oracle keeps nothing resident


def test_streaming_mask_is_sinks_plus_window():
    layer = random_layer(2, 8, 20)
    method = get_method("streaming")  # 4 sinks
    sel = method.select(method.build(layer), random_queries(2, 4, 8), 10)
    expected = {0, 1, 2, 3, 14, 15, 16, 17, 18, 19}
    assert all(s == expected for step in chosen_sets(sel.mask) for s in step)
    tiny = method.select(method.build(layer), random_queries(1, 4, 8), 2)
    assert chosen_sets(tiny.mask)[0][0] == {0, 1}


# --- ShadowKV -------------------------------------------------------------------------------------


def shadowkv_toy() -> tuple[LayerKV, torch.Tensor]:
    """64 tokens, d = 4, one KV head, chunk 8: chunks 0..6 are context, chunk 7 the local window.

    Chunk c repeats one key b_c, except chunk 1 (one key flipped: min cos −1) and chunk 4 (one key
    orthogonal: min cos 1/√50): those are the two outliers. Chunk 1's key would win the score if it
    were a landmark. Query head 0 points at e0 (chunk 2 scores 6, chunk 5 scores 4 after /√4),
    query head 1 at e1 (chunk 0 scores 2). Softmax per head, max over the group:
    chunk 2 ≈ 0.87, chunk 0 ≈ 0.65, chunk 5 ≈ 0.12, chunks 3, 6 ≈ 0.09: the top 2 chunks are {0, 2}
    (a mean query would pick {2, 5}).
    """
    e = torch.eye(4)
    base = {0: e[1], 1: 5 * e[0], 2: 3 * e[0], 3: e[2], 4: e[3], 5: 2 * e[0], 6: -e[0], 7: e[2] + e[3]}
    k = torch.stack([base[t // 8] for t in range(64)])
    k[8 + 3] = -base[1]
    k[32 + 5] = e[0]
    q = torch.stack([4 * e[0], 4 * e[1]])[None]  # [1, H_q = 2, d]
    return layer_from_keys(k[None]), q


def test_shadowkv_toy_outliers_and_selected_chunks():
    layer, q = shadowkv_toy()
    method = get_method(
        "shadowkv", rank=4, rank_channels=4, chunk=8, outlier_chunks=2, local=8, factor_dtype="fp32"
    )
    built = method.build(layer)
    tokens = lambda chunks: {t for c in chunks for t in range(8 * c, 8 * c + 8)}  # noqa: E731
    assert set(built.resident["outlier_ids"][0].tolist()) == tokens([1, 4])
    assert sorted(built.resident["landmark_chunks"][0].tolist()) == [0, 2, 3, 5, 6]
    sel = method.select(built, q, 16)  # 2 chunks
    assert chosen_sets(sel.mask)[0][0] == tokens([0, 2, 1, 4, 7])
    assert chosen_sets(sel.fetched)[0][0] == tokens([0, 2])
    assert set(sel.ids[0, 0].tolist()) == tokens([0, 2])  # token ids, ascending
    assert sel.ids[0, 0].tolist() == sorted(sel.ids[0, 0].tolist())
    assert sel.fetched_bytes() == 16 * 4 * 4  # the fp32 values of 16 tokens, d = 4, as captured


def test_shadowkv_full_rank_rebuilds_post_rope_keys():
    layer = random_layer(2, 16, 64, seed=5)
    method = get_method("shadowkv", rank=32, rank_channels=32, outlier_chunks=1, local=8, factor_dtype="fp32")
    built = method.build(layer)
    keys, values = method.dense_view(built)
    torch.testing.assert_close(keys, layer.k_post, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, layer.v)
    ids = torch.tensor([[0, 5, 63], [1, 2, 3]])
    torch.testing.assert_close(
        method.materialize(built, ids)[0], keys.gather(1, ids[:, :, None].expand(-1, -1, 16))
    )


def test_shadowkv_svd_factor_matches_numpy():
    layer = random_layer(2, 16, 64, seed=6)
    method = get_method("shadowkv", rank=5, rank_channels=32, factor_dtype="fp32")
    assert method.resolved_rank(32) == 5 and get_method("shadowkv").resolved_rank(192) == 30
    built = method.build(layer)
    u_ours, sv_ours = built.resident["u"].double().numpy(), built.resident["sv"].double().numpy()
    flat = layer.k_pre.numpy().transpose(1, 0, 2).reshape(64, 32).astype(np.float64)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    low_rank = (u[:, :5] * s[:5]) @ vt[:5]  # [L, H_kv·d]
    ours = np.einsum("lr,hrd->lhd", u_ours, sv_ours).reshape(64, 32)
    np.testing.assert_allclose(ours, low_rank, atol=1e-4)
    overlap = np.abs(u_ours.T @ u[:, :5])  # same singular vectors up to sign
    np.testing.assert_allclose(overlap, np.eye(5), atol=1e-4)
    # away from the always-kept tokens, keys are the rank-5 keys re-rotated at their positions
    rebuilt = apply_rope(
        torch.from_numpy(low_rank).float().reshape(64, 2, 16).transpose(0, 1), layer.cos, layer.sin
    )
    keys, _ = method.dense_view(built)
    always = method.always_kept(built, method.start(built, 8))
    free = torch.ones(2, 64, dtype=torch.bool).scatter_(1, always, False)
    torch.testing.assert_close(keys[free], rebuilt[free], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(keys[~free], layer.k_post[~free])  # outliers and the local tail: exact


def test_shadowkv_bytes_at_8x128_channels():
    layer = random_layer(8, 128, 256, seed=7, rope=False)
    layer = LayerKV(*(t.to(torch.bfloat16) for t in (layer.k_pre, layer.k_post, layer.v)), layer.cos,
                    layer.sin, layer.scaling, layer_idx=layer.layer_idx)  # a bf16 model, as upstream  # fmt: skip
    method = get_method("shadowkv", outlier_chunks=0)
    built = method.build(layer)
    parts = built.resident_breakdown()
    n_landmark_tokens = 256 - 32
    assert parts["u"] / 256 == 320  # rank 160 at bf16
    assert parts["landmarks"] / (n_landmark_tokens / 8) == 1024 * 2  # one bf16 row of 1024 channels per chunk
    assert parts["landmark_chunks"] == (n_landmark_tokens // 8) * 8 * 4  # the chunk index, int32
    assert parts["local_k"] + parts["local_v"] == 32 * 8 * 128 * 2 * 2
    assert built.resident_bytes == sum(parts.values())
    assert method.entry_bytes(built) == 128 * 2  # the bf16 value row of one (KV head, token)


# --- YAKV -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("landmark_quant", ["bf16", "fp16"])
def test_yakv_with_lossless_landmarks_selects_like_oracle(landmark_quant):
    gen = torch.Generator().manual_seed(8)
    k = torch.randint(-16, 17, (3, 120, 16), generator=gen).float() / 4  # exact in bf16 and fp16
    layer = layer_from_keys(k)
    q = random_queries(3, 9, 16, seed=9)
    yakv = get_method("yakv", local=0, landmark_quant=landmark_quant)
    oracle = get_method("oracle")
    ours = yakv.select(yakv.build(layer), q, 10)
    assert torch.equal(ours.mask, oracle.select(oracle.build(layer), q, 10).mask)
    assert chosen_sets(ours.mask) == np_gqa_topk(q.numpy(), k.numpy(), 16**-0.5, 10)


def test_yakv_bf16_landmarks_rank_bf16_rounded_keys():
    layer = random_layer(2, 32, 100, seed=10)
    q = random_queries(2, 4, 32, seed=11)
    yakv = get_method("yakv", local=16, landmark_quant="bf16")
    sel = yakv.select(yakv.build(layer), q, 12)
    k_bf16 = layer.k_post[:, :84].to(torch.bfloat16).float().numpy()
    expected = np_gqa_topk(q.numpy(), k_bf16, 32**-0.5, 12)
    local = set(range(84, 100))
    assert chosen_sets(sel.mask) == [[s | local for s in step] for step in expected]
    assert chosen_sets(sel.fetched) == expected


def test_yakv_runtime_and_simulator_agree_without_group_disagreement():
    # G = 1: softmax then max over one head is monotone in q·lm, so both rank by the raw dot product.
    layer = random_layer(4, 32, 150, seed=12)
    sim, run = get_method("yakv"), get_method("yakv", rule="mean_query")
    q = random_queries(3, 4, 32, seed=13)
    sim_mask = sim.select(sim.build(layer), q, 20).mask
    assert torch.equal(sim_mask, run.select(run.build(layer), q, 20).mask)
    # G = 3 with identical queries inside each group: the group mean and the group max coincide.
    layer = random_layer(2, 32, 150, seed=14)
    q = random_queries(3, 2, 32, seed=15).repeat_interleave(3, dim=1)
    assert torch.equal(sim.select(sim.build(layer), q, 20).mask, run.select(run.build(layer), q, 20).mask)


def test_yakv_residual_quantization_lowers_landmark_error():
    # Keys sharing a component within each meta-chunk (as neighbouring real keys do) plus noise.
    gen = torch.Generator().manual_seed(16)
    shared = 4 * torch.randn(2, 32, 1, 128, generator=gen).expand(-1, -1, 8, -1).reshape(2, 256, 128)
    k = shared + 0.5 * torch.randn(2, 256, 128, generator=gen)
    layer = layer_from_keys(k)

    def landmarks(method):
        return method.landmarks(method.build(layer))  # decoded from the resident storage

    plain = landmarks(get_method("yakv", local=0))
    residual = landmarks(get_method("yakv", local=0, residual_meta_chunk=8))
    err = lambda x: float(((x - k) ** 2).mean())  # noqa: E731
    assert err(residual) < 0.5 * err(plain)


def test_yakv_kv_quant_and_bytes():
    layer = random_layer(8, 128, 160, seed=17)
    sim, run = get_method("yakv"), get_method("yakv", rule="mean_query")
    assert sim.resolved_kv_quant().startswith("higgs:EDEN2-256") and run.resolved_kv_quant() == "fp8_e4m3"
    built = sim.build(layer)
    keys, _ = sim.dense_view(built)
    torch.testing.assert_close(keys[:, -64:], layer.k_post[:, -64:])  # local window exact
    assert not torch.equal(keys[:, :-64], layer.k_post[:, :-64])  # offloaded keys quantized
    per_token = built.resident_breakdown()["landmarks"] / (160 - 64)
    assert per_token == 1024 * 2 / 8 + 8 * 4  # 2-bit codes of 1024 channels + 8 fp32 group norms
    q = random_queries(2, 32, 128)
    sel = run.select(run.build(layer), q, 10)
    assert bool(sel.fetched[:, :, -64:].all())  # the runtime reads its local window from host memory
    assert sel.fetched_bytes() == pytest.approx(8 * (10 + 64) * 2 * 128)  # fp8 K and V


# --- Quest ----------------------------------------------------------------------------------------


def test_quest_page_score_bounds_every_key():
    method = get_method("quest", dense_layers=0)
    for seed in range(10):
        layer = random_layer(2, 8, 70, seed=seed)  # 5 pages, the last one partial
        q = random_queries(2, 6, 8, seed=100 + seed)
        scores = method.score(method.build(layer), q)  # [n, H_q, P]
        qk = torch.einsum("nhd,hld->nhl", q, layer.k_post.repeat_interleave(3, dim=0))
        for p in range(5):
            page_max = qk[:, :, 16 * p : 16 * p + 16].amax(dim=-1)
            assert bool((scores[:, :, p] >= page_max - 1e-5).all())


def test_quest_selection_matches_written_out_loop():
    layer = random_layer(2, 8, 100, seed=18, layer_idx=4)
    q = random_queries(2, 4, 8, seed=19)
    method = get_method("quest")
    sel = method.select(method.build(layer), q, 40)  # max(3, 40 // 16) = 3 pages
    assert sel.per_query_head and sel.mask.shape == (2, 4, 100)
    k, qn = layer.k_post.numpy(), q.numpy()
    for step in range(2):
        for h in range(4):
            keys = k[h // 2]
            scores = []
            for p in range(7):
                page = keys[16 * p : 16 * p + 16]
                score = 0.0
                for c in range(8):
                    score += max(qn[step, h, c] * page[:, c].max(), qn[step, h, c] * page[:, c].min())
                scores.append(score)
            pages = np.argsort(-np.array(scores), kind="stable")[:3]
            expected = {t for p in pages for t in range(16 * p, min(16 * p + 16, 100))}
            assert set(torch.nonzero(sel.mask[step, h]).flatten().tolist()) == expected


def test_quest_dense_layers_attend_everything():
    layer = random_layer(2, 8, 100, seed=20, layer_idx=1)
    method = get_method("quest")
    sel = method.select(method.build(layer), random_queries(1, 4, 8), 40)
    assert bool(sel.mask.all()) and not sel.fetched.any()


# --- budgets, knobs, registry ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["oracle", "shadowkv", "yakv", "quest", "streaming"])
def test_fraction_and_token_budgets_agree(name):
    layer = random_layer(2, 16, 200, seed=21)
    q = random_queries(2, 4, 16)
    method = get_method(name)
    index = method.build(layer)
    assert torch.equal(method.select(index, q, 0.25).mask, method.select(index, q, 50).mask)


@pytest.mark.parametrize("budget", [0, 0.0, -3, 1.5, 201, "half"])
def test_out_of_range_budget_is_a_clear_error(budget):
    method = get_method("yakv")
    index = method.build(random_layer(2, 16, 200))
    with pytest.raises(KvdiagError):
        method.select(index, random_queries(1, 4, 16), budget)


@pytest.mark.parametrize(
    "name, knobs, words",
    [
        ("shadowkv", {"rank": -1}, "rank=-1"),
        ("shadowkv", {"chunk": 0}, "chunk=0"),
        ("shadowkv", {"local": 30}, "multiple of chunk"),
        ("shadowkv", {"landmark_quant": "higgs:EDEN3-7"}, "landmark_quant"),
        ("shadowkv", {"factor_dtype": "fp64"}, "factor_dtype"),
        ("yakv", {"rule": "sim"}, "'softmax_max'"),
        ("yakv", {"kv_quant": "int99"}, "kv_quant"),
        ("yakv", {"residual_meta_chunk": -2}, "residual_meta_chunk"),
        ("quest", {"page": 0}, "page=0"),
        ("streaming", {"sinks": -1}, "sinks=-1"),
    ],
)
def test_invalid_knob_values_are_clear_errors(name, knobs, words):
    with pytest.raises(KvdiagError, match=words):
        get_method(name, **knobs)


def test_rank_above_the_matrix_is_a_clear_error():
    method = get_method("shadowkv", rank=64, rank_channels=32)
    with pytest.raises(KvdiagError, match="exceeds"):
        method.build(random_layer(2, 16, 50))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(KvdiagError, match="did you mean 'shadowkv'"):
        get_method("shadowk")
    with pytest.raises(KvdiagError, match="did you mean 'rank'"):
        get_method("shadowkv", rnak=3)
    with pytest.raises(KvdiagError, match="did you mean 'chunk'"):
        parse_method_spec("shadowkv:chunks=4")
    with pytest.raises(KvdiagError, match="integer"):
        parse_method_spec("shadowkv:rank=many")


def test_parse_method_spec_and_list_methods():
    method = parse_method_spec("shadowkv:rank=320, chunk=1,outlier_chunks=0,landmark_quant=higgs:EDEN4-256")
    assert (method.name, method.rank, method.chunk, method.landmark_quant) == (
        "shadowkv",
        320,
        1,
        "higgs:EDEN4-256",
    )
    assert parse_method_spec("yakv").knobs() == get_method("yakv").knobs()
    rows = {row["name"]: row for row in list_methods()}
    assert {"exact", "oracle", "streaming", "shadowkv", "yakv", "quest"} <= set(rows)
    assert rows["shadowkv"]["knobs"]["rank"] == 160 and rows["shadowkv"]["knobs"]["chunk"] == 8
    assert rows["yakv"]["knobs"]["local"] == 64 and rows["quest"]["knobs"]["page"] == 16
    for row in rows.values():
        assert row["paper"] and row["description"], row["name"]


# --- every registered method through the same checks -----------------------------------------------

SHAPES = [(4, 2, 16), (9, 3, 64), (4, 1, 32)]


def matrix_layer(n_q: int, n_kv: int, d: int, n_tokens: int = 200) -> LayerKV:
    layer = random_layer(n_kv, d, n_tokens, seed=n_q * 100 + d)
    layer.q = random_queries(1, n_q, d, seed=d)[0][:, None, :].expand(-1, n_tokens, -1).contiguous()
    layer.q = layer.q + 0.1 * torch.randn(n_q, n_tokens, d)
    return layer


def poisoned(built):
    """The same build with every offloaded tensor (codes and scales too) replaced by NaN / garbage."""
    from kvdiag.quant.base import QuantizedTensor

    def poison(t):
        return t.float().fill_(float("nan")).to(t.dtype) if t.is_floating_point() else t.fill_(7)

    bad = {k: (v.map(lambda t: poison(t.clone())) if isinstance(v, QuantizedTensor) else poison(v.clone()))
           for k, v in built.offloaded.items()}  # fmt: skip
    return dataclasses.replace(built, offloaded=bad, _decoded={})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", [row["name"] for row in list_methods()])
def test_every_method_runs_the_contract(name, shape):
    n_q, n_kv, d = shape
    n_tokens, budget = 200, 50  # 50 tokens ≥ Quest's minimum of 3 pages of 16; the contract passes ints
    layer = matrix_layer(n_q, n_kv, d, n_tokens)
    method = get_method(name)
    built = method.build(layer)
    q_a, q_b = random_queries(3, n_q, d, seed=31), random_queries(3, n_q, d, seed=32)
    sel_a, sel_b = (
        method.select(built, q_a, budget),
        method.select(built, q_b, resolve_budget(0.25, n_tokens)),
    )
    n_sel = n_q if sel_a.per_query_head else n_kv
    for sel in (sel_a, sel_b):
        assert sel.mask.shape == (3, n_sel, n_tokens) and sel.mask.dtype == torch.bool
        assert sel.fetched.shape == sel.mask.shape and sel.fetched.dtype == torch.bool
        assert not bool((sel.fetched & ~sel.mask).any())
        assert sel.per_query(n_q).shape == (3, n_q, n_tokens)
        valid = sel.ids[sel.ids >= 0]
        assert bool(((valid >= 0) & (valid < n_tokens)).all())
        assert torch.equal(sel.ids, torch.where(sel.ids < 0, n_tokens, sel.ids).sort(-1).values.masked_fill(
            torch.where(sel.ids < 0, n_tokens, sel.ids).sort(-1).values == n_tokens, -1))  # ascending  # fmt: skip
    # What every query attends is the always-kept set plus coincidences, so the per-head count cannot
    # exceed the budget (rounded up to the method's page or chunk, which upstream selects whole) plus
    # that common part.
    unit = method.block_size
    common = torch.cat([sel_a.mask, sel_b.mask]).all(dim=0)  # [H_sel, L]
    counts = torch.cat([sel_a.mask, sel_b.mask]).sum(dim=-1)  # [2n, H_sel]
    assert bool((counts <= math.ceil(budget / unit) * unit + common.sum(dim=-1)).all())
    # the dense view is materialize at every id, and materialize at some ids is the view at those ids
    keys, values = method.dense_view(built)
    assert keys.shape == values.shape == (n_kv, n_tokens, d)
    assert bool(torch.isfinite(keys).all() and torch.isfinite(values).all())
    ids = torch.randint(0, n_tokens, (n_kv, 23), generator=torch.Generator().manual_seed(d))
    ids[:, 0] = -1  # "none" gives zeros
    k_ids, v_ids = method.materialize(built, ids)

    def expect(x):
        return x.gather(1, ids.clamp_min(0)[:, :, None].expand(-1, -1, d)).masked_fill(
            (ids < 0)[:, :, None], 0
        )  # noqa: E731

    torch.testing.assert_close(k_ids, expect(keys))
    torch.testing.assert_close(v_ids, expect(values))
    # a runtime reads the offloaded rows of those ids (fetch_rows) and materializes from them alone
    from kvdiag.methods.base import fetch_rows

    fetched = fetch_rows(built.offloaded, ids)
    k_f, v_f = method.materialize(poisoned(built), ids, fetched=fetched)
    torch.testing.assert_close(k_f, k_ids)
    torch.testing.assert_close(v_f, v_ids)
    # bytes are measured from the stored tensors, never declared
    from kvdiag.methods.base import stored_nbytes

    state = method.start(built, budget)
    assert built.resident_bytes == sum(stored_nbytes(t) for t in built.resident.values())
    assert method.resident_bytes(built, state) == built.resident_bytes + sum(
        stored_nbytes(t) for t in state.resident.values()
    )
    assert method.resident_bytes(built, state) > 0
    fetched = sel_a.fetched_bytes()
    assert fetched >= 0 and math.isfinite(fetched)
    # selection reads the resident state only: a poisoned offloaded payload changes nothing
    state_ok, state_bad = method.start(built, budget), method.start(built, budget)
    bad = poisoned(built)
    for q in (q_a, q_b):
        good_sel, bad_sel = method.select(built, q, state_ok), method.select(bad, q, state_bad)
        assert torch.equal(good_sel.ids, bad_sel.ids) and torch.equal(good_sel.mask, bad_sel.mask), name


def test_batched_selection_equals_one_prompt_at_a_time():
    """`stack` + `select_batch` over prompts of different lengths gives each row exactly what `select`
    gives that prompt alone (padding never selected, never changes a softmax)."""
    for row in list_methods():
        method = get_method(row["name"])
        layers = [matrix_layer(4, 2, 16, n) for n in (200, 137, 170)]
        builts = [method.build(layer) for layer in layers]
        q = random_queries(3, 4, 16, seed=40)  # 3 rows, one query each
        states = [method.start(b, 0.25) for b in builts]
        batch = method.select_batch(method.stack(builts), q[:, None], states)
        for b, built in enumerate(builts):
            alone = method.select(built, q[b : b + 1], method.start(built, 0.25))
            row_sel = batch.row(b)
            assert torch.equal(row_sel.mask, alone.mask), (row["name"], b)


def test_yakv_center_removes_a_shared_key_offset_before_quantizing():
    """Keys with a large shared component (a k_proj bias): centring keeps the 4-bit error at the level
    of the varying part; without it the error scales with the offset. Reference: numpy mean + HIGGS
    round trip of the centred rows, added back."""
    base = random_layer(2, 64, 200, seed=3)
    offset = torch.zeros(2, 1, 64)
    offset[:, :, 5] = 40.0  # one huge channel shared by every token
    k_pre = base.k_pre + offset
    layer = LayerKV(k_pre, apply_rope(k_pre, base.cos, base.sin), base.v, base.cos, base.sin, base.scaling)
    plain = get_method("yakv", local=0)
    centred = get_method("yakv", local=0, center=True)
    err_plain = (plain.dense_view(plain.build(layer))[0] - layer.k_post).norm() / layer.k_post.norm()
    err_centred = (centred.dense_view(centred.build(layer))[0] - layer.k_post).norm() / layer.k_post.norm()
    assert err_centred < err_plain / 4
    # the same numbers written out: centre in numpy, round-trip the rows, add the mean back, rotate
    from kvdiag.quant import get_quantizer

    k = k_pre.numpy().astype(np.float64)
    mean = k.mean(axis=1, keepdims=True)
    rows = torch.tensor((k - mean).transpose(1, 0, 2).reshape(200, 128), dtype=torch.float32)
    back = get_quantizer("higgs:EDEN2-256:row").roundtrip(rows).numpy().reshape(200, 2, 64).transpose(1, 0, 2)
    expected = apply_rope(torch.tensor(back + mean, dtype=torch.float32), base.cos, base.sin)
    torch.testing.assert_close(centred.dense_view(centred.build(layer))[0], expected, rtol=1e-3, atol=1e-3)
    assert (
        centred.resident_bytes(centred.build(layer))
        == plain.resident_bytes(plain.build(layer))
        + 2 * 2 * 64 * 4  # two means per KV head, fp32 as captured
    )
