"""Load (model, tokenizer) from a registered name, a `.gguf` file, a local directory or a Hub id."""

from __future__ import annotations

from pathlib import Path

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.models.offline import converted_dir, ensure_offline_model, is_cached
from kvdiag.models.registry import (
    _TINY_COMMON,
    DEFAULT_MODEL,
    OFFLINE_MODELS,
    TINY_MODELS,
    _looks_like_path_or_hub_id,
    known_models,
)
from kvdiag.models.tiny import _byte_tokenizer, _tiny_model


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
    from kvdiag.models.adapter import check_supported

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
        from kvdiag.models.adapter import config_shapes

        row.update(config_shapes(config))
    else:
        row.update(entry.shapes, context_length=entry.context_length)
    return row


def list_models() -> list[dict]:
    return [describe_model(name) for name in known_models()]
