"""The contract every benchmark task implements: `Sample`, `Task`, token counting and length fitting.

Scores are on one scale everywhere: **0..100 per sample, higher is better, aggregated by the mean**
(so the dataset score is the mean of the sample scores, e.g. Text2JSON's "100 x mean").

Token sizing. Generators size the *whole prompt* (`Sample.prompt_text`, the chat messages joined,
without a chat template) to within `LENGTH_TOLERANCE` (5 %) of `target_tokens`, counted with the
tokenizer passed in (`len(tokenizer(text, add_special_tokens=False).input_ids)`, any Hugging Face
tokenizer) or, when it is None, with the approximate counter `approx_token_count` (1 token per 4
characters, rounded up). A chat template adds a few dozen tokens on top.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kvdiag.errors import KvdiagError

LENGTH_TOLERANCE = 0.05


class PromptTooLong(KvdiagError):
    """A sample's prompt without any filler is already longer than `target_tokens` allows;
    `min_tokens` is that shortest prompt, so a caller may retry at `target_tokens=min_tokens`."""

    def __init__(self, message: str, min_tokens: int):
        super().__init__(message)
        self.min_tokens = min_tokens


class LengthMissed(KvdiagError):
    """No amount of filler brings the prompt within `LENGTH_TOLERANCE` of `target_tokens`."""


CHARS_PER_TOKEN = 4
DATA_DIR_ENV = "KVDIAG_DATA_DIR"


@dataclass
class Sample:
    """One prompt and what a perfect answer contains.

    messages: the prompt as chat messages, [{"role": "user", "content": ...}, ...]
    gold:     task-specific (Text2JSON: list of dicts; needles: list of keyword records; HTML→TSV: TSV)
    meta:     task-specific facts about the sample (n facts, depths, target / actual tokens, ...)
    """

    id: str
    messages: list[dict[str, str]]
    gold: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The messages' contents joined by a blank line: the raw prompt for models without a template."""
        return "\n\n".join(m["content"] for m in self.messages)


def approx_token_count(text: str) -> int:
    """The documented fallback counter: ceil(characters / 4)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def token_counter(tokenizer: Any | None) -> Callable[[str], int]:
    """A function text -> number of tokens, with `tokenizer` (no special tokens) or approximately."""
    if tokenizer is None:
        return approx_token_count

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count


def counter_name(tokenizer: Any | None) -> str:
    if tokenizer is None:
        return f"approx-{CHARS_PER_TOKEN}-chars"
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def fit_length(
    build: Callable[[int], str], count: Callable[[str], int], target_tokens: int, what: str
) -> tuple[int, str, int]:
    """Find the amount of filler `n` whose prompt `build(n)` is closest to `target_tokens`.

    `build(n)` must grow with n (n = filler sentences / units). Extrapolates linearly until the target
    is bracketed, then alternates interpolation and bisection; stops early within 0.5 % of the target.
    Returns (n, prompt, tokens). Raises `PromptTooLong` when the prompt without filler is already too
    long, `LengthMissed` when the result misses the target by more than LENGTH_TOLERANCE (filler units
    too coarse: the caller may retry with finer ones).
    """
    if target_tokens <= 0:
        raise KvdiagError(f"target_tokens must be positive, got {target_tokens}")
    best: tuple[int, int, str, int] | None = None

    def measure(n: int) -> int:
        nonlocal best
        text = build(n)
        tokens = count(text)
        if best is None or abs(tokens - target_tokens) < best[0]:
            best = (abs(tokens - target_tokens), n, text, tokens)
        return tokens

    base_tokens = measure(0)
    if base_tokens > target_tokens * (1 + LENGTH_TOLERANCE):
        raise PromptTooLong(
            f"{what}: the prompt without filler already has {base_tokens} tokens, more than "
            f"target_tokens={target_tokens}; raise target_tokens or lower the number of facts",
            base_tokens,
        )
    good_enough = max(1.0, 0.005 * target_tokens)
    lo, lo_tok, hi, hi_tok = 0, base_tokens, None, None
    n, step = 64, 0
    while best[0] > good_enough and base_tokens < target_tokens:
        tokens = measure(n)
        if tokens < target_tokens:
            lo, lo_tok = n, tokens
        else:
            hi, hi_tok = n, tokens
        step += 1
        if hi is None:  # not bracketed yet: extrapolate from (0, base) through (lo, lo_tok), aim 2 % over
            rate = max((lo_tok - base_tokens) / lo, 1e-3)
            n = min(math.ceil(lo + 1.02 * (target_tokens - lo_tok) / rate), 16 * lo)
            n = max(n, lo + 1)
            if n > 1 << 24:
                raise KvdiagError(f"{what}: cannot reach {target_tokens} tokens")
            continue
        if hi - lo <= 1:
            break
        if step % 2 and hi_tok > lo_tok:  # interpolate
            n = lo + round((target_tokens - lo_tok) * (hi - lo) / (hi_tok - lo_tok))
        else:  # bisect
            n = (lo + hi) // 2
        n = min(max(n, lo + 1), hi - 1)
    _, n, text, tokens = best
    if abs(tokens - target_tokens) > LENGTH_TOLERANCE * target_tokens:
        raise LengthMissed(
            f"{what}: closest prompt has {tokens} tokens, more than {LENGTH_TOLERANCE:.0%} away from "
            f"target_tokens={target_tokens}"
        )
    return n, text, tokens


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory: the argument, else $KVDIAG_DATA_DIR, else None (tasks use built-ins)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


@dataclass
class Task:
    """A benchmark task. Subclasses are dataclasses whose fields are the difficulty knobs.

    Implement `samples` and `score`; set `name`, `description`, `metric`. `score` returns 0..100.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # how reports and figures name the task
    description: ClassVar[str] = ""
    metric: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    aggregation: ClassVar[str] = "mean"
    scale: ClassVar[tuple[float, float]] = (0.0, 100.0)

    def samples(self, n: int, seed: int = 0, tokenizer: Any | None = None, target_tokens: int = 4096):
        """Return n deterministic samples (a list of `Sample`) for this seed and length."""
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:
        """Score one model output against the sample's gold, 0..100."""
        raise NotImplementedError

    def answer_text(self, sample: Sample) -> str:
        """The gold answer written as the prompt asks for it (what fidelity teacher-forces and what
        `kvdiag heads` takes the decode-like queries from): the gold string, or its JSON."""
        import json

        return sample.gold if isinstance(sample.gold, str) else json.dumps(sample.gold)

    def metrics(self, prediction: str, sample: Sample) -> dict[str, float]:
        """All metrics of one output (the headline one under `self.metric`)."""
        return {self.metric: self.score(prediction, sample)}

    def aggregate(self, scores: list[float]) -> float:
        """Dataset score: the mean of the sample scores."""
        return sum(scores) / len(scores) if scores else float("nan")

    def data_available(self) -> bool:
        """Whether the real data this task can use was found (tasks with built-ins still run without)."""
        return False

    @classmethod
    def knobs(cls) -> dict[str, Any]:
        """Knob name -> default value."""
        out = {}
        for f in fields(cls):
            out[f.name] = f.default if f.default is not MISSING else f.default_factory()
        return out


def check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise KvdiagError(f"n must be a non-negative integer, got {n!r}")
