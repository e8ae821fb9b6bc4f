"""Capture against transformers' own cache, attention output and rotary embedding."""

from __future__ import annotations

import sys

import pytest
import torch

from kvdiag.attention import trace_attention_output
from kvdiag.capture import capture, capture_prompt, resolve_layers
from kvdiag.capture.rope import apply_rope
from kvdiag.capture.trace import Trace
from kvdiag.errors import KvdiagError
from kvdiag.models import adapter
from tests.conftest import TINY_MODELS

PROMPT = "The ledger lists 17 barometers in Lisbon, 4 sextants in Osaka and 9 looms in Bergen. " * 2


def _cache_matches(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode(), capture(model, "all", outputs=True) as rec:
        out = model(input_ids=ids, use_cache=True)
    trace = rec.trace()
    cache = adapter.model_forward_cache(out)
    for layer in trace.layers:
        keys, values = adapter.cache_layer_kv(cache, layer)
        kept = keys.shape[2]  # sliding-window layers keep only their window
        assert keys.dtype == trace.k_post(layer).dtype
        assert torch.equal(keys[0], trace.k_post(layer)[:, -kept:]), f"layer {layer} keys"
        assert torch.equal(values[0], trace.v(layer)[:, -kept:]), f"layer {layer} values"
    return trace


@pytest.mark.parametrize("name", TINY_MODELS)
def test_post_rope_keys_and_values_equal_the_models_cache(tiny, name):
    model, tokenizer = tiny(name)
    trace = _cache_matches(model, tokenizer, PROMPT)
    assert trace.n_tokens > 64  # longer than tiny-gemma3's sliding window of 32
    shapes = adapter.config_shapes(model.config)
    assert trace.q(0).shape == (shapes["q_heads"], trace.n_tokens, shapes["head_dim"])
    assert trace.k_pre(0).shape == (shapes["kv_heads"], trace.n_tokens, shapes["head_dim"])


def test_smollm2_cache_matches(smollm2):
    model, tokenizer = smollm2
    _cache_matches(model, tokenizer, PROMPT)


def _model_rotary(model, layer, trace):
    """cos/sin from the model's own rotary embedding module (Gemma3: per layer type)."""
    inner = model.model
    position_ids = torch.arange(trace.n_tokens)[None]
    x = torch.zeros(1, device=position_ids.device, dtype=torch.float32)
    if hasattr(inner.rotary_emb, "layer_types"):  # Gemma3: one table per layer type
        layer_type = model.config.layer_types[layer]
        return inner.rotary_emb(x, position_ids, layer_type)
    return inner.rotary_emb(x, position_ids)


@pytest.mark.parametrize("name", [*TINY_MODELS, "smollm2-135m"])
def test_pre_rope_keys_rotated_by_the_models_rotary_equal_post_rope(tiny, smollm2, name):
    model, tokenizer = smollm2 if name == "smollm2-135m" else tiny(name)
    trace = capture_prompt(model, tokenizer, PROMPT, layers=[0, -1])
    module = sys.modules[type(adapter.attention_modules(model)[0]).__module__]
    for layer in trace.layers:
        cos, sin = _model_rotary(model, layer, trace)
        k_pre = trace.k_pre(layer)[None]
        _, rotated = module.apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
        torch.testing.assert_close(rotated[0], trace.k_post(layer), rtol=0, atol=1e-6)
        torch.testing.assert_close(apply_rope(trace.k_pre(layer), *trace.rope(layer)), trace.k_post(layer))


@pytest.mark.parametrize("name", [*TINY_MODELS, "smollm2-135m"])
def test_attention_recomputed_from_capture_matches_the_models_output(tiny, smollm2, name):
    model, tokenizer = smollm2 if name == "smollm2-135m" else tiny(name)
    trace = capture_prompt(model, tokenizer, PROMPT, outputs=True)
    for layer in trace.layers:
        ours = trace_attention_output(trace, layer, chunk_size=29)
        theirs = trace.get(layer, "attn_out").float()
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_captured_attention_output_is_the_o_proj_input(tiny):
    model, tokenizer = tiny("tiny-llama")
    seen = {}
    attn = adapter.attention_modules(model)[1]
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        trace = capture_prompt(model, tokenizer, PROMPT, layers=[1], outputs=True)
    finally:
        handle.remove()
    o_proj_in = seen["x"][0].reshape(trace.n_tokens, -1, trace.q(1).shape[-1]).transpose(0, 1)
    assert torch.equal(o_proj_in, trace.get(1, "attn_out"))


def test_hooks_and_attention_override_are_removed_after_an_exception(tiny):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, tokenizer = tiny("tiny-qwen3")
    before = set(ALL_ATTENTION_FUNCTIONS._global_mapping)
    implementation = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == implementation
    assert set(ALL_ATTENTION_FUNCTIONS._global_mapping) == before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        model(input_ids=ids)  # still runs normally


def test_trace_roundtrip_and_corrupt_files(tiny, tmp_path):
    model, tokenizer = tiny("tiny-gemma3")
    trace = capture_prompt(model, tokenizer, PROMPT, layers="0,3")
    trace.save(tmp_path / "t")
    loaded = Trace.load(tmp_path / "t")
    assert loaded.layers == [0, 3] and loaded.n_tokens == trace.n_tokens
    for key, value in trace.tensors.items():
        assert torch.equal(loaded.tensors[key], value)
    assert loaded.meta["layer_info"]["0"]["sliding_window"] == 32
    assert loaded.meta["layer_info"]["3"]["sliding_window"] is None
    with pytest.raises(KvdiagError, match="layer 1 was not captured"):
        loaded.k_post(1)
    (tmp_path / "t" / "trace.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KvdiagError, match="corrupt trace"):
        Trace.load(tmp_path / "t")
    with pytest.raises(KvdiagError, match="no complete trace"):
        Trace.load(tmp_path / "missing")


def test_layer_selection_errors():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("0,-1", 4) == [0, 3]
    with pytest.raises(KvdiagError, match="layer index 7 is out of range; the model has layers 0..3"):
        resolve_layers("7", 4)
    with pytest.raises(KvdiagError, match="comma-separated"):
        resolve_layers("first", 4)


def test_batch_of_two_is_rejected(tiny):
    model, tokenizer = tiny("tiny-llama")
    ids = tokenizer([PROMPT, PROMPT], return_tensors="pt").input_ids
    with pytest.raises(KvdiagError, match="batch size 1"), torch.inference_mode(), capture(model):
        model(input_ids=ids)
