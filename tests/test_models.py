"""Model registry, loading, devices, dtypes and the byte tokenizer, checked against the models themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvdiag.errors import KvdiagError
from kvdiag.models import (
    OFFLINE_MODELS,
    TINY_MODELS,
    adapter,
    describe_model,
    known_models,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
)
from tests.conftest import TINY_MODELS as TINY_NAMES

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
UNICODE_TEXT = "Kraków, Da Nang & Quebec City — 41 métronomes ✓ 日本語 🙂\n\ttab"


def weight_shapes(model) -> dict:
    """Layers, heads, KV heads, head_dim as the weights have them (not as the config says)."""
    attn = adapter.attention_modules(model)
    head_dim = attn[0].head_dim
    return {
        "layers": len(attn),
        "q_heads": attn[0].q_proj.weight.shape[0] // head_dim,
        "kv_heads": attn[0].k_proj.weight.shape[0] // head_dim,
        "head_dim": head_dim,
    }


def test_unknown_model_suggests_close_names():
    with pytest.raises(KvdiagError, match=r"unknown model 'smollm'; did you mean 'smollm2-135m'\?"):
        load_model("smollm")
    with pytest.raises(KvdiagError, match=r"did you mean 'tiny-llama'"):
        load_model("tiny-lama")
    with pytest.raises(KvdiagError, match="Known: .*tiny-qwen3"):
        load_model("nothing-like-it")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_models_are_deterministic_and_have_the_listed_shapes(tiny, name):
    model, _ = tiny(name)
    again, _ = load_model(name)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    row = describe_model(name)
    assert {key: row[key] for key in ("layers", "q_heads", "kv_heads", "head_dim")} == weight_shapes(model)
    assert row["context_length"] == model.config.max_position_embeddings == TINY_MODELS[name].context_length
    assert row["cached"] is True and row["architecture"] == TINY_MODELS[name].architecture
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_tiny_gemma3_layer_types_as_described(tiny):
    model, _ = tiny("tiny-gemma3")
    windows = [info["sliding_window"] for info in adapter.layer_info(model)]
    assert windows == [32, 32, 32, None]
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]


def test_list_models_rows():
    rows = list_models()
    assert [row["name"] for row in rows] == known_models()
    assert set(known_models()) == {*OFFLINE_MODELS, *TINY_MODELS}
    for row in rows:
        for key in ("name", "architecture", "source", "cached", "layers", "q_heads", "kv_heads", "head_dim",
                    "context_length"):  # fmt: skip
            assert key in row, (row["name"], key)
        assert row["q_heads"] % row["kv_heads"] == 0
    for name, entry in OFFLINE_MODELS.items():
        row = describe_model(name)
        assert {key: row[key] for key in entry.shapes} == entry.shapes
        assert row["context_length"] == entry.context_length


@pytest.mark.slow
def test_smollm2_registry_shapes_match_the_loaded_model(smollm2):
    model, tokenizer = smollm2
    entry = OFFLINE_MODELS["smollm2-135m"]
    expected = {"layers": 30, "q_heads": 9, "kv_heads": 3, "head_dim": 64}
    assert entry.shapes == expected and entry.context_length == 8192
    assert weight_shapes(model) == expected
    assert model.config.max_position_embeddings == 8192
    assert model.config.model_type == entry.architecture
    row = describe_model("smollm2-135m")
    assert row["cached"] is True
    assert {key: row[key] for key in expected} == expected and row["context_length"] == 8192
    assert tokenizer("hello").input_ids  # the tokenizer loads and encodes


def test_load_model_from_a_local_directory(tiny, tmp_path):
    model, tokenizer = tiny("tiny-qwen3")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_tokenizer = load_model(str(tmp_path / "ckpt"))
    assert loaded.kvdiag_name == str(tmp_path / "ckpt")
    assert weight_shapes(loaded) == weight_shapes(model)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
    ids = loaded_tokenizer(UNICODE_TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer(UNICODE_TEXT, return_tensors="pt").input_ids)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(KvdiagError, match=r"GGUF file .*missing\.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(KvdiagError, match=r"GGUF file nowhere\.gguf does not exist"):
        load_model("nowhere.gguf")


def test_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvdiagError, match="empty"):
        load_model(str(tmp_path / "empty"))


@needs_no_gpu
def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == "cpu" and resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(KvdiagError, match=rf"device '{device}' requested but no CUDA GPU is available"):
            resolve_device(device)
    with pytest.raises(KvdiagError, match="unknown device 'tpu'; valid: cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(KvdiagError, match="no CUDA GPU"):
        load_model("tiny-llama", device="cuda")


def test_dtypes():
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    for name, dtype in names.items():
        assert resolve_dtype(name, "cpu") is dtype
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(None, "cuda") is torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(KvdiagError, match=r"unknown dtype 'float8'; did you mean"):
        resolve_dtype("float8", "cpu")
    model, _ = load_model("tiny-llama", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_byte_tokenizer_round_trips_unicode_and_adds_bos(tiny):
    model, tokenizer = tiny("tiny-llama")
    ids = tokenizer(UNICODE_TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id == 256
    assert len(ids) == len(UNICODE_TEXT.encode("utf-8")) + 1  # one token per byte, plus <bos>
    assert max(ids[1:]) < 256 and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == UNICODE_TEXT
    assert tokenizer.decode(ids[1:]) == UNICODE_TEXT
    # equal bytes get equal ids, different bytes different ids
    raw = UNICODE_TEXT.encode("utf-8")
    assert len({(b, i) for b, i in zip(raw, ids[1:])}) == len(set(raw)) == len(set(ids[1:]))


def test_byte_tokenizer_ids_are_the_same_in_another_process(tiny):
    _, tokenizer = tiny("tiny-llama")
    text = "The quick brown fox, 0123456789!"
    code = f"from kvdiag.models.tiny import _byte_tokenizer; print(_byte_tokenizer()({text!r}).input_ids)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(tokenizer(text).input_ids)


def test_decoding_on_cuda_keeps_sdpa_off_cudnn_unless_asked(monkeypatch):
    from kvdiag.models.adapter import CUDNN_ENV, decode_attention_backends

    monkeypatch.delenv(CUDNN_ENV, raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention_backends("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with decode_attention_backends("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    monkeypatch.setenv(CUDNN_ENV, "1")
    with decode_attention_backends("cuda"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
