"""Asymmetric (min/max) integer quantization, per group of g values along the row (KIVI-style).

For each group: zero = min, step = (max − min) / (2^k − 1), code = round((x − zero) / step) in
[0, 2^k − 1], x̂ = zero + code · step. zero and step are stored as fp16 (4 bytes per group) and the
codes are computed against the stored (rounded) values, so the error is at most half a step plus the
fp16 rounding of `zero`. Default group = the whole row; a short last group is padded with its last
value (which leaves its min/max unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvdiag.errors import KvdiagError
from kvdiag.quant.base import SCALE_BYTES, QuantizedTensor, Quantizer, as_rows, join_groups, split_groups

MAX_INT_BITS = 8


@dataclass
class IntQuantizer(Quantizer):
    """k-bit asymmetric integer codes per group of `group` values (None = the whole row).

    Codes: [R, m, g] uint8; scales: ([R, m, 1] fp16 zero = group min, [R, m, 1] fp16 step).
    """

    bits: int = 4
    group: int | None = None
    name: str = field(init=False)
    bits_per_value: float = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_INT_BITS:
            raise KvdiagError(f"int quantizer bit width must be 1..{MAX_INT_BITS}, got {self.bits}")
        if self.group is not None and self.group < 1:
            raise KvdiagError(f"int quantizer group size must be a positive integer, got {self.group}")
        self.bits_per_value = float(self.bits)
        self.name = f"int{self.bits}" + ("" if self.group is None else f":g{self.group}")

    def _group_size(self, n: int) -> int:
        return n if self.group is None else min(self.group, n)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        rows = as_rows(x)
        groups = split_groups(rows, self._group_size(rows.shape[-1]), pad="replicate")  # [R, m, g]
        lo = groups.amin(dim=-1, keepdim=True)
        hi = groups.amax(dim=-1, keepdim=True)
        levels = 2**self.bits - 1
        zero = lo.to(torch.float16)
        step = ((hi - lo) / levels).to(torch.float16)
        safe_step = torch.where(step > 0, step.float(), 1.0)
        codes = torch.round((groups - zero.float()) / safe_step).clamp(0, levels).to(torch.uint8)
        return QuantizedTensor(codes, (zero, step), x.shape, x.dtype, self.name, code_bits=self.bits)

    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        zero, step = qt.scales
        return join_groups(zero.float() + qt.codes.float() * step.float(), qt.shape[-1])

    def bytes_per_row(self, n: int) -> float:
        groups = math.ceil(n / self._group_size(n))
        return n * self.bits / 8 + groups * 2 * SCALE_BYTES
