"""Rotary position embedding in the layout of Llama, Qwen2/3 and Gemma3 (rotate-half, not interleaved).

The cos/sin tables are the ones the model itself computed (captured by `kvdiag.capture`), so RoPE
scaling variants (llama3, yarn, Gemma3's local/global bases) are reproduced without re-deriving them.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, d] by the tables cos, sin [L, d] (broadcast over leading dims).

    Computed in float32 and returned in x's dtype, like transformers' own `apply_rotary_pos_emb`
    when given float32 tables.
    """
    out = x.float() * cos.float() + rotate_half(x.float()) * sin.float()
    return out.to(x.dtype)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope` (rotation by the opposite angle), for tables without attention scaling."""
    out = x.float() * cos.float() - rotate_half(x.float()) * sin.float()
    return out.to(x.dtype)
