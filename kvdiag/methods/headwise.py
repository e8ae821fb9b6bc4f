"""Head-wise budgets: a base method's selection with its per-layer total split by calibrated need."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods._head_budget import (
    HeadCalibration,
    allocate_budget,
    calibration_file,
    file_sha256,
    load_calibration,
)
from kvdiag.methods._scoring import check_float, check_int
from kvdiag.methods.base import Built, BuiltBatch, DecodeState, LayerKV, Method
from kvdiag.methods.specs import parse_method_spec

log = logging.getLogger(__name__)

UNIFORM = "uniform"


@dataclass
class Headwise(Method):
    """Head-wise budgets for offloading: the `base` method's build, landmarks and scoring rule, with
    the layer's total top-k budget split across its KV heads in proportion to a calibrated need.

    kvdiag's method (issue 11). The allocation follows the head-wise eviction budgets of AdaKV (Feng
    et al., arXiv 2407.11550) and HeadKV (Fu et al., arXiv 2410.19258), here for offloading, where
    the budget is what is fetched per step rather than what is kept.

    Allocation, per layer and decode state: the base chooses k = `n_blocks_selected(budget)` scored
    blocks (tokens for YAKV, chunks for ShadowKV, pages for ArkVale) per KV head, at most the N blocks
    there are; headwise gives head h k_h blocks with Σ_h k_h = H_kv · min(k, N), each k_h in
    [`min_blocks`, N], k_h ∝ need_h^`power` (`kvdiag.analysis.heads.allocate_budget`: proportional
    shares clipped to the bounds, largest-remainder rounding; power 1 is the issue's proportional
    split, 0 the base's even one, 0.5 a softer split between). need_h is the calibration's need of this
    layer's KV head h (`kvdiag heads` → heads_calibration.json: by default the median over the gold
    answer's tokens of the GQA group's 90 %-mass need, as a share of L0, mean over the calibration
    samples). Where the base chooses fewer than `min_blocks` per head nothing is moved. Each head
    then takes its own top-k_h of the base's scores (`Method.blocks_per_head`, the base class's
    per-row-and-head top-k); the always-kept set (local window, outliers, sinks) is the base's.

    What stays equal to the base (tests/test_headwise.py measures it through `Selection`): the
    build, so the resident (GPU) bytes; the total of selected tokens per layer and step; the
    fetched entries and bytes per layer and step, for bases without a GPU cache of fetched tokens
    (ArkVale's page cache keeps the base's per-head capacity, so its cache hits, and then its
    fetched bytes, may differ). The [H_kv] block counts per layer are a table of H_kv integers,
    not counted as resident (like the rotary tables).

    Specs: `headwise:base=yakv,calib=runs/heads` (a run directory of `kvdiag heads` or its
    heads_calibration.json); the base's knobs as dotted knobs, `headwise:base=shadowkv,base.rank=320,
    base.chunk=8,calib=runs/heads`, or one of them inline, `base=yakv:center=True`. The label
    writes the base back in the dotted form, so labels parse back. `calib=uniform` (the default)
    gives every head the same need: the base's own selection, exactly (the control).

    Checks: the calibration must hold this layer with this layer's number of KV heads (a
    calibration of a model of another shape fails at build, naming both); its model name is recorded,
    not compared (the method does not see the model). Bases that select per query head (quest,
    lrqk; infinigen, which also has its own selection rule) are refused: their selections are per
    query head and a KV head fetches the group's union (or each head's own), so splitting a KV
    head's budget would not keep the fetched bytes equal. A headwise base is refused too.

    Provenance: the label carries the calibration's path; `resolved()` and `provenance()` add the
    file's SHA-256, the model it was measured on, its τ / statistic / measure and its source (task,
    seed, sample ids): recall manifests record `resolved()`, eval manifests `provenance()` (a resumed
    eval refuses a calibration file whose content changed, and warns when the calibration's sample
    ids are among the evaluated ones).

    Measured (figures/headwise/README.md, smollm2-135m, Text2JSON and MultiNeedle at 1.5625 / 3.125 %): the
    proportional split loses to the base's even split at equal bytes; power 0.5 is about neutral.
    Kernel paths of the offload runtime are chosen by method name, so headwise runs its PyTorch path.
    """

    name: ClassVar[str] = "headwise"
    paper: ClassVar[str] = (
        "kvdiag head-wise offloading budgets (issue 11), after AdaKV (Feng et al., arXiv 2407.11550) and "
        "HeadKV (Fu et al., arXiv 2410.19258)"
    )
    wraps_method: ClassVar[bool] = True
    nested_specs: ClassVar[tuple[str, ...]] = ("base",)

    base: str = "yakv"
    calib: str = UNIFORM
    min_blocks: int = 1
    power: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base.strip():
            raise KvdiagError(f"headwise: base {self.base!r} must be a method spec, e.g. 'yakv'")
        if not isinstance(self.calib, str) or not self.calib.strip():
            raise KvdiagError(
                f"headwise: calib {self.calib!r} must be a `kvdiag heads` run directory, its "
                f"heads_calibration.json, or {UNIFORM!r}"
            )
        check_int(self.name, "min_blocks", self.min_blocks, 0)
        check_float(self.name, "power", self.power, 0.0, 8.0)
        try:
            base = parse_method_spec(self.base)
        except KvdiagError as err:
            raise KvdiagError(f"headwise: base {self.base!r}: {err}") from None
        if isinstance(base, Headwise):
            raise KvdiagError("headwise: the base cannot be headwise itself; give e.g. base=yakv")
        if base.per_query_head:
            raise KvdiagError(
                f"headwise: base {base.name!r} selects per query head, so a KV head's budget cannot be "
                "split with equal fetched bytes; use a per-KV-head method (yakv, shadowkv, oracle, arkvale)"
            )
        if type(base).select_batch is not Method.select_batch:
            raise KvdiagError(f"headwise: base {base.name!r} has its own selection rule, not a top-k")
        self._base = base
        self.base = base.label()  # canonical: "yakv:center=True" however it was written
        self._calibration: HeadCalibration | None = None
        self._calibration_info: dict[str, Any] = {"calib": UNIFORM}
        if self.calib.strip() != UNIFORM:
            try:
                path = calibration_file(self.calib)
                self._calibration = load_calibration(path)
            except KvdiagError as err:
                raise KvdiagError(f"headwise: calib {self.calib!r}: {err}") from None
            cal = self._calibration
            self._calibration_info = {
                "calib": self.calib, "path": str(path.resolve()), "sha256": file_sha256(path),
                "model": cal.model, "tau": cal.tau, "statistic": cal.statistic, "measure": cal.measure,
                "source": cal.source, "layers": sorted(cal.need),
            }  # fmt: skip

    @property
    def base_method(self) -> Method:
        """The wrapped method (built from the `base` spec)."""
        return self._base

    # --- the calibration --------------------------------------------------------------------------

    def layer_need(self, layer_idx: int, n_kv_heads: int) -> np.ndarray:
        """[H_kv] need of one layer (ones with calib=uniform); a layer or a KV head count the
        calibration does not have is a KvdiagError."""
        cal = self._calibration
        if cal is None:
            return np.ones(n_kv_heads)
        if layer_idx not in cal.need:
            raise KvdiagError(
                f"headwise: calibration {self.calib} ({cal.model}) has no layer {layer_idx}; it has layers "
                f"{_ranges(sorted(cal.need))}: calibrate every layer of this model with `kvdiag heads`"
            )
        need = cal.layer_need(layer_idx)
        if need.size != n_kv_heads:
            raise KvdiagError(
                f"headwise: calibration {self.calib} ({cal.model}) has {need.size} KV heads in layer "
                f"{layer_idx}, this model {n_kv_heads}: calibrate this model with `kvdiag heads`"
            )
        return need

    def provenance(self) -> dict[str, Any]:
        return {"calibration": dict(self._calibration_info)}

    def resolved(self, layer: LayerKV) -> dict[str, Any]:
        need = self.layer_need(layer.layer_idx, layer.n_kv_heads)
        return {
            "base": self.base, "base_resolved": self._base.resolved(layer),
            "need": [float(x) for x in need], **self.provenance(),
        }  # fmt: skip

    # --- the base's build, scoring and storage ----------------------------------------------------

    def build(self, layer: LayerKV) -> Built:
        self.layer_need(layer.layer_idx, layer.n_kv_heads)  # a mismatched calibration fails here
        built = self._base.build(layer)
        built.info["headwise_layer"] = layer.layer_idx
        return built

    def start(self, built: Built, budget: float | int) -> DecodeState:
        state = self._base.start(built, budget)
        self.blocks_per_head(built, state)  # allocated once per decode state
        return state

    def blocks_per_head(self, built: Built, state: DecodeState) -> torch.Tensor:
        """[H_kv] long: the base's total for this layer split by the layer's need (see the class doc)."""
        if "head_blocks" in state.extra:
            return state.extra["head_blocks"]
        uniform = self._base.blocks_per_head(built, state)
        n_kv, n_blocks = built.n_kv_heads, int(self.block_starts(built).shape[-1])
        total = int(uniform.clamp_max(n_blocks).sum())
        if built.dense or total < self.min_blocks * n_kv:
            counts = uniform
        else:
            need = self.layer_need(built.info["headwise_layer"], n_kv) ** self.power
            counts = torch.as_tensor(
                allocate_budget(need, total, self.min_blocks, n_blocks), dtype=torch.long
            )
        state.extra["head_blocks"] = counts
        return counts

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        return self._base.score_inputs(built)

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        return self._base.score_batch(batch, q, states)

    def score_with(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState], backend: str
    ) -> torch.Tensor:
        return self._base.score_with(batch, q, states, backend)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's keys / values; `fetched` (rows a runtime read from host memory) passed through."""
        if fetched is None:
            return self._base.materialize(built, ids)
        return self._base.materialize(built, ids, fetched)

    def dense_view(self, built: Built) -> tuple[torch.Tensor, torch.Tensor]:
        return self._base.dense_view(built)

    @property
    def block_size(self) -> int:
        return self._base.block_size

    def block_starts(self, built: Built) -> torch.Tensor:
        return self._base.block_starts(built)

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        return self._base.n_blocks_selected(built, budget_tokens)

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        return self._base.always_kept(built, state)

    def always_fetched(self, built: Built) -> bool:
        return self._base.always_fetched(built)

    def entry_bytes(self, built: Built) -> float:
        return self._base.entry_bytes(built)

    def resident_bytes(self, built: Built, state: DecodeState | None = None) -> int:
        return self._base.resident_bytes(built, state)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ", ".join(parts) or "none"
