"""NeedleBench machinery shared by `needle` and `multineedle`: haystack, needles, insertion, prompt.

Follows OpenCompass NeedleBench v2 (`opencompass/datasets/needlebench_v2/origin.py` and
`parallel.py`): the haystack is the PaulGrahamEssays.jsonl essays in a seeded shuffled order; needles
are the English records of needles.jsonl (fields needle, retrieval_question, arg1, arg2 = answer
keyword); a needle goes in as "\\n{needle}\\n" at `depth` % of the haystack; questions come at the
end in the upstream English prompt. Differences from upstream, on purpose: needles are inserted at
the sentence boundary nearest to the depth (upstream cuts at a tiktoken position), and the whole
prompt is sized in the caller's tokenizer instead of tiktoken with a length buffer: in whole
sentences, or, when no number of whole sentences comes within 5 % of the target (long sentences,
short targets, byte-level tokenizers), whole sentences plus the first words of the next one.

Without a data directory: the haystack is real prose from the standard library's docstrings
(`prose.stdlib_prose`, cycled when a long haystack needs more) and the needles are generated from
word lists in the same shape as the real ones.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvdiag.errors import KvdiagError
from kvdiag.tasks.base import (
    LengthMissed,
    Sample,
    check_n,
    counter_name,
    fit_length,
    resolve_data_dir,
    token_counter,
)
from kvdiag.tasks.prose import split_sentences, stdlib_prose

SUBDIR = "needlebench"
WORD = re.compile(r"\S+\s*")  # a word and the whitespace after it

PROMPT_ONE = (
    "This is a test of long-text capability. You need to first read the long document below, and "
    "then answer the final question based on the information in the document.\n"
    "The content of the long document is as follows\n\n<Document>\n{context}\n</Document>\n\n"
    "Based on the information in the document, now please answer: {question}\n"
)
PROMPT_MANY = (
    "This is a test of long-text capability. You need to first read the long document below, and "
    "then answer the final questions one by one based on the information in the document.\n"
    "The content of the long document is as follows\n\n<Document>\n{context}\n</Document>\n\n"
    "Based on the information in the document, now please answer: {question}\n"
)


@dataclass(frozen=True)
class Needle:
    needle: str  # the fact sentence planted in the haystack
    retrieval_question: str  # "Question? Please answer in the format '...________.'"
    arg1: str  # the subject (unique per multi-needle sample)
    arg2: str  # the answer keyword the scorer looks for


def needle_files(data_dir: Path | None) -> tuple[Path, Path] | None:
    if data_dir is None:
        return None
    essays, needles = data_dir / SUBDIR / "PaulGrahamEssays.jsonl", data_dir / SUBDIR / "needles.jsonl"
    return (essays, needles) if essays.is_file() and needles.is_file() else None


@lru_cache(maxsize=4)
def _load_essays(path: Path) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


@lru_cache(maxsize=4)
def load_needles(path: Path) -> tuple[Needle, ...]:
    """The English needles of a NeedleBench needles.jsonl."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("language") != "English":
                continue
            out.append(Needle(rec["needle"], rec["retrieval_question"], rec["arg1"], rec["arg2"]))
    if not out:
        raise KvdiagError(f"no English needles in {path}")
    return tuple(out)


_PLACES = "Amber Cobalt Crimson Silver Misty Hollow Northern Quiet Sunken Ivory Velvet Granite Willow Copper Frozen Lantern".split()
_PLACE_KINDS = ["Valley", "Harbor", "Plateau", "Forest", "Lagoon", "Canyon", "Meadow", "Archipelago"]
_ITEM_ADJ = "Whispering Gilded Eternal Shattered Radiant Obsidian Clockwork Wandering Silent Burning Hidden Sapphire Thunder Moonlit Ancient Crystal".split()
_ITEMS = "Compass Lantern Chalice Key Map Harp Crown Mirror Sextant Bell Anvil".split()


def generated_needles(k: int, rng: random.Random) -> list[Needle]:
    """k needles with unique subjects and keywords, shaped like NeedleBench's 'legendary item' ones."""
    places = rng.sample([f"{a} {b}" for a in _PLACES for b in _PLACE_KINDS], k)
    items = rng.sample([f"{a} {b}" for a in _ITEM_ADJ for b in _ITEMS], k)
    return [
        Needle(
            needle=f"Hidden in the {p} is the legendary {it}.",
            retrieval_question=(
                f"What legendary item is hidden in the {p}? Please answer in the format "
                f"'The legendary item hidden in the {p} is________.'"
            ),
            arg1=p,
            arg2=it,
        )
        for p, it in zip(places, items, strict=True)
    ]


def pick_needles(pool: tuple[Needle, ...], k: int, rng: random.Random) -> list[Needle]:
    """k needles with unique arg1, unique arg2 (as upstream `get_unique_entries`), in seeded order."""
    order = list(pool)
    rng.shuffle(order)
    seen1, seen2, out = set(), set(), []
    for nd in order:
        if nd.arg1 in seen1 or nd.arg2 in seen2:
            continue
        seen1.add(nd.arg1)
        seen2.add(nd.arg2)
        out.append(nd)
        if len(out) == k:
            return out
    raise KvdiagError(f"only {len(out)} needles with distinct subjects and answers exist; asked for {k}")


