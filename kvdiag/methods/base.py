"""The one contract every offloading / sparse-attention method implements (see DESIGN.md).

A method is a dataclass whose fields are its knobs, each defaulting to the upstream value. Analyses
(`kvdiag.analysis.recall`), the accuracy simulator (`kvdiag.offload.simulate`) and the offload runtime use the same
objects, so they agree by construction.

Decode semantics. The index is built once on a prompt of L tokens (`build`). Each decode step brings
a query and asks which prompt tokens attention reads (`select`). Tokens generated after the prompt
are always attended by the caller: methods only choose among the L prompt tokens.

Shapes: H_q query heads, H_kv KV heads, G = H_q // H_kv (GQA group, query head h belongs to KV head
h // G), L prompt tokens, d head dim, n independent decode queries.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import torch

from kvdiag.errors import KvdiagError


@dataclass
class LayerKV:
    """One attention layer of one prompt (batch 1), as `kvdiag.capture` records it.

    k_pre:   [H_kv, L, d] keys before RoPE (after k_norm where the architecture has one)
    k_post:  [H_kv, L, d] keys after RoPE (what exact attention uses)
    v:       [H_kv, L, d] values
    cos/sin: [L, d] the model's own rotary tables at the prompt positions:
             `kvdiag.capture.rope.apply_rope(k_pre, cos, sin)` reproduces k_post
    scaling: softmax scale of the model's attention (1/sqrt(d) for Llama/Qwen)
    q:       [H_q, L, d] post-RoPE prompt queries, or None (methods that calibrate on prompt
             queries, LRQK and InfiniGen, need it)
    """

    k_pre: torch.Tensor
    k_post: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scaling: float
    q: torch.Tensor | None = None
    layer_idx: int = 0

    @property
    def n_kv_heads(self) -> int:
        return self.k_post.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.k_post.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_post.shape[2]


@dataclass
class Selection:
    """Which prompt tokens attention reads, for n decode queries.

    mask:    [n, H_sel, L] bool, True = attended (selected by score ∪ always-kept: local window,
             sinks, outliers). H_sel is H_kv for per-KV-head selection or H_q for per-query-head
             selection (Quest); `per_query_head` says which.
    fetched: [n, H_sel, L] bool, the subset of `mask` that is read from offloaded (host) memory at
             this step; the rest of `mask` is GPU-resident.
    """

    mask: torch.Tensor
    fetched: torch.Tensor
    per_query_head: bool = False

    def per_query(self, n_q_heads: int) -> torch.Tensor:
        """[n, H_q, L] mask expanded to query heads (a KV head's choice is shared by its group)."""
        if self.per_query_head:
            return self.mask
        group = n_q_heads // self.mask.shape[1]
        return self.mask.repeat_interleave(group, dim=1)


def resolve_budget(budget: float | int, n_tokens: int) -> int:
    """Budget as a token count: a float in (0, 1] is a fraction of the prompt, an int ≥ 1 is tokens.

    >>> resolve_budget(0.015625, 131072), resolve_budget(2048, 131072)
    (2048, 2048)
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise KvdiagError(
            f"budget {budget!r} is not a number; give a fraction in (0, 1] or a token count ≥ 1"
        )
    if isinstance(budget, float) and budget <= 1:
        if budget <= 0:
            raise KvdiagError(f"budget fraction {budget} is outside (0, 1]")
        return max(1, math.ceil(budget * n_tokens))
    if not float(budget).is_integer():
        raise KvdiagError(f"budget {budget} is neither a fraction in (0, 1] nor a whole token count")
    tokens = int(budget)
    if not 1 <= tokens <= n_tokens:
        raise KvdiagError(f"budget of {tokens} tokens is outside 1..{n_tokens} (the prompt length)")
    return tokens


@dataclass
class Method:
    """Base class. Subclasses are dataclasses; their fields are the method's knobs.

    Subclasses implement:
      build(layer)                 -> index (any object; the GPU-resident state at prefill)
      select(index, q, budget)     -> Selection; q: [n, H_q, d] post-RoPE decode queries;
                                      budget: tokens (int) chosen by score, see `resolve_budget`
      keys(index, ids=None)        -> [H_kv, L, d] the key attention sees for each prompt token
                                      (exact, dequantized, or rebuilt from a low-rank factor and
                                      re-rotated); `ids` may restrict to those tokens ([H_kv, k])
      values(index, ids=None)      -> [H_kv, L, d] likewise for values
      resident_bytes(index)        -> GPU-resident bytes of the index for this layer
      fetched_bytes(selection)     -> bytes read from host memory per decode step (mean over n)
    """

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""

    def knobs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        """The name, or "name:knob=value,..." with the knobs that differ from the defaults (a spec
        that `kvdiag.methods.parse_method_spec` reads back)."""
        changed = []
        for f in fields(self):
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING
            )  # fmt: skip
            if f.init and getattr(self, f.name) != default:
                changed.append(f"{f.name}={getattr(self, f.name)}")
        return f"{self.name}:{','.join(changed)}" if changed else self.name

    def resident_bytes_at(self, index, budget_tokens: int) -> float:
        """GPU-resident bytes of the layer's index when decoding at `budget_tokens` (methods whose
        resident set depends on the budget, like StreamingLLM's window, take it as `budget`)."""
        if "budget" in inspect.signature(self.resident_bytes).parameters:
            return float(self.resident_bytes(index, budget=budget_tokens))
        return float(self.resident_bytes(index))
