"""The shipped EDEN grids: MSE-optimal quantizers of a standard Gaussian, as package data.

"EDEN{d}-{n}" is n points in R^d (float32 [n, d]) built by `python -m kvdiag.tools.make_eden_grids`
(stochastic Lloyd / CLVQ, fixed seed); `grids.json` beside them records each grid's measured MSE per
coordinate. Names follow HIGGS (Malinovskii et al., 2024) and EDEN (Vargaftik et al., 2022).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

import numpy as np
import torch

from kvdiag.errors import unknown_name_error

GRID_NAME = re.compile(r"^EDEN(\d+)-(\d+)$")


def _grid_dir():
    return resources.files("kvdiag") / "data" / "eden"


@functools.lru_cache(maxsize=1)
def grid_names() -> tuple[str, ...]:
    """Names of the shipped grids, e.g. ('EDEN1-16', 'EDEN1-4', ..., 'EDEN8-4096')."""
    names = [p.name[: -len(".npy")] for p in _grid_dir().iterdir() if p.name.endswith(".npy")]
    return tuple(sorted(n for n in names if GRID_NAME.match(n)))


@functools.lru_cache(maxsize=1)
def grid_info() -> dict[str, dict]:
    """grids.json: per grid d, n, bits_per_coord, mse_per_coord (on 10^6 fresh samples), seeds, budget."""
    return json.loads((_grid_dir() / "grids.json").read_text())


def grid_shape(name: str) -> tuple[int, int]:
    """'EDEN4-256' → (d, n) = (4, 256); unknown names get a "did you mean" error."""
    if name not in grid_names():
        raise unknown_name_error("EDEN grid", name, grid_names())
    d, n = GRID_NAME.match(name).groups()
    return int(d), int(n)


@functools.cache
def _load_cpu(name: str) -> torch.Tensor:
    d, n = grid_shape(name)
    with (_grid_dir() / f"{name}.npy").open("rb") as f:
        grid = torch.from_numpy(np.load(f).astype(np.float32))
    if grid.shape != (n, d):
        raise RuntimeError(f"grid file {name}.npy has shape {tuple(grid.shape)}, expected {(n, d)}")
    return grid


@functools.lru_cache(maxsize=64)
def load_grid(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The grid [n, d] float32 on `device` (cached per device)."""
    return _load_cpu(name).to(device)


@functools.lru_cache(maxsize=64)
def grid_sq_norms(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """‖G_j‖² for every grid point: [n] float32 on `device`."""
    return load_grid(name, device).square().sum(-1)
