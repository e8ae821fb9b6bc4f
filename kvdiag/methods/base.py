"""The one contract every offloading / sparse-attention method implements (DESIGN.md, kvpress's
ScorerPress shape: an abstract base owns the shared work, a method implements a few pieces).

A method is a dataclass whose fields are its knobs, each defaulting to the upstream value. Recall
(`kvdiag.analysis.recall`), the accuracy simulator (`kvdiag.offload.simulate`) and the offload
runtime (`kvdiag.offload.runtime`) all drive the same objects through this contract:

    built = method.build(layer)                  # prefill, once per layer: Built(resident, offloaded)
    state = method.start(built, budget_tokens)   # decode begins: per-step state (cache, working set)
    sel = method.select(built, q, state)         # per decode step: Selection of token ids
    k, v = method.materialize(built, ids)        # the keys / values attention sees for those ids

A subclass implements
    build(layer)            -> Built: `resident` = what stays on the GPU, at its true dtype and format
                               (QuantizedTensor codes + scales, factors, page digests, exact local /
                               outlier rows); `offloaded` = the host payload (K/V rows as stored);
    score_inputs(built)     -> the tensors the PyTorch scoring rule reads, from the resident state only
                               (decoded landmarks, page boxes, ...), stacked over a batch of prompts;
    score_batch(batch, q, states)
                            -> [B, n, H_sel, n_blocks] fp32 block scores of B prompts (padding -inf);
    materialize(built, ids) -> (k, v) [H_kv, m, d] fp32 for token ids [H_kv, m];
and describes its blocks: `block_size` (1 per token, ShadowKV chunks of 8, Quest/ArkVale pages of 16),
`block_starts(built)` (first token of every scored block), `n_blocks_selected(built, budget)` (the
same count for every KV head unless `blocks_per_head` says otherwise, as `headwise` does) and
`always_kept(built, state)` (local window, sinks, outliers, dense layers). The base class does the
top-k, the block → token expansion and the always-kept set, prices the fetched entries and keeps
the optional GPU cache of recently fetched tokens, for one prompt (`select`) or a batch of prompts
of different lengths (`stack` + `select_batch`, what the simulator and the runtime decode with).
Methods whose selection is not "top-k of scores" (InfiniGen's threshold) override `select_batch`,
still from the resident state only.

Decode semantics: the index is built on a prompt of L tokens; each decode step brings a query and
the method chooses among the L prompt tokens. Tokens generated after the prompt are always attended,
exactly, by the caller. Bytes: `Built.resident_bytes` is the sum of the stored tensors' bytes
(`nbytes`, QuantizedTensor codes at their packed width); fetched bytes per (KV head, token) entry
are the offloaded payload's bytes per stored entry. Both are measured, never declared.

Shapes: H_q query heads, H_kv KV heads, G = H_q // H_kv (query head h belongs to KV head h // G),
L prompt tokens, d head dim, n independent decode queries, H_sel = H_kv (per KV head selection) or
H_q (`per_query_head` methods: Quest, InfiniGen, LRQK).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from kvdiag.capture.trace import LayerKV  # noqa: F401  (re-exported: the contract's input)
from kvdiag.errors import KvdiagError
from kvdiag.quant.base import QuantizedTensor

BACKENDS = ("torch", "triton")


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


@dataclass
class Selection:
    """Which prompt tokens attention reads at n decode steps, as token ids.

    ids:           [n, H_sel, k] long, tokens chosen by score at each step, ascending, -1 = none
    always:        [H_sel, a] long, tokens attended at every step (local window, sinks, outliers,
                   dense layers), ascending, -1 = none
    n_tokens:      L, the prompt length
    per_query_head: H_sel = H_q (True) or H_kv
    n_kv_heads:    H_kv
    always_fetched: the always-kept tokens are read from host memory each step (nothing of them is
                   resident: YAKV's runtime variant)
    entry_bytes:   host bytes of one fetched (KV head, token) entry, K and/or V as stored
    fetch_per_query_head: a per-query-head method that fetches per query head (LRQK: a token two
                   heads of a group select is fetched twice); otherwise the group's union is fetched
    cached:        [n, H_sel, k] bool or None, chosen ids found in the GPU cache of recently fetched
                   tokens (not fetched again); see `DecodeState.cache_tokens`
    """

    ids: torch.Tensor
    always: torch.Tensor
    n_tokens: int
    per_query_head: bool = False
    n_kv_heads: int = 0
    always_fetched: bool = False
    entry_bytes: float = 0.0
    fetch_per_query_head: bool = False
    cached: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return self.ids.shape[0]

    def as_batch(self) -> BatchSelection:
        """This selection as a batch of one row."""
        return BatchSelection(
            ids=self.ids[None], always=self.always[None], n_tokens=[self.n_tokens],
            per_query_head=self.per_query_head, n_kv_heads=self.n_kv_heads,
            always_fetched=self.always_fetched, entry_bytes=[self.entry_bytes],
            fetch_per_query_head=self.fetch_per_query_head,
            cached=None if self.cached is None else self.cached[None],
        )  # fmt: skip

    @property
    def selected_mask(self) -> torch.Tensor:
        """[n, H_sel, L] bool: the tokens chosen by score."""
        return dense_ids(self.ids, self.n_tokens)

    @property
    def always_mask(self) -> torch.Tensor:
        """[H_sel, L] bool: the always-kept tokens."""
        return dense_ids(self.always, self.n_tokens)

    @property
    def mask(self) -> torch.Tensor:
        """[n, H_sel, L] bool: every attended prompt token (chosen ∪ always-kept)."""
        return self.as_batch().mask()[0]

    @property
    def fetched(self) -> torch.Tensor:
        """[n, H_sel, L] bool: the attended tokens read from host memory at each step."""
        return self.as_batch().fetched()[0]

    def per_query(self, n_q_heads: int) -> torch.Tensor:
        """[n, H_q, L] mask expanded to query heads (a KV head's choice is shared by its group)."""
        if self.per_query_head:
            return self.mask
        return self.mask.repeat_interleave(n_q_heads // self.mask.shape[1], dim=1)

    def fetched_entries(self) -> torch.Tensor:
        """[n, H_kv] number of (KV head, token) entries read from host memory at each step."""
        return self.as_batch().fetched_entries()[0]

    def fetched_bytes(self) -> float:
        """Host bytes read per decode step and layer (mean over the n steps)."""
        if not self.n_steps:
            return 0.0
        return float(self.fetched_entries().sum(dim=-1).mean().item()) * self.entry_bytes


def dense_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """[..., m] token ids (-1 = none) -> [..., length] bool."""
    out = torch.zeros(*ids.shape[:-1], length + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(-1, torch.where(ids < 0, length, ids), True)
    return out[..., :length]


@dataclass
class DecodeState:
    """What a method carries from one decode step to the next (created by `Method.start`).

    budget_tokens: the budget in tokens (see `resolve_budget`)
    resident:      extra GPU tensors decode keeps (StreamingLLM's window, LRQK's working set): counted
                   in `resident_bytes`
    cache_tokens:  capacity of the GPU cache of recently fetched tokens, per KV head (0 = none); a
                   chosen token found there is attended without a fetch
    cache:         [H_kv, cache_tokens] long, the cached token ids (most recent last), -1 = empty
    extra:         method-specific bookkeeping
    """

    budget_tokens: int
    resident: dict[str, Stored] = field(default_factory=dict)
    cache_tokens: int = 0
    cache: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        return sum(stored_nbytes(x) for x in self.resident.values())


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
        if not budget > 0:
            raise KvdiagError(f"budget fraction {budget} is outside (0, 1]; give e.g. 0.03125 or 3.125%")
        return max(1, math.ceil(budget * n_tokens))
    if not float(budget).is_integer():
        raise KvdiagError(
            f"budget {budget} is invalid; give a fraction in (0, 1] (e.g. 0.03125 or 3.125%) or a whole "
            "number of tokens ≥ 1 (e.g. 2048)"
        )
    tokens = int(budget)
    if tokens < 1:
        raise KvdiagError(
            f"budget of {tokens} tokens is invalid; give at least 1 token or a fraction in (0, 1]"
        )
    if tokens > n_tokens:
        raise KvdiagError(f"budget of {tokens} tokens exceeds the prompt's {n_tokens} tokens")
    return tokens


def ids_ascending(ids: torch.Tensor) -> torch.Tensor:
    """Sort token ids along the last dim, -1 (none) last."""
    big = torch.iinfo(torch.long).max
    ordered = torch.where(ids < 0, big, ids).sort(dim=-1).values
    return ordered.masked_fill(ordered == big, -1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N] -> [..., min(k, N)] indices of the k largest scores, ties to the lower index."""
    k = max(0, min(int(k), scores.shape[-1]))
    if k == 0:
        return scores.new_zeros(*scores.shape[:-1], 0, dtype=torch.long)
    # a stable descending sort ranks equal scores by index: exact, and the same on every device
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [H, L, d] at ids [H, m] -> [H, m, d] (-1 ids give zeros)."""
    safe = ids.clamp_min(0).to(x.device).long()
    out = x.gather(1, safe[:, :, None].expand(-1, -1, x.shape[-1]))
    return out.masked_fill((ids < 0).to(x.device)[:, :, None], 0)


def overlay_exact(keys, values, ids, exact_ids, exact_k, exact_v):
    """Rows of keys/values [H, m, d] whose ids [H, m] appear in exact_ids [H, e] replaced by the
    matching rows of exact_k / exact_v [H, e, d] (tokens a method keeps exact on the GPU)."""
    if exact_ids.shape[1] == 0:
        return keys, values
    exact_ids = exact_ids.to(ids.device).long()
    order = exact_ids.argsort(dim=1)
    sorted_ids = exact_ids.gather(1, order)
    pos = torch.searchsorted(sorted_ids, ids.long().contiguous()).clamp_max(sorted_ids.shape[1] - 1)
    hit = (sorted_ids.gather(1, pos) == ids) & (ids >= 0)
    src = order.gather(1, pos)[:, :, None].expand(-1, -1, keys.shape[-1])  # [H, m, d] row of exact_*
    k_exact, v_exact = exact_k.float().gather(1, src), exact_v.float().gather(1, src)
    return torch.where(hit[:, :, None], k_exact, keys), torch.where(hit[:, :, None], v_exact, values)


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
    float32 (-1 ids give zeros). From `fetched` (`fetch_rows` of these ids, what a runtime brought
    from host memory) when given, else read from `built.offloaded`."""
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
    return out.to(ids.device).masked_fill((ids < 0).to(ids.device)[:, :, None], 0)


def all_token_ids(n_kv_heads: int, n_tokens: int, device=None) -> torch.Tensor:
    """[H_kv, L] the ids of every prompt token, per KV head (for the dense view)."""
    return torch.arange(n_tokens, device=device).expand(n_kv_heads, -1)


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


@dataclass
class BatchSelection:
    """The selections of B rows at n decode steps each: `Method.select_batch`.

    ids [B, n, H_sel, K] and always [B, H_sel, A] long (-1 = none), cached [B, n, H_sel, K] bool or
    None; the other fields as `Selection` (entry_bytes per row). `row(b)` is row b's `Selection`.
    """

    ids: torch.Tensor
    always: torch.Tensor
    n_tokens: list[int]
    per_query_head: bool
    n_kv_heads: int
    always_fetched: bool
    entry_bytes: list[float]
    fetch_per_query_head: bool
    cached: torch.Tensor | None = None

    def row(self, b: int) -> Selection:
        always = self.always[b]
        width = int((always >= 0).sum(dim=-1).max()) if always.numel() else 0
        return Selection(
            ids=self.ids[b],
            always=always[:, :width],
            n_tokens=self.n_tokens[b],
            per_query_head=self.per_query_head,
            n_kv_heads=self.n_kv_heads,
            always_fetched=self.always_fetched,
            entry_bytes=self.entry_bytes[b],
            fetch_per_query_head=self.fetch_per_query_head,
            cached=None if self.cached is None else self.cached[b],
        )

    def mask(self, length: int | None = None) -> torch.Tensor:
        """[B, n, H_sel, length] bool over token positions 0..length-1 (default the longest prompt):
        every attended prompt token of each row (chosen ∪ always-kept)."""
        length = max(self.n_tokens) if length is None else length
        always = dense_ids(self.always.to(self.ids.device), length)[:, None]
        return dense_ids(self.ids, length) | always

    def fetched(self, length: int | None = None) -> torch.Tensor:
        """[B, n, H_sel, length] bool: the attended tokens read from host memory at each step (chosen
        tokens not in the GPU cache, minus the resident always-kept ones, or plus them when the
        always-kept tokens are fetched too)."""
        length = max(self.n_tokens) if length is None else length
        ids = self.ids if self.cached is None else torch.where(self.cached, -1, self.ids)
        chosen = dense_ids(ids, length)
        always = dense_ids(self.always.to(self.ids.device), length)[:, None]
        return chosen | always if self.always_fetched else chosen & ~always

    def fetched_entries(self) -> torch.Tensor:
        """[B, n, H_kv] (KV head, token) entries read from host memory at each step: a per-query-head
        selection fetches its group's union once (or each head's own, `fetch_per_query_head`)."""
        fetched = self.fetched()
        b, n, h, length = fetched.shape
        if self.per_query_head:
            grouped = fetched.reshape(b, n, self.n_kv_heads, h // self.n_kv_heads, length)
            fetched = grouped.sum(dim=3) if self.fetch_per_query_head else grouped.any(dim=3)
        return fetched.sum(dim=-1).float()


@dataclass
class Method(ABC):
    """Base class. Subclasses are dataclasses; their fields are the method's knobs.

    Class attributes a subclass sets: `name` (registry key), `paper` (citation), and
    `per_query_head` (selections per query head rather than per KV head); a method that wraps
    another (`headwise`) sets `wraps_method` (left out of the default method list) and names in
    `nested_specs` its fields that hold a method spec (written `base=yakv,base.center=True` in a
    spec: see `label` and `kvdiag.methods.specs.parse_method_spec`).
    """

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    per_query_head: ClassVar[bool] = False
    fetch_per_query_head: ClassVar[bool] = False
    wraps_method: ClassVar[bool] = False
    nested_specs: ClassVar[tuple[str, ...]] = ()

    # --- what a method implements -------------------------------------------------------------

    @abstractmethod
    def build(self, layer: LayerKV) -> Built:
        """Prefill: the GPU-resident index and the offloaded payload of one layer."""

    @abstractmethod
    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        """The tensors the PyTorch scoring rule reads, derived from `built.resident` only (decoded
        landmarks, page boxes, partial keys, …): [H, N, ...]-shaped per row; `stack` pads them."""

    @abstractmethod
    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_sel, N] fp32 block scores of B prompts for decode queries q [B, n, H_q, d], from
        `batch.inputs` (the stacked `score_inputs`); blocks at or beyond `batch.n_blocks[b]` must
        score -inf (the rules in `kvdiag.kernels.naive` take n_valid for that)."""

    @abstractmethod
    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [H_kv, m, d] fp32: what attention sees for token ids [H_kv, m] (-1 = zeros).

        Offloaded rows come from `fetched` (`fetch_rows(built.offloaded, ids)`, what a runtime read
        from host memory) when given, else from `built.offloaded`: read them with `offloaded_rows`."""

    @property
    def block_size(self) -> int:
        """Tokens per scored block (1 = every token its own landmark)."""
        return 1

    def block_starts(self, built: Built) -> torch.Tensor:
        """[H_sel, n_blocks] or [n_blocks] long: the first token of every scored block."""
        return torch.arange(0, built.n_tokens, self.block_size)

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        """How many scored blocks a step chooses at this budget (default budget // block_size)."""
        return budget_tokens // self.block_size

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        """[H_kv, a] long ids attended at every step, per KV head (default: none; a dense layer:
        all). Per-query-head methods share their KV head's set over the group."""
        if built.dense:
            return all_token_ids(built.n_kv_heads, built.n_tokens)
        return torch.zeros(built.n_kv_heads, 0, dtype=torch.long)

    def always_fetched(self, built: Built) -> bool:
        """Whether the always-kept tokens are read from host memory (default: they are resident)."""
        return False

    def start(self, built: Built, budget: float | int) -> DecodeState:
        """Decode begins at `budget` (fraction or tokens): the per-step state. Methods with a GPU page
        cache (ArkVale) or working set (LRQK) set `cache_tokens` or add resident tensors here."""
        return DecodeState(budget_tokens=resolve_budget(budget, built.n_tokens))

    def resolved(self, layer: LayerKV) -> dict[str, Any]:
        """Values the method derives from its knobs for this layer (ranks, storage formats)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """The files the method reads and what identifies their content (path, SHA-256), for run
        manifests: a run that resumes with the same knobs but another file is refused. Default none."""
        return {}

    # --- what the base does -------------------------------------------------------------------

    def stack(self, builts: list[Built]) -> BuiltBatch:
        """The builds of a batch of prompts, score inputs stacked (see `BuiltBatch`)."""
        views = [b.resident_only() for b in builts]
        per_row = [self.score_inputs(v) for v in views]
        inputs = {name: stack_padded([row[name] for row in per_row]) for name in per_row[0]}
        starts = [self.block_starts(v) for v in views]
        starts = [s if s.dim() == 2 else s[None] for s in starts]
        n_blocks = torch.tensor([s.shape[-1] for s in starts], dtype=torch.long)
        return BuiltBatch(rows=builts, inputs=inputs, n_blocks=n_blocks, starts=stack_padded(starts))

    def score(self, built: Built, q: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        """[n, H_sel, n_blocks] scores of one prompt's blocks for q [n, H_q, d] (one-row `score_batch`)."""
        states = [state if state is not None else self.start(built, 1)]
        return self.score_batch(self.stack([built]), q[None], states)[0]

    def select(
        self, built: Built, q: torch.Tensor, budget: float | int | DecodeState, backend: str = "torch"
    ) -> Selection:
        """The tokens attended at n decode steps (q [n, H_q, d] post-RoPE) of one prompt, from the
        resident state. budget: a fraction / token count (a fresh state), or the `DecodeState` of a
        running decode (its cache is updated step by step, in the order of the n queries)."""
        state = budget if isinstance(budget, DecodeState) else self.start(built, budget)
        return self.select_batch(self.stack([built]), q[None], [state], backend).row(0)

    def select_batch(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState], backend: str = "torch"
    ) -> BatchSelection:
        """Selections of B prompts at n decode steps each: q [B, n, H_q, d], one decode state per row."""
        check_backend(backend)
        n_rows, n, n_q_heads = q.shape[0], q.shape[1], q.shape[2]
        always = self._always_batch(batch, states, n_q_heads, q.device)
        n_sel = always.shape[1]
        ks = torch.stack([self.blocks_per_head(row, st) for row, st in zip(batch.rows, states)])
        ks = ks.to(q.device).repeat_interleave(n_sel // ks.shape[1], dim=1)  # [B, H_sel]
        if int(ks.max()) == 0:
            ids = torch.full((n_rows, n, n_sel, 0), -1, dtype=torch.long, device=q.device)
        else:
            scores = self.score_with(batch, q, states, backend)  # [B, n, H_sel, N]
            ids = self._top_blocks(batch, scores, ks)
        return self._finish(batch, states, ids, always)

    def blocks_per_head(self, built: Built, state: DecodeState) -> torch.Tensor:
        """[H_kv] long: scored blocks each KV head chooses per step (default `n_blocks_selected` for
        every head, none on a dense layer; a per-query-head method's query heads take their KV
        head's count). The `headwise` wrapper overrides it to split the same total unevenly."""
        k = 0 if built.dense else self.n_blocks_selected(built, state.budget_tokens)
        return torch.full((built.n_kv_heads,), k, dtype=torch.long)

    def score_with(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState], backend: str
    ) -> torch.Tensor:
        """Block scores through `backend`: "torch" is the PyTorch reference `score_batch`; "triton" the
        method's `kernel_scores` (an error where no kernel covers its rule and storage)."""
        if backend == "triton":
            scores = self.kernel_scores(batch, q, states)
            if scores is None:
                raise KvdiagError(
                    f"{self.label()}: no Triton kernel covers this method's scoring; use backend='torch'"
                )
            return scores
        return self.score_batch(batch, q, states)

    def kernel_scores(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]
    ) -> torch.Tensor | None:
        """[B, n, H_sel, N] scores from a `kvdiag.kernels` Triton kernel (CUDA, or CPU under
        TRITON_INTERPRET=1), or None where no kernel covers this method's rule and storage."""
        return None

    def _top_blocks(self, batch: BuiltBatch, scores: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """[B, n, H_sel, N] scores, block counts ks [B, H_sel] (per row and head) or [B] (per row)
        -> token ids [B, n, H_sel, K] ascending, K = max(ks) · block_size."""
        chosen = topk_indices(scores, int(ks.max()))  # [B, n, H, k_max]
        picked = scores.gather(-1, chosen)
        rank = torch.arange(chosen.shape[-1], device=scores.device)
        per_head = ks.reshape(ks.shape[0], 1, -1, 1)  # [B, 1, H_sel | 1, 1]
        keep = (rank < per_head) & (picked > float("-inf"))
        b, n, h, k = chosen.shape
        starts = batch.starts.to(scores.device).expand(b, h, -1)  # [B, H, N]
        first = starts[:, None].expand(b, n, h, -1).gather(-1, chosen)  # [B, n, H, k]
        tokens = first[..., None] + torch.arange(self.block_size, device=scores.device)
        limit = torch.tensor([r.n_tokens for r in batch.rows], device=scores.device)[
            :, None, None, None, None
        ]
        tokens = torch.where(keep[..., None] & (tokens < limit), tokens, -1)
        return ids_ascending(tokens.reshape(b, n, h, k * self.block_size))

    def _always_batch(self, batch: BuiltBatch, states, n_q_heads: int, device) -> torch.Tensor:
        rows = []
        for row, state in zip(batch.rows, states):
            always = self.always_kept(row, state).to(device).long()
            if self.per_query_head:
                always = always.repeat_interleave(n_q_heads // row.n_kv_heads, dim=0)
            rows.append(always)
        return stack_padded(rows, value=-1)

    def _finish(
        self, batch: BuiltBatch, states: list[DecodeState], ids: torch.Tensor, always: torch.Tensor
    ) -> BatchSelection:
        rows = batch.rows
        sel = BatchSelection(
            ids=ids,
            always=always,
            n_tokens=[r.n_tokens for r in rows],
            per_query_head=self.per_query_head,
            n_kv_heads=rows[0].n_kv_heads,
            always_fetched=self.always_fetched(rows[0]),
            entry_bytes=[self.entry_bytes(r) for r in rows],
            fetch_per_query_head=self.fetch_per_query_head,
        )
        if any(st.cache_tokens for st in states):
            sel.cached = torch.zeros_like(ids, dtype=torch.bool)
            for b, state in enumerate(states):
                if state.cache_tokens:
                    sel.cached[b] = update_cache(state, sel.row(b))
        return sel

    def entry_bytes(self, built: Built) -> float:
        """Host bytes per fetched (KV head, token): the offloaded payload's bytes per stored entry."""
        if not built.offloaded or not built.n_tokens:
            return 0.0
        return built.offloaded_bytes / (built.n_tokens * built.n_kv_heads)

    def resident_bytes(self, built: Built, state: DecodeState | None = None) -> int:
        """GPU bytes of the layer's index (and of the decode state, when given)."""
        return built.resident_bytes + (state.resident_bytes if state is not None else 0)

    def dense_view(self, built: Built) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [H_kv, L, d] fp32 for every prompt token: `materialize` at all ids."""
        return self.materialize(built, all_token_ids(built.n_kv_heads, built.n_tokens))

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
                value = getattr(self, f.name)
                changed.extend(nested_spec_items(f.name, value) if f.name in self.nested_specs
                               else [f"{f.name}={value}"])  # fmt: skip
        return f"{self.name}:{','.join(changed)}" if changed else self.name


def per_step(kernel, q: torch.Tensor) -> torch.Tensor:
    """Run a one-query-per-row kernel (q [B, H_q, d] -> [B, H, N]) over the n steps of q [B, n, H_q, d]."""
    return torch.stack([kernel(q[:, i].contiguous()) for i in range(q.shape[1])], dim=1)


def nested_spec_items(field_name: str, spec: str) -> list[str]:
    """A method spec held by a field, as items of the outer spec: ("base", "shadowkv:rank=320,chunk=8")
    -> ["base=shadowkv", "base.rank=320", "base.chunk=8"] (the outer spec's commas stay unambiguous)."""
    name, _, rest = spec.partition(":")
    knobs = [item.strip() for item in rest.split(",") if item.strip()]
    return [f"{field_name}={name.strip()}"] + [f"{field_name}.{item}" for item in knobs]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KvdiagError(f"scoring backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")


def update_cache(state: DecodeState, sel: Selection) -> torch.Tensor:
    """Walk the n steps of `sel` in order through the per-KV-head LRU cache of recently fetched
    tokens: [n, H_sel, k] bool, True where a chosen id was cached (read from the GPU, not fetched).
    Fetched tokens enter the cache (most recent last); the oldest leave when it is full. A
    per-query-head selection shares its KV head's cache."""
    n, h_sel, _ = sel.ids.shape
    group = h_sel // sel.n_kv_heads
    if state.cache is None:
        state.cache = torch.full((sel.n_kv_heads, 0), -1, dtype=torch.long, device=sel.ids.device)
    hits = torch.zeros_like(sel.ids, dtype=torch.bool)
    for step in range(n):
        rows = []
        for kv in range(sel.n_kv_heads):
            cache = state.cache[kv]
            cache = cache[cache >= 0]
            chosen = sel.ids[step, kv * group : (kv + 1) * group]  # [G', k]
            hit = torch.isin(chosen, cache) & (chosen >= 0)
            hits[step, kv * group : (kv + 1) * group] = hit
            new = chosen[(~hit) & (chosen >= 0)].unique()
            kept = cache[~torch.isin(cache, chosen)]  # refreshed ids move to the end
            reused = cache[torch.isin(cache, chosen)]
            rows.append(torch.cat([kept, reused, new])[-state.cache_tokens :])
        width = max(r.numel() for r in rows)
        state.cache = torch.stack(
            [torch.nn.functional.pad(r, (width - r.numel(), 0), value=-1) for r in rows]
        )
    return hits
