"""Accuracy simulator: make a stock HF model run an offloading method inside `generate`.

    with simulate(model, get_method("yakv"), budget=0.03125) as sim:
        out = model.generate(input_ids, max_new_tokens=64, do_sample=False)
    sim.stats()   # fetched tokens/bytes per step, resident bytes per layer

What happens, per attention call (routed through `adapter.attention_override`, removed on exit):
- prefill (the call that starts an empty cache: key length == query length): exact attention; the
  prompt's q, pre-/post-RoPE keys, values and rotary tables are recorded (the same hooks as
  `kvdiag.capture`), and each layer's method index is built from them on first use;
- every later call (one decode token, or several teacher-forced tokens at once): each query
  attends to the prompt tokens the method selects for it, with the keys and values the method
  provides (`keys()` / `values()`: exact, dequantized or rebuilt from a low-rank factor), plus,
  exactly and causally, every token after the prompt. Several queries in one call are independent
  decode steps of the method (what a one-token-at-a-time decode would see), so teacher forcing
  an answer costs one forward pass.

Layers with a sliding window (Gemma3's local layers) attend exactly: their window is already a
small resident set. Batch size 1. Scores and softmax in float32, output in the model's dtype.
Because `kvdiag.analysis.recall` uses the same Method objects and the same split (index on the prompt,
exact tail), the simulator and the recall analysis agree by construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvdiag.capture import Recorder, recording_hooks, resolve_layers
from kvdiag.errors import KvdiagError
from kvdiag.methods.base import Method, resolve_budget
from kvdiag.models import adapter


@dataclass
class SimulationState:
    """What the simulator knows about the current prompt; `stats()` summarises decode steps."""

    method: Method
    budget: float | int
    layers: set[int]
    recorder: Recorder
    prompt_len: int | None = None
    budget_tokens: int | None = None
    indices: dict = field(default_factory=dict)
    seen_kv: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    resident: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Forget the previous prompt (called before a forward pass that starts an empty cache)."""
        self.recorder.reset()
        self.indices.clear()
        self.seen_kv.clear()
        self.resident.clear()
        self.prompt_len = self.budget_tokens = None

    def new_prompt(self, length: int) -> None:
        self.prompt_len = length
        self.budget_tokens = resolve_budget(self.budget, length)

    def load_prompt(self, trace) -> None:
        """Take the prompt from an existing Trace instead of recording a prefill: the caller then
        continues from a copy of that prefill's cache (see `kvdiag.eval.fidelity`)."""
        missing = sorted(self.layers - set(trace.layers))
        if missing:
            raise KvdiagError(f"the prompt trace lacks layers {missing}; capture them all")
        self.reset()
        rec = self.recorder
        rec.tensors.update({k: v for k, v in trace.tensors.items() if not k.startswith("rope.")})
        for layer in self.layers:
            rec.keep_rope(layer, *(t[None] for t in trace.rope(layer)))
        rec.done_layers.update(self.layers)
        self.new_prompt(trace.n_tokens)

    def index(self, layer: int):
        """The method's index for `layer`, built from the recorded prompt on first use."""
        if layer not in self.indices:
            trace = self.recorder.trace(with_versions=False)
            index = self.method.build(trace.layer_kv(layer))
            self.indices[layer] = index
            self.seen_kv[layer] = (self.method.keys(index).float(), self.method.values(index).float())
            self.resident[layer] = int(self.method.resident_bytes_at(index, self.budget_tokens))
        return self.indices[layer]

    def stats(self) -> dict:
        """Mean fetched tokens/bytes per decode step and layer, resident bytes per layer and token."""
        if not self.steps:
            return {"decode_steps": 0}
        n_layers = len(self.resident) or 1
        return {
            "prompt_tokens": self.prompt_len,
            "budget_tokens": self.budget_tokens,
            "decode_steps": sum(s["queries"] for s in self.steps) // max(len(self.resident), 1),
            "fetched_tokens_per_step_layer": sum(s["fetched_tokens"] for s in self.steps)
            / max(sum(s["queries"] for s in self.steps), 1),
            "fetched_bytes_per_step_layer": sum(s["fetched_bytes"] for s in self.steps)
            / max(len(self.steps), 1),
            "resident_bytes_per_token_layer": sum(self.resident.values()) / n_layers / self.prompt_len,
            "simulated_layers": sorted(self.resident),
        }


