"""The `kvdiag` command line, in process: outputs of a run, redrawing, and one-line errors that leave
nothing behind in --out."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.models import known_models

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

TEXT = (
    "Record R-0012: Priya Sato (beekeeper, Hobart) - 17 sextants, filed 1999. Weather delayed two shipments."
)
FIGURES = sorted(f"{name}.{ext}" for name in ("energy_vs_rank", "rank95_heatmap", "lowrank_damage")
                 for ext in ("png", "pdf"))  # fmt: skip
TABLES = {
    "spectrum": ["layer", "kv_head", "stage", "index", "singular_value", "energy"],
    "spectrum_summary": "layer kv_head stage centered n_tokens dim rank90 rank95 rank99 effective_rank".split(),
    "lowrank_damage": (
        "layer kv_head rank rank_fraction is_shadowkv_rank channels top_k n_queries logit_rel_error "
        "topk_recall output_rel_error"
    ).split(),
}


def kvdiag_cli(*args, env=None):
    runner = CliRunner()
    return runner.invoke(kvdiag.cli.app, [str(a) for a in args], env={"KVDIAG_DEBUG": None, **(env or {})})


def spectrum(out, *args):
    return kvdiag_cli("spectrum", "--model", "tiny-llama", "--out", out, *args)


def n_byte_tokens(text: str) -> int:
    """The tiny models' byte tokenizer: one token per UTF-8 byte, plus <bos>."""
    return len(text.encode("utf-8")) + 1


def check_run(out, layers, n_tokens, model="tiny-llama"):
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["figures", "manifest.json", "prompt.txt", *(f"{t}.parquet" for t in TABLES)]
    )
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    for name, columns in TABLES.items():
        table = pd.read_parquet(out / f"{name}.parquet")
        assert list(table.columns) == columns, name
        assert sorted(table.layer.unique()) == layers, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "spectrum"
    assert manifest["config"]["model"] == model
    assert manifest["config"]["n_tokens"] == n_tokens
    assert manifest["config"]["layers"] == layers
    assert manifest["versions"]["torch"] == torch.__version__
    summary = pd.read_parquet(out / "spectrum_summary.parquet")
    assert (summary.n_tokens == n_tokens).all()
    return manifest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = spectrum(out, "--text", TEXT)
    assert result.exit_code == 0, result.output
    assert f"{n_byte_tokens(TEXT)} tokens" in result.stdout
    return out


def test_spectrum_writes_tables_manifest_and_figures(run_dir):
    manifest = check_run(run_dir, [0, 1, 2, 3], n_byte_tokens(TEXT))
    assert manifest["config"]["prompt_source"] == "--text"
    assert not manifest["config"]["chat"]
    assert (run_dir / "figures" / "energy_vs_rank.pdf").read_bytes().startswith(b"%PDF")
    assert (run_dir / "figures" / "energy_vs_rank.png").read_bytes().startswith(b"\x89PNG")


def test_plot_redraws_the_figures_byte_stably(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "figures")
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    first = kvdiag_cli("plot", copy, env=env)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in (copy / "figures").iterdir()) == FIGURES
    drawn = {p.name: p.read_bytes() for p in (copy / "figures").glob("*")}
    second = kvdiag_cli("plot", copy, env=env)
    assert second.exit_code == 0, second.output
    for name, data in drawn.items():
        assert (copy / "figures" / name).read_bytes() == data, f"{name} changed between two redraws"


def test_layers_max_tokens_and_prompt_file(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT * 3, encoding="utf-8")
    out = tmp_path / "run"
    result = spectrum(out, "--prompt-file", prompt, "--layers", "0,2", "--max-tokens", 50, "--queries", 8)
    assert result.exit_code == 0, result.output
    manifest = check_run(out, [0, 2], 50)
    assert manifest["config"]["prompt_source"] == str(prompt)
    assert manifest["config"]["max_tokens"] == 50
    assert (pd.read_parquet(out / "lowrank_damage.parquet").n_queries == 8).all()


def test_chat_wraps_the_prompt_in_the_template(tmp_path):
    out = tmp_path / "run"
    result = spectrum(out, "--text", "Which city?", "--chat", "--layers", "-1")
    assert result.exit_code == 0, result.output
    rendered = "<|user|>\nWhich city?\n<|assistant|>\n"  # the tiny models' template, by hand (no <bos>)
    manifest = check_run(out, [3], len(rendered.encode("utf-8")))
    assert manifest["config"]["chat"] is True


def test_env_and_models():
    env = kvdiag_cli("env")
    assert env.exit_code == 0, env.output
    assert f"torch         {torch.__version__}" in env.stdout
    assert env.stdout.startswith("kvdiag")
    models = kvdiag_cli("models")
    assert models.exit_code == 0, models.output
    lines = models.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "arch", "layers"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == known_models()
    assert rows["tiny-llama"][1:8] == ["llama", "4", "4", "2", "16", "2048", "yes"]
    assert rows["tiny-gemma3"][1:8] == ["gemma3", "4", "4", "1", "16", "2048", "yes"]
    assert rows["smollm2-135m"][1:7] == ["llama", "30", "9", "3", "64", "8192"]


def test_known_lists_end_their_sentence():
    result = spectrum("unused", "--text", TEXT, "--model", "bert")
    line = result.stderr.strip()
    assert line.endswith(", tiny-qwen3."), line  # not "... 'bert' Known: ..." running on
    assert "'bert'. Known: " in line


