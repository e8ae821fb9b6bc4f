"""Single needle in a haystack: the low-intensity control of arXiv 2604.08426.

One NeedleBench v2 needle at `depth` % (OpenCompass `NeedleBenchOriginDataset`), its question at the
end. Score = 100 if the answer keyword (`arg2`) occurs in the output, else 0 (case-insensitive by
default; upstream is case-sensitive: `case_sensitive=True`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvdiag.errors import KvdiagError
from kvdiag.tasks.base import Sample, Task, resolve_data_dir
from kvdiag.tasks.haystack import PROMPT_ONE, filled_format, keyword_found, needle_files, needle_samples


@dataclass
class SingleNeedle(Task):
    """Knobs: depth (percent, default 50), case_sensitive, data_dir."""

    name = "needle"
    title = "needle"
    description = "Single needle in a haystack (NeedleBench v2 origin), the low-intensity control"
    metric = "keyword_found"

    depth: float = 50.0
    case_sensitive: bool = False
    data_dir: str | None = None

    def __post_init__(self):
        if not 0 <= self.depth <= 100:
            raise KvdiagError(f"depth must be a percent in [0, 100], got {self.depth!r}")

    def data_available(self) -> bool:
        return needle_files(resolve_data_dir(self.data_dir)) is not None

    def samples(self, n: int, seed: int = 0, tokenizer: Any | None = None, target_tokens: int = 4096):
        def render(context, needles):
            return PROMPT_ONE.format(context=context, question=needles[0].retrieval_question)

        return needle_samples(self, n, seed, tokenizer, target_tokens, [self.depth], render)

    def score(self, prediction: str, sample: Sample) -> float:
        return 100.0 if keyword_found(sample.gold[0]["keyword"], prediction, self.case_sensitive) else 0.0

    def answer_text(self, sample: Sample) -> str:
        """Each needle's answer sentence in its question's requested format, keyword filled in, one per
        line, in depth order."""
        return "\n".join(filled_format(g) for g in sample.gold)
