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

The contract's data types live beside this module and are re-exported here: `kvdiag.methods.built`
(Built, BuiltBatch, payload reads) and `kvdiag.methods.selection` (Selection, BatchSelection,
DecodeState, token-id helpers).

Shapes: H_q query heads, H_kv KV heads, G = H_q // H_kv (query head h belongs to KV head h // G),
L prompt tokens, d head dim, n independent decode queries, H_sel = H_kv (per KV head selection) or
H_q (`per_query_head` methods: Quest, InfiniGen, LRQK).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import torch

from kvdiag.capture.trace import LayerKV  # noqa: F401  (re-exported: the contract's input)
from kvdiag.errors import KvdiagError
from kvdiag.methods.built import (  # noqa: F401  (re-exported: the contract's types)
    Built,
    BuiltBatch,
    Stored,
    fetch_rows,
    offloaded_rows,
    stack_padded,
    stored_nbytes,
)
from kvdiag.methods.selection import (  # noqa: F401  (re-exported: the contract's types and helpers)
    BatchSelection,
    DecodeState,
    Selection,
    all_token_ids,
    dense_ids,
    gather_tokens,
    ids_ascending,
    overlay_exact,
    resolve_budget,
    topk_indices,
    update_cache,
    update_caches,
)

BACKENDS = ("torch", "triton")


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
            sel.cached = update_caches(states, ids, rows[0].n_kv_heads, [r.n_tokens for r in rows])
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
        return self.materialize(built, all_token_ids(built.n_kv_heads, built.n_tokens, built.device))

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
