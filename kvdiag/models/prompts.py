"""Prompts: reading, tokenizing (raw or chat template) and checking them against the model's context,
plus the built-in context-intensive sample text used when no prompt is given."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from kvdiag.errors import KvdiagError

_FIRST = ["Amara", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Gustav", "Hana", "Ivo", "Jasmin", "Kofi",
          "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera",
          "Wei", "Ximena", "Yusuf", "Zofia"]  # fmt: skip
_LAST = ["Adeyemi", "Bergstrom", "Castillo", "Dubois", "Eriksen", "Fujita", "Gallagher", "Haddad", "Ivanova",
         "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Romano",
         "Sato", "Tanaka", "Ueda", "Varga", "Weber", "Xu", "Yilmaz", "Zhou"]  # fmt: skip
_CITIES = ["Lisbon", "Osaka", "Nairobi", "Tallinn", "Porto Alegre", "Quebec City", "Gdansk", "Hobart",
           "Leipzig", "Cusco", "Bergen", "Tbilisi", "Adelaide", "Valparaiso", "Kraków", "Da Nang"]  # fmt: skip
_ROLES = ["cardiologist", "structural engineer", "archivist", "data librarian", "marine biologist",
          "tax auditor", "glass blower", "translator", "geologist", "pharmacist", "luthier",
          "air traffic controller", "cartographer", "patent examiner", "beekeeper"]  # fmt: skip
_ITEMS = ["ledger", "barometer", "telescope", "typewriter", "compass", "loom", "sextant", "kiln",
          "metronome", "microscope", "printing press", "harpsichord"]  # fmt: skip
_TEMPLATES = [
    "{name}, a {role} based in {city}, registered {n} {item}s with the cooperative in {year}.",
    "According to the {year} register, {name} works as a {role} in {city} and owns {n} {item}s.",
    "In {city}, the {role} {name} reported an inventory of {n} {item}s at the end of {year}.",
    "Record {rid}: {name} ({role}, {city}) — {n} {item}s, filed {year}.",
    "{name} moved to {city} in {year}, where they practise as a {role}; the audit lists {n} {item}s.",
    "The committee noted that {name}, the {city} {role}, had catalogued {n} {item}s by {year}.",
]
_FILLER = [
    "The cooperative keeps its ledgers in a cool, dry room, and every entry is checked twice.",
    "Members are reminded that late filings are accepted only with a signed explanation.",
    "Weather delayed two shipments that spring, but no records were lost.",
    "An independent auditor reviewed a random sample of entries and found them consistent.",
    "Several members asked that the register also record the condition of each instrument.",
    "The archive was moved to a new building, and the index was rebuilt from the paper cards.",
]


def sample_text(n_records: int = 140, seed: int = 0) -> str:
    """Built-in context-intensive prose: many short records, each a distinct fact (several thousand tokens).

    Every record carries a unique person, role, city, count, item and year, so a model that must
    answer questions about them needs many scattered tokens of the prompt, not one needle.
    """
    rng = random.Random(seed)
    lines = ["The Northern Instrument Cooperative: annual register of members and their holdings.", ""]
    for rid in range(1, n_records + 1):
        fields = dict(
            name=f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", role=rng.choice(_ROLES), city=rng.choice(_CITIES),
            item=rng.choice(_ITEMS), n=rng.randint(2, 97), year=rng.randint(1961, 2023), rid=f"R-{rid:04d}",
        )  # fmt: skip
        lines.append(rng.choice(_TEMPLATES).format(**fields))
        if rng.random() < 0.15:
            lines.append(rng.choice(_FILLER))
    lines.append("")
    lines.append(
        "Question: list every member based in Lisbon together with the number of items they registered."
    )
    return "\n".join(lines)


def read_prompt(prompt_file: str | Path | None, text: str | None) -> str:
    """The prompt from --prompt-file or --text (not both), or the built-in sample; never empty."""
    if prompt_file is not None and text is not None:
        raise KvdiagError("give either --prompt-file or --text, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise KvdiagError(f"prompt file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    elif text is None:
        return sample_text()
    if not text.strip():
        raise KvdiagError("the prompt is empty")
    return text


def context_length(model) -> int | None:
    from kvdiag.models.adapter import config_shapes

    return config_shapes(model.config)["context_length"]


def tokenize_prompt(
    tokenizer, text: str, *, model=None, chat: bool = False, max_tokens: int | None = None
) -> torch.Tensor:
    """input_ids [1, L]: raw text with add_special_tokens=True, or the chat template with chat=True.

    max_tokens keeps the first max_tokens tokens. A prompt longer than the model's context is an error.
    """
    if text is None or not text.strip():
        raise KvdiagError("the prompt is empty")
    if max_tokens is not None and max_tokens < 1:
        raise KvdiagError(f"--max-tokens {max_tokens} must be ≥ 1")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise KvdiagError("--chat given but this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    limit = context_length(model) if model is not None else None
    if limit is not None and ids.shape[1] > limit:
        raise KvdiagError(
            f"the prompt has {ids.shape[1]} tokens, more than the model's context of {limit}; "
            f"shorten it or pass --max-tokens {limit}"
        )
    if ids.shape[1] == 0:
        raise KvdiagError("the prompt tokenizes to zero tokens")
    return ids