def _decode_attention(state: SimulationState, module, query, key, value) -> torch.Tensor:
    """Attention of T new queries [1, H_q, T, d] over the method's prompt view plus the exact tail.

    key/value [1, H_kv, S, d] hold the whole cache (prompt, earlier tokens, the T new ones).
    Returns [1, T, H_q, d] as transformers' attention functions do.
    """
    layer, length = module.layer_idx, state.prompt_len
    index = state.index(layer)
    keys_m, values_m = state.seen_kv[layer]  # [H_kv, L, d]
    _, h_q, t, d = query.shape
    h_kv, s = key.shape[1], key.shape[2]
    group = h_q // h_kv
    q = query[0].float()  # [H_q, T, d]

    selection = state.method.select(index, q.transpose(0, 1), state.budget_tokens)  # mask [T, H_sel, L]
    mask = selection.per_query(h_q).transpose(0, 1)  # [H_q, T, L]
    state.steps.append({
        "queries": t,
        "fetched_tokens": int(selection.fetched.sum().item()) / selection.fetched.shape[1],
        "fetched_bytes": float(state.method.fetched_bytes(selection)),
    })  # fmt: skip

    qg = q.reshape(h_kv, group, t, d)
    prompt_logits = torch.einsum("hgtd,hld->hgtl", qg, keys_m).reshape(h_q, t, length)
    prompt_logits = prompt_logits.masked_fill(~mask, float("-inf"))
    tail_k, tail_v = key[0, :, length:].float(), value[0, :, length:].float()  # [H_kv, S-L, d]
    tail_logits = torch.einsum("hgtd,hld->hgtl", qg, tail_k).reshape(h_q, t, s - length)
    query_pos = torch.arange(s - t, s, device=q.device)
    tail_pos = torch.arange(length, s, device=q.device)
    tail_logits = tail_logits.masked_fill(tail_pos[None, :] > query_pos[:, None], float("-inf"))

    logits = torch.cat([prompt_logits, tail_logits], dim=-1) * module.scaling
    softcap = getattr(adapter.text_config(module.config), "attn_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    weights = torch.softmax(logits, dim=-1).reshape(h_kv, group, t, s)
    out = torch.einsum("hgtl,hld->hgtd", weights[..., :length], values_m) + torch.einsum(
        "hgtl,hld->hgtd", weights[..., length:], tail_v
    )
    return out.reshape(h_q, t, d).transpose(0, 1)[None].to(query.dtype)


@contextlib.contextmanager
def simulate(
    model, method: Method, budget: float | int, layers: str | Sequence[int] | None = "all", prompt_trace=None
) -> Iterator[SimulationState]:
    """Run `method` at `budget` (fraction of the prompt or tokens) in `model`'s attention while open.

    layers: where the method applies ('all' = every full-attention layer); other layers attend exactly.
    prompt_trace: a Trace of the prompt (all those layers) whose prefill cache the caller continues
    from, so that several methods can share one prefill.
    """
    if not isinstance(method, Method):
        raise KvdiagError(
            f"simulate needs a kvdiag Method (see `kvdiag methods`), got {type(method).__name__}"
        )
    infos = {d["layer"]: d for d in adapter.layer_info(model)}
    chosen = {i for i in resolve_layers(layers, len(infos)) if infos[i]["sliding_window"] is None}
    device = next(model.parameters()).device
    recorder = Recorder(model, sorted(chosen), outputs=False, store_device=device)
    state = SimulationState(method=method, budget=budget, layers=chosen, recorder=recorder)
    if prompt_trace is not None:
        state.load_prompt(prompt_trace)

    def attend(original, module, query, key, value, attention_mask, **kwargs):
        if query.shape[0] != 1:
            raise KvdiagError(f"the simulator runs batch size 1, got {query.shape[0]}")
        layer, t, s = module.layer_idx, query.shape[2], key.shape[2]
        if s == t:  # an empty cache before this call: a new prompt, attended exactly
            if state.prompt_len is None:
                state.new_prompt(s)
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
            recorder.on_attention(layer, query, key, value, out)
            return out, weights
        if layer not in chosen or state.prompt_len is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return _decode_attention(state, module, query, key, value), None

    def on_forward(_module, args, kwargs):
        if adapter.cache_length(adapter.forward_cache_kwarg(kwargs)) == 0:
            state.reset()

    handle = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with recording_hooks(model, recorder), adapter.attention_override(model, attend):
            yield state
    finally:
        handle.remove()
