"""Head-wise budgets: split a layer's budget across KV heads by a measured need, and the calibration
file that holds the need (`kvdiag heads` writes it, the `headwise` method reads it).

Here, below the analyses in the package's layering, so that a method can use it;
`kvdiag.analysis.heads` re-exports every name (its module docstring defines the need).

    allocate_budget([0.5, 0.25, 0.25], total_tokens=120)       # array([60, 30, 30])
    calibration = load_calibration("runs/heads")               # heads_calibration.json in a run dir
    calibration.layer_need(5)                                  # [H_kv] need, a fraction of L0
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvdiag.errors import KvdiagError
from kvdiag.runs import atomic_write_json

CALIBRATION_FILE = "heads_calibration.json"
CALIBRATION_FORMAT = "kvdiag.heads_calibration"
CALIBRATION_VERSION = 1


# --- budgets that follow the need --------------------------------------------------------------------


def _as_int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise KvdiagError(f"{name} {value!r} must be an integer ≥ {low}")
    return int(value)


def _share(weights: np.ndarray, total: float, low: int, high: float) -> np.ndarray:
    """Real x with Σx = total, x_h = clip(c·w_h, low, high) for one c ≥ 0 (w > 0; bisection on c)."""
    if total <= low * len(weights):
        return np.full(len(weights), float(low))
    if total >= high * len(weights):
        return np.full(len(weights), float(high))
    weights = weights / weights.max()
    lo, hi = 0.0, 1.0
    while np.clip(hi * weights, low, high).sum() < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(mid * weights, low, high).sum() < total else (lo, mid)
    return np.clip(hi * weights, low, high)


def allocate_budget(
    need, total_tokens: int, min_per_head: int = 1, max_per_head: int | None = None
) -> np.ndarray:
    """Split a layer's token budget across KV heads in proportion to their need.

    need [H_kv] float ≥ 0 (e.g. a calibrated median union need); total_tokens: the layer's budget
    (sum over its KV heads). Returns [H_kv] int64 summing exactly to total_tokens, each in
    [min_per_head, max_per_head]: the real allocation x_h = clip(c·need_h, min, max) with Σx = total
    (heads of zero need get min_per_head unless the others are all at max_per_head; all-zero need
    splits evenly), rounded by largest remainder (floors, then +1 to the largest fractional parts,
    ties to the larger need, then the lower head index).
    """
    need = np.asarray(need.cpu() if isinstance(need, torch.Tensor) else need, dtype=np.float64)
    if need.ndim != 1 or need.size == 0:
        raise KvdiagError(f"need must be a 1-D array with one value per KV head, got shape {need.shape}")
    if not np.isfinite(need).all() or (need < 0).any():
        raise KvdiagError(f"need must be finite and ≥ 0 for every KV head, got {need.tolist()}")
    total = _as_int("total_tokens", total_tokens)
    low = _as_int("min_per_head", min_per_head)
    high = math.inf if max_per_head is None else _as_int("max_per_head", max_per_head)
    n = need.size
    if high < low:
        raise KvdiagError(f"max_per_head {max_per_head} is below min_per_head {min_per_head}")
    if not low * n <= total <= high * n:
        raise KvdiagError(
            f"total_tokens {total} cannot be split over {n} KV heads with {low} ≤ tokens per head ≤ "
            f"{max_per_head}: use a total in [{low * n}, {'∞' if max_per_head is None else high * n}]"
        )
    positive = need > 0
    x = np.full(n, float(low))
    if not positive.any():
        x = _share(np.ones(n), total, low, high)
    elif high * positive.sum() + low * (~positive).sum() <= total:  # the needy heads are full
        x[positive] = high
        x[~positive] = _share(np.ones((~positive).sum()), total - high * positive.sum(), low, high)
    else:
        x[positive] = _share(need[positive], total - low * (~positive).sum(), low, high)
    tokens = np.floor(x + 1e-9).astype(np.int64)
    remainder = total - int(tokens.sum())
    if remainder < 0 or remainder > n:
        raise KvdiagError(f"allocation failed to round (remainder {remainder}); please report this")
    fractional = np.where(tokens < high, x - tokens, -np.inf)
    order = sorted(range(n), key=lambda h: (-fractional[h], -need[h], h))
    tokens[order[:remainder]] += 1
    return tokens


# --- calibration file ---------------------------------------------------------------------------------


@dataclass
class HeadCalibration:
    """A need per layer × KV head, measured by `kvdiag heads` (what `headwise` allocates by).

    need: layer -> [H_kv] need as a fraction of L0 (the `statistic` over query positions of the
    `measure` at mass level `tau`, mean over the calibration samples); source: where it was measured
    (task, seed, sample ids, or a prompt and its SHA-256), so that a run can check that it evaluates
    other prompts.
    """

    model: str
    tau: float
    need: dict[int, list[float]]
    source: dict = field(default_factory=dict)
    statistic: str = "median"
    measure: str = "union"

    def layer_need(self, layer: int) -> np.ndarray:
        """[H_kv] need of one layer (fraction of the context)."""
        if layer not in self.need:
            raise KvdiagError(f"the calibration has no layer {layer}; it has {sorted(self.need)}")
        return np.asarray(self.need[layer], dtype=np.float64)

    def to_json(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "model": self.model,
            "tau": self.tau, "statistic": self.statistic, "measure": self.measure, "unit": "fraction of L0",
            "source": self.source, "layers": {str(k): list(map(float, v)) for k, v in sorted(self.need.items())},
        }  # fmt: skip


def save_calibration(calibration: HeadCalibration, path: str | Path) -> Path:
    """Write the calibration as JSON (atomically); a directory gets `heads_calibration.json` inside."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CALIBRATION_FILE
    atomic_write_json(path, calibration.to_json())
    return path


def calibration_file(path: str | Path) -> Path:
    """The calibration file a path names: the file itself, or `heads_calibration.json` in a run
    directory (checked to exist)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.is_file():
        raise KvdiagError(f"no head calibration at {path}; run `kvdiag heads` to measure one")
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_calibration(path: str | Path) -> HeadCalibration:
    """Read a calibration written by `save_calibration` (a file, or a run directory holding one)."""
    path = calibration_file(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KvdiagError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise KvdiagError(f"{path} is not a kvdiag head calibration (format {CALIBRATION_FORMAT!r})")
    if data.get("version") != CALIBRATION_VERSION:
        raise KvdiagError(
            f"{path} has calibration version {data.get('version')!r}; this kvdiag reads {CALIBRATION_VERSION}"
        )
    try:
        need = {int(k): [float(x) for x in v] for k, v in data["layers"].items()}
        calibration = HeadCalibration(model=str(data["model"]), tau=float(data["tau"]), need=need,
                                      source=dict(data.get("source") or {}), statistic=str(data["statistic"]),
                                      measure=str(data["measure"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise KvdiagError(f"{path} is a malformed head calibration ({type(err).__name__}: {err})") from None
    bad = [k for k, v in need.items() if not v or any(not math.isfinite(x) or x < 0 for x in v)]
    if bad:
        raise KvdiagError(f"{path}: layers {bad} have missing, negative or non-finite needs")
    return calibration
