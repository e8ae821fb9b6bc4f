"""HIGGS: Hadamard rotation + per-group norm + vector rounding onto an EDEN Gaussian grid.

HIGGS (Malinovskii et al., 2024, "Pushing the limits of LLM quantization via the linearity
theorem"), with the grids of EDEN (Vargaftik et al., 2022), as the study (arXiv 2604.08426) applies
it to keys / values: YAKV's 2-bit landmarks (EDEN4-256) and 4-bit offloaded K/V (EDEN2-256).

Per row of x, for each Hadamard group of g values (zero-padded):
    s  = ‖x_group‖₂                                   stored, one scale per group
    y  = H_g x_group / s                              H_g unnormalised, H_g H_g = g·I
    codes = argmax_j 2·y_k·G_jᵀ − ‖G_j‖²              per d-dim sub-vector y_k (nearest point)
    x̂_group = H_g (G[codes] · s) / g
Normalisation: ‖H_g x‖² = g‖x‖², so Σ_i y_i² = g and the coordinates of y have mean square exactly 1;
for a generic x they are close to N(0, 1) (the rotation spreads the energy), which is what the grid,
an MSE-optimal quantizer of a *standard* Gaussian, expects. The relative error ‖x − x̂‖² / ‖x‖²
is the grid's error per coordinate of y (times s² / g).

Faithful to the release's simulator (`shadowkv_models/quantization/higgs.py`): no random signs
before the Hadamard transform (the weight-HIGGS "RHT" signs are not used for KV), zero padding to the
group, norms and the forward transform in fp32, the norm stored as fp32 (4 bytes per group), the
study's published grids by default (`kvdiag.quant.grids`), and dequantization as upstream: the
scaled lookup G[codes]·s is cast to fp16, the inverse transform is computed in fp32 from those fp16
values (what the `fast_hadamard_transform` kernel does) and rounded to fp16, then cast to x's dtype.
Deviations:
- rows shorter than g use the next power of two ≥ n as the group (upstream always pads to g, which
  doubles the codes of a 64-dim head at g = 128); `:row` uses the next power of two ≥ n;
- a group of zeros (norm 0) decodes to zeros (upstream divides by 0).
The release's GPU runtime (mini-sglang) differs from its simulator: one Hadamard group per row and a
bf16 norm ("higgs:EDEN4-256:row"; kvdiag stores the norm in fp32 for both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvdiag.quant.base import QuantizedTensor, Quantizer, as_rows, join_groups, split_groups
from kvdiag.quant.grids import grid_shape, grid_sq_norms, load_grid
from kvdiag.quant.hadamard import next_power_of_two, walsh_hadamard

NORM_BYTES = 4  # one fp32 norm per group, as upstream
SCORE_ELEMENTS = 1 << 24  # cap on the [rows, codes, points] score block built at once


@dataclass
class HiggsQuantizer(Quantizer):
    """HIGGS with grid `grid` ("EDEN{d}-{n}") and Hadamard group `group` (None = the whole row).

    Codes: [R, m, c] uint8 (int16 for grids over 256 points), m groups per row, c = ceil(g / d)
    sub-vectors per group; scales: ([R, m] fp32 group norms,).
    """

    grid: str = "EDEN4-256"
    group: int | None = 128
    name: str = field(init=False)
    bits_per_value: float = field(init=False)

    def __post_init__(self) -> None:
        self.dim, self.points = grid_shape(self.grid)
        self.bits_per_value = math.log2(self.points) / self.dim
        suffix = "row" if self.group is None else f"g{self.group}"
        self.name = f"higgs:{self.grid}:{suffix}"

    def group_size(self, n: int) -> int:
        """Hadamard group actually used for rows of n values (a power of two)."""
        if self.group is None:
            return next_power_of_two(n)
        return min(self.group, next_power_of_two(n))

    def _subvectors_per_group(self, g: int) -> int:
        return math.ceil(g / self.dim)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        rows = as_rows(x)  # [R, n]
        g = self.group_size(rows.shape[-1])
        groups = split_groups(rows, g)  # [R, m, g]
        norms = groups.norm(dim=-1)  # [R, m]
        y = walsh_hadamard(groups) / torch.where(norms > 0, norms, 1.0).unsqueeze(-1)
        codes = self._nearest(y)  # [R, m, c]
        return QuantizedTensor(codes, (norms,), x.shape, x.dtype, self.name, code_bits=math.log2(self.points))

    def _nearest(self, y: torch.Tensor) -> torch.Tensor:
        """y [R, m, g] → [R, m, c] index of the nearest grid point of each d-dim sub-vector."""
        r, m, g = y.shape
        c = self._subvectors_per_group(g)
        y = torch.nn.functional.pad(y, (0, c * self.dim - g)).reshape(r * m * c, self.dim)
        grid = load_grid(self.grid, y.device)  # [P, d]
        neg_sq = -grid_sq_norms(self.grid, y.device)  # [P]
        code_dtype = torch.uint8 if self.points <= 256 else torch.int16
        codes = torch.empty(r * m * c, dtype=code_dtype, device=y.device)
        step = max(1, SCORE_ELEMENTS // self.points)
        for start in range(0, y.shape[0], step):
            scores = torch.addmm(neg_sq, y[start : start + step], grid.T, alpha=2)  # [step, P]
            codes[start : start + step] = scores.argmax(dim=-1).to(code_dtype)
        return codes.reshape(r, m, c)

    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        (norms,) = qt.scales
        n = qt.shape[-1]
        g = self.group_size(n)
        grid = load_grid(self.grid, qt.codes.device)
        y = grid[qt.codes.long()].flatten(-2)[..., :g]  # [R, m, g]
        scaled = (y * norms.float().unsqueeze(-1)).half().float()  # upstream: .half() before the transform
        groups = walsh_hadamard(scaled, scale=1.0 / g).half()
        return join_groups(groups.float(), n)

    def bytes_per_row(self, n: int) -> float:
        g = self.group_size(n)
        m = math.ceil(n / g)
        code_bits = m * self._subvectors_per_group(g) * math.log2(self.points)
        return code_bits / 8 + m * NORM_BYTES
