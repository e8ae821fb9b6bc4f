"""Triton kernel paths of the offload runtime: a whole decode step of one layer in five launches.

For the configurations a path covers, one decode step (one query token per batch row) is:

    scores = score(resident codes / landmarks)          kvdiag.kernels.higgs_scores / batched_scores
    ids    = topk_ids(scores, k per row)                 kvdiag.kernels.topk (radix select, ascending)
    rows   = gather_rows(host K/V, ids)                  kvdiag.kernels.gather (zero-copy from pinned memory)
    out    = sparse_decode_attention(q, rows, resident, tail)   kvdiag.kernels.decode_attention (split-K)

- `YAKVRuntimePath`: YAKV's GPU-runtime variant (`rule="mean_query"`, K/V stored fp8 e4m3, 2-bit
  HIGGS landmarks, no centring, no residual landmarks): scored straight from the codes, the top-k
  and the local window fetched as fp8 rows and dequantized inside the attention kernel.
- `ShadowKVPath`: ShadowKV with a low-rank factor and cast (bf16/fp16/fp32) landmarks: chunk
  landmarks scored with the softmax-max rule, the chosen chunks' values fetched, their keys rebuilt
  as U[pos]·SV + RoPE inside the attention kernel, the outlier and local tokens exact from the GPU.

The selection is the method's (same resident state, same rules; kernels compute in fp32 where the
PyTorch rule may round through fp16 / bf16, so rare near-ties can go the other way). `Selection`s
for the statistics are built from the kernel's ids. All launches take no host sync (`validate=False`),
so a step can be captured in a CUDA graph (`kvdiag.bench` does).
"""

from __future__ import annotations

import torch

from kvdiag.methods.base import BuiltBatch, stack_padded


def _pinned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


def _host_rows(builts, rows_of) -> torch.Tensor:
    """[B, ...] pinned host payload of a batch (`rows_of(built)` per row, padded to the longest).
    Rows that all share one build (one prompt decoded in B rows, as `kvdiag bench` does) share one
    host copy: a stride-0 view over the batch, which the gather kernel reads through its strides;
    the GPU state stays one copy per row."""
    if all(b is builts[0] for b in builts):
        one = _pinned(rows_of(builts[0]))
        return one[None].expand(len(builts), *one.shape)
    return _pinned(stack_padded([rows_of(b) for b in builts]))


