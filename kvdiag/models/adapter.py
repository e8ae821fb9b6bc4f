"""The one place for transformers-version and architecture quirks.

Everything else in kvdiag talks to a stock Hugging Face causal LM through these functions:
- where the attention modules are, and how to read the pre-RoPE key from `k_proj` / `k_norm`
  (Qwen3 normalises before the head transpose, Gemma3 after);
- per-layer facts: softmax scale, sliding window, logit soft-capping;
- the model's cache object across versions (`cache` output/kwarg in newer 5.x, `past_key_values`
  before; `layers[i].keys` vs older `key_cache[i]`);
- `attention_override`: run a function of ours in place of the model's attention, through
  transformers' `AttentionInterface` (registered under a fresh name, removed on exit: no global
  patching of existing implementations).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kvdiag.errors import KvdiagError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3", "mistral")

_override_ids = itertools.count()


def text_config(config):
    """The text sub-config for multimodal configs (Gemma3), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_shapes(config) -> dict:
    """Layers, heads, KV heads, head_dim and context length from a config."""
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "q_heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim,
        "context_length": getattr(config, "max_position_embeddings", None),
    }


def check_supported(model) -> None:
    model_type = text_config(model.config).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KvdiagError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    attention_modules(model)


def attention_modules(model) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    modules = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "q_proj")
    ]
    modules.sort(key=lambda m: m.layer_idx)
    if not modules:
        raise KvdiagError(f"no attention modules with q_proj/k_proj found in {type(model).__name__}")
    return modules


def pre_rope_keys_bhld(
    k_proj_out: torch.Tensor, norm_in: torch.Tensor | None, norm_out: torch.Tensor | None, head_dim: int
) -> torch.Tensor:
    """Pre-RoPE keys as [B, H_kv, L, d] from the k_proj output [B, L, H_kv·d] and, where the model
    has a k_norm, that norm's input and output.

    Qwen3 normalises [B, L, H_kv, d] before transposing, Gemma3 [B, H_kv, L, d] after: the layout of
    the norm's input is recognised by matching it against the k_proj output.
    """
    b, length = k_proj_out.shape[:2]
    blhd = k_proj_out.reshape(b, length, -1, head_dim)
    if norm_out is None:
        return blhd.transpose(1, 2)
    if norm_in.shape == blhd.shape and torch.equal(norm_in.reshape(blhd.shape), blhd):
        return norm_out.reshape(blhd.shape).transpose(1, 2)
    if norm_in.shape == blhd.transpose(1, 2).shape:
        return norm_out
    raise KvdiagError(f"unexpected k_norm input layout {tuple(norm_in.shape)} for keys {tuple(blhd.shape)}")


def layer_info(model) -> list[dict]:
    """Per layer: softmax scale, sliding window (None = full attention), soft-cap, GQA group."""
    config = text_config(model.config)
    layer_types = getattr(config, "layer_types", None)
    infos = []
    for attn in attention_modules(model):
        i = attn.layer_idx
        window = getattr(attn, "sliding_window", None)
        if window is None and layer_types is not None and layer_types[i] == "sliding_attention":
            window = config.sliding_window
        infos.append(
            {
                "layer": i,
                "scaling": float(attn.scaling),
                "sliding_window": int(window) if window else None,
                "softcap": getattr(config, "attn_logit_softcapping", None),
                "group": int(attn.num_key_value_groups),
            }
        )
    return infos


