"""Benchmark tasks of arXiv 2604.08426: a registry of `Task` dataclasses (one module per task).

>>> from kvdiag.tasks import get_task, list_tasks
>>> task = get_task("text2json", n_entities=12)
>>> samples = task.samples(2, seed=0, target_tokens=4096)      # tokenizer=None: ~4 chars per token
>>> task.score('[{"name": "x"}]', samples[0])                  # 0..100, higher is better, mean over samples

Tasks with real data (`html2tsv`, and the NeedleBench haystack of `needle` / `multineedle`) read it
from `data_dir=` or $KVDIAG_DATA_DIR; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

from kvdiag.errors import unknown_name_error
from kvdiag.tasks.base import Sample, Task, approx_token_count, token_counter
from kvdiag.tasks.html2tsv import HtmlToTsv
from kvdiag.tasks.html2tsv_synthetic import HtmlToTsvSynthetic
from kvdiag.tasks.multineedle import MultiNeedle
from kvdiag.tasks.needle import SingleNeedle
from kvdiag.tasks.text2json import Text2JSON

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Text2JSON, MultiNeedle, SingleNeedle, HtmlToTsv, HtmlToTsvSynthetic)
}

__all__ = ["TASKS", "Sample", "Task", "approx_token_count", "get_task", "list_tasks", "token_counter"]


def get_task(name: str, **knobs: Any) -> Task:
    """The task `name` with its knobs set (unknown names and knobs raise KvdiagError)."""
    if name not in TASKS:
        raise unknown_name_error("task", name, TASKS)
    cls = TASKS[name]
    known = cls.knobs()
    for knob in knobs:
        if knob not in known:
            raise unknown_name_error(f"knob of task {name!r}", knob, known)
    return cls(**knobs)


def list_tasks(data_dir: str | None = None) -> list[dict[str, Any]]:
    """One row per task: name, description, metric, knobs with defaults, whether its data was found."""
    rows = []
    for name, cls in TASKS.items():
        task = cls(data_dir=data_dir) if data_dir is not None and "data_dir" in cls.knobs() else cls()
        rows.append(
            {
                "name": name,
                "description": cls.description,
                "metric": cls.metric,
                "higher_is_better": cls.higher_is_better,
                "aggregation": cls.aggregation,
                "knobs": cls.knobs(),
                "data_found": task.data_available(),
            }
        )
    return rows
