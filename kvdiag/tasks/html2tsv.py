"""LongProc HTML→TSV (princeton-pli/LongProc, as used by arXiv 2604.08426), on the real task files.

Data: `<data_dir>/longproc_html_to_tsv/` with `html_to_tsv_{subset}.json` (task_id, html_path,
task_topic, task_description, tsv_header, filtering_instruction, gt), the pages under `webpage/`, and
`prompts.yaml` (USER_PROMPT). The prompt is `USER_PROMPT.format(html_str=..., task_topic=...,
task_description=..., filtering_instruction=..., tsv_header=...)`, as LongProc's loader fills it
(so the template's "{{Your TSV output}}" becomes "{Your TSV output}").

Metric, following LongProc's `eval_html_to_tsv` and `evaluate_html_to_csv_compute_metrics`:
- parsing: the text inside the greedy match of ```tsv ... ``` (stripped); without one, everything after
  the first ```tsv, or else the whole output;
- TSV: lines split on "\\n" and read by `csv.reader(delimiter="\\t")`; the first line is the header
  (the prediction's own first line too); a last row with the wrong number of cells is dropped; any
  other such row becomes an all-"N/A" row; each cell is normalised (lowercase, drop
  string.punctuation, articles a/an/the → space, collapse whitespace, then drop all spaces);
- precision = share of predicted rows found among the gold rows (duplicates each count);
  recall = share of gold rows found among the predicted rows; F1 = 2PR / (P + R);
- a prediction with no data rows, or with a different column count from the gold, scores 0 (upstream
  gets there through an exception).
Scores here are on 0..100 (LongProc reports 0..1). `target_tokens` does not apply to the real pages:
their lengths are what they are (recorded in `meta["tokens"]`).
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.tasks.base import Sample, Task, counter_name, resolve_data_dir, token_counter

SUBDIR = "longproc_html_to_tsv"
SUBSETS = ("0.5k", "2k", "8k")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_TSV_BLOCK = re.compile(r"```tsv([\s\S]*)```")


def normalize_cell(text: str) -> str:
    """LongProc's normalize_answer: lower, drop punctuation, articles → space, collapse, drop spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()).replace(" ", "")


def extract_tsv(prediction: str) -> str:
    """The TSV part of a model output, as LongProc cuts it."""
    m = _TSV_BLOCK.search(prediction)
    if m is not None:
        return m.group(1).strip()
    if "```tsv" in prediction:
        prediction = prediction.split("```tsv")[1]
    return prediction.strip()


def tsv_rows(tsv: str) -> tuple[int, list[tuple[str, ...]]] | None:
    """(number of header columns, normalised data rows), or None where LongProc fails to read it."""
    data = list(csv.reader(tsv.strip().split("\n"), delimiter="\t"))
    header, rows = data[0], data[1:]
    if not rows:
        return None
    if len(rows[-1]) != len(header):
        rows = rows[:-1]
    width = len(header)
    return width, [
        tuple(normalize_cell(c) for c in (r if len(r) == width else ["N/A"] * width)) for r in rows
    ]


def tsv_metrics(prediction: str, gold_tsv: str) -> dict[str, float]:
    """precision, recall, f1 (0..100) and extraction_rate (100 if the prediction could be read)."""
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "extraction_rate": 0.0}
    gold, pred = tsv_rows(gold_tsv), tsv_rows(extract_tsv(prediction))
    if gold is None or pred is None or pred[0] != gold[0] or not pred[1]:
        return zero
    gold_rows, pred_rows = gold[1], pred[1]
    gold_set, pred_set = set(gold_rows), set(pred_rows)
    precision = sum(r in gold_set for r in pred_rows) / len(pred_rows)
    recall = sum(r in pred_set for r in gold_rows) / len(gold_rows)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1, "extraction_rate": 100.0}


@lru_cache(maxsize=2)
def load_user_prompt(path: Path) -> str:
    import yaml  # a dependency of transformers / huggingface_hub

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)["USER_PROMPT"]


