"""Figures drawn from saved tables (never from live state), so `kvdiag plot RUN_DIR` redraws them.

Every figure is saved as PNG (dpi 200) and PDF (byte-stable: no creation date; set
SOURCE_DATE_EPOCH for other metadata) under RUN_DIR/figures/. One module per kind of run:
`plots.spectrum`, `plots.recall`, `plots.eval`, `plots.heads`; `plot_run` dispatches on the manifest's command.
"""

from __future__ import annotations

import contextlib
from importlib.resources import files
from pathlib import Path

from kvdiag.errors import KvdiagError


@contextlib.contextmanager
def style():
    """kvdiag's packaged matplotlib style."""
    import matplotlib.pyplot as plt

    with plt.style.context(str(files("kvdiag").joinpath("kvdiag.mplstyle"))):
        yield


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Save `fig` as name.png and name.pdf in out_dir (atomically) and close it."""
    import matplotlib.pyplot as plt

    from kvdiag.runs import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        import io

        buffer = io.BytesIO()
        metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(buffer, format=ext, metadata=metadata)
        path = out_dir / f"{name}.{ext}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def run_manifest(run_dir: Path) -> dict:
    """The manifest of a run directory ({} when there is none; a damaged one is a clear error)."""
    from kvdiag.runs import holds_run, read_manifest

    return read_manifest(run_dir) if holds_run(run_dir) else {}


def run_config(run_dir: Path) -> dict:
    """The `config` of a run directory's manifest ({} when there is none), for figure titles."""
    return run_manifest(run_dir).get("config", {})


# run kind (manifest "command") -> "module:function" drawing that run's figures from its tables
PLOTTERS = {
    "spectrum": "kvdiag.plots.spectrum:plot_spectrum_run",
    "recall": "kvdiag.plots.recall:plot_recall_run",
    "eval": "kvdiag.plots.eval:plot_eval_run",
    "heads": "kvdiag.plots.heads:plot_heads_run",
    "reproduce": "kvdiag.plots:plot_reproduce_run",
    "bench": "kvdiag.plots.bench:plot_bench_run",
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Redraw the figures of any kvdiag run directory (the kind is read from its manifest)."""
    from kvdiag.runs import read_manifest

    run_dir = Path(run_dir)
    command = read_manifest(run_dir)["command"]
    if command not in PLOTTERS:
        raise KvdiagError(f"no figures known for runs of {command!r}; known: {', '.join(PLOTTERS)}")
    import importlib

    module, function = PLOTTERS[command].split(":")
    return getattr(importlib.import_module(module), function)(run_dir)


def plot_reproduce_run(run_dir: str | Path) -> list[Path]:
    """Redraw the figures of every stage of a `kvdiag reproduce` run from their tables (`kvdiag plot
    DIR`). The report's study-scores figure is redrawn by running `kvdiag reproduce` again with the
    same options: every finished stage is reused, only the report is rewritten."""
    stages = sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and (p / "manifest.json").exists())
    if not stages:
        raise KvdiagError(f"{run_dir} holds no finished stage of a reproduce run")
    return [path for stage in stages for path in plot_run(stage)]
