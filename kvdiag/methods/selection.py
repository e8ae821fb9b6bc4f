"""What a method's `select` returns and the decode state it keeps (kvdiag.methods.base): `Selection`
(token ids per step and KV head, plus the always-kept ids; the dense mask derived from them),
`BatchSelection` for a batch of prompts, `DecodeState` (budget, GPU cache of recently fetched tokens)
and the small token-id helpers the methods share (budgets in tokens, top-k, gathers).

Shapes: n decode steps, H_sel selecting heads (H_kv, or H_q for per-query-head methods), k selected
tokens, L prompt tokens, d head dim, B prompts of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods.built import Stored, stored_nbytes


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
    cache:         the GPU cache's ranks (`LruRanks`, shared by a batch's rows; `cached_ids` lists
                   a row's cached token ids), None before the first step
    extra:         method-specific bookkeeping
    """

    budget_tokens: int
    resident: dict[str, Stored] = field(default_factory=dict)
    cache_tokens: int = 0
    cache: Any = None  # LruRanks
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
    values, ids, exact_ids = values.to(keys.device), ids.to(keys.device), exact_ids.to(keys.device).long()
    order = exact_ids.argsort(dim=1)
    sorted_ids = exact_ids.gather(1, order)
    pos = torch.searchsorted(sorted_ids, ids.long().contiguous()).clamp_max(sorted_ids.shape[1] - 1)
    hit = (sorted_ids.gather(1, pos) == ids) & (ids >= 0)
    src = order.gather(1, pos)[:, :, None].expand(-1, -1, keys.shape[-1])  # [H, m, d] row of exact_*
    k_exact = exact_k.to(keys.device).float().gather(1, src)
    v_exact = exact_v.to(keys.device).float().gather(1, src)
    return torch.where(hit[:, :, None], k_exact, keys), torch.where(hit[:, :, None], v_exact, values)


def all_token_ids(n_kv_heads: int, n_tokens: int, device=None) -> torch.Tensor:
    """[H_kv, L] the ids of every prompt token, per KV head (for the dense view)."""
    return torch.arange(n_tokens, device=device).expand(n_kv_heads, -1)


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


def update_cache(state: DecodeState, sel: Selection) -> torch.Tensor:
    """One prompt's `update_caches`: [n, H_sel, k] bool hits of `sel`'s n steps."""
    return update_caches([state], sel.ids[None], sel.n_kv_heads, sel.n_tokens)[0]


@dataclass
class LruRanks:
    """The GPU caches of a batch of prompts: rank [B, H_kv, L + 1] long, each token's place in its
    (row, KV head) cache, oldest 0, -1 = not cached (column L: a sink for padding ids). Shared by the
    rows' DecodeStates (`state.cache`, `state.extra["cache_row"]`), so a batched decode step updates
    it with no per-row work."""

    rank: torch.Tensor


def cached_ids(state: DecodeState) -> torch.Tensor:
    """[H_kv, C] the token ids in a state's GPU cache, oldest first (-1 pads heads holding fewer)."""
    if state.cache is None:
        return torch.empty(0, 0, dtype=torch.long)
    rank = state.cache.rank[state.extra["cache_row"]]
    width = int((rank >= 0).sum(dim=-1).max())
    oldest_first = rank.argsort(dim=-1)[:, rank.shape[-1] - width :]
    return torch.where(rank.gather(1, oldest_first) >= 0, oldest_first, -1)


def update_caches(states: list[DecodeState], ids: torch.Tensor, n_kv_heads: int, n_tokens) -> torch.Tensor:
    """Walk n decode steps of B prompts through their per-KV-head LRU caches of recently fetched
    tokens; ids [B, n, H_sel, k] (-1 = none) are the chosen token ids, n_tokens the prompts' lengths
    (an int or one per row). Returns [B, n, H_sel, k] bool, True where a chosen id was cached (read
    from the GPU, not fetched). At each step a KV head's chosen ids (a per-query-head selection: its
    group's union) that were cached move to the most recent end in their cached order, then the
    fetched ones enter in ascending id order; the oldest leave beyond `cache_tokens` (each row its
    own). Rows without a cache keep none and hit nothing.

    Vectorised over rows and heads (`LruRanks`; one pass per step, no host synchronisation)."""
    b, n, h_sel, k = ids.shape
    device = ids.device
    group = h_sel // n_kv_heads
    length = max(n_tokens) if isinstance(n_tokens, (list, tuple)) else int(n_tokens)
    capacity = torch.tensor([st.cache_tokens for st in states], device=device)[:, None, None]  # [B, 1, 1]
    shared = states[0].cache
    if (
        shared is not None
        and shared.rank.shape == (b, n_kv_heads, length + 1)
        and all(st.cache is shared and st.extra.get("cache_row") == row for row, st in enumerate(states))
    ):
        prio = shared.rank.to(device)
    else:  # a new batch, or rows from different batches: gather each row's ranks
        prio = torch.full((b, n_kv_heads, length + 1), -1, dtype=torch.long, device=device)
        for row, st in enumerate(states):
            if st.cache_tokens and st.cache is not None:
                old = st.cache.rank[st.extra["cache_row"]].to(device)
                width = min(old.shape[-1] - 1, length)
                prio[row, :, :width] = old[:, :width]
    big = length + 2  # above every rank
    token = torch.arange(length + 1, device=device)
    hits = torch.zeros_like(ids, dtype=torch.bool)
    for step in range(n):
        chosen = ids[:, step].reshape(b, n_kv_heads, group * k)  # [B, H_kv, G·k]
        slot = torch.where(chosen >= 0, chosen, length)
        hits[:, step] = ((prio.gather(2, slot) >= 0) & (chosen >= 0)).reshape(b, h_sel, k)
        picked = torch.zeros_like(prio, dtype=torch.bool).scatter_(2, slot, True)
        picked[..., length] = False
        # kept ranks stay; reused move after every kept one (their order kept); new ones after those
        score = torch.where(picked & (prio >= 0), prio + big, prio)
        score = torch.where(picked & (prio < 0), 2 * big + token, score)
        newest_first = score.argsort(dim=-1, descending=True)
        place = torch.empty_like(newest_first).scatter_(-1, newest_first, token.expand_as(newest_first))
        keep = (score >= 0) & (place < capacity)  # the `capacity` most recent
        count = keep.sum(dim=-1, keepdim=True)
        prio = torch.where(keep, count - 1 - place, -1)
    ranks = LruRanks(prio)
    for row, st in enumerate(states):
        if st.cache_tokens:
            st.cache, st.extra["cache_row"] = ranks, row
    return hits
