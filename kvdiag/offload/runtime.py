"""The offload runtime: decode with each method's index on the GPU and its payload in host memory.

    traces = [prefill_prompt(model, ids).trace for ids in prompts]
    with offload(model, get_method("yakv", rule="mean_query"), 0.03125, prompt_traces=traces) as rt:
        ... decode from `adapter.offload_cache(model, ...)` (kvdiag.offload.decode does it) ...
    rt.stats()

Prefill attends exactly (the caller's `prefill_prompt`). Then, per layer the method applies to (every
full-attention layer; sliding-window layers stay exact), each prompt's `Built` is split as the
contract says: `resident` moves to the GPU, `offloaded` (K/V rows in the method's storage format:
YAKV fp8 or 4-bit HIGGS rows, ShadowKV's values, ...) moves to host memory (pinned when CUDA is
there) and the prompt's K/V leave the GPU: the model's cache for those layers holds only the tokens
generated after the prompt (`adapter.offload_cache`). Every decode step, per layer:

1. score the resident landmarks and pick the top-k (`Method.select_batch`, one call for the whole
   batch; `backend="triton"` routes the rules a Triton kernel covers to `kvdiag.kernels`);
2. fetch the attended rows from host memory (`fetch_rows`: an index on the host tensors, then one
   copy to the GPU) and rebuild what attention sees from them (`Method.materialize`: dequantized,
   re-rotated, or rebuilt from a low-rank factor; the tokens a method keeps exact on the GPU come
   from its resident state);
3. attend over them plus every generated token (`kvdiag.attention.masked_attention`).

`kvdiag.offload.fast` replaces these three steps by Triton kernels (scoring from the resident codes,
radix top-k, zero-copy gather from pinned memory, split-K attention with the key rebuild fused) for
the configurations it covers (`fast_path_for`): YAKV's runtime variant (fp8 K/V, mean-query rule)
and ShadowKV; the rest runs the PyTorch path above. Both run the same Method objects as the
simulator: same resident state, same selection code, so in fp32 they select the same tokens and
generate the same text (the tests check it). What differs from the simulator is where the payload
lives and what a step reads: the simulator attends over a dense view of every prompt token, the
runtime reads only the attended rows. The generic path reads every attended row from host memory
(the rows a method keeps exact on the GPU too, for simplicity); the bytes a method must fetch are
counted from its `Selection` (`stats`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvdiag.attention import masked_attention
from kvdiag.capture import resolve_layers
from kvdiag.errors import KvdiagError
from kvdiag.methods.base import BACKENDS, Built, Method, fetch_rows, stored_nbytes
from kvdiag.models import adapter
from kvdiag.offload.accounting import DecodeCounters
from kvdiag.quant.base import QuantizedTensor


def to_host(x, pin: bool):
    """A stored tensor (or QuantizedTensor) in host memory, pinned for zero-copy / async reads."""
    if isinstance(x, QuantizedTensor):
        return x.map(lambda t: _host(t, pin))
    return _host(x, pin)


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    return t.pin_memory() if pin else t


def to_device(x, device):
    return x.to(device) if isinstance(x, QuantizedTensor) else x.to(device, non_blocking=True)


def offload_built(built: Built, device) -> Built:
    """The build with its resident state on `device` and its offloaded payload in host memory."""
    pin = torch.cuda.is_available()
    return Built(
        resident={k: to_device(v, device) for k, v in built.resident.items()},
        offloaded={k: to_host(v, pin) for k, v in built.offloaded.items()},
        n_tokens=built.n_tokens,
        n_kv_heads=built.n_kv_heads,
        head_dim=built.head_dim,
        scaling=built.scaling,
        dense=built.dense,
        rope=None if built.rope is None else tuple(t.to(device) for t in built.rope),
        info=built.info,
    )


@dataclass
class RuntimeLayer:
    """One layer of a batch: builds (resident on the GPU, payload on the host), stacked scoring
    inputs, decode states, and the kernel path when one covers the method."""

    builts: list[Built]
    batch: object
    states: list
    fast: object | None = None


@dataclass
class RuntimeState:
    """The runtime's state for the current batch of prompts; `stats()` summarises decode steps."""

    method: Method
    budget: float | int | list
    layers: set[int]
    traces: list
    backend: str = "torch"
    kernels: bool | None = None
    per_layer: dict = field(default_factory=dict)
    counters: DecodeCounters = field(default_factory=DecodeCounters)
    counting: bool = True  # count every step's selection (statistics); False: the kernel path only
    rows_read: int = 0  # host rows actually read by the PyTorch path (its own accounting)
    fast_steps: int = 0  # layer-steps served by the kernel path

    @property
    def prompt_lens(self) -> list[int]:
        return [t.n_tokens for t in self.traces]

    def row_budget(self, b: int) -> int:
        from kvdiag.offload.simulate import SimulationState

        return SimulationState.row_budget(self, b)  # the same rule as the simulator

    def layer(self, layer: int, device) -> RuntimeLayer:
        if layer not in self.per_layer:
            method = self.method
            by_trace: dict[int, Built] = {}  # rows decoding one prompt share its build
            builts = []
            for trace in self.traces:
                if id(trace) not in by_trace:
                    by_trace[id(trace)] = offload_built(
                        method.build(trace.layer_kv(layer, device=device)), device
                    )
                builts.append(by_trace[id(trace)])
            states = [method.start(built, self.row_budget(b)) for b, built in enumerate(builts)]
            fast = None
            if self.kernels is not False:
                from kvdiag.offload.fast import fast_path_for

                fast = fast_path_for(method, builts, states, device, interpreter=self.kernels is True)
            batch = fast.batch if fast is not None else method.stack(builts)
            self.per_layer[layer] = RuntimeLayer(builts, batch, states, fast)
        return self.per_layer[layer]

    def gpu_resident_bytes(self) -> int:
        """Bytes the method's state holds on the GPU over every layer and row (measured)."""
        total = 0
        for rl in self.per_layer.values():
            for built, state in zip(rl.builts, rl.states):
                total += self.method.resident_bytes(built, state)
        return total

    def host_bytes(self) -> int:
        """Bytes of the offloaded payload in host memory over every layer and row."""
        return sum(
            stored_nbytes(x)
            for rl in self.per_layer.values()
            for b in rl.builts
            for x in b.offloaded.values()
        )

    def row_stats(self, b: int) -> dict:
        layers = [(rl.builts[b], rl.states[b], b) for rl in self.per_layer.values()]
        out = self.counters.row_stats(self.method, layers, self.prompt_lens[b], self.row_budget(b))
        return {**out, "simulated_layers": sorted(self.per_layer)} if layers else out

    def stats(self) -> dict:
        out = self.row_stats(0)
        out.update(fast_layer_steps=self.fast_steps, host_rows_read=self.rows_read)
        return out


