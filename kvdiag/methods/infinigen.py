"""InfiniGen: attention speculated with skewed partial query/key channels (OSDI 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import check_float, check_int
from kvdiag.methods.base import (
    Built,
    BuiltBatch,
    DecodeState,
    LayerKV,
    Method,
    gather_tokens,
    ids_ascending,
    offloaded_rows,
)


def skewing_matrices(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[H_q, d, d] InfiniGen skewing matrices from calibration queries q [H_q, T, d] and keys k
    [H_q, T, d] (the key of each query head's KV head), both post-RoPE.

    As upstream `gen_llama_skewing_matrix.py`: SVD per head, q = U_q S_q V_qᵀ and the singular
    values S_k of k; s = S_q·S_k; column ind[j] of A is the j-th right singular vector of q, where
    ind = argsort(s) ascending. A is orthogonal, so (q A)(k A)ᵀ = q kᵀ. Fewer than d calibration
    tokens are zero-padded so that V_q is a full d×d basis.
    """
    n_heads, n_tokens, d = q.shape
    if n_tokens < d:
        pad = q.new_zeros(n_heads, d - n_tokens, d)
        q, k = torch.cat([q, pad], dim=1), torch.cat([k, pad], dim=1)
    # q = QR·R, so q and the d×d factor R share singular values and right singular vectors
    r_q = torch.linalg.qr(q.float(), mode="r").R  # [H, d, d]
    _, s_q, vh_q = torch.linalg.svd(r_q)  # s_q [H, d], vh_q [H, d, d]
    s_k = torch.linalg.svdvals(k.float())
    order = torch.argsort(s_q * s_k, dim=-1, stable=True)  # [H, d]
    skew = torch.zeros_like(vh_q)
    # skew[h, :, order[h, j]] = v_q[h, :, j]
    return skew.scatter_(2, order[:, None, :].expand(-1, d, -1), vh_q.transpose(1, 2))


def partial_channels(q_skewed: torch.Tensor, k_skewed: torch.Tensor, n_keep: int) -> torch.Tensor:
    """[H_q, d] bool: the union of the n_keep skewed channels with the largest column sums of |q A|
    and of |k A| (upstream `modeling_llama_ours_setup.py`, the 'partial weight' mask)."""
    mask = torch.zeros(q_skewed.shape[0], q_skewed.shape[-1], dtype=torch.bool, device=q_skewed.device)
    for x in (q_skewed, k_skewed):
        mask.scatter_(1, x.abs().sum(dim=1).topk(n_keep, dim=-1).indices, True)
    return mask


