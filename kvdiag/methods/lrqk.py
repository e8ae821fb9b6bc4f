"""LRQK: low-rank query/key factors chosen jointly to preserve QKᵀ, top tokens by proxy (NeurIPS 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import (
    BF16_BYTES,
    PricedSelection,
    check_choice,
    check_float,
    check_int,
    make_selection,
    priced_fetched_bytes,
    take_tokens,
    topk_mask,
)
from kvdiag.methods.base import LayerKV, Method, resolve_budget

INITS = ("topcol", "top", "randn")


def _solve(m: torch.Tensor, rhs: torch.Tensor, *, left: bool) -> torch.Tensor:
    """m⁻¹·rhs (left) or rhs·m⁻¹ (right) for batched square m; pseudo-inverse where m is singular."""
    x, info = torch.linalg.solve_ex(m, rhs, left=left)
    if bool((info != 0).any()):
        pinv = torch.linalg.pinv(m)
        x = pinv @ rhs if left else rhs @ pinv
    return x


def lrqk_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    rank: int,
    *,
    iters: int = 2,
    tol: float = 1e-2,
    lambda_q: float = 1.0,
    lambda_k: float = 1.0,
    init: str = "topcol",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LRQK prefill factors per head: (A_Q [H, L, r], B_Q [H, r, d], A_K [H, L, r], B_K [H, r, d]).

    q, k: [H, L, d] post-RoPE queries and the keys of each query head's KV head. Block-coordinate
    descent on  ‖Q Kᵀ − A_Q A_Kᵀ‖² + λ_Q ‖Q − A_Q B_Q‖² + λ_K ‖K − A_K B_K‖²:  each iteration sets
    B_Q, B_K to their least-squares optimum, then A_Q, then A_K (using the new A_Q) to theirs, so the
    objective never increases; it stops after `iters` iterations or when the mean squared change of
    A_Q and A_K drops below `tol`; B_Q, B_K are refitted to the final A's. QKᵀ is never formed:
    A_Q = Q (KᵀA_K + λ_Q B_Qᵀ)(A_KᵀA_K + λ_Q B_Q B_Qᵀ)⁻¹ and symmetrically for A_K. Computed in
    float32 (float64 if q is float64). Init: "topcol" the r channels with the largest column sums
    of |Q| + |K| (same channels for both), "top" the top-r channels of |Q| and of |K| separately,
    "randn" Gaussian (seeded).
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(dtype), k.to(dtype)
    if init == "topcol":
        cols = (q.abs().sum(dim=1) + k.abs().sum(dim=1)).topk(rank, dim=-1).indices  # [H, r]
        a_q = q.gather(2, cols[:, None, :].expand(-1, q.shape[1], -1))
        a_k = k.gather(2, cols[:, None, :].expand(-1, k.shape[1], -1))
    elif init == "top":
        cols_q = q.abs().sum(dim=1).topk(rank, dim=-1).indices
        cols_k = k.abs().sum(dim=1).topk(rank, dim=-1).indices
        a_q = q.gather(2, cols_q[:, None, :].expand(-1, q.shape[1], -1))
        a_k = k.gather(2, cols_k[:, None, :].expand(-1, k.shape[1], -1))
    else:
        gen = torch.Generator(device=q.device).manual_seed(seed)
        a_q = torch.randn(*q.shape[:2], rank, generator=gen, dtype=dtype, device=q.device)
        a_k = torch.randn(*k.shape[:2], rank, generator=gen, dtype=dtype, device=k.device)

    def refit(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # argmin_B ‖x − a B‖²
        return _solve(a.transpose(1, 2) @ a, a.transpose(1, 2) @ x, left=True)

    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    for _ in range(iters):
        b_q, b_k = refit(a_q, q), refit(a_k, k)
        new_a_q = q @ _solve(
            a_k.transpose(1, 2) @ a_k + lambda_q * b_q @ b_q.transpose(1, 2),
            kt @ a_k + lambda_q * b_q.transpose(1, 2),
            left=False,
        )
        new_a_k = k @ _solve(
            new_a_q.transpose(1, 2) @ new_a_q + lambda_k * b_k @ b_k.transpose(1, 2),
            qt @ new_a_q + lambda_k * b_k.transpose(1, 2),
            left=False,
        )
        delta = max(float((new_a_q - a_q).pow(2).mean()), float((new_a_k - a_k).pow(2).mean()))
        a_q, a_k = new_a_q, new_a_k
        if delta < tol:
            break
    return a_q, refit(a_q, q), a_k, refit(a_k, k)


@dataclass
class LRQKIndex:
    """LRQK's state for one layer (per query head: upstream repeats the KV heads over the group).

    a_k:      [H_q, L, r] low-rank key proxies (GPU-resident)
    a_q_last: [H_q, r] the last prompt query's factor (upstream picks the prefill hit set with it)
    b_q, b_k: [H_q, r, d] the query / key bases
    k_post, v: [H_kv, L, d] exact keys / values (host memory; the recent tokens also on the GPU)
    """

    a_k: torch.Tensor
    a_q_last: torch.Tensor
    b_q: torch.Tensor
    b_k: torch.Tensor
    k_post: torch.Tensor
    v: torch.Tensor


@dataclass
class LRQK(Method):
    """LRQK (Li et al., "Efficient Low Rank Attention for Long-Context Inference in Large Language
    Models", NeurIPS 2025; code github.com/tenghuilee/LRQK, `lrqk_attention.py`).

    Prefill (`lrqk_prefill`): per query head, rank-r factors Q ≈ A_Q B_Q, K ≈ A_K B_K fitted jointly
    with A_Q A_Kᵀ ≈ QKᵀ by `prefill_iters` alternating regularised least-squares steps from the
    top-|Q|+|K| channels. Upstream then picks its first GPU working set Ω (the `budget` tokens whose
    A_K scores highest against the last prompt query's A_Q row) next to the `n_recent` most recent
    ("lite") tokens. Decode: q is projected into rank r by the closed-form minimiser of
    ‖q − q̂ B_Q‖² + λ_a ‖q K_Ωᵀ − q̂ A_Ωᵀ‖² (one update step), every older prompt token j is scored
    by q̂·A_K[j], and the top `budget` tokens plus the `n_recent` most recent are attended.

    Defaults are upstream's (`LRQKChatBot` / `DynamicLRQKCache`): rank 16 at head_dim 128, 64 lite
    tokens, 2 prefill iterations, tol 1e-2, all four λ = 1. The study (arXiv 2604.08426) runs rank
    16 on Llama and 32 on Qwen with ≈ 0.258 % of L active tokens: `LRQK.study("llama" | "qwen")`,
    used with a budget of 0.00258.

    Rank rule: `rank` is given for head_dim `rank_head_dim` (128) and scaled to the layer's d as
    max(1, round(rank·d / 128)) (rank 16 → 8 at d=64, 32 at d=256); rank_head_dim=0 uses `rank`
    as is. GQA rule: upstream's (keys repeated over the group, factors and top-k per query head,
    `per_query_head=True`; its GPU buffer and host gathers are per query head too, so a token two
    heads of a group select is fetched twice, and the bytes count it so).

    Deviations from the public code, and why:
    - The decode token's own key is unknown to `select` (the contract passes q only), so upstream's
      joint (q̂, k̂) iteration loses its q·k coupling term λ_d ‖q kᵀ − q̂ k̂ᵀ‖² and q̂ has the closed
      form above; that term only concerns the new token's own logit, which is always attended.
    - Steps are independent: upstream updates B_Q, B_K by a gradient step after every decode token
      and keeps the previous step's hits on the GPU (hit/miss fetching); here every step starts
      from the prefill state, Ω is the prefill working set, and `fetched` counts every token chosen
      by score (a cold working set, an upper bound).
    - Init defaults to "topcol" (METHODS.md, the study); upstream's wrapper default is "randn"
      (also available, seeded). The A_K update always uses the new A_Q (upstream does so for
      λ_Q = λ_K = 1, its default; its λ ≠ 1 branch updates both from the old factors), so the
      objective decreases monotonically.
    - Upstream skips LRQK for prompts shorter than the active-token count; here any prompt whose
      older tokens fit in the budget is attended in full.
    - `resident_bytes` counts A_K, B_Q, B_K and the recent tokens' K/V (per query head, as
      upstream's GPU buffer); the budget-sized working buffer is not in it (it depends on budget).
    """

    name: ClassVar[str] = "lrqk"
    paper: ClassVar[str] = (
        "Li et al., Efficient Low Rank Attention for Long-Context Inference in Large Language Models, "
        "NeurIPS 2025; github.com/tenghuilee/LRQK"
    )

    rank: int = 16  # r at head_dim rank_head_dim (study: 16 Llama, 32 Qwen)
    rank_head_dim: int = 128  # head_dim the rank is given for; 0 = use rank as is
    n_recent: int = 64  # "lite" tokens: the most recent prompt tokens, always attended
    prefill_iters: int = 2  # alternating least-squares iterations at prefill (upstream max_iter)
    tol: float = 1e-2  # stop early when the factors move less than this (mean squared change)
    lambda_q: float = 1.0  # prefill weight of ‖Q − A_Q B_Q‖²
    lambda_k: float = 1.0  # prefill weight of ‖K − A_K B_K‖²
    lambda_active: float = 1.0  # decode weight of ‖q K_Ωᵀ − q̂ A_Ωᵀ‖² (upstream lambda2)
    init: str = "topcol"  # "topcol" | "top" | "randn"
    seed: int = 0  # for init="randn"

    def __post_init__(self) -> None:
        check_int(self.name, "rank_head_dim", self.rank_head_dim, 0)
        check_int(self.name, "rank", self.rank, 1, self.rank_head_dim or None)
        check_int(self.name, "n_recent", self.n_recent, 0)
        check_int(self.name, "prefill_iters", self.prefill_iters, 0)
        check_float(self.name, "tol", self.tol, 0.0, float("inf"))
        for knob in ("lambda_q", "lambda_k", "lambda_active"):
            check_float(self.name, knob, getattr(self, knob), 0.0, float("inf"))
        check_choice(self.name, "init", self.init, INITS)
        check_int(self.name, "seed", self.seed, 0)

    @classmethod
    def study(cls, family: str = "llama") -> LRQK:
        """The study's configuration: rank 16 for Llama, 32 for Qwen (budget ≈ 0.00258 of L)."""
        check_choice(cls.name, "family", family, ("llama", "qwen"))
        return cls(rank=16 if family == "llama" else 32)

    def effective_rank(self, head_dim: int) -> int:
        """The rank used at this head_dim (see the rank rule in the class docstring)."""
        if not self.rank_head_dim:
            rank = self.rank
        else:
            rank = max(1, round(self.rank * head_dim / self.rank_head_dim))
        if rank > head_dim:
            raise KvdiagError(f"lrqk: rank {rank} exceeds head_dim {head_dim}; use a rank in 1..{head_dim}")
        return rank

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV) -> LRQKIndex:
        if layer.q is None:
            raise KvdiagError("lrqk: the layer has no prompt queries (q is None); capture with queries")
        n_kv, n_tokens, d = layer.k_post.shape
        n_q = layer.q.shape[0]
        if layer.q.shape[1:] != (n_tokens, d) or n_q % n_kv:
            raise KvdiagError(
                f"lrqk: queries {tuple(layer.q.shape)} do not fit keys {tuple(layer.k_post.shape)}"
            )
        keys = layer.k_post.repeat_interleave(n_q // n_kv, dim=0)  # [H_q, L, d]
        a_q, b_q, a_k, b_k = lrqk_prefill(
            layer.q,
            keys,
            self.effective_rank(d),
            iters=self.prefill_iters,
            tol=self.tol,
            lambda_q=self.lambda_q,
            lambda_k=self.lambda_k,
            init=self.init,
            seed=self.seed,
        )
        return LRQKIndex(a_k=a_k, a_q_last=a_q[:, -1], b_q=b_q, b_k=b_k, k_post=layer.k_post, v=layer.v)

    # --- decode -----------------------------------------------------------------------------------

    def project_query(self, index: LRQKIndex, q: torch.Tensor, budget_tokens: int) -> torch.Tensor:
        """[n, H_q, r] q̂ = (q B_Qᵀ + λ_a (q K_Ωᵀ) A_Ω)(B_Q B_Qᵀ + λ_a A_Ωᵀ A_Ω)⁻¹ over the prefill
        working set Ω = top-`budget` older tokens by A_K·a_q_last ∪ the recent tokens."""
        n_q, n_tokens, _ = index.a_k.shape
        n_old = max(n_tokens - self.n_recent, 0)
        hits = index.a_k[:, :n_old] @ index.a_q_last[:, :, None]  # [H_q, n_old, 1]
        hit_ids = hits[..., 0].topk(min(budget_tokens, n_old), dim=-1).indices  # [H_q, b]
        recent = torch.arange(n_old, n_tokens, device=hit_ids.device).expand(n_q, -1)
        omega = torch.cat([hit_ids, recent], dim=1)  # [H_q, m]
        keys = index.k_post.repeat_interleave(n_q // index.k_post.shape[0], dim=0).to(index.a_k.dtype)
        k_omega = take_tokens(keys, omega)  # [H_q, m, d]
        a_omega = take_tokens(index.a_k, omega)  # [H_q, m, r]
        lam = self.lambda_active
        qf = q.to(index.a_k.dtype)
        gram = index.b_q @ index.b_q.transpose(1, 2) + lam * a_omega.transpose(1, 2) @ a_omega  # [H_q, r, r]
        rhs = torch.einsum("nhd,hrd->hnr", qf, index.b_q)
        rhs = rhs + lam * torch.einsum("nhm,hmr->hnr", torch.einsum("nhd,hmd->nhm", qf, k_omega), a_omega)
        return _solve(gram, rhs, left=False).transpose(0, 1)  # [n, H_q, r]

    def select(self, index: LRQKIndex, q: torch.Tensor, budget: float | int) -> PricedSelection:
        n_kv, n_tokens, d = index.k_post.shape
        n_q = index.a_k.shape[0]
        if q.ndim != 3 or q.shape[1:] != (n_q, d):
            raise KvdiagError(f"lrqk: queries of shape {tuple(q.shape)} do not fit; expected [n, {n_q}, {d}]")
        n, budget_tokens = q.shape[0], resolve_budget(budget, n_tokens)
        entry_bytes = 2 * d * BF16_BYTES
        n_old = max(n_tokens - self.n_recent, 0)
        recent = torch.zeros(n_q, n_tokens, dtype=torch.bool, device=q.device)
        recent[:, n_old:] = True
        selected = torch.zeros(n, n_q, n_tokens, dtype=torch.bool, device=q.device)
        if n_old <= budget_tokens:
            selected[:, :, :n_old] = True
        else:
            q_hat = self.project_query(index, q, budget_tokens)
            scores = torch.einsum("nhr,hlr->nhl", q_hat, index.a_k[:, :n_old])
            selected[:, :, :n_old] = topk_mask(scores, budget_tokens)
        return make_selection(selected, recent, entry_bytes, per_query_head=True)

    def keys(self, index: LRQKIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.k_post, ids)

    def values(self, index: LRQKIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.v, ids)

    # --- accounting -------------------------------------------------------------------------------

    def resident_breakdown(self, index: LRQKIndex) -> dict[str, int]:
        n_q, n_tokens, rank = index.a_k.shape
        d = index.k_post.shape[-1]
        return {
            "key_factors": (n_tokens * rank + 2 * rank * d) * n_q * BF16_BYTES,
            "recent_kv": min(self.n_recent, n_tokens) * n_q * 2 * d * BF16_BYTES,
        }

    def resident_bytes(self, index: LRQKIndex) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: PricedSelection) -> float:
        return priced_fetched_bytes(selection)
