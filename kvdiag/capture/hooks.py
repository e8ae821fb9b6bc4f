"""Capture per-head queries, pre-/post-RoPE keys and values of a stock Hugging Face model.

    with capture(model, layers=[0, 5]) as rec:
        model(input_ids)
    trace = rec.trace()          # kvdiag.capture.trace.Trace

or in one call: `trace = capture_prompt(model, tokenizer, "some text", layers="all")`.

How: the model's attention runs through `kvdiag.models.adapter.attention_override`, which sees the
post-RoPE queries and keys and the values exactly as attention does (and the attention output, with
`outputs=True`); forward hooks on `k_proj` and `k_norm` give the keys before RoPE; a forward
pre-hook on each attention module gives the rotary tables the model used. Everything is removed on
exit, also after an exception. Only the first forward pass inside the context (the prompt) is
recorded; batch size must be 1.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch

from kvdiag.capture.trace import Trace
from kvdiag.errors import KvdiagError
from kvdiag.models import adapter


def resolve_layers(layers: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """The layer indices a --layers value selects, sorted and without repeats.

    'all' / None → every layer; '0,5,10' or [0, 5, 10] → those. Negative indices count from the end,
    as in Python: -1 is the last layer (n_layers - 1), -n_layers the first; anything outside
    -n_layers..n_layers-1 is an error naming the valid range.
    """
    if layers is None or (isinstance(layers, str) and layers.strip() == "all"):
        return list(range(n_layers))
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError as err:
            raise KvdiagError(
                f"--layers {layers!r} is not 'all' or a comma-separated list of integers"
            ) from err
    chosen = []
    for i in layers:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise KvdiagError(
                f"layer index {i} is out of range; the model has layers 0..{n_layers - 1} "
                f"(or -{n_layers}..-1 counted from the end)"
            )
        chosen.append(j)
    if not chosen:
        raise KvdiagError("no layers selected")
    return sorted(set(chosen))


class Recorder:
    """Collects tensors during the prompt pass; `trace()` assembles a `Trace`."""

    def __init__(self, model, layers: list[int], outputs: bool, store_device, queries: bool = True):
        self.model = model
        self.layers = set(layers)
        self.outputs = outputs
        self.queries = queries
        self.store_device = store_device
        self.tensors: dict[str, torch.Tensor] = {}
        self.rope_tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rope_of_layer: dict[str, int] = {}
        self.done_layers: set[int] = set()
        self.input_ids: torch.Tensor | None = None

    def keep(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[0] != 1:
            raise KvdiagError(f"capture needs batch size 1, got {tensor.shape[0]}")
        self.tensors[f"layers.{layer}.{name}"] = tensor[0].detach().to(self.store_device).clone()

    def keep_rope(self, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        for j, (c, s) in enumerate(self.rope_tables):
            if (
                c.shape == cos[0].shape
                and torch.equal(c, cos[0].to(c.device))
                and torch.equal(s, sin[0].to(s.device))
            ):
                self.rope_of_layer[str(layer)] = j
                return
        self.rope_tables.append(
            (cos[0].detach().to(self.store_device).clone(), sin[0].detach().to(self.store_device).clone())
        )
        self.rope_of_layer[str(layer)] = len(self.rope_tables) - 1

    def trace(self, prompt_text: str | None = None, with_versions: bool = True) -> Trace:
        if not self.done_layers:
            raise KvdiagError("nothing was captured: run the model on a prompt inside the capture context")
        layers = sorted(self.done_layers)
        tensors = dict(self.tensors)
        for j, (cos, sin) in enumerate(self.rope_tables):
            tensors[f"rope.{j}.cos"], tensors[f"rope.{j}.sin"] = cos, sin
        n_tokens = tensors[f"layers.{layers[0]}.k_post"].shape[1]
        tensors["positions"] = torch.arange(n_tokens)
        info = {str(d["layer"]): d for d in adapter.layer_info(self.model)}
        meta = {
            "model": getattr(self.model, "kvdiag_name", getattr(self.model.config, "_name_or_path", "")),
            "shapes": adapter.config_shapes(self.model.config),
            "n_tokens": int(n_tokens),
            "layers": layers,
            "dtype": str(tensors[f"layers.{layers[0]}.k_post"].dtype).replace("torch.", ""),
            "device": str(next(self.model.parameters()).device),
            "layer_info": {str(i): info[str(i)] for i in layers},
            "rope_of_layer": {str(i): self.rope_of_layer[str(i)] for i in layers},
            "with_outputs": self.outputs,
            "with_queries": self.queries,
        }
        if self.input_ids is not None:
            ids = self.input_ids.flatten().tolist()
            meta["input_ids_sha256"] = hashlib.sha256(str(ids).encode()).hexdigest()
        if prompt_text is not None:
            meta["prompt_sha256"] = hashlib.sha256(prompt_text.encode()).hexdigest()
        if with_versions:
            from kvdiag.runs import versions

            meta["versions"] = versions()
        return Trace(tensors, meta)

    def on_attention(self, layer: int, query, key, value, out) -> None:
        """Keep what attention saw at a layer (first call per layer only)."""
        if layer in self.layers and layer not in self.done_layers:
            if self.queries:
                self.keep(layer, "q", query)
            self.keep(layer, "k_post", key)
            self.keep(layer, "v", value)
            if self.outputs:
                self.keep(layer, "attn_out", out.transpose(1, 2))
            self.done_layers.add(layer)

    def reset(self) -> None:
        """Forget what was recorded, to record the next prompt."""
        self.tensors.clear()
        self.rope_tables.clear()
        self.rope_of_layer.clear()
        self.done_layers.clear()
        self.input_ids = None


@contextlib.contextmanager
def recording_hooks(model, rec: Recorder) -> Iterator[None]:
    """Install the hooks that give `rec` the pre-RoPE keys, rotary tables and input ids; removed on exit.

    The post-RoPE q/k/v come from the attention function: call `rec.on_attention` from an
    `adapter.attention_override` wrapper (as `capture` and `kvdiag.offload.simulate` do).
    """
    attn_modules = adapter.attention_modules(model)
    handles = []
    k_proj_outputs: dict[int, torch.Tensor] = {}

    def on_k_proj(layer):
        def hook(_module, _inputs, output):
            if layer in rec.done_layers:
                return
            k_proj_outputs[layer] = output
            if getattr(attn_modules[layer], "k_norm", None) is None:
                rec.keep(
                    layer,
                    "k_pre",
                    adapter.pre_rope_keys_bhld(output, None, None, attn_modules[layer].head_dim),
                )

        return hook

    def on_k_norm(layer):
        def hook(_module, inputs, output):
            if layer not in rec.done_layers:
                k_pre = adapter.pre_rope_keys_bhld(
                    k_proj_outputs.pop(layer), inputs[0], output, attn_modules[layer].head_dim
                )
                rec.keep(layer, "k_pre", k_pre)

        return hook

    def on_attention_input(layer):
        def hook(_module, args, kwargs):
            if layer in rec.done_layers:
                return
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is None and len(args) > 1:
                cos_sin = args[1]
            rec.keep_rope(layer, *cos_sin)

        return hook

    def on_model_input(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if rec.input_ids is None and ids is not None:
            rec.input_ids = ids.detach().cpu()

    try:
        handles.append(model.register_forward_pre_hook(on_model_input, with_kwargs=True))
        for layer in sorted(rec.layers):
            attn = attn_modules[layer]
            handles.append(attn.k_proj.register_forward_hook(on_k_proj(layer)))
            if getattr(attn, "k_norm", None) is not None:
                handles.append(attn.k_norm.register_forward_hook(on_k_norm(layer)))
            handles.append(attn.register_forward_pre_hook(on_attention_input(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture(
    model,
    layers: str | Sequence[int] | None = "all",
    outputs: bool = False,
    store_device: str | None = None,
    queries: bool = True,
) -> Iterator[Recorder]:
    """Record q, k_pre, k_post, v (and attn_out with outputs=True) of `layers` during the next forward.

    store_device: where captured tensors live (default: the model's device). queries=False keeps no
    prompt queries (a third of the bytes at GQA 4; what the offload runtime's prefill needs for
    methods that do not calibrate on them).
    """
    chosen = resolve_layers(layers, len(adapter.attention_modules(model)))
    rec = Recorder(model, chosen, outputs, store_device or next(model.parameters()).device, queries)

    def record(original, module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        rec.on_attention(module.layer_idx, query, key, value, out)
        return out, weights

    with recording_hooks(model, rec), adapter.attention_override(model, record):
        yield rec


def capture_prompt(
    model,
    tokenizer,
    prompt: str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    layers: str | Sequence[int] | None = "all",
    chat: bool = False,
    max_tokens: int | None = None,
    outputs: bool = False,
    store_device: str | None = None,
) -> Trace:
    """Tokenize `prompt` (or take `input_ids` [1, L]), run one forward pass and return its Trace."""
    from kvdiag.models.prompts import tokenize_prompt

    if input_ids is None:
        input_ids = tokenize_prompt(tokenizer, prompt, model=model, chat=chat, max_tokens=max_tokens)
    device = next(model.parameters()).device
    with torch.inference_mode(), capture(model, layers, outputs=outputs, store_device=store_device) as rec:
        model(input_ids=input_ids.to(device), use_cache=False)
    return rec.trace(prompt_text=prompt)