@dataclass
class HtmlToTsv(Task):
    """Knobs: subset ("0.5k" or "2k": LongProc's output-length groups), data_dir, max_prompt_tokens.

    `samples(n=None)` returns every task of the subset in file order; an integer n returns a seeded
    random subset of n tasks (in file order), nested: the subset for n holds the one for any smaller n
    (so an eval run can grow by samples). max_prompt_tokens keeps only the tasks whose prompt text has
    at most that many tokens (in the given tokenizer), before the subset is drawn: the 0.5k subset's
    pages run from 1.8K to 64K tokens in Qwen2.5's tokenizer, past a small model's context (a kvdiag
    deviation from LongProc, which keeps every page; the run's samples record their lengths).
    """

    name = "html2tsv"
    title = "HTML→TSV (LongProc)"
    description = "LongProc HTML→TSV on the real pages: extract every matching record (row-level F1)"
    metric = "f1"

    subset: str = "0.5k"
    data_dir: str | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.subset not in SUBSETS:
            raise unknown_name_error("html2tsv subset", self.subset, SUBSETS)
        limit = self.max_prompt_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise KvdiagError(f"html2tsv max_prompt_tokens must be an integer ≥ 1 or None, got {limit!r}")

    def _root(self) -> Path | None:
        data_dir = resolve_data_dir(self.data_dir)
        return None if data_dir is None else data_dir / SUBDIR

    def data_available(self) -> bool:
        root = self._root()
        return root is not None and (root / f"html_to_tsv_{self.subset}.json").is_file()

    def tasks(self) -> list[dict]:
        """The subset's task records (LongProc's json)."""
        if not self.data_available():
            raise KvdiagError(
                f"LongProc HTML→TSV data not found: need {SUBDIR}/html_to_tsv_{self.subset}.json under the "
                f"data directory (data_dir= or $KVDIAG_DATA_DIR); use 'html2tsv_synthetic' without data"
            )
        with open(self._root() / f"html_to_tsv_{self.subset}.json", encoding="utf-8") as f:
            return json.load(f)

    def samples(self, n: int | None = None, seed: int = 0, tokenizer: Any | None = None, target_tokens=None):
        records = self.tasks()
        root = self._root()
        template = load_user_prompt(root / "prompts.yaml")
        count = token_counter(tokenizer)
        prompts, lengths = {}, {}  # built on demand: every page when a length limit must be checked
        if self.max_prompt_tokens is not None:
            prompts = {rec["task_id"]: self._prompt(rec, root, template) for rec in records}
            lengths = {task_id: count(prompt) for task_id, prompt in prompts.items()}
            records = [rec for rec in records if lengths[rec["task_id"]] <= self.max_prompt_tokens]
        if n is not None:
            if not isinstance(n, int) or not 0 <= n <= len(records):
                limit = (
                    ""
                    if self.max_prompt_tokens is None
                    else f" with ≤ {self.max_prompt_tokens} prompt tokens"
                )
                raise KvdiagError(
                    f"n must be between 0 and {len(records)} for subset {self.subset}{limit}, got {n!r}"
                )
            order = list(range(len(records)))  # a seeded order: n + 1 tasks are n's plus one more
            random.Random(f"html2tsv-{seed}").shuffle(order)
            keep = sorted(order[:n])
            records = [records[i] for i in keep]
        out = []
        for rec in records:
            prompt = prompts.get(rec["task_id"]) or self._prompt(rec, root, template)
            meta = {
                "task_id": rec["task_id"],
                "website_id": rec["website_id"],
                "subset": self.subset,
                "n_facts": len(rec["gt"].strip().split("\n")) - 1,
                "tokens": lengths[rec["task_id"]] if rec["task_id"] in lengths else count(prompt),
                "token_counter": counter_name(tokenizer),
            }
            out.append(Sample(rec["task_id"], [{"role": "user", "content": prompt}], rec["gt"], meta))
        return out

    @staticmethod
    def _prompt(rec: dict, root: Path, template: str) -> str:
        page = root / rec["html_path"]
        if not page.is_file():
            raise KvdiagError(f"page {page} of task {rec['task_id']} is missing from the data directory")
        return template.format(
            html_str=page.read_text(encoding="utf-8"),
            task_topic=rec["task_topic"],
            task_description=rec["task_description"],
            filtering_instruction=rec["filtering_instruction"],
            tsv_header=rec["tsv_header"],
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return tsv_metrics(prediction, sample.gold)["f1"]

    def metrics(self, prediction: str, sample: Sample) -> dict[str, float]:
        return tsv_metrics(prediction, sample.gold)

    def answer_text(self, sample: Sample) -> str:
        """The gold TSV in a ```tsv block, as the prompt asks."""
        return f"```tsv\n{sample.gold.strip()}\n```"
