"""Build the EDEN grids HIGGS uses: MSE-optimal quantizers of a standard Gaussian in d dims.

A grid "EDEN{d}-{n}" is n points in R^d that (approximately) minimise E‖x − q(x)‖² for
x ~ N(0, I_d), q(x) = the nearest grid point. HIGGS (Malinovskii et al., 2024, "Pushing the limits of
LLM quantization via the linearity theorem") rounds Hadamard-rotated, norm-scaled vectors, whose
coordinates are close to N(0, 1), onto these grids; the name comes from EDEN (Vargaftik et al., 2022,
"EDEN: Communication-efficient and robust distributed mean estimation"). Bits per coordinate =
log2(n) / d.

Method: stochastic Lloyd / CLVQ as in the study's release (`minisgl/utils/grid_generator.py`): every
step draws a fresh Gaussian batch, assigns each sample to its nearest point (argmax 2·x·Gᵀ − ‖G‖²,
in chunks), and moves every point towards the mean of its cell with step
γ_t = γ0·A / (A + γ0·B·t), A = 4·n^(1/d), B = π²·n^(−2/d), γ0 = 2; the grid returned is the last
step's cell means. Deviations, to fit ≤ 5 min on 2 CPU cores (upstream: 10^7 samples × 600 steps on a
GPU): far fewer samples and steps (per grid below, written to grids.json), and an empty cell keeps
its point instead of becoming NaN.

Writes `kvdiag/data/eden/EDEN{d}-{n}.npy` (float32 [n, d]) and `kvdiag/data/eden/grids.json` (per
grid: d, n, bits per coordinate, MSE per coordinate measured on 10^6 fresh samples, seeds, sample
counts, steps, the Lloyd–Max / Shannon references at that rate).

    python -m kvdiag.tools.make_eden_grids                 # all grids, ~3 min on 2 cores
    python -m kvdiag.tools.make_eden_grids --only EDEN4-256 --out /tmp/grids
    python -m kvdiag.tools.make_eden_grids --measure-published  # MSE of the study's grids

The study's published grids (`kvdiag/data/higgs_grids/`, the default for every `higgs:EDEN…` spec)
are not rebuilt here; `--measure-published` measures their MSE with the same 10^6-sample estimator and
writes `kvdiag/data/higgs_grids/measured.json`, so the two sources compare side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "eden"
EVAL_SAMPLES = 1_000_000
CHUNK = 2048  # samples per distance block: [CHUNK, n] scores at a time

# Scalar Lloyd–Max MSE of a unit Gaussian at 1..4 bits (Max, 1960), for the JSON's reference column.
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@dataclass(frozen=True)
class GridRecipe:
    """One grid to build: d dims, n points, `samples` fresh Gaussians per step, `steps` steps."""

    d: int
    n: int
    samples: int
    steps: int

    @property
    def name(self) -> str:
        return f"EDEN{self.d}-{self.n}"

    @property
    def bits_per_coord(self) -> float:
        return math.log2(self.n) / self.d


# Budgets sized so the whole set takes ~3 min on 2 CPU cores (cost per step ∝ samples · n).
RECIPES = (
    GridRecipe(1, 4, 400_000, 600),  # 2 bit scalar
    GridRecipe(1, 16, 400_000, 600),  # 4 bit scalar
    GridRecipe(2, 16, 400_000, 150),  # 2 bit
    GridRecipe(2, 64, 400_000, 120),  # 3 bit
    GridRecipe(2, 256, 400_000, 150),  # 4 bit (YAKV offloaded K/V)
    GridRecipe(4, 256, 400_000, 150),  # 2 bit (YAKV landmarks)
    GridRecipe(8, 256, 400_000, 150),  # 1 bit
    GridRecipe(8, 4096, 150_000, 60),  # 1.5 bit (YAKV residual landmarks)
)


def nearest(x: torch.Tensor, grid: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Index of the nearest grid point for every row of x: x [N, d], grid [n, d] → [N] int64."""
    neg_grid_sq = -grid.square().sum(-1)  # [n]
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for start in range(0, x.shape[0], chunk):
        scores = torch.addmm(neg_grid_sq, x[start : start + chunk], grid.T, alpha=2)  # [chunk, n]
        out[start : start + chunk] = scores.argmax(dim=-1)
    return out