class YAKVRuntimePath:
    """Kernel step of YAKV's runtime variant for a batch of prompts (see the module docstring)."""

    def __init__(self, method, batch: BuiltBatch, states, device):
        from kvdiag.quant import get_quantizer
        from kvdiag.quant.grids import load_grid

        builts = batch.rows
        self.method, self.batch, self.states = method, batch, states
        self.n_kv, self.d = builts[0].n_kv_heads, builts[0].head_dim
        landmarks = [b.resident["landmarks"] for b in builts]
        quantizer = get_quantizer(landmarks[0].spec)
        self.grid = load_grid(quantizer.grid, device)
        self.codes = stack_padded([lm.codes for lm in landmarks]).to(device)  # [B, C_max, m, c] uint8
        self.scales = stack_padded([lm.scales[0].float() for lm in landmarks]).to(device)  # [B, C_max, m]
        self.n_scored = torch.tensor([b.info["n_scored"] for b in builts], dtype=torch.int32, device=device)
        self.k = torch.tensor([s.budget_tokens for s in states], dtype=torch.int32, device=device)
        self.k_max = max(1, int(self.k.max()))
        # host K/V: [B, H_kv, L_max, d] fp8, pinned (the stored rows of all heads, split per head)
        self.k_host = _host_rows(builts, lambda b: self._per_head(b.offloaded["k"].codes, b))
        self.v_host = _host_rows(builts, lambda b: self._per_head(b.offloaded["v"].codes, b))
        local = [torch.arange(b.info["n_scored"], b.n_tokens).expand(self.n_kv, -1) for b in builts]
        self.local_ids = stack_padded(local, value=-1).to(device=device, dtype=torch.int32)  # [B, H_kv, W]

    def _per_head(self, codes: torch.Tensor, built) -> torch.Tensor:
        """Stored rows [L, H_kv·d] -> [H_kv, L, d] on the host."""
        return codes.reshape(built.n_tokens, self.n_kv, self.d).transpose(0, 1).contiguous().cpu()

    def select_ids(self, q: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, K_max] int32 ids of the top-k scored tokens (ascending, -1 padded)."""
        from kvdiag.kernels.higgs_scores import higgs_landmark_scores
        from kvdiag.kernels.topk import topk_ids

        scores = higgs_landmark_scores(q, self.codes, self.scales, self.grid, self.n_scored, self.n_kv,
                                       "mean_query", validate=False)  # fmt: skip
        return topk_ids(scores, self.k, self.n_scored, k_max=self.k_max, validate=False)

    def kernel_step(self, q, tail_k, tail_v, scaling: float, softcap):
        """The five launches alone (no host sync, CUDA-graph capturable): q [B, H_q, d], tail
        [B, H_kv, T, d] -> (top-k ids [B, H_kv, K] int32, out [B, H_q, d])."""
        from kvdiag.kernels.decode_attention import sparse_decode_attention
        from kvdiag.kernels.gather import gather_rows

        top = self.select_ids(q)
        ids = torch.cat([top, self.local_ids], dim=-1)
        sel_k, sel_v = gather_rows((self.k_host, self.v_host), ids)
        out = sparse_decode_attention(q.contiguous(), scale=scaling, softcap=softcap, ids=ids, sel_k=sel_k,
                                      sel_v=sel_v, tail_k=tail_k.contiguous(), tail_v=tail_v.contiguous())  # fmt: skip
        return top, out

    def step(self, q, tail_k, tail_v, scaling: float, softcap):
        """`kernel_step`, plus the step's `BatchSelection` (for the runtime's statistics)."""
        top, out = self.kernel_step(q, tail_k, tail_v, scaling, softcap)
        return self.selection(top), out

    def selection(self, top: torch.Tensor):
        always = self.method._always_batch(self.batch, self.states, self.n_kv, top.device)
        return self.method._finish(self.batch, self.states, top.long()[:, None], always)


class ShadowKVPath:
    """Kernel step of ShadowKV (low-rank keys, cast landmarks) for a batch of prompts."""

    def __init__(self, method, batch: BuiltBatch, states, device):
        from kvdiag.methods._scoring import load_rows

        builts = batch.rows
        self.method, self.batch, self.states = method, batch, states
        self.n_kv, self.d = builts[0].n_kv_heads, builts[0].head_dim
        self.landmarks = stack_padded([load_rows(b.resident["landmarks"], self.n_kv) for b in builts]).to(
            device
        )
        self.n_landmarks = torch.tensor([b.resident["landmark_chunks"].shape[1] for b in builts],
                                        dtype=torch.int32, device=device)  # fmt: skip
        self.chunks = stack_padded([b.resident["landmark_chunks"].long() for b in builts]).to(
            device
        )  # [B, H, C]
        self.k = torch.tensor(
            [s.budget_tokens // method.chunk for s in states], dtype=torch.int32, device=device
        )
        self.k_max = max(1, int(self.k.max()))
        exact_k = [torch.cat([b.resident["outlier_k"], b.resident["local_k"]], dim=1) for b in builts]
        exact_v = [torch.cat([b.resident["outlier_v"], b.resident["local_v"]], dim=1) for b in builts]
        self.res_k, self.res_v = stack_padded(exact_k).to(device), stack_padded(exact_v).to(device)
        self.res_len = torch.tensor([t.shape[1] for t in exact_k], dtype=torch.int32, device=device)
        self.u = stack_padded([b.resident["u"] for b in builts]).to(device)  # [B, L_max, r]
        self.sv = stack_padded([b.resident["sv"] for b in builts]).to(device)  # [B, H_kv, r, d]
        longest = max(builts, key=lambda b: b.n_tokens)
        self.cos, self.sin = (t.to(device=device, dtype=torch.float32).contiguous() for t in longest.rope)
        self.v_host = _host_rows(builts, lambda b: b.offloaded["v"].cpu())  # [B, H_kv, L_max, d]

    def select_ids(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen landmark slots [B, H_kv, K], their token ids [B, H_kv, K·chunk] int32)."""
        from kvdiag.kernels.batched_scores import batched_landmark_scores
        from kvdiag.kernels.topk import topk_ids

        scale = 1.0 / float(self.d) ** 0.5
        scores = batched_landmark_scores(q, self.landmarks, self.n_landmarks, "softmax_max", scale,
                                         validate=False)  # fmt: skip
        slots = topk_ids(scores, self.k, self.n_landmarks, k_max=self.k_max, validate=False)
        chunk = self.method.chunk
        first = self.chunks.gather(-1, slots.clamp_min(0).long()) * chunk  # [B, H, K]
        tokens = (first[..., None] + torch.arange(chunk, device=q.device)).flatten(-2)
        keep = (slots >= 0).repeat_interleave(chunk, dim=-1)
        return slots, torch.where(keep, tokens, -1).to(torch.int32)

    def kernel_step(self, q, tail_k, tail_v, scaling: float, softcap):
        """The launches alone (CUDA-graph capturable) -> (token ids [B, H_kv, K·chunk], out [B, H_q, d])."""
        from kvdiag.kernels.decode_attention import sparse_decode_attention
        from kvdiag.kernels.gather import gather_rows

        _, ids = self.select_ids(q)
        sel_v = gather_rows(self.v_host, ids)
        out = sparse_decode_attention(
            q.contiguous(), scale=scaling, softcap=softcap, res_k=self.res_k, res_v=self.res_v,
            res_len=self.res_len, ids=ids, sel_v=sel_v, u=self.u, sv=self.sv, cos=self.cos, sin=self.sin,
            tail_k=tail_k.contiguous(), tail_v=tail_v.contiguous(),
        )  # fmt: skip
        return ids, out

    def step(self, q, tail_k, tail_v, scaling: float, softcap):
        """`kernel_step`, plus the step's `BatchSelection` (for the runtime's statistics)."""
        ids, out = self.kernel_step(q, tail_k, tail_v, scaling, softcap)
        always = self.method._always_batch(self.batch, self.states, self.n_kv, q.device)
        return self.method._finish(self.batch, self.states, ids.long()[:, None], always), out


