"""LRQK: low-rank query/key factors chosen jointly to preserve QKᵀ, top tokens by proxy (NeurIPS 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import check_choice, check_float, check_int
from kvdiag.methods.base import (
    Built,
    BuiltBatch,
    DecodeState,
    LayerKV,
    Method,
    gather_tokens,
    offloaded_rows,
    stack_padded,
)

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
    - The GPU working set is modelled as a cache of the last step's `budget` chosen tokens (hits are
      not fetched again; a per-query-head choice shares its KV head's cache, where upstream keeps one
      per query head), and Ω stays the prefill working set.

    Resident (`build`): A_K [H_q, L, r], B_Q [H_q, r, d], the last prompt query's factor [H_q, r]
    (at the keys' dtype), and the recent tokens' exact K/V per query head (as upstream's GPU buffer);
    decode state (`start`): the exact keys of the prefill working set Ω [H_q, |Ω|, d], placed on the
    GPU at prefill. Offloaded: every token's K and V.
    """

    name: ClassVar[str] = "lrqk"
    per_query_head: ClassVar[bool] = True
    fetch_per_query_head: ClassVar[bool] = True
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

    def resolved(self, layer: LayerKV) -> dict:
        return {"rank": self.effective_rank(layer.head_dim)}

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV) -> Built:
        if layer.q is None:
            raise KvdiagError("lrqk: the layer has no prompt queries (q is None); capture with queries")
        n_kv, n_tokens, d = layer.k_post.shape
        n_q = layer.q.shape[0]
        if layer.q.shape[1:] != (n_tokens, d) or n_q % n_kv:
            raise KvdiagError(
                f"lrqk: queries {tuple(layer.q.shape)} do not fit keys {tuple(layer.k_post.shape)}"
            )
        group = n_q // n_kv
        keys = layer.k_post.repeat_interleave(group, dim=0)  # [H_q, L, d]
        a_q, b_q, a_k, _ = lrqk_prefill(
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
        n_old = max(n_tokens - self.n_recent, 0)
        resident = {
            "a_k": a_k.to(layer.dtype),  # [H_q, L, r]
            "b_q": b_q.to(layer.dtype),  # [H_q, r, d]
            "a_q_last": a_q[:, -1].to(layer.dtype),  # [H_q, r]
            "recent_k": keys[:, n_old:].contiguous(),  # [H_q, n_recent, d]
            "recent_v": layer.v[:, n_old:].repeat_interleave(group, dim=0),
        }
        return Built(
            resident=resident,
            offloaded={"k": layer.k_post, "v": layer.v},
            n_tokens=n_tokens,
            n_kv_heads=n_kv,
            head_dim=d,
            scaling=layer.scaling,
            info={"n_old": n_old, "n_q_heads": n_q},
        )

    # --- decode -----------------------------------------------------------------------------------

    def start(self, built: Built, budget: float | int) -> DecodeState:
        """Ω = the top-`budget` older tokens by A_K·a_q_last ∪ the recent tokens; their exact keys are
        on the GPU from prefill (the only read of the offloaded payload outside `materialize`)."""
        state = super().start(built, budget)
        res, n_old = built.resident, built.info["n_old"]
        a_k, a_q_last = res["a_k"].float(), res["a_q_last"].float()
        n_q = a_k.shape[0]
        hits = (a_k[:, :n_old] @ a_q_last[:, :, None])[..., 0]  # [H_q, n_old]
        hit_ids = hits.topk(min(state.budget_tokens, n_old), dim=-1).indices
        recent = torch.arange(n_old, built.n_tokens, device=hit_ids.device).expand(n_q, -1)
        omega = torch.cat([hit_ids, recent], dim=1)  # [H_q, m]
        group = n_q // built.n_kv_heads
        keys = built.offloaded["k"].repeat_interleave(group, dim=0) if "k" in built.offloaded else None
        state.extra["omega"] = omega
        if keys is not None:
            state.resident["omega_k"] = gather_tokens(keys, omega)  # [H_q, m, d]
        state.cache_tokens = state.budget_tokens
        return state

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        res = built.resident
        return {"a_k_old": res["a_k"][:, : built.info["n_old"]], "a_k": res["a_k"], "b_q": res["b_q"]}

    def block_starts(self, built: Built) -> torch.Tensor:
        return torch.arange(built.info["n_old"])

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        return min(budget_tokens, built.info["n_old"])

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_q, n_old] q̂·A_K[j] of the older (non-recent) prompt tokens; q̂ from
        `project_query` over each row's working set Ω (in its decode state)."""
        n_q, d = batch.inputs["b_q"].shape[1], batch.rows[0].head_dim
        if q.ndim != 4 or q.shape[2:] != (n_q, d):
            raise KvdiagError(
                f"lrqk: queries of shape {tuple(q.shape[1:])} do not fit; expected [n, {n_q}, {d}]"
            )
        q_hat = self.project_query(batch, states, q)  # [B, n, H_q, r]
        scores = torch.einsum("bnhr,bhlr->bnhl", q_hat, batch.inputs["a_k_old"].to(q.device).float())
        valid = torch.arange(scores.shape[-1], device=q.device) < batch.n_blocks.to(q.device)[:, None]
        return scores.masked_fill(~valid[:, None, None, :], float("-inf"))

    def project_query(self, batch: BuiltBatch, states: list[DecodeState], q: torch.Tensor) -> torch.Tensor:
        """[B, n, H_q, r] q̂ = (q B_Qᵀ + λ_a (q K_Ωᵀ) A_Ω)(B_Q B_Qᵀ + λ_a A_Ωᵀ A_Ω)⁻¹ over each row's
        prefill working set Ω (`start`). Zero padding of Ω adds nothing to either term."""
        a_k = batch.inputs["a_k"].to(q.device).float()  # [B, H_q, L, r]
        b_q = batch.inputs["b_q"].to(q.device).float()  # [B, H_q, r, d]
        omega = stack_padded([st.extra["omega"].to(q.device) for st in states], value=-1)  # [B, H_q, m]
        k_omega = stack_padded(
            [st.resident["omega_k"].to(q.device).float() for st in states]
        )  # [B, H_q, m, d]
        safe = omega.clamp_min(0)
        a_omega = a_k.gather(2, safe[..., None].expand(-1, -1, -1, a_k.shape[-1]))
        a_omega = a_omega.masked_fill((omega < 0)[..., None], 0)  # [B, H_q, m, r]
        lam = self.lambda_active
        qf = q.float()
        gram = b_q @ b_q.transpose(-1, -2) + lam * a_omega.transpose(-1, -2) @ a_omega  # [B, H_q, r, r]
        rhs = torch.einsum("bnhd,bhrd->bhnr", qf, b_q)
        rhs = rhs + lam * torch.einsum(
            "bnhm,bhmr->bhnr", torch.einsum("bnhd,bhmd->bnhm", qf, k_omega), a_omega
        )
        return _solve(gram, rhs, left=False).transpose(1, 2)  # [B, n, H_q, r]

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        return torch.arange(built.info["n_old"], built.n_tokens).expand(built.n_kv_heads, -1)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return offloaded_rows(built, "k", ids, fetched), offloaded_rows(built, "v", ids, fetched)
