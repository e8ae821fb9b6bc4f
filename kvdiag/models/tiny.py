"""Tiny random models for tests: built from a config, weights from kvdiag's own seeded generator,
and an offline byte-level tokenizer."""

from __future__ import annotations

from kvdiag.models.registry import _TINY_COMMON, TinyModel


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
