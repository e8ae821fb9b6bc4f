"""Execute every notebook (py:percent sources paired by jupytext) on small inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def outputs_text(notebook) -> str:
    """Every stream, error and text/plain output of the executed notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
            parts.extend(output.get("traceback", []))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    import jupytext
    from nbclient import NotebookClient

    monkeypatch.setenv("KVDIAG_NB_TOKENS", "512")
    monkeypatch.setenv("KVDIAG_NB_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(path)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = outputs_text(notebook)
    if importlib.util.find_spec("ipywidgets") is not None:  # the notebooks extra installs it
        assert "IProgress not found" not in text, "tqdm.auto found no ipywidgets in the kernel"
    if path.stem.startswith("03"):
        assert "REFERENCE RESULTS from" in text  # the reference scores are loaded and labelled as such
