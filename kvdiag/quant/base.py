"""The quantizer contract shared by every KV format, and the row / group reshaping they all use.

Every quantizer works row-wise along the last dim: x [..., n] is seen as R = prod(...) rows of n
values. `quantize` returns a `QuantizedTensor` holding the codes and the side information (scales)
a real kernel would store; `dequantize` restores x's shape and dtype. Codes are kept one per tensor
element (uint8 / int16 / float8), not bit-packed: `bytes_per_row` reports the packed storage a real
kernel would use, which is what byte budgets compare.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvdiag.errors import KvdiagError

SCALE_BYTES = 2  # scales / zero points / norms are stored as fp16 unless a format says otherwise


@dataclass
class QuantizedTensor:
    """What a quantizer stores for x [..., n].

    codes:  format-specific payload, e.g. [R, m, c] integer codes or the float8 values
    scales: format-specific side information (per row / group / block scales, zero points, norms)
    shape:  x.shape, restored by `dequantize`
    dtype:  x.dtype, restored by `dequantize`
    spec:   the quantizer's canonical name, checked by `dequantize`
    code_bits: bits one element of `codes` takes when packed (the codes themselves are stored one per
            tensor element)

    Rows: codes and per-row scales have R = prod(shape[:-1]) rows along their first dim (per-tensor
    scales are 0-dim); `take_rows(ids)` keeps some rows, as a runtime gathers stored tokens.
    """

    codes: torch.Tensor
    scales: tuple[torch.Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    spec: str
    code_bits: float = 8.0

    @property
    def n_rows(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Storage: the codes packed at `code_bits` each, plus every scale tensor as stored."""
        code_bytes = math.ceil(self.codes.numel() * self.code_bits / 8)
        return code_bytes + sum(s.numel() * s.element_size() for s in self.scales)

    def take_rows(self, ids: torch.Tensor) -> QuantizedTensor:
        """The stored rows at `ids` ([k] long): shape (k, n), same spec."""
        ids = ids.to(self.codes.device).long()
        scales = tuple(s[ids] if s.dim() and s.shape[0] == self.n_rows else s for s in self.scales)
        shape = torch.Size((ids.numel(), self.shape[-1]))
        return QuantizedTensor(self.codes[ids], scales, shape, self.dtype, self.spec, self.code_bits)

    def to(self, device) -> QuantizedTensor:
        """The same stored tensor on `device` (host offload, GPU residency)."""
        return QuantizedTensor(self.codes.to(device), tuple(s.to(device) for s in self.scales),
                               self.shape, self.dtype, self.spec, self.code_bits)  # fmt: skip

    def map(self, fn) -> QuantizedTensor:
        """`fn` applied to the codes and every scale (e.g. poisoning a payload in tests)."""
        return QuantizedTensor(fn(self.codes), tuple(fn(s) for s in self.scales), self.shape, self.dtype,
                               self.spec, self.code_bits)  # fmt: skip


class Quantizer(ABC):
    """A KV storage format. Concrete quantizers are small dataclasses built by `get_quantizer(spec)`.

    name:           canonical spec string, e.g. "higgs:EDEN4-256:g128"
    bits_per_value: code bits per coordinate, without scales
    """

    name: str
    bits_per_value: float

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """x [..., n] → codes and scales, quantized row-wise along the last dim."""

    @abstractmethod
    def _decode(self, qt: QuantizedTensor) -> torch.Tensor:
        """codes and scales → float32 [R, n] (R rows of x, flattened)."""

    @abstractmethod
    def bytes_per_row(self, n: int) -> float:
        """Storage of one row of n values: packed codes + scales (per-tensor constants excluded)."""

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """Back to x's shape and dtype."""
        if qt.spec != self.name:
            raise KvdiagError(f"QuantizedTensor was made by {qt.spec!r}, not by {self.name!r}")
        return self._decode(qt).reshape(qt.shape).to(qt.dtype)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(x)): same shape and dtype as x."""
        return self.dequantize(self.quantize(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] → float32 [R, n] (R = prod of the leading dims); rejects non-float input."""
    if not torch.is_floating_point(x):
        raise KvdiagError(f"quantizers take floating-point tensors, got {x.dtype}")
    if x.dim() == 0:
        raise KvdiagError("quantizers take tensors with at least one dim (rows along the last dim)")
    return x.reshape(-1, x.shape[-1]).float()


def split_groups(rows: torch.Tensor, group: int, pad: str = "zeros") -> torch.Tensor:
    """[R, n] → [R, ceil(n / group), group]; the last group is padded with zeros or its last value."""
    n = rows.shape[-1]
    m = math.ceil(n / group)
    extra = m * group - n
    if extra:
        mode = "constant" if pad == "zeros" else "replicate"
        rows = F.pad(rows.unsqueeze(1), (0, extra), mode=mode).squeeze(1)
    return rows.reshape(rows.shape[0], m, group)


def join_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """[R, m, group] → [R, n]: flatten groups and drop the padding."""
    return groups.reshape(groups.shape[0], -1)[:, :n]


def parse_group(opt: str, spec: str) -> int | None:
    """':g32' → 32, ':row' → None (the whole row); anything else is a KvdiagError."""
    if opt == "row":
        return None
    if opt.startswith("g") and opt[1:].isdigit() and int(opt[1:]) > 0:
        return int(opt[1:])
    raise KvdiagError(f"bad option {opt!r} in quantizer spec {spec!r}: expected ':g<positive int>' or ':row'")