def _count(state: RuntimeState, sel, t: int) -> None:
    state.counters.add(sel, t)


def _attended_ids(mask: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[T, H_sel, L] attended mask of one row -> [H_kv, m] ids attended by any of its queries (the
    group's union for per-query-head selections), ascending, -1 padded."""
    per_kv = mask.any(dim=0)
    per_kv = per_kv.reshape(n_kv, -1, per_kv.shape[-1]).any(dim=1)  # [H_kv, L]
    counts = per_kv.sum(dim=-1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~per_kv).to(torch.int8), dim=-1, stable=True)[
        :, :width
    ]  # attended first, in order
    return torch.where(torch.arange(width, device=mask.device) < counts[:, None], order, -1)


def _runtime_attention(state: RuntimeState, module, query, tail_k, tail_v) -> torch.Tensor:
    """Decode attention of T new queries per row [B, H_q, T, d]: the method's selected prompt rows
    (from host memory) plus the tail the cache holds ([B, H_kv, S_t, d], the T new ones last)."""
    rl = state.layer(module.layer_idx, query.device)
    n_rows, h_q, t, _ = query.shape
    softcap = getattr(adapter.text_config(module.config), "attn_logit_softcapping", None)
    if rl.fast is not None and t == 1:
        if state.counting:
            sel, out = rl.fast.step(query[:, :, 0], tail_k, tail_v, module.scaling, softcap)
            _count(state, sel, t)
        else:
            out = rl.fast.kernel_step(query[:, :, 0], tail_k, tail_v, module.scaling, softcap)[1]
        state.fast_steps += 1
        return out[:, None].to(query.dtype)  # [B, 1, H_q, d]
    q = query.float().transpose(1, 2)  # [B, T, H_q, d]
    sel = state.method.select_batch(rl.batch, q, rl.states, state.backend)
    _count(state, sel, t)
    s_t = tail_k.shape[2]
    query_pos = torch.arange(s_t - t, s_t, device=query.device)
    tail_mask = torch.arange(s_t, device=query.device)[None, :] <= query_pos[:, None]  # [T, S_t]
    outs = []
    for b, built in enumerate(rl.builts):
        row = sel.row(b)
        per_query = row.per_query(h_q).transpose(0, 1)  # [H_q, T, L]
        ids = _attended_ids(row.mask, built.n_kv_heads)  # [H_kv, m]
        fetched = fetch_rows(built.offloaded, ids.cpu())
        state.rows_read += int((ids >= 0).sum())
        fetched = {k: to_device(v, query.device) for k, v in fetched.items()}
        k, v = state.method.materialize(built, ids, fetched)  # [H_kv, m, d]
        group = h_q // built.n_kv_heads
        cols = ids.clamp_min(0).repeat_interleave(group, dim=0)[:, None, :].expand(-1, t, -1)  # [H_q, T, m]
        prompt_mask = per_query.gather(-1, cols) & (ids >= 0).repeat_interleave(group, dim=0)[:, None, :]
        mask = torch.cat([prompt_mask, tail_mask[None].expand(h_q, -1, -1)], dim=-1)
        keys = torch.cat([k, tail_k[b].float()], dim=1)
        values = torch.cat([v, tail_v[b].float()], dim=1)
        outs.append(masked_attention(query[b], keys, values, mask, module.scaling, softcap))
    return torch.stack(outs).transpose(1, 2).to(query.dtype)  # [B, T, H_q, d]


@contextlib.contextmanager
def offload(
    model,
    method: Method,
    budget: float | int | Sequence,
    prompt_traces: Sequence,
    layers: str | Sequence[int] | None = "all",
    backend: str = "torch",
    kernels: bool | None = None,
    counting: bool = True,
) -> Iterator[RuntimeState]:
    """Run `method` at `budget` (fraction or tokens; a list gives one per row) with its payload
    offloaded, for the prompts of `prompt_traces` (one prefill trace per batch row, every layer).

    The caller decodes from `adapter.offload_cache` (the method layers' prompt K/V not on the GPU):
    `kvdiag.offload.decode.greedy_decode(..., engine="runtime")` does it. backend: how selection
    scores ("torch", or "triton" for the kernels of `kvdiag.kernels`); kernels: the Triton fast path
    of `kvdiag.offload.fast` where it covers the method (decode steps of one token): None = on CUDA,
    True = also on CPU under the Triton interpreter (tests), False = never. counting=False skips the
    per-step selection statistics where the kernel path serves a layer (`kvdiag bench` times it so).
    """
    if not isinstance(method, Method):
        raise KvdiagError(
            f"offload needs a kvdiag Method (see `kvdiag methods`), got {type(method).__name__}"
        )
    if backend not in BACKENDS:
        raise KvdiagError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if not prompt_traces:
        raise KvdiagError("offload needs the prompts' prefill traces (one per batch row)")
    chosen = offloaded_layers(model, layers)
    state = RuntimeState(method=method, budget=budget, layers=chosen, traces=list(prompt_traces),
                         backend=backend, kernels=kernels, counting=counting)  # fmt: skip

    def attend(original, module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx not in chosen:
            return original(module, query, key, value, attention_mask, **kwargs)
        return _runtime_attention(state, module, query, key, value), None

    with adapter.attention_override(model, attend):
        yield state


def offloaded_layers(model, layers="all") -> set[int]:
    """The full-attention layers a method applies to (sliding-window layers stay exact)."""
    infos = {d["layer"]: d for d in adapter.layer_info(model)}
    return {i for i in resolve_layers(layers, len(infos)) if infos[i]["sliding_window"] is None}


__all__ = ["RuntimeState", "offload", "offload_built", "offloaded_layers"]