def model_forward_cache(outputs):
    """The cache returned by a forward pass (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def forward_cache_kwarg(kwargs: dict):
    """The cache passed to a model's forward (`cache` in newer transformers, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def with_cache(model, cache) -> dict:
    """Forward kwargs that pass `cache` under the name this transformers version expects."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def last_logits_only(model) -> dict:
    """Forward kwargs that compute the logits of the last position only (`logits_to_keep=1`, where
    this model's forward takes it): a 128K-token prefill otherwise materialises L × vocab logits
    (33 GB in bf16 for Llama-3.1-8B's vocabulary)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


CUDNN_ENV = "KVDIAG_SDPA_CUDNN"


@contextlib.contextmanager
def decode_attention_backends(device) -> Iterator[None]:
    """Token-by-token decoding on CUDA with SDPA's flash / memory-efficient / math kernels, not cuDNN.

    cuDNN's attention builds an execution graph per input shape, and a decode step's key length
    grows by one every step, so each step of each layer can pay a new graph build (reported at
    hundreds of ms per build, e.g. sgl-project/sglang#4650, ml-explore/mlx#2743). Exact decoding of a
    padded batch of 25 × 8K prompts measured 230 ms per step on the H200 against ~80 ms for the
    simulated methods; that this is the cause is a hypothesis not yet measured: set
    KVDIAG_SDPA_CUDNN=1 to keep torch's default order and compare. No effect on CPU."""
    import os

    if torch.device(device).type != "cuda" or os.environ.get(CUDNN_ENV, "") not in ("", "0"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def cache_length(cache) -> int:
    """Tokens already in a cache (0 for None or an empty cache)."""
    return 0 if cache is None else int(cache.get_seq_length())


def cache_layer_kv(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, H_kv, T, d] stored in a transformers cache for one layer."""
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def _model_attention_function(model, attn: nn.Module, implementation: str) -> Callable:
    """The attention function the model would call for `implementation` (eager from its own module)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        module = sys.modules[type(attn).__module__]
        return module.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _set_implementation(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, KeyError):
        for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
            config._attn_implementation = name


@contextlib.contextmanager
def attention_override(model, wrapper: Callable) -> Iterator[None]:
    """Route every attention call of `model` through `wrapper` while the context is open.

    wrapper(original, module, query, key, value, attention_mask, **kwargs) -> (attn_output, weights)
      original: the attention function the model would have used (sdpa or its eager one);
      query [B, H_q, T, d] post-RoPE; key/value [B, H_kv, S, d] post-RoPE (whole cache so far);
      module.layer_idx tells the layer. attn_output is [B, T, H_q, d] as transformers expects.
    The function is registered in transformers' AttentionInterface under a fresh name (plus the
    matching mask function) and removed, with the model's implementation restored, on exit.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = text_config(model.config)._attn_implementation or "eager"
    if previous.startswith("kvdiag_"):
        raise KvdiagError("kvdiag attention overrides cannot be nested on the same model")
    name = f"kvdiag_{next(_override_ids)}"
    attn_modules = attention_modules(model)
    originals = {id(m): _model_attention_function(model, m, previous) for m in attn_modules}

    def dispatch(module, query, key, value, attention_mask, **kwargs):
        return wrapper(originals[id(module)], module, query, key, value, attention_mask, **kwargs)

    mask_name = previous if previous in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "sdpa"
    ALL_ATTENTION_FUNCTIONS.register(name, dispatch)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_name])
    try:
        _set_implementation(model, name)
        yield
    finally:
        _set_implementation(model, previous)
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def batched_cache(model, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], device=None):
    """A transformers cache holding several prompts left-padded to a common end.

    rows[b][layer] = (k, v) [H_kv, L_b, d]: row b's prompt keys/values of every layer (post-RoPE, as
    the model caches them). The cache is built through the cache classes' own `update` with the
    left-padded [B, H_kv, S0, d] tensors (S0 = max L_b), so sliding-window layers keep their own
    window as in a normal prefill. Pass the matching 2-D attention mask (0 on padding) to forward.
    device: where the cache lives (default: where the rows are); rows elsewhere (host memory) are
    copied in layer by layer, so the GPU never holds a second copy of a prompt's K/V.
    """
    from transformers import DynamicCache

    n_layers = len(rows[0])
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signatures
        cache = DynamicCache()
    for layer in range(n_layers):
        k0, _ = rows[0][layer]
        h_kv, _, d = k0.shape
        s0 = max(kv[layer][0].shape[1] for kv in rows)
        keys = torch.zeros(len(rows), h_kv, s0, d, dtype=k0.dtype, device=device or k0.device)
        values = torch.zeros_like(keys)
        for b, kv in enumerate(rows):
            k, v = kv[layer]
            keys[b, :, s0 - k.shape[1] :] = k
            values[b, :, s0 - v.shape[1] :] = v
        cache.update(keys, values, layer)
    return cache


def offload_cache(
    model,
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]],
    offloaded_layers: set[int],
    prompt_lens: list[int] | None = None,
    device=None,
):
    """Like `batched_cache`, but the layers in `offloaded_layers` keep no prompt keys/values on the GPU:
    they store only the tokens that arrive after the prompt and report the prompt's length as cached,
    so that masks, positions and sequence lengths are what a full cache gives. Their attention call
    then receives the tail only (the offload runtime supplies the prompt part). The rows of those
    layers may already be empty ([H_kv, 0, d]) when `prompt_lens` gives the prompts' lengths."""
    from transformers.cache_utils import DynamicLayer

    cache = batched_cache(model, [[kv if i not in offloaded_layers else (kv[0][:, :0], kv[1][:, :0])
                                   for i, kv in enumerate(row)] for row in rows], device)  # fmt: skip
    s0 = max(prompt_lens) if prompt_lens else max(row[0][0].shape[1] for row in rows)

    class PromptOffloadedLayer(DynamicLayer):
        """A full-attention layer whose prompt part lives elsewhere (host memory, a method's index)."""

        prompt_length = s0

        def get_seq_length(self) -> int:
            stored = (
                0
                if not self.is_initialized or self.keys is None or not self.keys.numel()
                else self.keys.shape[-2]
            )
            return self.prompt_length + stored

        def get_mask_sizes(self, query_length, *args, **kwargs):
            if isinstance(query_length, torch.Tensor):  # older signature: cache_position
                query_length = query_length.shape[0]
            return self.get_seq_length() + query_length, 0

    for i in offloaded_layers:
        layer = PromptOffloadedLayer()
        k0, _ = rows[0][i]
        empty = torch.zeros(
            len(rows), k0.shape[0], 0, k0.shape[2], dtype=k0.dtype, device=device or k0.device
        )
        layer.lazy_initialization(empty, empty)
        cache.layers[i] = layer
    return cache
