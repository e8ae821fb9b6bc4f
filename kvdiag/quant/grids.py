"""EDEN grids for HIGGS: MSE-optimal quantizers of a standard Gaussian, shipped as package data.

"EDEN{d}-{n}" is n points in R^d (float32 [n, d]). Two sources, chosen by the grid key:

- "EDEN4-256" (no suffix): the grid **as published with the study** (arXiv 2604.08426, release
  yandex-research/context-intensive-kv-offloading, commit 721b2d1, Apache-2.0; the files and their
  attribution are in `kvdiag/data/higgs_grids/`, SHA-256 checked on load). With these exact points
  kvdiag's YAKV selects the same tokens as the release does; a different grid of the same size and
  MSE does not (Jaccard ≈ 0.3–0.5 of the selected sets on structured keys).
- "EDEN4-256@clvq": kvdiag's own rebuild by stochastic Lloyd / CLVQ from a fixed seed
  (`python -m kvdiag.tools.make_eden_grids`, `kvdiag/data/eden/`), kept as an ablation. A name that
  only exists there (e.g. "EDEN1-4") resolves to it without the suffix.

`grid_info()` gives, per key, d, n, bits per coordinate, the source and the MSE per coordinate
measured on 10^6 fresh Gaussian samples (`kvdiag/data/eden/grids.json` for CLVQ,
`kvdiag/data/higgs_grids/measured.json` for the published grids).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from importlib import resources

import numpy as np
import torch

from kvdiag.errors import KvdiagError, unknown_name_error

GRID_NAME = re.compile(r"^EDEN(\d+)-(\d+)$")
CLVQ = "clvq"
PUBLISHED = "published"


def _clvq_dir():
    return resources.files("kvdiag") / "data" / "eden"


def _published_dir():
    return resources.files("kvdiag") / "data" / "higgs_grids"


def _names_in(folder, suffix: str) -> set[str]:
    found = {p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix)}
    return {n for n in found if GRID_NAME.match(n)}


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, tuple[str, str]]:
    """grid key -> (base name, source)."""
    published = _names_in(_published_dir(), ".pt")
    clvq = _names_in(_clvq_dir(), ".npy")
    keys = {name: (name, PUBLISHED) for name in published}
    for name in clvq:
        keys[f"{name}@{CLVQ}"] = (name, CLVQ)
        keys.setdefault(name, (name, CLVQ))  # only kvdiag has it: the plain name means CLVQ
    return keys


@functools.lru_cache(maxsize=1)
def grid_names() -> tuple[str, ...]:
    """Every grid key, e.g. ('EDEN1-16', ..., 'EDEN4-256', 'EDEN4-256@clvq', ...)."""
    return tuple(sorted(_sources()))


def grid_source(key: str) -> str:
    """ "published" (the study's points) or "clvq" (kvdiag's rebuild) for a grid key."""
    return _resolve(key)[1]


def _resolve(key: str) -> tuple[str, str]:
    sources = _sources()
    if key not in sources:
        raise unknown_name_error("EDEN grid", key, sources)
    return sources[key]


@functools.lru_cache(maxsize=1)
def grid_info() -> dict[str, dict]:
    """Per grid key: d, n, bits_per_coord, source, mse_per_coord (measured, 10^6 samples) and the
    build details of the CLVQ grids."""
    clvq = json.loads((_clvq_dir() / "grids.json").read_text())
    published = json.loads((_published_dir() / "measured.json").read_text())
    out = {}
    for key, (name, source) in _sources().items():
        d, n = grid_shape(key)
        base = {"d": d, "n": n, "bits_per_coord": float(np.log2(n) / d), "source": source}
        extra = published.get(name, {}) if source == PUBLISHED else clvq.get(name, {})
        out[key] = {**extra, **base}
    return out


def grid_shape(key: str) -> tuple[int, int]:
    """'EDEN4-256' (or 'EDEN4-256@clvq') → (d, n) = (4, 256); unknown keys get a "did you mean"."""
    name, _ = _resolve(key)
    d, n = GRID_NAME.match(name).groups()
    return int(d), int(n)


@functools.lru_cache(maxsize=1)
def _published_sums() -> dict[str, str]:
    lines = (_published_dir() / "SHA256SUMS").read_text().split("\n")
    return {f: h for h, f in (line.split() for line in lines if line.strip())}


@functools.cache
def _load_cpu(key: str) -> torch.Tensor:
    name, source = _resolve(key)
    d, n = grid_shape(key)
    if source == PUBLISHED:
        data = (_published_dir() / f"{name}.pt").read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != _published_sums().get(f"{name}.pt"):
            raise KvdiagError(
                f"published grid {name}.pt is damaged (SHA-256 {digest} differs from SHA256SUMS)"
            )
        import io

        grid = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu").float()
    else:
        with (_clvq_dir() / f"{name}.npy").open("rb") as f:
            grid = torch.from_numpy(np.load(f).astype(np.float32))
    if tuple(grid.shape) != (n, d):
        raise KvdiagError(f"grid {key} has shape {tuple(grid.shape)}, expected {(n, d)}")
    return grid.contiguous()


@functools.lru_cache(maxsize=64)
def load_grid(key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The grid [n, d] float32 on `device` (cached per device)."""
    return _load_cpu(key).to(device)


@functools.lru_cache(maxsize=64)
def grid_sq_norms(key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """‖G_j‖² for every grid point: [n] float32 on `device`."""
    return load_grid(key, device).square().sum(-1)
