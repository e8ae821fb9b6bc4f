"""What a method's `build` returns (kvdiag.methods.base): `Built`, the GPU-resident state and the host
payload of one layer's prompt, with bytes measured from the stored tensors; `BuiltBatch`, several
prompts' states stacked for batched scoring; and the payload reads a runtime does (`fetch_rows`,
`offloaded_rows`).

Shapes: H_kv KV heads, L prompt tokens, d head dim, B prompts of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvdiag.quant.base import QuantizedTensor

Stored = torch.Tensor | QuantizedTensor


def stored_nbytes(x: Stored) -> int:
    """Bytes of one stored tensor (QuantizedTensor: codes at their packed width + scales)."""
    return x.nbytes if isinstance(x, QuantizedTensor) else x.numel() * x.element_size()


@dataclass
class Built:
    """A method's state for one layer after prefill.

    resident:  name -> tensor kept on the GPU, at its true dtype and format
    offloaded: name -> host payload (exact or quantized K/V rows, as the method stores them)
    n_tokens, n_kv_heads, head_dim: the layer's L, H_kv, d
    scaling:   the model's softmax scale
    dense:     the layer attends everything (a method's first `dense_layers`, or exact)
    rope:      (cos, sin) [L, d], the model's rotary tables at the prompt positions: model constants
               (recomputable from positions and the rotary frequencies), not per-layer state, so not
               counted as resident; methods that rebuild pre-RoPE keys re-rotate with them
    info:      what the method derived at build (ranks, counts; build diagnostics such as InfiniGen's
               skew matrices): for tables, docs and tests, never read by `score` or `select`
    """

    resident: dict[str, Stored]
    offloaded: dict[str, Stored]
    n_tokens: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    dense: bool = False
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _decoded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def resident_bytes(self) -> int:
        """Σ of the resident tensors' bytes as stored."""
        return sum(stored_nbytes(x) for x in self.resident.values())

    @property
    def offloaded_bytes(self) -> int:
        return sum(stored_nbytes(x) for x in self.offloaded.values())

    @property
    def device(self) -> torch.device:
        """Where the resident state lives (the GPU in a runtime): materialized rows end up there."""
        for x in (*self.resident.values(), *self.offloaded.values()):
            return x.codes.device if isinstance(x, QuantizedTensor) else x.device
        return torch.device("cpu")

    def resident_breakdown(self) -> dict[str, int]:
        return {name: stored_nbytes(x) for name, x in self.resident.items()}

    def decoded(self, name: str, decode) -> torch.Tensor:
        """`decode(self.resident[name])`, memoised: a PyTorch path may dequantize resident codes once
        per layer instead of every step. The memo is derived from resident state only (never from
        `offloaded`) and is not counted as resident."""
        if name not in self._decoded:
            self._decoded[name] = decode(self.resident[name])
        return self._decoded[name]

    def resident_only(self) -> Built:
        """A view without the offloaded payload: what scoring may see."""
        return Built(self.resident, {}, self.n_tokens, self.n_kv_heads, self.head_dim, self.scaling,
                     self.dense, self.rope, self.info, self._decoded)  # fmt: skip


def fetch_rows(offloaded: dict[str, Stored], ids: torch.Tensor) -> dict[str, Stored]:
    """What a runtime reads from host memory for token ids [H_kv, m] (-1 = none, read as token 0):
    per offloaded tensor, [H_kv, m, d] rows of a per-head tensor [H_kv, L, d], or the H_kv·m stored
    rows (head-major: row j·m + i is head j's i-th id) of a QuantizedTensor laid out as rows of all
    heads' channels (a token's row is read whole: its quantization mixes the heads)."""
    safe = ids.clamp_min(0).long()
    out = {}
    for name, x in offloaded.items():
        if isinstance(x, QuantizedTensor):
            out[name] = x.take_rows(safe.reshape(-1).to(x.codes.device))
        else:
            out[name] = x.gather(1, safe.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1]))
    return out


def offloaded_rows(built: Built, name: str, ids: torch.Tensor, fetched: dict | None = None) -> torch.Tensor:
    """The offloaded payload `name` at token ids [H_kv, m], as stored then decoded: [H_kv, m, d]
    float32 on the resident state's device (-1 ids give zeros). From `fetched` (`fetch_rows` of these
    ids, what a runtime brought from host memory) when given, else read from `built.offloaded`."""
    if fetched is None:
        fetched = fetch_rows({name: built.offloaded[name]}, ids)
    rows = fetched[name]
    if isinstance(rows, QuantizedTensor):
        from kvdiag.quant import get_quantizer

        h, m = ids.shape
        flat = get_quantizer(rows.spec).dequantize(rows).float().reshape(h, m, built.n_kv_heads, -1)
        out = flat[torch.arange(h), :, torch.arange(h)]  # head j's part of head j's rows: [H_kv, m, d]
    else:
        out = rows.float()
    device = built.device if built.resident else ids.device
    return out.to(device).masked_fill((ids < 0).to(device)[:, :, None], 0)


def stack_padded(tensors: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Tensors of equal rank, sizes differing per dim, padded with `value` to the largest and stacked:
    [B, *max_shape]."""
    shape = [max(t.shape[i] for t in tensors) for i in range(tensors[0].dim())]
    out = tensors[0].new_full((len(tensors), *shape), value)
    for b, t in enumerate(tensors):
        out[(b, *[slice(0, n) for n in t.shape])] = t
    return out


@dataclass
class BuiltBatch:
    """The builds of B prompts (one per batch row, each its own length) with their score inputs
    stacked for batched scoring: `Method.stack(builts)`.

    rows:     the per-row Built (materialize and bytes work per row)
    inputs:   name -> [B, ...] the method's `score_inputs`, zero-padded to the largest row
    n_blocks: [B] long, scored blocks per row (padding blocks score -inf and are never chosen)
    starts:   [B, H | 1, N] long, the first token of every scored block (padding: 0)
    """

    rows: list[Built]
    inputs: dict[str, torch.Tensor]
    n_blocks: torch.Tensor
    starts: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.rows)
