"""Offline filler prose: a seeded generator of neutral sentences, real stdlib prose, a sentence splitter.

`NeutralProse` writes plausible, fact-free office-report sentences from word lists (no names, no
numbers), so filler never collides with the facts a task plants. `stdlib_prose` returns real English
prose (the docstrings of a fixed list of Python standard-library modules), the needle tasks'
haystack when the NeedleBench essays are not available; it depends on the Python version.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from functools import lru_cache

_SUBJECTS = "The committee|The review panel|The planning group|The editorial team|Our staff|The working group|The regional office|The survey team|The steering board|Most participants|The volunteers|The research unit|The advisory council|The operations team|Several observers|The archive staff|The design group".split(
    "|"
)
_VERBS = "reviewed discussed revisited summarised postponed examined approved questioned documented circulated compared reorganised simplified outlined".split()
_OBJECTS = "the quarterly schedule|the seating arrangements|the draft guidelines|the meeting notes|the maintenance plan|the reading list|the travel policy|the filing procedure|the training materials|the visitor survey|the storage layout|the annual timetable|the internal newsletter|the safety checklist|the printing budget|the room bookings|the feedback forms|the onboarding guide|the catering options|the archive index".split(
    "|"
)
_ADVERBIALS = "before the session ended|without much debate|after a short break|at some length|in the usual careful way|once the morning coffee arrived|with mixed enthusiasm|late in the afternoon|as a matter of routine|for the second time this season|while the rain continued outside|in a calm and orderly fashion|ahead of the holidays".split(
    "|"
)
_COMMENTS = "Nobody expected any surprises from this.|The discussion stayed friendly throughout.|A few minor points were left for later.|Everyone agreed that clarity mattered most.|Some of the older documents were hard to read.|The weather was mild for the time of year.|Attendance was steady but not remarkable.|The hallway lights flickered now and then.|Tea and biscuits were served as usual.|A follow-up note will be sent around.|The building's heating worked better than last winter.|Most questions were answered briefly.".split(
    "|"
)
_CONNECTORS = ["Later,", "Meanwhile,", "In addition,", "As before,", "Afterwards,", "Separately,"]


class NeutralProse:
    """An endless, seeded stream of neutral sentences; `take(k)` returns the first k (a prefix)."""

    def __init__(self, seed: int):
        self._rng = random.Random(f"neutral-prose-{seed}")
        self._sentences: list[str] = []

    def _next(self) -> str:
        r = self._rng
        if r.random() < 0.2:
            return r.choice(_COMMENTS)
        lead = (
            f"{r.choice(_CONNECTORS)} {r.choice(_SUBJECTS).lower()}"
            if r.random() < 0.3
            else r.choice(_SUBJECTS)
        )
        return f"{lead} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_ADVERBIALS)}."

    def take(self, k: int) -> list[str]:
        while len(self._sentences) < k:
            self._sentences.append(self._next())
        return self._sentences[:k]


# Modules whose docstrings are mostly prose. Fixed order: the fallback haystack is deterministic for a
# given Python version.
_STDLIB_MODULES = "argparse|asyncio|calendar|collections|contextlib|csv|dataclasses|datetime|decimal|difflib|email|enum|fractions|functools|gettext|heapq|http.client|inspect|ipaddress|itertools|json|logging|mailbox|numbers|optparse|os|pathlib|pickle|pprint|queue|random|shlex|shutil|smtplib|socket|statistics|string|subprocess|tarfile|tempfile|textwrap|threading|typing|unittest|urllib.parse|uuid|warnings|weakref|zipfile".split(
    "|"
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_sentences(text: str) -> list[str]:
    """Split prose at sentence ends; every piece keeps its trailing whitespace, so "".join restores text."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


@lru_cache(maxsize=1)
def stdlib_prose() -> tuple[str, ...]:
    """Paragraphs of real English prose: docstrings of stdlib modules and their public members.

    Only docstring paragraphs that read as prose are kept (no code, tables or doctest lines).
    """
    paragraphs: list[str] = []
    seen: set[str] = set()
    for mod_name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        objects = [mod] + [
            getattr(mod, n) for n in sorted(getattr(mod, "__all__", []) or []) if hasattr(mod, n)
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                flat = " ".join(para.split())
                if len(flat) < 80 or flat in seen or not flat[0].isupper() or not flat.endswith("."):
                    continue
                if any(tok in para for tok in (">>>", "::", "    ", "|", "==", "{", "}", "--")):
                    continue
                seen.add(flat)
                paragraphs.append(flat)
    return tuple(paragraphs)
