"""Text2JSON-style extraction (arXiv 2604.08426, "Text2JSON"), generated offline with the study's metric.

The released Text2JSON file is not available here, so samples are generated: a raw-text document
mentions `n_entities` entities of one domain (products, medical professionals, organizations,
movies), each with a name and two attributes, in varied phrasings at seeded random positions inside
neutral filler prose, plus `n_distractors` near misses (an entity with fewer than both attributes,
or one the document says is out: discontinued, retired, dissolved, never released). The instruction
says exactly which entities to extract, so the gold is well defined: the full mentions, in order of
appearance, as {"name", attr1, attr2} with string values.

Prompt (one user message): the instruction ("Extract all <plural> mentioned in the document below
into a JSON list of objects with keys ..."), the document between "Document:" and "End of
document.", then the JSON schema and "Output only the JSON list.".

Metric (reference/METHODS.md, implemented exactly; `score` returns 100 x the sample score):
1. the output must contain exactly one "[" and one "]", "[" first, else 0; the text from "[" to "]"
   (brackets included) must parse as a JSON list, else 0;
2. union = number of gold objects;
3. for each predicted item: no string "name" → union += 1; name not among the remaining gold names →
   union += 1; else 1 − 0.5 per gold attribute missing or null − 0.25 per attribute present but not an
   exact string match (ints are stringified, ’ → '), added to the sum; that gold name is removed;
4. sample score = sum / union; extra keys are not penalised.
Decisions where METHODS.md is silent: a predicted item that is not a JSON object counts like an object
without a string "name" (union += 1); names are compared after the same ’ → ' replacement as values
(otherwise exactly); an attribute value that is neither a string nor an int (float, bool, list, dict)
is "present but not a match" (−0.25); an empty gold list with an empty prediction list scores 100.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.tasks.base import Sample, Task, check_n, counter_name, fit_length, token_counter
from kvdiag.tasks.prose import NeutralProse
from kvdiag.tasks.text2json_domains import DOMAINS, Domain

SENTENCES_PER_PARAGRAPH = 6


def instruction(domain: Domain) -> str:
    keys = ", ".join(f'"{k}"' for k in ("name", *domain.attrs))
    a1, a2 = domain.attr_words
    notes = f" {domain.value_notes}" if domain.value_notes else ""
    return (
        f"Extract all {domain.plural} mentioned in the document below into a JSON list of objects with "
        f"keys {keys}. Include only {domain.plural} for which the document states both the {a1} and the "
        f"{a2}; leave out any {domain.noun} that the document says {domain.excluded_rule}. "
        f"Every value must be a string.{notes} List each {domain.noun} once, in order of appearance."
    )


def schema(domain: Domain) -> str:
    item = {"name": "string", domain.attrs[0]: "string", domain.attrs[1]: "string"}
    return "[" + json.dumps(item) + ", ...]"


def build_prompt(domain: Domain, document: str) -> str:
    return (
        f"{instruction(domain)}\n\nDocument:\n{document}\nEnd of document.\n\n"
        f"JSON schema:\n{schema(domain)}\n\nOutput only the JSON list."
    )


def _canon(value: Any) -> str | None:
    """The comparable form of a value: ints stringified, ’ → ' in strings; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.replace("\u2019", "'")
    return None


def parse_prediction(prediction: str) -> list | None:
    """The metric's validity gate: the JSON list between the only "[" and the only "]", else None."""
    if prediction.count("[") != 1 or prediction.count("]") != 1:
        return None
    start, end = prediction.index("["), prediction.index("]")
    if start > end:
        return None
    try:
        parsed = json.loads(prediction[start : end + 1])
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def text2json_score(prediction: str, gold: list[dict[str, str]]) -> float:
    """The study's IoU-like sample score in 0..1 (see the module docstring)."""
    items = parse_prediction(prediction)
    if items is None:
        return 0.0
    remaining = {_canon(g["name"]): g for g in gold}
    union, total = len(gold), 0.0
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or _canon(name) not in remaining:
            union += 1
            continue
        g = remaining.pop(_canon(name))
        s = 1.0
        for key, gold_value in g.items():
            if key == "name":
                continue
            value = item.get(key)
            if value is None:
                s -= 0.5
            elif _canon(value) is None or _canon(value) != _canon(gold_value):
                s -= 0.25
        total += s
    return 1.0 if union == 0 else total / union


