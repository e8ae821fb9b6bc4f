"""The README matches the code: every command and flag in its command table exists, and its Python
snippets use every import and run (on a tiny model) with the simulator actually fetching tokens."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvdiag.cli

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
ROWS = re.findall(r"^\| `kvdiag (\w+)([^`]*)` \|", README, re.M)
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def options(command: str) -> set[str]:
    """Every long option of a command, from the click command typer builds (not from wrapped help)."""
    import typer.main

    group = typer.main.get_command(kvdiag.cli.app)
    params = group.commands[command].params
    return {opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")} - {"--help"}


def test_the_command_table_lists_every_command_and_only_real_flags():
    listed = [name for name, _ in ROWS]
    app = kvdiag.cli.app
    registered = sorted([c.name for c in app.registered_commands] + [g.name for g in app.registered_groups])
    assert sorted(listed) == registered
    for name, usage in ROWS:
        known = options(name)
        for flag in set(re.findall(r"--[a-z][a-z0-9-]*", usage)):
            assert flag in known, f"README lists `kvdiag {name} {flag}`, which the command does not take"


def test_every_spectrum_flag_is_in_the_readme():
    missing = options("spectrum") - set(re.findall(r"--[a-z][a-z0-9-]*", dict(ROWS)["spectrum"]))
    assert not missing, missing


def test_the_snippets_use_every_import():
    code = "\n".join(SNIPPETS)
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff not installed next to this python")
    check = subprocess.run([str(ruff), "check", "--select", "F401,F811,F821", "--stdin-filename", "readme.py", "-"],
                           input=code, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout


@pytest.mark.slow
def test_the_api_snippet_runs_and_the_simulator_fetches(monkeypatch):
    code = "\n".join(SNIPPETS).replace('"smollm2-135m"', '"tiny-llama"')
    code = re.sub(r"\b(k_pre|layer_kv|q|layer_need)\(5\)", r"\1(1)", code)  # tiny-llama has 4 layers
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    stats = namespace["sim"].stats()
    assert stats["budget_tokens"] == 64 and stats["fetched_tokens_per_step_layer"] > 0, stats
    assert namespace["trace"].n_tokens == 2048
    assert set(namespace["table"].method) == {"oracle", "shadowkv", "yakv"}