@dataclass
class InfiniGen(Method):
    """InfiniGen (Lee et al., "InfiniGen: Efficient Generative Inference of Large Language Models
    with Dynamic KV Cache Management", OSDI 2024; code github.com/snu-comparch/InfiniGen, Llama path
    `accuracy/src/modeling_llama_ours.py`, and the study's GQA port in
    yandex-research/context-intensive-kv-offloading `shadowkv_models/llama_infinigen.py`).

    Offline: per head, an orthogonal skewing matrix A from the SVD of post-RoPE queries and keys of
    a calibration text (`skewing_matrices`; upstream skews *post-RoPE* q and k in its Llama code, so
    RoPE is applied first and the skew after); partial weights keep the `partial_weight_ratio`·d
    skewed channels with the largest column |Q A| sums, united with those of |K A|
    (`partial_channels`). Decode: speculated logits (q A)[partial]·(k A)[partial] / √d (√d hard-coded
    upstream, so `alpha` is in these units whatever the model's own scale); per head count the
    tokens with logit ≥ max − alpha, average the count over the layer's heads (truncated; upstream
    fetches the same number for each head), cap it at the budget (upstream int(budget·L), budget
    0.2 in the release wrapper: the `budget` argument here) and keep that many top tokens per
    head. The first `dense_layers` layers attend to everything (upstream speculates layer i+1 from
    layer i only for i ≥ 1). Every kept token is fetched from host memory (capacity 1.0: the whole
    KV cache lives on the host); the GPU holds the partial skewed keys.

    Resident (`build`): per query head the partial skewed keys (k A_h)[partial_h] [H_q, L, P] and the
    partial query projection A_h[:, partial_h] [H_q, d, P] (P = the largest partial channel count of
    the layer's heads; heads with fewer channels are zero-padded, which adds nothing to their
    logits), at the keys' dtype; offloaded: every token's K and V.

    Defaults are upstream's: partial_weight_ratio 0.2, alpha 5 (`LlamaAttention.alpha`; the paper
    sweeps 4–5), 2 dense layers. The study's release (`InfiniGenwithChatTemplate`, alpha=99,
    budget=0.2) decodes with a plain top-int(0.2·L) per query head and no threshold, which is
    alpha=inf here: `InfiniGen.study()`, used with a budget of 0.2.

    Deviations from the public code, and why:
    - Speculation uses the current decode query (exact post-RoPE q, skewed and cut to the partial
      channels). Upstream speculates layer i+1 from layer i's hidden state through layer i+1's
      W_q; with one layer's q/k at hand that cross-layer input is not available, so this is an
      optimistic version of the speculation (it removes the hidden-state drift error).
    - Calibration: by default the layer's own prompt queries `layer.q` and post-RoPE keys; pass a
      `calibration` LayerKV to `build` to calibrate offline on other text as upstream does (pg19,
      2048 tokens, for the skew; a short fixed prompt for the partial weights). Calibrating on the
      prompt itself is optimistic.
    - GQA (upstream is MHA-only): as in the study's port, the keys are repeated over the group and
      everything is per query head: A_h from (Q_h, K_{h//G}), one partial mask and one selection
      per query head (`per_query_head=True`); the head-averaged count runs over all H_q heads.
      Bytes: a token selected by any query head of a KV head is fetched once (union over the group).
    - The threshold uses each head's own max. Upstream indexes `torch.max(attn, -1)[0][0]`, i.e. the
      max of the first head (of a [B·H, ...] view), for every head; we read that as a batch-index
      slip and follow the paper (per-head max − alpha).
    - Upstream's accuracy code simulates decoding with teacher-forced prefill rows and a KV
      eviction policy (capacity < 1); here capacity is 1.0 (upstream default) and each step is a
      fresh decode query over the L prompt tokens.
    - The partial channel count is max(1, int(ratio·d)) per set (upstream int(ratio·d)). A budget
      fraction becomes ceil(budget·L) tokens (`resolve_budget`; upstream floors).
    """

    name: ClassVar[str] = "infinigen"
    paper: ClassVar[str] = (
        "Lee et al., InfiniGen: Efficient Generative Inference of Large Language Models with Dynamic "
        "KV Cache Management, OSDI 2024; github.com/snu-comparch/InfiniGen"
    )

    partial_weight_ratio: float = 0.2  # share of skewed channels in the partial query / keys
    alpha: float = 5.0  # keep logits ≥ max − alpha (speculated logit units, /√d); inf = top-budget
    dense_layers: int = 2  # first layers with full attention (no speculation)

    def __post_init__(self) -> None:
        check_float(self.name, "partial_weight_ratio", self.partial_weight_ratio, 1e-9, 1.0)
        check_float(self.name, "alpha", self.alpha, 0.0, math.inf)
        check_int(self.name, "dense_layers", self.dense_layers, 0)

    @classmethod
    def study(cls) -> InfiniGen:
        """The study's release: top int(budget·L) per query head by speculated logits (budget 0.2)."""
        return cls(partial_weight_ratio=0.2, alpha=math.inf, dense_layers=2)

    per_query_head: ClassVar[bool] = True

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV, calibration: LayerKV | None = None) -> Built:
        """Skew and partial channels from `calibration` (default: the layer itself, its prompt q)."""
        calib = layer if calibration is None else calibration
        if calib.q is None:
            raise KvdiagError(
                "infinigen: the calibration LayerKV has no prompt queries (q is None); capture with "
                "queries or pass calibration=LayerKV(..., q=...) to build()"
            )
        n_kv, n_tokens, d = layer.k_post.shape
        n_q = calib.q.shape[0]
        if calib.q.shape[-1] != d or calib.k_post.shape[0] != n_kv or n_q % n_kv:
            raise KvdiagError(
                f"infinigen: calibration q {tuple(calib.q.shape)} / keys {tuple(calib.k_post.shape)} "
                f"do not match the layer's keys {tuple(layer.k_post.shape)}"
            )
        group = n_q // n_kv
        meta = dict(n_tokens=n_tokens, n_kv_heads=n_kv, head_dim=d, scaling=layer.scaling,
                    dense=layer.layer_idx < self.dense_layers)  # fmt: skip
        if meta["dense"]:
            return Built(resident={"k": layer.k_post, "v": layer.v}, offloaded={}, **meta)
        q_cal = calib.q.float()  # [H_q, T, d]
        k_cal = calib.k_post.float().repeat_interleave(group, dim=0)  # [H_q, T, d]
        skew = skewing_matrices(q_cal, k_cal)
        n_keep = max(1, int(d * self.partial_weight_ratio))
        partial = partial_channels(q_cal @ skew, k_cal @ skew, n_keep)  # [H_q, d] bool
        width = int(partial.sum(dim=-1).max())
        # each head's partial channels first (in channel order), zero columns after
        order = torch.argsort((~partial).to(torch.int8), dim=-1, stable=True)[:, :width]  # [H_q, P]
        used = partial.gather(1, order)  # [H_q, P] False on padding
        projection = skew.gather(2, order[:, None, :].expand(-1, d, -1)) * used[:, None, :]  # [H_q, d, P]
        keys = layer.k_post.float().repeat_interleave(group, dim=0)  # [H_q, L, d]
        resident = {
            "partial_keys": torch.einsum("hld,hdp->hlp", keys, projection).to(layer.dtype),  # [H_q, L, P]
            "partial_query": projection.to(layer.dtype),  # [H_q, d, P]
        }
        info = {"partial_channels": int(partial.sum()), "skew": skew, "partial": partial}
        return Built(resident=resident, offloaded={"k": layer.k_post, "v": layer.v}, info=info, **meta)

    # --- decode -----------------------------------------------------------------------------------

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        if built.dense:
            return {"partial_query": torch.zeros(1, built.head_dim, 0), "partial_keys": torch.zeros(1, 0, 0)}
        return {
            "partial_query": built.resident["partial_query"],
            "partial_keys": built.resident["partial_keys"],
        }

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_q, L] speculated logits (q A)[partial]·(k A)[partial] / √d for q [B, n, H_q, d]."""
        proj = batch.inputs["partial_query"].to(q.device).float()  # [B, H_q, d, P]
        keys = batch.inputs["partial_keys"].to(q.device).float()  # [B, H_q, L, P]
        n_q, d = proj.shape[1], proj.shape[2]
        if q.ndim != 4 or q.shape[2:] != (n_q, d):
            raise KvdiagError(
                f"infinigen: queries of shape {tuple(q.shape[1:])} do not fit; expected [n, {n_q}, {d}]"
            )
        q_partial = torch.einsum("bnhd,bhdp->bnhp", q.float(), proj)
        logits = torch.einsum("bnhp,bhlp->bnhl", q_partial, keys) / math.sqrt(d)
        valid = torch.arange(logits.shape[-1], device=q.device) < batch.n_blocks.to(q.device)[:, None]
        return logits.masked_fill(~valid[:, None, None, :], float("-inf"))

    def speculated_logits(self, built: Built, q: torch.Tensor) -> torch.Tensor:
        """[n, H_q, L] speculated logits of one prompt for q [n, H_q, d]."""
        return self.score(built, q)

    def select_batch(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState], backend: str = "torch"
    ):
        """Threshold rule (not a plain top-k): per head count logits ≥ max − alpha, average the count
        over the layer's heads, cap it at the budget, keep that many top tokens per head."""
        n_rows, n, n_q = q.shape[0], q.shape[1], q.shape[2]
        always = self._always_batch(batch, states, n_q, q.device)
        if all(row.dense for row in batch.rows):
            return self._finish(batch, states, q.new_zeros(n_rows, n, n_q, 0, dtype=torch.long), always)
        logits = self.score_batch(batch, q, states)  # [B, n, H_q, L]
        above = logits >= logits.amax(dim=-1, keepdim=True) - self.alpha
        n_keep = above.sum(dim=-1).float().mean(dim=-1).long()  # [B, n]: one count for every head
        caps = torch.tensor(
            [0 if r.dense else st.budget_tokens for r, st in zip(batch.rows, states)], device=q.device
        )
        n_keep = torch.minimum(n_keep.clamp_min(1), caps[:, None])
        order = logits.sort(dim=-1, descending=True, stable=True).indices[..., : int(n_keep.max())]
        rank = torch.arange(order.shape[-1], device=q.device)
        ids = ids_ascending(torch.where(rank < n_keep[:, :, None, None], order, -1))
        return self._finish(batch, states, ids, always)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if built.dense:  # everything is resident
            return gather_tokens(built.resident["k"], ids).float(), gather_tokens(
                built.resident["v"], ids
            ).float()
        return offloaded_rows(built, "k", ids, fetched), offloaded_rows(built, "v", ids, fetched)
