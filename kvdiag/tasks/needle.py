"""Single needle in a haystack: the low-intensity control of arXiv 2604.08426.

One NeedleBench v2 needle at `depth` % (OpenCompass `NeedleBenchOriginDataset`), its question at the
end. Score = 100 if the answer keyword (`arg2`) occurs in the output, else 0 (case-insensitive by
default; upstream is case-sensitive: `case_sensitive=True`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvdiag.errors import KvdiagError
from kvdiag.tasks.base import Sample, Task, check_n, counter_name, fit_length, resolve_data_dir, token_counter
from kvdiag.tasks.haystack import PROMPT_ONE, Haystack, insert_needles, keyword_found, needle_files


@dataclass
class SingleNeedle(Task):
    """Knobs: depth (percent, default 50), case_sensitive, data_dir."""

    name = "needle"
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
        check_n(n)
        count = token_counter(tokenizer)
        out = []
        for i in range(n):
            hay = Haystack(resolve_data_dir(self.data_dir), seed=seed * 1_000_003 + i)
            (nd,) = hay.needles(1)

            def build(k, hay=hay, nd=nd):
                context = insert_needles(hay.sentences(k), [nd], [self.depth])
                return PROMPT_ONE.format(context=context, question=nd.retrieval_question)

            k, prompt, tokens = fit_length(build, count, target_tokens, self.name)
            gold = [
                {
                    "depth": self.depth,
                    "keyword": nd.arg2,
                    "needle": nd.needle,
                    "question": nd.retrieval_question,
                }
            ]
            meta = {
                "n_facts": 1,
                "depths": [self.depth],
                "target_tokens": target_tokens,
                "tokens": tokens,
                "token_counter": counter_name(tokenizer),
                "haystack": hay.source,
                "haystack_sentences": k,
            }
            out.append(Sample(f"{self.name}-s{seed}-{i}", [{"role": "user", "content": prompt}], gold, meta))
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        return 100.0 if keyword_found(sample.gold[0]["keyword"], prediction, self.case_sensitive) else 0.0