def fast_path_for(method, builts, states, device, interpreter: bool = False):
    """The kernel path covering `method` on these builds, or None (then the PyTorch path runs).

    Kernel paths run on CUDA; on CPU only with `interpreter=True` under the Triton interpreter
    (TRITON_INTERPRET=1: for tests, far slower than the PyTorch path)."""
    import os

    if torch.device(device).type != "cuda" and not (
        interpreter and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        return None
    if any(b.dense for b in builts) or any(s.cache_tokens for s in states):
        return None
    d = builts[0].head_dim
    if d < 16 or d > 256 or d & (d - 1):
        return None
    batch = method.stack(builts)
    name = getattr(method, "name", "")
    if name == "yakv" and _yakv_covered(method):
        return YAKVRuntimePath(method, batch, states, device)
    if name == "shadowkv" and _shadowkv_covered(method, builts):
        return ShadowKVPath(method, batch, states, device)
    return None


def _yakv_covered(method) -> bool:
    return (
        method.rule == "mean_query"
        and method.resolved_kv_quant() == "fp8_e4m3"
        and method.landmark_quant.startswith("higgs:")
        and not method.residual_meta_chunk
        and not method.center
    )


def _shadowkv_covered(method, builts) -> bool:
    return (
        method.rank > 0
        and method.landmark_quant in ("bf16", "fp16")
        and all(b.info.get("rank") for b in builts)
        and all(b.resident["landmark_chunks"].shape[1] for b in builts)
    )