def cell_means(x: torch.Tensor, idx: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Mean of the samples in each grid point's cell ([n, d]); an empty cell keeps its point."""
    sums = torch.zeros_like(grid).index_add_(0, idx, x)
    counts = torch.bincount(idx, minlength=grid.shape[0]).unsqueeze(-1).to(grid.dtype)
    return torch.where(counts > 0, sums / counts.clamp_min(1), grid)


def mse_per_coord(grid: torch.Tensor, samples: int, seed: int) -> float:
    """E‖x − q(x)‖² / d on `samples` fresh N(0, I_d) draws (float64 accumulation)."""
    gen = torch.Generator().manual_seed(seed)
    total, done = 0.0, 0
    while done < samples:
        m = min(200_000, samples - done)
        x = torch.randn(m, grid.shape[1], generator=gen)
        total += (x - grid[nearest(x, grid)]).double().square().sum().item()
        done += m
    return total / (samples * grid.shape[1])


def build_grid(recipe: GridRecipe, seed: int, gamma0: float = 2.0) -> torch.Tensor:
    """Stochastic Lloyd / CLVQ (upstream schedule) → [n, d] float32 grid."""
    d, n = recipe.d, recipe.n
    gen = torch.Generator().manual_seed(seed)
    a, b = 4 * n ** (1 / d), math.pi**2 * n ** (-2 / d)
    grid = torch.randn(n, d, generator=gen)
    means = grid
    for step in trange(recipe.steps, desc=recipe.name, leave=False):
        x = torch.randn(recipe.samples, d, generator=gen)
        means = cell_means(x, nearest(x, grid), grid)
        gamma = gamma0 * a / (a + gamma0 * b * step)
        grid = grid + gamma * (means - grid)
    return canonical_order(means)


def canonical_order(grid: torch.Tensor) -> torch.Tensor:
    """Sort points lexicographically (first coordinate first) so files are stable and readable."""
    g = grid.numpy()
    order = np.lexsort(g.T[::-1])
    return torch.from_numpy(np.ascontiguousarray(g[order]))


def make_grid(recipe: GridRecipe, out_dir: Path, base_seed: int) -> dict:
    """Build, measure and save one grid; return its grids.json record."""
    seed = base_seed * 1_000_003 + 1000 * recipe.d + recipe.n
    eval_seed = seed + 7_777_777
    t0 = time.perf_counter()
    grid = build_grid(recipe, seed)
    build_s = time.perf_counter() - t0
    mse = mse_per_coord(grid, EVAL_SAMPLES, eval_seed)
    np.save(out_dir / f"{recipe.name}.npy", grid.numpy().astype(np.float32))
    bits = recipe.bits_per_coord
    return {
        **asdict(recipe),
        "bits_per_coord": bits,
        "mse_per_coord": mse,
        "eval_samples": EVAL_SAMPLES,
        "seed": seed,
        "eval_seed": eval_seed,
        "method": "stochastic Lloyd / CLVQ, fresh batch per step, upstream step schedule, gamma0=2",
        "lloyd_max_scalar_mse": LLOYD_MAX_MSE.get(int(bits)) if bits == int(bits) else None,
        "shannon_bound_mse": 2.0 ** (-2 * bits),
        "build_seconds": round(build_s, 1),
    }


PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "data" / "higgs_grids"


def measure_published(out_dir: Path = PUBLISHED_DIR, seed: int = 7778793) -> dict:
    """MSE per coordinate of every published grid (10^6 samples, seed fixed) → measured.json."""
    records = {}
    for path in sorted(out_dir.glob("EDEN*.pt")):
        grid = torch.load(path, weights_only=True, map_location="cpu").float()
        n, d = grid.shape
        bits = math.log2(n) / d
        records[path.stem] = {
            "d": d,
            "n": n,
            "bits_per_coord": bits,
            "mse_per_coord": mse_per_coord(grid, EVAL_SAMPLES, seed + 1000 * d + n),
            "eval_samples": EVAL_SAMPLES,
            "eval_seed": seed + 1000 * d + n,
            "source": "yandex-research/context-intensive-kv-offloading@721b2d1 (Apache-2.0)",
            "shannon_bound_mse": 2.0 ** (-2 * bits),
        }
        print(f"{path.stem} (published): {bits:.3g} bit/coord, MSE {records[path.stem]['mse_per_coord']:.5f}")
    (out_dir / "measured.json").write_text(json.dumps(records, indent=2) + "\n")
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the .npy files and grids.json"
    )
    parser.add_argument("--only", nargs="*", default=None, help="grid names to build, e.g. EDEN4-256")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--measure-published", action="store_true", help="measure the study's grids' MSE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_published:
        measure_published()
        return
    recipes = [r for r in RECIPES if args.only is None or r.name in args.only]
    unknown = set(args.only or ()) - {r.name for r in RECIPES}
    if unknown:
        raise SystemExit(f"unknown grid(s) {sorted(unknown)}; known: {[r.name for r in RECIPES]}")
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "grids.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for recipe in recipes:
        record = make_grid(recipe, args.out, args.seed)
        index[recipe.name] = record
        print(
            f"{recipe.name}: {record['bits_per_coord']:.3g} bit/coord, MSE {record['mse_per_coord']:.5f} "
            f"({record['build_seconds']} s)"
        )
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
