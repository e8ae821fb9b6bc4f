"""Calibrating a task's difficulty before the study: the hardest setting exact attention still solves.

A context-intensive task tells methods apart only where exact attention scores well above the floor:
Text2JSON with more entities than a small model can list scores ~0 even exactly, and every method
"matches" it. The `calibrate` stage of `kvdiag reproduce` therefore runs exact attention alone on
samples of a seed the evaluation never uses, once per candidate setting (ordered easy → hard), and
keeps the hardest candidate whose exact mean score reaches `min_score`; when none does, the one
with the highest exact mean (the report says so). The choice and the whole table are written to
`calibrate/calibration.json` and shown in the report.

    from kvdiag.study.calibrate import Calibration, run_calibration
    cal = Calibration("text2json", n=8, seed=1000, min_score=50.0, candidates=[
        {"knobs": {"n_entities": 4, "n_distractors": 2}, "max_new_tokens": 160},
        {"knobs": {"n_entities": 8, "n_distractors": 4}, "max_new_tokens": 280}])
    chosen = run_calibration("qwen2.5-coder-0.5b", cal, target_tokens=8192, out=Path("runs/x/calibrate"),
                             device="cuda")
    chosen["knobs"], chosen["max_new_tokens"]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from kvdiag.errors import KvdiagError
from kvdiag.study.configs import _positive_int

RESULT = "calibration.json"


@dataclasses.dataclass
class Calibration:
    """What to calibrate: `task`'s knobs and answer cap among `candidates` (each {"knobs": {...},
    "max_new_tokens": int}, easy → hard), on n samples of `seed` (not the evaluation's seed 0)."""

    task: str
    n: int
    seed: int
    min_score: float
    candidates: list[dict]

    def __post_init__(self) -> None:
        if self.seed == 0:
            raise KvdiagError("calibration seed 0 is the evaluation's: calibrate on other samples")
        if not self.candidates:
            raise KvdiagError("a calibration needs at least one candidate setting")
        for i, cand in enumerate(self.candidates):
            if set(cand) != {"knobs", "max_new_tokens"} or not isinstance(cand["knobs"], dict):
                raise KvdiagError(
                    f"calibration candidate {i} must be {{knobs: {{...}}, max_new_tokens: N}}, got {cand!r}"
                )
            _positive_int(cand["max_new_tokens"], f"calibration candidate {i}: max_new_tokens")

    @classmethod
    def from_dict(cls, data: dict, where: str = "the calibration") -> Calibration:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != fields:
            raise KvdiagError(f"{where} must have exactly the fields {sorted(fields)}, got {data!r}")
        return cls(**data)


def candidate_dir(out: Path, index: int) -> Path:
    return out / f"candidate_{index}"


def run_calibration(model: str, cal: Calibration, target_tokens: int, out: Path, device: str = "cpu",
                    data_dir=None, progress: bool = True, batch_size: int | None = None) -> dict:  # fmt: skip
    """Exact attention on each candidate (one eval run each under `out`, resumable), then the choice,
    written to out/calibration.json. Returns the chosen candidate with its row of the table."""
    from kvdiag.eval.harness import run_eval

    for i, cand in enumerate(cal.candidates):
        run_eval(model, cal.task, candidate_dir(out, i), methods=[], budgets=[], task_knobs=cand["knobs"],
                 n=cal.n, seed=cal.seed, target_tokens=target_tokens, max_new_tokens=cand["max_new_tokens"],
                 data_dir=data_dir, device=device, fidelity=False, progress=progress,
                 batch_size=batch_size or cal.n, idle_ranks_ok=True)  # fmt: skip
    return choose(cal, out)


def candidate_table(cal: Calibration, out: Path) -> pd.DataFrame:
    """One row per candidate: its knobs, the exact mean score, prompt and answer lengths, hit-cap share."""
    from kvdiag.eval.store import RESULTS
    from kvdiag.runs import read_table

    rows = []
    for i, cand in enumerate(cal.candidates):
        table = read_table(candidate_dir(out, i) / RESULTS)
        exact = table[table.method == "exact"]
        rows.append({
            "candidate": i, **{f"knob_{k}": v for k, v in cand["knobs"].items()},
            "max_new_tokens": cand["max_new_tokens"], "n": len(exact),
            "exact_mean": float(exact.score.mean()), "exact_min": float(exact.score.min()),
            "exact_max": float(exact.score.max()), "prompt_tokens_mean": float(exact.prompt_tokens.mean()),
            "tokens_generated_max": int(exact.tokens_generated.max()),
            "hit_cap_share": float(exact.hit_cap.mean()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def choose(cal: Calibration, out: Path) -> dict:
    """The hardest candidate whose exact mean reaches min_score (else the best), saved to RESULT."""
    from kvdiag.runs import atomic_write_json

    table = candidate_table(cal, out)
    passing = table[table.exact_mean >= cal.min_score]
    index = int(passing.candidate.iloc[-1]) if len(passing) else int(table.exact_mean.idxmax())
    reason = (
        f"the hardest candidate with exact mean ≥ {cal.min_score:g}" if len(passing)
        else f"no candidate reaches exact mean {cal.min_score:g}: the one with the highest exact mean"
    )  # fmt: skip
    chosen = {**cal.candidates[index], "candidate": index, "reason": reason,
              "exact_mean": float(table.exact_mean[index])}  # fmt: skip
    result = {"calibration": dataclasses.asdict(cal), "chosen": chosen, "table": table.to_dict("records")}
    atomic_write_json(out / RESULT, json.loads(json.dumps(result, default=float)))
    return chosen


def load_choice(out: Path) -> dict | None:
    """The saved choice of a finished calibration stage, or None."""
    path = out / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KvdiagError(f"{path} is unreadable ({err}); delete it to calibrate again") from None
