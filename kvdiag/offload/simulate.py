"""Accuracy simulator: make a stock HF model run an offloading method inside its decode.

    with simulate(model, get_method("yakv"), budget=0.03125) as sim:      # one prompt, HF generate
        out = model.generate(input_ids, max_new_tokens=64, do_sample=False)
    sim.stats()   # fetched tokens/bytes per step, resident bytes per layer

    traces = [prefill(p) for p in prompts]                                 # a batch of prompts
    with simulate(model, method, budget, prompt_traces=traces) as sim:     # (see kvdiag.offload.decode)
        ... decode with a left-padded cache built from the traces ...

What happens, per attention call (routed through `adapter.attention_override`, removed on exit):
- prefill (the call that starts an empty cache: key length == query length): exact attention; the
  prompt's q, pre-/post-RoPE keys, values and rotary tables are recorded (the same hooks as
  `kvdiag.capture`; batch 1). With `prompt_traces` the prompts come from earlier prefills instead;
- every later call (one decode token per row, or several teacher-forced tokens): each query attends
  to the prompt tokens the method selects for it (`Method.select_batch` over the batch's stacked
  builds), with the keys and values `Method.materialize` gives for them (computed once per layer
  for every prompt token: the method's dense view), plus, exactly and causally, every token after
  the prompt. Several queries in one call are independent decode steps of the method (what a
  one-token-at-a-time decode would see), so teacher forcing an answer costs one forward pass.
  The attention itself is `kvdiag.attention.masked_attention`, the one masked GQA attention.

Batches: rows are left-padded so that every prompt ends at the same cache position S0; row b's
prompt occupies cache positions [S0 − L_b, S0). Padding positions are never attended. Layers with a
sliding window (Gemma3's local layers) attend exactly: their window is already a small resident
set. Scores and softmax in float32; the dense views are kept in the model's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvdiag.attention import masked_attention
from kvdiag.capture import Recorder, recording_hooks, resolve_layers
from kvdiag.errors import KvdiagError
from kvdiag.methods.base import Method, resolve_budget
from kvdiag.models import adapter
from kvdiag.offload.accounting import DecodeCounters


@dataclass
class LayerState:
    """A method's state for one layer of a batch: builds, stacked scoring inputs, decode states and
    the dense views aligned to the cache (k/v [B, H_kv, S0, d], zeros on padding)."""

    builts: list
    batch: object
    states: list
    view_k: torch.Tensor
    view_v: torch.Tensor


@dataclass
class SimulationState:
    """What the simulator knows about the current prompts; `stats()` summarises decode steps."""

    method: Method
    budget: float | int | list
    layers: set[int]
    recorder: Recorder
    traces: list = field(default_factory=list)
    per_layer: dict = field(default_factory=dict)
    counters: DecodeCounters = field(default_factory=DecodeCounters)

    # --- prompts --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the previous prompts (called before a forward pass that starts an empty cache)."""
        self.recorder.reset()
        self.traces = []
        self.per_layer.clear()
        self.counters = DecodeCounters()

    def load_prompts(self, traces: Sequence) -> None:
        """Take the prompts from Traces of earlier prefills (one per batch row, all the layers the
        method applies to): the caller continues from their caches."""
        for trace in traces:
            missing = sorted(self.layers - set(trace.layers))
            if missing:
                raise KvdiagError(f"a prompt trace lacks layers {missing}; capture them all")
        self.reset()
        self.traces = list(traces)
        self.recorder.done_layers.update(self.layers)  # nothing more to record

    @property
    def prompt_lens(self) -> list[int]:
        return [t.n_tokens for t in self.traces]

    @property
    def prompt_len(self) -> int | None:
        return self.traces[0].n_tokens if len(self.traces) == 1 else None

    @property
    def budget_tokens(self) -> int | None:
        return self.row_budget(0) if len(self.traces) == 1 else None

    def layer(self, layer: int, device, dtype) -> LayerState:
        """The method's state for `layer`, built from the prompts on first use."""
        if layer not in self.per_layer:
            method = self.method
            builts = [method.build(t.layer_kv(layer, device=device)) for t in self.traces]
            states = [method.start(built, self.row_budget(b)) for b, built in enumerate(builts)]
            s0 = max(self.prompt_lens)
            h_kv, d = builts[0].n_kv_heads, builts[0].head_dim
            view_k = torch.zeros(len(builts), h_kv, s0, d, dtype=dtype, device=device)
            view_v = torch.zeros_like(view_k)
            for b, built in enumerate(builts):
                k, v = method.dense_view(built)
                view_k[b, :, s0 - built.n_tokens :] = k.to(dtype)
                view_v[b, :, s0 - built.n_tokens :] = v.to(dtype)
            self.per_layer[layer] = LayerState(builts, method.stack(builts), states, view_k, view_v)
        return self.per_layer[layer]

    def row_budget(self, b: int) -> int:
        """Row b's budget in tokens: `budget` (one for every row, or a list with one per row) as a
        fraction of the row's indexed prompt or tokens (capped at the prompt)."""
        budget = self.budget[b] if isinstance(self.budget, (list, tuple)) else self.budget
        n_tokens = self.prompt_lens[b]
        if not (isinstance(budget, float) and budget <= 1):
            budget = min(int(budget), n_tokens)
        return resolve_budget(budget, n_tokens)

    # --- statistics -----------------------------------------------------------------------------

    def resident_bytes_per_token(self) -> list[float]:
        """Per row: mean over simulated layers of resident bytes (index + decode state) per prompt token."""
        out = []
        for b, n_tokens in enumerate(self.prompt_lens):
            sizes = [self.method.resident_bytes(ls.builts[b], ls.states[b]) for ls in self.per_layer.values()]
            out.append(sum(sizes) / len(sizes) / n_tokens if sizes else float("nan"))
        return out

    def row_stats(self, b: int) -> dict:
        """Decode statistics of batch row b: tokens fetched per KV head, and bytes fetched (all KV heads),
        per decode step and layer (means over steps × layers), decode steps, resident bytes per token."""
        layers = [(ls.builts[b], ls.states[b], b) for ls in self.per_layer.values()]
        out = self.counters.row_stats(self.method, layers, self.prompt_lens[b], self.row_budget(b))
        return {**out, "simulated_layers": sorted(self.per_layer)} if layers else out

    def stats(self) -> dict:
        """`row_stats` of a one-prompt simulation (batch row 0)."""
        return self.row_stats(0)