@dataclass
class Text2JSON(Task):
    """Knobs: domain ("mixed" = seeded choice per sample, or one of DOMAINS), n_entities (default 4),
    n_distractors (default 2, near misses not in the gold).

    Defaults are calibrated on qwen2.5-coder-0.5b with exact attention at ~1.5K tokens (chat template,
    greedy, 200 new tokens, n = 3): 36.1 ± 3.9, clearly above chance; with 10 entities and 4
    distractors the 0.5B model scores 4.5 ± 4.5 (it hallucinates entities and hits the cap), so
    degradations would be invisible. The study's samples hold many more facts: raise n_entities for
    larger models and longer prompts (keep max_new_tokens ≥ ~40 × n_entities)."""

    name = "text2json"
    title = "Text2JSON"
    description = "Text2JSON-style extraction of N entities x 2 attributes from a long document (IoU metric)"
    metric = "text2json_iou"

    domain: str = "mixed"
    n_entities: int = 4
    n_distractors: int = 2

    def __post_init__(self):
        if self.domain != "mixed" and self.domain not in DOMAINS:
            raise unknown_name_error("text2json domain", self.domain, ["mixed", *DOMAINS])
        if not isinstance(self.n_entities, int) or self.n_entities < 1:
            raise KvdiagError(f"n_entities must be a positive integer, got {self.n_entities!r}")
        if not isinstance(self.n_distractors, int) or self.n_distractors < 0:
            raise KvdiagError(f"n_distractors must be a non-negative integer, got {self.n_distractors!r}")

    def data_available(self) -> bool:
        return True  # fully generated, needs no data

    def _facts(self, rng: random.Random, domain: Domain):
        """Gold entities and distractors as (kind, sentence, record) in document order (kind: full/partial/excluded)."""
        names: set[str] = set()
        records = []
        kinds = ["full"] * self.n_entities + [
            rng.choice(["partial", "excluded"]) for _ in range(self.n_distractors)
        ]
        rng.shuffle(kinds)
        for kind in kinds:
            for _ in range(1000):
                name, a1, a2 = domain.make(rng)
                if not any(name in other or other in name for other in names):  # no name inside another
                    break
            else:
                raise KvdiagError(
                    f"cannot draw {len(kinds)} distinct {domain.plural} names; lower n_entities"
                )
            names.add(name)
            template = rng.choice(getattr(domain, kind))
            sentence = template.format(name=name, a1=a1, a2=a2)
            records.append((kind, sentence, {"name": name, domain.attrs[0]: a1, domain.attrs[1]: a2}))
        return records

    def samples(self, n: int, seed: int = 0, tokenizer: Any | None = None, target_tokens: int = 4096):
        check_n(n)
        count = token_counter(tokenizer)
        out = []
        for i in range(n):
            rng = random.Random(f"text2json-{seed}-{i}")
            domain = DOMAINS[rng.choice(sorted(DOMAINS))] if self.domain == "mixed" else DOMAINS[self.domain]
            facts = self._facts(rng, domain)
            fractions = sorted(rng.random() for _ in facts)  # where each fact sits in the filler
            prose = NeutralProse(seed=rng.randrange(1 << 30))

            def build(k, facts=facts, fractions=fractions, prose=prose, domain=domain):
                return build_prompt(domain, _document(prose.take(k), facts, fractions))

            k, prompt, tokens = fit_length(build, count, target_tokens, self.name)
            gold = [rec for kind, _, rec in facts if kind == "full"]
            meta = {
                "domain": domain.key,
                "n_facts": len(gold),
                "n_distractors": len(facts) - len(gold),
                "distractors": [(kind, rec["name"]) for kind, _, rec in facts if kind != "full"],
                "target_tokens": target_tokens,
                "tokens": tokens,
                "token_counter": counter_name(tokenizer),
                "filler_sentences": k,
            }
            out.append(Sample(f"{self.name}-s{seed}-{i}", [{"role": "user", "content": prompt}], gold, meta))
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        return 100.0 * text2json_score(prediction, sample.gold)


def _document(filler: list[str], facts: list[tuple], fractions: list[float]) -> str:
    """Filler sentences with fact i after filler sentence round(fractions[i] * len(filler)), in paragraphs."""
    sentences: list[str] = []
    j = 0
    for pos in range(len(filler) + 1):
        while j < len(facts) and round(fractions[j] * len(filler)) == pos:
            sentences.append(facts[j][1])
            j += 1
        if pos < len(filler):
            sentences.append(filler[pos])
    paragraphs = [
        " ".join(sentences[p : p + SENTENCES_PER_PARAGRAPH])
        for p in range(0, len(sentences), SENTENCES_PER_PARAGRAPH)
    ]
    return "\n\n".join(paragraphs)

    def answer_text(self, sample: Sample) -> str:
        """The gold list as JSON (the format the instructions ask for)."""
        return json.dumps(sample.gold)