def test_models_as_json():
    result = kvdiag_cli("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == known_models()
    assert (rows["tiny-llama"]["layers"], rows["tiny-llama"]["kv_heads"], rows["tiny-llama"]["head_dim"]) == (
        4,
        2,
        16,
    )
    assert rows["smollm2-135m"]["context_length"] == 8192 and rows["tiny-gemma3"]["architecture"] == "gemma3"


def test_a_prompt_file_in_another_encoding_reads_with_encoding(tmp_path):
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("Café, crème brûlée et façade.".encode("latin-1"))
    result = spectrum(tmp_path / "run", "--prompt-file", prompt, "--encoding", "latin-1", "--layers", "0")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "prompt.txt").read_text(encoding="utf-8") == "Café, crème brûlée et façade."
    n_utf8 = len("Café, crème brûlée et façade.".encode()) + 1  # the byte tokenizer sees UTF-8 text
    check_run(tmp_path / "run", [0], n_utf8)


def test_the_built_in_text_is_cut_to_the_tiny_models_context(tmp_path, caplog):
    result = spectrum(tmp_path / "run", "--layers=-1")  # documented: -1 is the last layer
    assert result.exit_code == 0, result.output
    assert "layers 3," in result.stdout  # -1 is the last of layers 0..3
    text = (tmp_path / "run" / "prompt.txt").read_text(encoding="utf-8")
    assert text.startswith("The Northern Instrument Cooperative") and text.rstrip().endswith(
        "the number of items they registered."
    )  # whole records, and the question kept
    n_tokens = n_byte_tokens(text)
    assert 1500 < n_tokens <= 2048
    check_run(tmp_path / "run", [3], n_tokens)
    assert "using its first" in caplog.text and "records" in caplog.text


def test_help_shows_examples():
    result = kvdiag_cli("spectrum", "--help")
    assert result.exit_code == 0
    assert "kvdiag spectrum --out runs/smol" in result.stdout


# --------------------------------------------------------------------------- errors

ERRORS = {  # case: (arguments, what the one-line error must say)
    "unknown_layer": (
        ["--text", TEXT, "--layers", "0,99"],
        "layer index 99 is out of range; the model has layers 0..3",
    ),
    "bad_layers": (["--text", TEXT, "--layers", "first"], "is not 'all' or a comma-separated list"),
    "empty_prompt": (["--text", "   "], "the prompt is empty"),
    "over_context": (
        ["--text", "a" * 2048],
        "the prompt has 2049 tokens, more than the model's context of 2048",
    ),
    "cuda": (["--text", TEXT, "--device", "cuda"], "device 'cuda' requested but no CUDA GPU is available"),
    "unknown_model": (["--text", TEXT, "--model", "smollm"], "did you mean 'smollm2-135m'?"),
    "text_and_file": (["--text", TEXT, "--prompt-file", "{tmp}/p.txt"], "either --prompt-file or --text"),
    "missing_file": (["--prompt-file", "{tmp}/nowhere.txt"], "nowhere.txt does not exist"),
    "max_tokens_0": (["--text", TEXT, "--max-tokens", "0"], "--max-tokens 0 must be ≥ 1"),
    "queries_0": (["--text", TEXT, "--queries", "0"], "--queries 0 must be ≥ 1"),
    "bad_dtype": (["--text", TEXT, "--dtype", "float8"], "unknown dtype 'float8'"),
    "negative_layer": (
        ["--text", TEXT, "--layers", "-5"],
        "layer index -5 is out of range; the model has layers 0..3 (or -4..-1 counted from the end)",
    ),
    "no_close_model": (["--text", TEXT, "--model", "bert"], "unknown model 'bert'. Known: gemma3-270m, "),
    "not_utf8": (
        ["--prompt-file", "{tmp}/latin1.txt"],
        "latin1.txt is not valid utf-8: byte 0xe9 at offset 3 (line 1) cannot be decoded; pass --encoding",
    ),
    "unknown_encoding": (
        ["--prompt-file", "{tmp}/p.txt", "--encoding", "klingon"],
        "--encoding 'klingon' is not",
    ),
    "missing_trace": (["--trace", "{tmp}/nowhere"], "nowhere holds no complete trace"),
    "trace_and_text": (["--trace", "{tmp}/nowhere", "--text", TEXT], "--text cannot change it: drop them"),
}


def check_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvdiag: error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("out_exists", [False, True], ids=["new_out", "existing_out"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_leaves_nothing(case, out_exists, tmp_path):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    args, message = ERRORS[case]
    (tmp_path / "p.txt").write_text(TEXT)
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "unknown_model":  # without the helper's --model tiny-llama
        result = kvdiag_cli("spectrum", "--out", out, *args)
    else:
        result = spectrum(out, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    check_one_line_error(result, message)
    if out_exists:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_out(where, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "run" if where == "under_a_file" else blocker
    result = spectrum(out, "--text", TEXT)
    check_one_line_error(result, f"--out {out} is not a writable directory")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_plot_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    check_one_line_error(kvdiag_cli("plot", tmp_path), "has no manifest.json")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    check_one_line_error(kvdiag_cli("plot", tmp_path / "missing"), "missing does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "spectrum"}))
    check_one_line_error(kvdiag_cli("plot", tmp_path), "is not a spectrum run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]


def test_failed_run_leaves_no_parent_directories(tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    check_one_line_error(spectrum(out, "--text", TEXT, "--layers", "99"), "layer index 99 is out of range")
    assert not (tmp_path / "new").exists(), sorted(str(p) for p in (tmp_path / "new").rglob("*"))


def test_max_tokens_hint_of_the_context_error_works(tmp_path):
    out = tmp_path / "run"
    result = spectrum(out, "--text", "a" * 2048, "--max-tokens", 2048, "--layers", "3", "--center")
    assert result.exit_code == 0, result.output
    manifest = check_run(out, [3], 2048)
    assert manifest["config"]["centered"] is True
    assert pd.read_parquet(out / "spectrum_summary.parquet").centered.all()