def _cache_mask(sel_mask: torch.Tensor, lens: list[int], s0: int) -> torch.Tensor:
    """Row-token masks [B, T, H, L_max] -> cache-position masks [B, T, H, S0] (row b right-aligned)."""
    b, t, h, l_max = sel_mask.shape
    offsets = torch.tensor([s0 - n for n in lens], device=sel_mask.device)
    target = offsets[:, None] + torch.arange(l_max, device=sel_mask.device)  # [B, L_max]
    valid = (
        torch.arange(l_max, device=sel_mask.device)[None, :]
        < torch.tensor(lens, device=sel_mask.device)[:, None]
    )
    target = torch.where(valid, target, s0)  # padding columns land in a dropped extra column
    out = torch.zeros(b, t, h, s0 + 1, dtype=torch.bool, device=sel_mask.device)
    out.scatter_(-1, target[:, None, None, :].expand(b, t, h, l_max), sel_mask)
    return out[..., :s0]


def _decode_attention(state: SimulationState, module, query, key, value) -> torch.Tensor:
    """Attention of T new queries per row [B, H_q, T, d] over the method's prompt views plus the
    exact tail. key/value [B, H_kv, S, d] hold the whole cache (padding, prompts, the T new ones).
    Returns [B, T, H_q, d] as transformers' attention functions do."""
    ls = state.layer(module.layer_idx, query.device, query.dtype)
    lens = state.prompt_lens
    s0 = max(lens)
    n_rows, h_q, t, _ = query.shape
    s = key.shape[2]
    q = query.float().transpose(1, 2)  # [B, T, H_q, d]
    sel = state.method.select_batch(ls.batch, q, ls.states)
    state.counters.add(sel, t)
    mask = _cache_mask(sel.mask(), lens, s0)  # [B, T, H_sel, S0]
    if sel.per_query_head:
        prompt_mask = mask.transpose(1, 2)  # [B, H_q, T, S0]
    else:
        prompt_mask = mask.repeat_interleave(h_q // mask.shape[2], dim=2).transpose(1, 2)
    query_pos = torch.arange(s - t, s, device=q.device)
    tail_pos = torch.arange(s0, s, device=q.device)
    tail_mask = (tail_pos[None, :] <= query_pos[:, None]).expand(n_rows, h_q, t, s - s0)
    keys = torch.cat([ls.view_k, key[:, :, s0:]], dim=2)
    values = torch.cat([ls.view_v, value[:, :, s0:]], dim=2)
    softcap = getattr(adapter.text_config(module.config), "attn_logit_softcapping", None)
    out = masked_attention(
        query, keys, values, torch.cat([prompt_mask, tail_mask], dim=-1), module.scaling, softcap
    )
    return out.transpose(1, 2).to(query.dtype)


@contextlib.contextmanager
def simulate(
    model,
    method: Method,
    budget: float | int | Sequence,
    layers: str | Sequence[int] | None = "all",
    prompt_trace=None,
    prompt_traces: Sequence | None = None,
) -> Iterator[SimulationState]:
    """Run `method` at `budget` (fraction of the prompt or tokens; a list gives one per batch row) in
    `model`'s attention while open.

    layers: where the method applies ('all' = every full-attention layer); other layers attend exactly.
    prompt_trace: a Trace of the prompt (all those layers) whose prefill cache the caller continues
    from, so that several methods can share one prefill; prompt_traces: one per batch row, for a
    batched decode from a left-padded cache (`kvdiag.offload.decode`).
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
        state.load_prompts([prompt_trace])
    if prompt_traces is not None:
        state.load_prompts(prompt_traces)
    recording = {"on": False}

    def attend(original, module, query, key, value, attention_mask, **kwargs):
        layer, t, s = module.layer_idx, query.shape[2], key.shape[2]
        if s == t:  # an empty cache before this call: a new prompt, attended exactly and recorded
            if query.shape[0] != 1:
                raise KvdiagError(f"the simulator records prompts of batch size 1, got {query.shape[0]}")
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
            recorder.on_attention(layer, query, key, value, out)
            return out, weights
        if layer not in chosen or not state.traces:
            return original(module, query, key, value, attention_mask, **kwargs)
        return _decode_attention(state, module, query, key, value), None

    def on_forward(_module, args, kwargs):
        if adapter.cache_length(adapter.forward_cache_kwarg(kwargs)) == 0:
            state.reset()
            recording["on"] = True
        elif recording["on"]:  # the prompt just recorded becomes the prompt of the decode
            state.traces = [recorder.trace(with_versions=False)]
            recording["on"] = False

    handle = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with recording_hooks(model, recorder), adapter.attention_override(model, attend):
            yield state
    finally:
        handle.remove()