class Haystack:
    """Seeded haystack sentences (a prefix of an endless stream) and needles, with data or built-ins."""

    def __init__(self, data_dir: Path | None, seed: int):
        self.rng = random.Random(f"haystack-{seed}")
        files = needle_files(data_dir)
        self.source = "needlebench" if files else "builtin"
        if files:
            docs = list(_load_essays(files[0]))
            self.needle_pool: tuple[Needle, ...] | None = load_needles(files[1])
        else:
            docs = list(stdlib_prose())
            self.needle_pool = None
        self.rng.shuffle(docs)
        self._docs = docs
        self._sentences: list[str] = []
        self._next_doc = 0

    def needles(self, k: int) -> list[Needle]:
        if self.needle_pool is None:
            return generated_needles(k, self.rng)
        return pick_needles(self.needle_pool, k, self.rng)

    def sentences(self, n: int) -> list[str]:
        """The first n haystack sentences (documents in order, cycled when exhausted)."""
        while len(self._sentences) < n:
            text = self._docs[self._next_doc % len(self._docs)]
            self._next_doc += 1
            pieces = split_sentences(text.strip() + "\n")
            self._sentences.extend(pieces)
        return self._sentences[:n]

    def words(self, k: int, n: int) -> list[str]:
        """The first k whole sentences, then the first n words of sentence k + 1 (a haystack cut at a
        word instead of a sentence boundary, as upstream cuts at a token)."""
        whole = self.sentences(k + 1)
        cut = "".join(WORD.findall(whole[k])[:n]).rstrip()
        return whole[:k] + ([cut + "\n"] if cut else [])


def _sentences_below(build, count, target_tokens: int) -> int:
    """The most whole sentences k whose haystack prompt stays below `target_tokens` (bisection)."""
    lo, hi = 0, 1
    while count(build(hi)) < target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) < target_tokens else (lo, mid)
    return lo


def insert_needles(sentences: list[str], needles: list[Needle], depths: list[float]) -> str:
    """The haystack with needle i at depths[i] % (by characters, snapped to a sentence boundary)."""
    total = sum(len(s) for s in sentences)
    cum, boundaries = 0, [0]
    for s in sentences:
        cum += len(s)
        boundaries.append(cum)  # boundary b sits before sentence b; boundary len(sentences) = end
    inserts: dict[int, list[str]] = {}
    for nd, depth in zip(needles, depths, strict=True):
        want = total * depth / 100
        b = min(range(len(boundaries)), key=lambda i: (abs(boundaries[i] - want), i))
        inserts.setdefault(b, []).append(f"\n{nd.needle}\n")
    parts = []
    for i in range(len(sentences) + 1):
        parts.extend(inserts.get(i, []))
        if i < len(sentences):
            parts.append(sentences[i])
    return "".join(parts).strip("\n")


def multi_question(needles: list[Needle]) -> str:
    """The combined question of NeedleBench's parallel (multi-retrieval) task, as upstream builds it.

    Upstream joins the questions and the answer formats with the ideographic comma '、' also in
    English; kept for fidelity.
    """
    questions = "、".join(nd.retrieval_question.split("?")[0] + "?" for nd in needles)
    formats = "、".join(nd.retrieval_question.split("'")[1].split(".")[0] for nd in needles)
    return questions + "Please answer in the format of '" + formats + "'"


def keyword_found(keyword: str, prediction: str, case_sensitive: bool) -> bool:
    if case_sensitive:
        return keyword in prediction
    return keyword.casefold() in prediction.casefold()


def needle_samples(
    task, n: int, seed: int, tokenizer, target_tokens: int, depths: list[float], render
) -> list:
    """Samples of a needle task (`needle`, `multineedle`): per sample a seeded haystack, one needle per
    depth, the haystack sized to `target_tokens`; render(context, needles) -> the prompt text."""
    check_n(n)
    count = token_counter(tokenizer)
    out = []
    for i in range(n):
        hay = Haystack(resolve_data_dir(task.data_dir), seed=seed * 1_000_003 + i)
        needles = hay.needles(len(depths))

        def build(k, hay=hay, needles=needles):
            return render(insert_needles(hay.sentences(k), needles, depths), needles)

        try:
            k, prompt, tokens = fit_length(build, count, target_tokens, task.name)
            cut_words = None
        except LengthMissed:  # sentences too long for the target: cut the last one at a word
            k = _sentences_below(build, count, target_tokens)

            def build_words(w, hay=hay, needles=needles, k=k):
                return render(insert_needles(hay.words(k, w), needles, depths), needles)

            cut_words, prompt, tokens = fit_length(build_words, count, target_tokens, task.name)
        gold = [
            {"depth": d, "keyword": nd.arg2, "needle": nd.needle, "question": nd.retrieval_question}
            for d, nd in zip(depths, needles, strict=True)
        ]
        meta = {
            "n_facts": len(needles),
            "depths": list(depths),
            "target_tokens": target_tokens,
            "tokens": tokens,
            "token_counter": counter_name(tokenizer),
            "haystack": hay.source,
            "haystack_sentences": k,
            "haystack_cut_words": cut_words,  # None: whole sentences; else words of sentence k + 1
        }
        out.append(Sample(f"{task.name}-s{seed}-{i}", [{"role": "user", "content": prompt}], gold, meta))
    return out


def filled_format(record: dict) -> str:
    """A needle's answer in its question's requested format ("... was________." with the keyword)."""
    import re

    match = re.search(r"format '(.*)'", record["question"])
    if match and "________" in match.group(1):
        return " ".join(match.group(1).replace("________", " " + record["keyword"]).split())
    return record["needle"]
