"""Prompts: reading, tokenizing (raw or chat template) and checking them against the model's context,
plus the built-in context-intensive sample text used when no prompt is given."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from kvdiag.errors import KvdiagError

log = logging.getLogger(__name__)
BUILTIN_RECORDS = 140  # records of the built-in sample text (several thousand tokens)

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


def sample_text(n_records: int = BUILTIN_RECORDS, seed: int = 0) -> str:
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


def read_prompt(prompt_file: str | Path | None, text: str | None, encoding: str = "utf-8") -> str | None:
    """The prompt from --prompt-file (decoded with `encoding`) or --text (not both); None when neither
    is given: the caller then uses `builtin_prompt`, sized to the model. Never empty."""
    if prompt_file is not None and text is not None:
        raise KvdiagError("give either --prompt-file or --text, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise KvdiagError(f"prompt file {path} does not exist")
        text = decode_prompt(path, encoding)
    elif text is None:
        return None
    if not text.strip():
        raise KvdiagError("the prompt is empty")
    return text


def decode_prompt(path: Path, encoding: str = "utf-8") -> str:
    """The text of a prompt file; a byte the encoding cannot decode is named with its offset and line."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise KvdiagError(
            f"--encoding {encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1)"
        ) from None
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise KvdiagError(
            f"prompt file {path} is not valid {encoding}: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(line {line}) cannot be decoded; pass --encoding with the file's encoding, e.g. --encoding latin-1"
        ) from None


def builtin_prompt(tokenizer, model=None, chat: bool = False) -> str:
    """The built-in sample text (`sample_text`), cut to as many whole records as fit the model's
    context when all 140 do not (the tiny models' 2048 tokens), with a logged note saying so."""
    text = sample_text()
    limit = context_length(model) if model is not None else None
    if limit is None or _n_tokens(tokenizer, text, chat) <= limit:
        return text
    full = _n_tokens(tokenizer, text, chat)
    lo, hi = 0, BUILTIN_RECORDS  # the largest record count that fits lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _n_tokens(tokenizer, sample_text(mid), chat) <= limit:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise KvdiagError(
            f"not even one record of the built-in sample fits the model's context of {limit} tokens"
        )
    text = sample_text(lo)
    log.warning(
        "the built-in sample text has %d tokens, more than the model's context of %d: using its first %d of "
        "%d records (%d tokens)", full, limit, lo, BUILTIN_RECORDS, _n_tokens(tokenizer, text, chat),
    )  # fmt: skip
    return text


def _n_tokens(tokenizer, text: str, chat: bool) -> int:
    return tokenize_prompt(tokenizer, text, chat=chat).shape[1]


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
