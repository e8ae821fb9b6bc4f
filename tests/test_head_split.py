"""Head-wise splits of a budget under oracle selection (`kvdiag.analysis.head_split`): the mass curve
on hand-worked weights, the dynamic program against brute force, the four splits on a hand case."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kvdiag.analysis.head_split import best_split, layer_head_split, mass_curves
from kvdiag.errors import KvdiagError


def weights_layer(weights: list[list[float]], n_kv: int):
    """q [H_q, L0 + 1, L0 + 1], k [H_kv, L0 + 1, L0 + 1] whose query at position L0 has context weights
    `weights[g]` for query head g (one-hot keys, logits log w; the tail key is zero)."""
    n_ctx = len(weights[0])
    length = n_ctx + 1
    k = torch.zeros(n_kv, length, length)
    k[:, :n_ctx, :n_ctx] = torch.eye(n_ctx)
    q = torch.zeros(len(weights), length, length)
    for g, w in enumerate(weights):
        q[g, n_ctx, :n_ctx] = torch.tensor(w, dtype=torch.float64).clamp_min(1e-30).log().float()
    return q, k, torch.tensor([n_ctx])


def test_mass_curve_of_a_group_by_hand():
    # one KV head, two query heads: head a's context weights 0.6 0.1 0.3 0, head b's 0.2 0.5 0.1 0.2
    q, k, pos = weights_layer([[0.6, 0.1, 0.3, 0.0], [0.2, 0.5, 0.1, 0.2]], n_kv=1)
    curve = mass_curves(q, k, pos, scaling=1.0, max_tokens=10)[0, 0]
    # tokens by max over the group: 0 (0.6), 1 (0.5), 2 (0.3), 3 (0.2); head a accumulates 0.6, 0.7,
    # 1.0, 1.0 and head b 0.2, 0.7, 0.8, 1.0
    by_hand = [0, (0.6 + 0.2) / 2, (0.7 + 0.7) / 2, (1.0 + 0.8) / 2, 1.0]
    np.testing.assert_allclose(curve.numpy(), by_hand, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_split_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    curves = torch.rand(3, 9, generator=gen, dtype=torch.float64).cumsum(
        dim=-1
    )  # non-decreasing, not concave
    curves[:, 0] = 0
    for total, low in ((6, 1), (12, 2), (24, 0)):
        value, split = best_split(curves, total, low)
        brute = max(
            (sum(float(curves[h, a]) for h, a in enumerate(s)), s)
            for s in itertools.product(range(low, 9), repeat=3) if sum(s) == total
        )  # fmt: skip
        assert float(value) == pytest.approx(brute[0]) and sum(split.tolist()) == total
        assert float(sum(curves[h, a] for h, a in enumerate(split.tolist()))) == pytest.approx(brute[0])
    batched, _ = best_split(torch.stack([curves, curves.flip(0)], dim=1), 6, 1)  # [H, 2, A + 1]
    assert batched.shape == (2,) and float(batched[0]) == pytest.approx(float(batched[1]))
    with pytest.raises(KvdiagError, match="cannot be split"):
        best_split(curves, 30, 1)


def test_four_splits_on_a_hand_case():
    # KV head 0 reads 0.7 / 0.1 / 0.1 / 0.1 of 8 tokens (needs 3 for 90 %), KV head 1 reads all 8 evenly
    # (needs 8): at 2 tokens per head (total 4) even keeps (0.8 + 0.25) / 2; the best split is 1 / 3,
    # (0.7 + 0.375) / 2, and so is the proportional one (4 split 3:8 → 1.09 / 2.91 → 1 / 3)
    q, k, pos = weights_layer([[0.7, 0.1, 0.1, 0.1, 0, 0, 0, 0], [1 / 8] * 8], n_kv=2)
    curves = mass_curves(q, k, pos, scaling=1.0, max_tokens=8)
    row = layer_head_split(curves, 2, need=[3 / 8, 8 / 8])
    assert row["even"] == pytest.approx(0.525, abs=1e-6)
    assert row["best_static"] == pytest.approx(0.5375, abs=1e-6) and row["split_best_static"] == [1, 3]
    assert row["proportional"] == pytest.approx(0.5375, abs=1e-6) and row["split_proportional"] == [1, 3]
    assert row["best_per_step"] == pytest.approx(row["best_static"])  # one query: the same
    assert math.isclose(float(curves[1, 0, 8]), 1.0, abs_tol=1e-6)


def test_power_half_softens_the_proportional_split():
    # need 0.16 / 0.64 → square roots 0.4 / 0.8: 12 tokens split 1:2 = 4 / 8 (need^1 gives 1:4, 2.4 / 9.6 → 2 / 10)
    q, k, pos = weights_layer([[1 / 16] * 16, [1 / 16] * 16], n_kv=2)
    curves = mass_curves(q, k, pos, scaling=1.0, max_tokens=12)
    row = layer_head_split(curves, 6, need=[0.16, 0.64], powers=(1.0, 0.5))
    assert row["split_proportional"] == [2, 10] and row["split_proportional_p0.5"] == [4, 8]
    assert row["proportional_p0.5"] == pytest.approx(
        6 / 16, abs=1e-6
    )  # uniform heads: any split keeps 12/16/2
