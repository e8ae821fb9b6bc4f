"""What a decode through a method costs, counted the same way by the simulator and the runtime.

Per batch row, summed over the method's layers and decode steps: the queries seen, the (KV head,
token) entries read from host memory (`BatchSelection.fetched_entries`: after the method's GPU cache)
and the context tokens attended (per selection head, the mean over heads). `row_stats` turns them
into per-step, per-layer means beside the resident bytes measured from the stored tensors.
Counters stay on the device (no host sync per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeCounters:
    queries: torch.Tensor | None = None  # [B]
    fetched: torch.Tensor | None = None  # [B] fetched (KV head, token) entries
    attended: torch.Tensor | None = None  # [B] attended context tokens (mean over selection heads)

    def add(self, sel, n_queries: int) -> None:
        """Count one layer's BatchSelection of n_queries steps per row."""
        fetched = sel.fetched_entries().sum(dim=(1, 2))
        attended = sel.mask().sum(dim=-1).float().mean(dim=-1).sum(dim=1)
        if self.queries is None:
            self.queries = torch.zeros_like(fetched, dtype=torch.long)
            self.fetched = torch.zeros_like(fetched)
            self.attended = torch.zeros_like(fetched)
        self.queries += n_queries
        self.fetched += fetched
        self.attended += attended

    def row_stats(self, method, builts_and_states, prompt_tokens: int, budget_tokens: int) -> dict:
        """Per-step means of one batch row; builts_and_states: the row's (Built, DecodeState) per layer."""
        b_s = list(builts_and_states)
        if self.queries is None or not b_s:
            return {"decode_steps": 0}
        row = b_s[0][2]
        queries = int(self.queries[row])
        if not queries:
            return {"decode_steps": 0}
        n_layers = len(b_s)
        n_kv = b_s[0][0].n_kv_heads
        entry_bytes = sum(method.entry_bytes(built) for built, _, _ in b_s) / n_layers
        resident = sum(method.resident_bytes(built, state) for built, state, _ in b_s) / n_layers
        fetched = float(self.fetched[row])
        return {
            "prompt_tokens": prompt_tokens,
            "budget_tokens": budget_tokens,
            "decode_steps": queries // n_layers,
            "attended_tokens_per_step_layer": float(self.attended[row]) / queries,
            "fetched_tokens_per_step_layer": fetched / queries / n_kv,  # per KV head
            "fetched_bytes_per_step_layer": fetched / queries * entry_bytes,  # all KV heads
            "resident_bytes_per_token_layer": resident / prompt_tokens,
        }
