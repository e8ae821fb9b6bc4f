"""Floating-point KV formats: plain bf16 / fp16 casts, FP8 E4M3 and NVFP4.

FP8 E4M3 ("fn" variant, OCP FP8 spec): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, max 448,
no infinities. `fp8_e4m3` is the scale-free, saturating cast the study's simulator uses for
offloaded K/V (`shadowkv_models/quantization/fp8.py` casts directly); kvdiag clamps to ±448 first
because CUDA casts of out-of-range values give NaN. `fp8_e4m3:row` adds a per-row absmax scale
(absmax → 448, stored fp16) for inputs outside E4M3's range.

NVFP4 (NVIDIA Blackwell): E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} × sign in blocks of 16 with one
E4M3 scale per block, plus one fp32 scale per tensor that maps the largest block scale to 448
(NVIDIA's two-level recipe, also the release's `nvfp4.py`). "Per tensor" = the whole x passed to
`quantize`; it is excluded from `bytes_per_row`. Rounding to E2M1 is round-to-nearest, ties to even
mantissa as the hardware conversion does (the release's simulator rounds ties down; only exact ties
differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvdiag.quant.base import SCALE_BYTES, QuantizedTensor, Quantizer, as_rows, join_groups, split_groups

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude codes 0..7; bit 3 = sign
NVFP4_BLOCK = 16


@dataclass
class CastQuantizer(Quantizer):
    """A plain cast to bf16 or fp16 (codes = the cast tensor, no scales)."""

    name: str = "bf16"
    bits_per_value: float = field(init=False, default=16.0)

    def __post_init__(self) -> None:
        self.target = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(as_rows(x).to(self.target), (), x.shape, x.dtype, self.name, code_bits=16)

    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        return qt.codes.float()

    def bytes_per_row(self, n: int) -> float:
        return 2.0 * n


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of float32 x to float8_e4m3fn."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass
class Fp8Quantizer(Quantizer):
    """FP8 E4M3: scale-free saturating cast, or with a per-row absmax scale (`row_scale`).

    Codes: [R, n] float8_e4m3fn; scales: () or ([R, 1] fp16 row scales,).
    """

    row_scale: bool = False
    name: str = field(init=False)
    bits_per_value: float = field(init=False, default=8.0)

    def __post_init__(self) -> None:
        self.name = "fp8_e4m3:row" if self.row_scale else "fp8_e4m3"

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        rows = as_rows(x)
        if not self.row_scale:
            return QuantizedTensor(cast_e4m3(rows), (), x.shape, x.dtype, self.name)
        scale = (rows.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).to(torch.float16).float()
        codes = cast_e4m3(rows / torch.where(scale > 0, scale, 1.0))
        return QuantizedTensor(codes, (scale.to(torch.float16),), x.shape, x.dtype, self.name)

    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        values = qt.codes.float()
        return values * qt.scales[0].float() if self.row_scale else values

    def bytes_per_row(self, n: int) -> float:
        return n + (SCALE_BYTES if self.row_scale else 0)


@dataclass
class NvFp4Quantizer(Quantizer):
    """NVFP4: E2M1 codes in blocks of 16, E4M3 block scales, one fp32 scale per tensor.

    Codes: [R, m, 16] uint8 in 0..15 (bit 3 = sign, bits 0-2 = index into E2M1_VALUES);
    scales: ([R, m] float8_e4m3fn block scales, [] fp32 tensor scale).
    """

    name: str = field(init=False, default="nvfp4")
    bits_per_value: float = field(init=False, default=4.0)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        blocks = split_groups(as_rows(x), NVFP4_BLOCK)  # [R, m, 16]
        block_scale = blocks.abs().amax(dim=-1) / E2M1_MAX  # [R, m], ideal decode scale
        top = block_scale.max() if block_scale.numel() else block_scale.new_tensor(0.0)
        tensor_scale = torch.where(top > 0, E4M3_MAX / top, 1.0)  # maps the largest block to 448
        scale_e4m3 = cast_e4m3(block_scale * tensor_scale)
        scale = scale_e4m3.float() / tensor_scale  # [R, m], the decode scale actually stored
        scaled = blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
        codes = round_e2m1(scaled.clamp(-E2M1_MAX, E2M1_MAX))
        return QuantizedTensor(
            codes, (scale_e4m3, tensor_scale.float()), x.shape, x.dtype, self.name, code_bits=4
        )

    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        scale_e4m3, tensor_scale = qt.scales
        values = torch.tensor(E2M1_VALUES, device=qt.codes.device)[(qt.codes & 7).long()]
        values = torch.where(qt.codes >= 8, -values, values)
        scale = scale_e4m3.float() / tensor_scale
        return join_groups(values * scale.unsqueeze(-1), qt.shape[-1])

    def bytes_per_row(self, n: int) -> float:
        blocks = math.ceil(n / NVFP4_BLOCK)
        return blocks * NVFP4_BLOCK * 4 / 8 + blocks * 1  # 4-bit codes + one E4M3 byte per block


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties to even mantissa) of v in [−6, 6] → uint8 codes, bit 3 = sign."""
    mags = torch.tensor(E2M1_VALUES, device=v.device)
    midpoints = (mags[1:] + mags[:-1]) / 2  # [7]
    a = v.abs().contiguous()
    idx = torch.searchsorted(midpoints, a)  # a == midpoint[i] → i (the lower value)
    tie = (idx < len(midpoints)) & (a == midpoints[idx.clamp(max=len(midpoints) - 1)])
    idx = idx + (tie & (idx % 2 == 1)).long()  # odd codes have mantissa 1: move ties up to even
    return (idx | ((v < 0).long() << 3)).to(torch.uint8)
