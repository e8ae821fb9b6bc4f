"""Helpers the methods share: the scoring rules (from their one reference, `kvdiag.kernels.naive`),
storage of per-head tensors in a quantized format, ranks, and knob validation.

Shapes as in `kvdiag.methods.base`: q [n, H_q, d] (n independent decode steps), keys/landmarks
[H_kv, N, d], G = H_q // H_kv and query head h belongs to KV head h // G.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from kvdiag.errors import KvdiagError
from kvdiag.kernels.naive import box_upper_bound_scores, mean_query_scores, softmax_max_scores
from kvdiag.quant.base import QuantizedTensor

__all__ = [
    "FLOAT_DTYPES",
    "box_upper_bound_scores",
    "mean_query_scores",
    "softmax_max_scores",
    "numerics_of",
    "store_rows",
    "load_rows",
    "load_token_rows",
    "check_int",
    "check_float",
    "check_choice",
    "check_quant_spec",
    "scaled_rank",
    "get_quantizer",
]

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def numerics_of(layer_dtype: torch.dtype) -> str:
    """ "bf16" when the layer's tensors are bf16 (a bf16 model scores as upstream does), else "fp32"."""
    return "bf16" if layer_dtype == torch.bfloat16 else "fp32"


# --- quantized storage of per-head tensors ------------------------------------------------------


def get_quantizer(spec: str) -> Any:
    """`kvdiag.quant.get_quantizer(spec)`."""
    from kvdiag.quant import get_quantizer as _get

    return _get(spec)


def store_rows(spec: str, x: torch.Tensor) -> QuantizedTensor:
    """Store per-head tensors the way the upstream code does: x [H, N, d] laid out as N rows of H·d
    channels (all heads of a token in one row), quantized with `spec`. Returns the QuantizedTensor
    of shape (N, H·d)."""
    n_heads, n_rows, d = x.shape
    rows = x.transpose(0, 1).reshape(n_rows, n_heads * d)
    return get_quantizer(spec).quantize(rows)


def load_rows(qt: QuantizedTensor, n_heads: int) -> torch.Tensor:
    """The dequantized rows of a `store_rows` result, laid back as [H, N, d] float32."""
    if qt.n_rows == 0 or qt.shape[0] == 0:
        return torch.zeros(n_heads, 0, qt.shape[-1] // n_heads, device=qt.codes.device)
    rows = get_quantizer(qt.spec).dequantize(qt).float()  # [N, H·d]
    return rows.reshape(rows.shape[0], n_heads, -1).transpose(0, 1).contiguous()


def load_token_rows(qt: QuantizedTensor, ids: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Dequantize only the stored rows a step reads: ids [H, m] (-1 = zeros) -> [H, m, d] float32,
    head h taking its own part of each of its tokens' rows."""
    safe = ids.clamp_min(0).long().to(qt.codes.device)
    unique, where = torch.unique(safe, return_inverse=True)  # each stored row decoded once
    rows = load_rows(qt.take_rows(unique), n_heads)  # [H, U, d]
    picked = rows.gather(1, where[:, :, None].expand(-1, -1, rows.shape[-1]))  # [H, m, d]
    return picked.masked_fill((ids < 0).to(picked.device)[:, :, None], 0)


# --- ranks ----------------------------------------------------------------------------------------


def scaled_rank(rank: int, n_channels: int, reference_channels: int = 1024) -> int:
    """A rank given for `reference_channels` channels, scaled to n_channels: round(rank·C/ref), ≥ 1.

    >>> scaled_rank(160, 1024), scaled_rank(160, 512), scaled_rank(160, 192)
    (160, 80, 30)
    """
    return max(1, round(rank * n_channels / reference_channels))


# --- knob validation (used in each method's __post_init__) ----------------------------------------


def check_int(method: str, knob: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise a KvdiagError naming the value and the valid range unless value is an int in lo..hi."""
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )
    if not ok:
        valid = f"an integer in {lo}..{hi}" if hi is not None else f"an integer ≥ {lo}"
        raise KvdiagError(f"{method}: {knob}={value!r} is invalid; use {valid}")


def check_float(method: str, knob: str, value: Any, lo: float, hi: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok or math.isnan(float(value)):
        raise KvdiagError(f"{method}: {knob}={value!r} is invalid; use a number in [{lo}, {hi}]")


def check_choice(method: str, knob: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise KvdiagError(
            f"{method}: {knob}={value!r} is invalid; use one of {', '.join(map(repr, choices))}"
        )


def check_quant_spec(method: str, knob: str, spec: Any) -> None:
    """Raise a KvdiagError unless `spec` names a quantizer of kvdiag.quant."""
    if not isinstance(spec, str) or not spec:
        raise KvdiagError(f"{method}: {knob}={spec!r} is invalid; use a quantizer spec such as 'bf16'")
    try:
        get_quantizer(spec)
    except KvdiagError as err:
        raise KvdiagError(f"{method}: {knob}={spec!r} is invalid: {err}") from err
