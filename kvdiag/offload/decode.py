"""Batched greedy decoding of prompts of different lengths, exact or through the accuracy simulator.

    prefills = [prefill_prompt(model, ids) for ids in prompts]          # one exact prefill each
    result = greedy_decode(model, prompts, prefills, max_new_tokens=256, eos=[eos_id])
    result = greedy_decode(model, prompts, prefills, 256, [eos_id], method=get_method("yakv"), budget=0.03125)

A prefill covers prompt[:-1] (L_b − 1 tokens, every layer captured); it is shared by every method
decoded from it. Decoding assembles one left-padded cache from the prefills' keys and values
(`adapter.batched_cache`), feeds each prompt's last token at its own position, and continues
greedily, one token per row per step, until every row has produced an end-of-sequence token or
`max_new_tokens`. Finished rows keep being fed (their outputs are ignored), so the batch keeps its
shape. With a method, the simulator (`kvdiag.offload.simulate`) serves every full-attention layer.
The same code runs a batch of one, so batched and single decoding agree (up to float round-off in
batched matmuls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdiag.capture import capture
from kvdiag.errors import KvdiagError
from kvdiag.methods.base import Method
from kvdiag.models import adapter


@dataclass
class SharedPrefill:
    """One exact prefill of prompt[:-1], shared by every method decoded from it."""

    trace: Any  # kvdiag.capture.Trace of the L − 1 prefilled tokens, every layer
    last_token: int  # the prompt's last token, fed as the first decode input

    @property
    def n_tokens(self) -> int:
        return self.trace.n_tokens


def prefill_prompt(model, input_ids: torch.Tensor, queries: bool = True, store_device=None) -> SharedPrefill:
    """Prefill input_ids[:, :-1] ([1, L], L ≥ 2) once, exactly, recording every layer.

    queries=False keeps no prompt queries (LRQK and InfiniGen calibrate on them; the other methods
    and exact decoding do not); store_device: where the recorded K/V live (default the model's
    device; "cpu" keeps a long prompt's K/V off the GPU until a method builds from them)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise KvdiagError(f"a shared prefill needs input_ids [1, L ≥ 2], got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    with torch.inference_mode(), capture(model, "all", store_device=store_device, queries=queries) as rec:
        model(input_ids=input_ids[:, :-1].to(device), use_cache=False, **adapter.last_logits_only(model))
    return SharedPrefill(rec.trace(with_versions=False), int(input_ids[0, -1]))


@dataclass
class DecodeResult:
    """tokens[b]: row b's new tokens (up to and including its first end-of-sequence token); stats[b]:
    the simulator's `row_stats` (empty for exact decoding); logits: [B, steps, V] float32 next-token
    logits of every step (with keep_logits=True)."""

    tokens: list[torch.Tensor]
    stats: list[dict] = field(default_factory=list)
    steps: int = 0
    logits: torch.Tensor | None = None
    engine_state: Any = None  # the simulator's or runtime's state (e.g. `RuntimeState.gpu_resident_bytes()`)


def greedy_decode(
    model,
    prefills: Sequence[SharedPrefill],
    max_new_tokens: int,
    eos: Sequence[int],
    method: Method | None = None,
    budget: float | int | Sequence | None = None,
    layers="all",
    keep_logits: bool = False,
    engine: str = "simulator",
    backend: str = "torch",
    kernels: bool | None = None,
    step_seconds: list | None = None,
    counting: bool = True,
) -> DecodeResult:
    """Greedy decoding of a batch of prefilled prompts (exact, or `method` at `budget`: a fraction of
    each row's indexed prompt, or tokens; a list gives each row its own).

    engine: "simulator" (`kvdiag.offload.simulate`, dense views, the reference) or "runtime"
    (`kvdiag.offload.runtime`: the payload in host memory, the method layers' prompt K/V not in the
    GPU cache; backend / kernels as `offload`). step_seconds: a list that receives each step's wall
    time (the device synchronised at both ends; the first step includes the method's setup);
    counting: as `offload` (the runtime's statistics; False leaves `stats` without decode counts)."""
    if engine not in ("simulator", "runtime"):
        raise KvdiagError(f"engine {engine!r} is unknown; use 'simulator' or 'runtime'")
    if not prefills:
        raise KvdiagError("greedy_decode needs at least one prefilled prompt")
    if max_new_tokens < 1:
        raise KvdiagError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    traces = [p.trace for p in prefills]
    n_layers = len(adapter.attention_modules(model))
    for trace in traces:
        missing = sorted(set(range(n_layers)) - set(trace.layers))
        if missing:
            raise KvdiagError(f"a prefill lacks layers {missing}: prefill with every layer captured")
    lens = [t.n_tokens for t in traces]
    s0, n_rows = max(lens), len(traces)
    from kvdiag.offload.runtime import offload, offloaded_layers

    runtime = method is not None and engine == "runtime"
    elsewhere = offloaded_layers(model, layers) if runtime else set()  # prompt K/V never copied to the GPU

    def prompt_part(t: torch.Tensor, layer: int) -> torch.Tensor:
        return t[:, :0] if layer in elsewhere else t

    # wherever the traces live; the cache copies them to `device` layer by layer
    rows = [[(prompt_part(t.k_post(i), i), prompt_part(t.v(i), i)) for i in range(n_layers)] for t in traces]
    if runtime:
        cache = adapter.offload_cache(model, rows, elsewhere, prompt_lens=lens, device=device)
    else:
        cache = adapter.batched_cache(model, rows, device=device)
    del rows
    mask = torch.zeros(n_rows, s0 + 1, dtype=torch.long, device=device)
    for b, n in enumerate(lens):
        mask[b, s0 - n :] = 1
    inputs = torch.tensor([[p.last_token] for p in prefills], device=device)
    positions = torch.tensor([[n] for n in lens], device=device)
    eos_ids = torch.tensor(sorted(set(eos)) or [-1], device=device)
    out_tokens = torch.empty(n_rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)

    import contextlib

    from kvdiag.offload.simulate import simulate

    if method is None:
        context = contextlib.nullcontext()
    elif engine == "runtime":
        context = offload(model, method, budget, traces, layers=layers, backend=backend, kernels=kernels,
                          counting=counting)  # fmt: skip
    else:
        context = simulate(model, method, budget, layers=layers, prompt_traces=traces)
    steps, kept = 0, []
    with torch.inference_mode(), adapter.decode_attention_backends(device), context as sim:
        import time

        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(max_new_tokens):
            if step_seconds is not None:
                synchronize()
                started = time.perf_counter()
            out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                        **adapter.with_cache(model, cache))  # fmt: skip
            cache = adapter.model_forward_cache(out)
            logits = out.logits[:, -1].float()
            if keep_logits:
                kept.append(logits.cpu())
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, eos_ids[0].clamp_min(0), nxt)
            out_tokens = torch.cat([out_tokens, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos_ids)
            steps += 1
            if step_seconds is not None:
                synchronize()
                step_seconds.append(time.perf_counter() - started)
            if bool(done.all()):
                break
            inputs, positions = nxt[:, None], positions + 1
            mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=1)
    tokens = []
    for b in range(n_rows):
        row = out_tokens[b].cpu()
        hits = torch.isin(row, eos_ids.cpu()).nonzero()
        tokens.append(row[: int(hits[0]) + 1] if len(hits) else row)
    stats = [sim.row_stats(b) for b in range(n_rows)] if method is not None else [{} for _ in range(n_rows)]
    logits = torch.stack(kept, dim=1) if keep_logits else None
    return DecodeResult(tokens=tokens, stats=stats, steps=steps, logits=logits, engine_state=sim)
