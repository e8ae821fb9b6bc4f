"""ShadowKV: low-rank pre-RoPE keys on the GPU, chunk-mean landmarks, values offloaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_quant_spec,
    load_rows,
    load_token_rows,
    numerics_of,
    scaled_rank,
    softmax_max_scores,
    store_rows,
)
from kvdiag.methods.base import (
    Built,
    BuiltBatch,
    DecodeState,
    LayerKV,
    Method,
    gather_tokens,
    offloaded_rows,
    overlay_exact,
    per_step,
)


def chunk_landmarks(k_post: torch.Tensor, chunk: int, n_chunks: int, n_outliers: int):
    """ShadowKV's prefill over the context chunks of one layer's post-RoPE keys [H_kv, L, d].

    Returns (landmarks [H_kv, C, d] in k_post's dtype, landmark_chunks [H_kv, C] long, outliers
    [H_kv, n_outliers] long): chunk means, the chunks with the lowest minimum cosine similarity
    between the mean and its keys (with chunk = 1 upstream takes the first chunks), and the means
    of the remaining chunks in chunk order. The arithmetic runs in k_post's dtype, as upstream does
    on its bf16 cache (fp32 captures stay fp32).
    """
    n_kv, _, d = k_post.shape
    ctx = k_post[:, : n_chunks * chunk].reshape(n_kv, n_chunks, chunk, d)
    means = ctx.mean(dim=2)  # [H_kv, n_chunks, d]
    if chunk > 1:
        cos = torch.nn.functional.cosine_similarity(means[:, :, None, :].expand_as(ctx), ctx, dim=-1)
        outliers = cos.amin(dim=-1).topk(n_outliers, dim=-1, largest=False).indices  # [H_kv, n_out]
    else:
        outliers = torch.arange(n_outliers, device=k_post.device).expand(n_kv, -1)
    keep = torch.ones(n_kv, n_chunks, dtype=torch.bool, device=k_post.device)
    keep.scatter_(1, outliers, False)
    landmark_chunks = torch.arange(n_chunks, device=k_post.device).expand(n_kv, -1)[keep]
    landmark_chunks = landmark_chunks.reshape(n_kv, n_chunks - n_outliers)
    landmarks = means.gather(1, landmark_chunks[:, :, None].expand(-1, -1, d))
    return landmarks, landmark_chunks, outliers


@dataclass
class ShadowKV(Method):
    """ShadowKV (Sun et al., ICML 2025, arXiv 2410.21465; ByteDance-Seed/ShadowKV), as run by arXiv
    2604.08426 (its fork in yandex-research/context-intensive-kv-offloading, `ShadowKVCache`).

    Prefill, per layer: SVD of the pre-RoPE keys [L, H_kv·d] (all KV heads side by side, fp32); keep
    U[:, :r] and S_r·V_rᵀ split per head, stored at `factor_dtype` (bf16 upstream). The prompt is cut
    into n_chunks = L // chunk - local // chunk chunks; the remaining tail (local window plus the
    L mod chunk alignment tokens) stays exact on the GPU. Landmarks are the means of the post-RoPE keys
    of each chunk per KV head. Outliers: the `outlier_chunks` chunks with the lowest minimum cosine
    similarity between the chunk mean and its keys, kept exact on the GPU and removed from the
    landmarks. Decode: score = softmax over landmarks of q·l/√d per query head, max over the G query
    heads; top budget // chunk chunks per KV head; their keys rebuilt as U[pos]·SV[head] and
    re-rotated at their positions (`materialize`), values fetched from host memory.

    Resident (`build`): u [L, r], sv [H_kv, r, d] (factor_dtype), landmarks (stored with
    `landmark_quant` as rows of H_kv·d channels), landmark_chunks [H_kv, C] int32 (upstream keeps this
    index too), the outlier tokens' exact K/V and ids, the local tail's exact K/V. Offloaded: v
    [H_kv, L, d] as captured. With rank = 0 the keys are stored quantized (`key_quant`) and resident
    (upstream keys_on_device with rank = -1).

    Rank rule: `rank` is given for `rank_channels` (1024) KV channels and scales with the layer's
    H_kv·d: r = round(rank · H_kv·d / rank_channels), e.g. 160 → 80 at 512 channels, 30 at 192 (see
    `resolved`). rank = 0 disables the SVD: keys are then pre-RoPE keys round-tripped through
    `key_quant` and re-rotated (upstream rank = -1 with keys_fp8 / keys_nvfp4 / keys_higgs).

    Numerics: on a bf16 layer (a bf16 model, as upstream runs) chunk means, the outlier cosine and
    the scores follow upstream's bf16 arithmetic (bf16 logits, softmax in fp32 rounded to bf16, max in
    bf16: `kvdiag.kernels.naive.softmax_max_scores(numerics="bf16")`); on an fp32 capture everything
    is fp32. Still different from upstream, and why:
    - scale: ByteDance's code divides by √128 (hard-coded); the study's fork and kvdiag use √d. Equal
      for d = 128.
    - ties: top-k breaks equal scores toward the lower chunk index (upstream: torch.topk's order,
      unspecified); bf16 scores tie often, so a few chunks differ between the two at a tie.
    - rebuilt keys: U[pos]·SV is computed in fp32 from the stored factors and re-rotated in fp32
      (upstream: bf16 matmul and its bf16 RoPE kernel).
    - small prompts: upstream asserts enough chunks; kvdiag clamps the outlier count and the selected
      chunk count to the chunks available, so any L works.
    - chunk = 1: upstream then takes the *first* `outlier_chunks` tokens as "outliers" (cosine
      similarity is meaningless for one key); kvdiag does the same.
    - budget: upstream requires budget to be a multiple of chunk; kvdiag selects budget // chunk chunks.
    - generated tokens are always attended by the caller (as upstream, which keeps them on the GPU).
    """

    name: ClassVar[str] = "shadowkv"
    paper: ClassVar[str] = (
        "Sun et al., ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference, "
        "ICML 2025 (ByteDance-Seed/ShadowKV)"
    )

    rank: int = 160
    rank_channels: int = 1024
    chunk: int = 8
    outlier_chunks: int = 48
    local: int = 32
    landmark_quant: str = "bf16"
    factor_dtype: str = "bf16"
    key_quant: str = "bf16"

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank, 0)
        check_int(self.name, "rank_channels", self.rank_channels, 1)
        check_int(self.name, "chunk", self.chunk, 1, 4096)
        check_int(self.name, "outlier_chunks", self.outlier_chunks, 0)
        check_int(self.name, "local", self.local, 0)
        if self.local % self.chunk:
            raise KvdiagError(
                f"{self.name}: local={self.local} is invalid; use a multiple of chunk={self.chunk} "
                f"(e.g. {self.chunk * max(1, round(self.local / self.chunk))})"
            )
        check_quant_spec(self.name, "landmark_quant", self.landmark_quant)
        check_choice(self.name, "factor_dtype", self.factor_dtype, FLOAT_DTYPES)
        check_quant_spec(self.name, "key_quant", self.key_quant)

    @property
    def block_size(self) -> int:
        return self.chunk

    def resolved_rank(self, n_channels: int, n_tokens: int | None = None) -> int:
        """The SVD rank used for a layer of n_channels = H_kv·d (0 = no SVD)."""
        if self.rank == 0:
            return 0
        rank = scaled_rank(self.rank, n_channels, self.rank_channels)
        limit = n_channels if n_tokens is None else min(n_channels, n_tokens)
        if rank > limit:
            raise KvdiagError(
                f"{self.name}: rank {self.rank} (scaled to {rank} for {n_channels} channels) exceeds "
                f"min(L, H_kv·d) = {limit}; use rank ≤ {limit * self.rank_channels // n_channels}"
            )
        return rank

    def resolved(self, layer: LayerKV) -> dict:
        return {"rank": self.resolved_rank(layer.n_kv_heads * layer.head_dim, layer.n_tokens)}

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV) -> Built:
        n_kv, n_tokens, d = layer.k_post.shape
        chunk = self.chunk
        n_chunks = max(0, n_tokens // chunk - self.local // chunk)
        n_local = n_tokens - n_chunks * chunk  # local window + alignment tail, exact and resident
        n_out = min(self.outlier_chunks, n_chunks)
        resident = {}

        rank = self.resolved_rank(n_kv * d, n_tokens)
        if rank:
            flat = layer.k_pre.float().transpose(0, 1).reshape(n_tokens, n_kv * d)  # [L, H_kv·d]
            u_full, s, vh = torch.linalg.svd(flat, full_matrices=False)
            dtype = FLOAT_DTYPES[self.factor_dtype]
            resident["u"] = u_full[:, :rank].to(dtype).contiguous()  # [L, r]
            sv = (s[:rank, None] * vh[:rank]).reshape(rank, n_kv, d).transpose(0, 1)
            resident["sv"] = sv.to(dtype).contiguous()  # [H_kv, r, d]
        else:
            resident["keys"] = store_rows(self.key_quant, layer.k_pre)

        landmarks, landmark_chunks, outliers = chunk_landmarks(layer.k_post, chunk, n_chunks, n_out)
        resident["landmarks"] = store_rows(self.landmark_quant, landmarks)
        resident["landmark_chunks"] = landmark_chunks.to(torch.int32)
        offsets = torch.arange(chunk, device=outliers.device)
        outlier_ids = (
            (outliers[:, :, None] * chunk + offsets).reshape(n_kv, n_out * chunk).sort(dim=-1).values
        )
        resident["outlier_ids"] = outlier_ids.to(torch.int32)
        resident["outlier_k"] = gather_tokens(layer.k_post, outlier_ids)
        resident["outlier_v"] = gather_tokens(layer.v, outlier_ids)
        resident["local_k"] = layer.k_post[:, n_tokens - n_local :].contiguous()
        resident["local_v"] = layer.v[:, n_tokens - n_local :].contiguous()
        return Built(
            resident=resident,
            offloaded={"v": layer.v},
            n_tokens=n_tokens,
            n_kv_heads=n_kv,
            head_dim=d,
            scaling=layer.scaling,
            rope=(layer.cos, layer.sin),
            info={
                "rank": rank,
                "n_local": n_local,
                "n_chunks": n_chunks,
                "numerics": numerics_of(layer.dtype),
            },
        )

    # --- decode -----------------------------------------------------------------------------------

    def landmarks(self, built: Built) -> torch.Tensor:
        """[H_kv, C, d] the landmarks as stored, decoded (memoised per layer)."""
        return built.decoded("landmarks", lambda qt: load_rows(qt, built.n_kv_heads))

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        return {"landmarks": self.landmarks(built)}

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_kv, C] landmark scores (slot order of `landmark_chunks`)."""
        row = batch.rows[0]
        return softmax_max_scores(q, batch.inputs["landmarks"].to(q.device), 1.0 / math.sqrt(row.head_dim),
                                  numerics=row.info["numerics"], n_valid=batch.n_blocks)  # fmt: skip

    def kernel_scores(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """Softmax-max scores of the chunk landmarks by `kvdiag.kernels.batched_scores` (fp32)."""
        from kvdiag.kernels.batched_scores import batched_landmark_scores

        landmarks = batch.inputs["landmarks"].to(q.device)
        n = batch.n_blocks.to(device=q.device, dtype=torch.int32)
        scale = 1.0 / math.sqrt(batch.rows[0].head_dim)
        return per_step(lambda qs: batched_landmark_scores(qs, landmarks, n, "softmax_max", scale), q)

    def block_starts(self, built: Built) -> torch.Tensor:
        return built.resident["landmark_chunks"].long() * self.chunk

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        outliers = built.resident["outlier_ids"].long()
        return torch.cat([outliers, self._local_ids(built).to(outliers.device)], dim=1)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        res = built.resident
        safe = ids.clamp_min(0).long()
        if built.info["rank"]:
            u = res["u"].float()[safe]  # [H_kv, m, r]
            pre = torch.einsum("hmr,hrd->hmd", u, res["sv"].float())
        else:
            pre = load_token_rows(res["keys"], ids, built.n_kv_heads)
        cos, sin = built.rope
        keys = apply_rope(pre, cos.float()[safe], sin.float()[safe]).float()
        values = offloaded_rows(built, "v", ids, fetched)
        # outlier and local tokens are exact on the GPU
        exact_ids = self.always_kept(built, None)
        exact_k = torch.cat([res["outlier_k"], res["local_k"]], dim=1).float()
        exact_v = torch.cat([res["outlier_v"], res["local_v"]], dim=1).float()
        keys, values = overlay_exact(keys, values, ids, exact_ids, exact_k, exact_v)
        none = (ids < 0).to(keys.device)[:, :, None]
        return keys.masked_fill(none, 0), values.masked_fill(none, 0)

    def _local_ids(self, built: Built) -> torch.Tensor:
        n_local = built.info["n_local"]
        return torch.arange(built.n_tokens - n_local, built.n_tokens).expand(built.n_kv_heads, -1)
