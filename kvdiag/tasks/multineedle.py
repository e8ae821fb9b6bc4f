"""MultiNeedle: NeedleBench v2 multi-retrieval, the study's MultiNeedle-128K (arXiv 2604.08426).

11 needles (distinct subjects and answers) at depths 0, 10, ..., 100 % of one haystack; all the
questions at the end in one combined question (OpenCompass `NeedleBenchParallelDataset`). Score per
sample = 100 x the share of depths whose answer keyword (`arg2`) occurs in the output; the dataset
score is the mean, equal to upstream's per-depth shares averaged over depths. Upstream matches the
keyword case-sensitively; the default here is case-insensitive (`case_sensitive=True` for upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvdiag.errors import KvdiagError
from kvdiag.tasks.base import Sample, Task, resolve_data_dir
from kvdiag.tasks.haystack import (
    PROMPT_MANY,
    filled_format,
    keyword_found,
    multi_question,
    needle_files,
    needle_samples,
)


@dataclass
class MultiNeedle(Task):
    """Knobs: depths (percent; one needle each, default 0..100 step 10), case_sensitive, data_dir."""

    name = "multineedle"
    title = "multi-needle"
    description = "NeedleBench v2 multi-retrieval: 11 needles at depths 0-100 %, all questions at the end"
    metric = "keyword_recall"

    depths: list[float] = field(default_factory=lambda: [float(d) for d in range(0, 101, 10)])
    case_sensitive: bool = False
    data_dir: str | None = None

    def __post_init__(self):
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise KvdiagError(f"depths must be a non-empty list of percents in [0, 100], got {self.depths!r}")

    def data_available(self) -> bool:
        return needle_files(resolve_data_dir(self.data_dir)) is not None

    def samples(self, n: int, seed: int = 0, tokenizer: Any | None = None, target_tokens: int = 4096):
        def render(context, needles):
            return PROMPT_MANY.format(context=context, question=multi_question(needles))

        return needle_samples(self, n, seed, tokenizer, target_tokens, self.depths, render)

    def depth_hits(self, prediction: str, sample: Sample) -> dict[float, bool]:
        """Depth -> whether that needle's keyword is in the output."""
        return {g["depth"]: keyword_found(g["keyword"], prediction, self.case_sensitive) for g in sample.gold}

    def score(self, prediction: str, sample: Sample) -> float:
        hits = self.depth_hits(prediction, sample)
        return 100.0 * sum(hits.values()) / len(hits)

    def answer_text(self, sample: Sample) -> str:
        """Each needle's answer sentence in its question's requested format, keyword filled in, one per
        line, in depth order."""
        return "\n".join(filled_format(g) for g in sample.gold)
