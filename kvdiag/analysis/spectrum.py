"""Key rank spectra: how low-rank are the keys that offloading methods project?

For each captured layer and stage (pre-RoPE, post-RoPE), singular values of
- the joint key matrix [L, H_kv·d] (all KV heads side by side: ShadowKV's SVD), kv_head = −1;
- each KV head's key matrix [L, d], kv_head = 0..H_kv−1.
Uncentred by default (as ShadowKV factorises raw keys); `center=True` subtracts the column mean.

Outputs are tidy tables:
- spectrum: layer, kv_head, stage, index, singular_value, energy — energy is the cumulative share
  of squared singular values up to and including `index` (0-based);
- summary: ranks needed for 90 / 95 / 99 % energy and the effective rank
  exp(H(p)), p_i = σ_i / Σσ (Roy & Vetterli, 2007).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.errors import KvdiagError

STAGES = {"pre_rope": "k_pre", "post_rope": "k_post"}
ENERGY_LEVELS = (0.90, 0.95, 0.99)


def singular_values(matrix: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Singular values (descending) of a [rows, cols] matrix, in float64 on CPU, float32 on GPU."""
    x = matrix.double() if matrix.device.type == "cpu" else matrix.float()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(x)


def cumulative_energy(sv: np.ndarray) -> np.ndarray:
    """Cumulative fraction of squared singular values; ends at exactly 1."""
    power = np.asarray(sv, dtype=np.float64) ** 2
    total = power.sum()
    if total == 0:
        return np.ones_like(power)
    energy = np.cumsum(power) / total
    energy[-1] = 1.0
    return energy


def rank_for_energy(energy: np.ndarray, level: float) -> int:
    """Smallest r such that the top r singular values hold at least `level` of the energy."""
    return int(np.searchsorted(energy, level - 1e-12) + 1)


def effective_rank(sv: np.ndarray) -> float:
    """exp of the Shannon entropy of the normalised singular values (Roy & Vetterli, 2007)."""
    sv = np.asarray(sv, dtype=np.float64)
    p = sv / sv.sum() if sv.sum() > 0 else np.ones_like(sv) / len(sv)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def key_matrices(keys: torch.Tensor):
    """Yield (kv_head, matrix) for keys [H_kv, L, d]: −1 → joint [L, H_kv·d], then each head [L, d]."""
    h_kv, length, d = keys.shape
    yield -1, keys.transpose(0, 1).reshape(length, h_kv * d)
    for h in range(h_kv):
        yield h, keys[h]


def key_spectrum(trace, layers=None, center: bool = False, progress: bool = True):
    """Spectra of every captured layer. Returns (spectrum, summary) pandas DataFrames."""
    layers = trace.layers if layers is None else layers
    rows, summary = [], []
    for layer in tqdm(layers, desc="spectrum", unit="layer", disable=not progress):
        for stage, name in STAGES.items():
            keys = trace.get(layer, name)
            for kv_head, matrix in key_matrices(keys):
                sv = singular_values(matrix, center).cpu().numpy()
                energy = cumulative_energy(sv)
                rows.append(pd.DataFrame({
                    "layer": layer, "kv_head": kv_head, "stage": stage, "index": np.arange(len(sv)),
                    "singular_value": sv, "energy": energy,
                }))  # fmt: skip
                summary.append({
                    "layer": layer, "kv_head": kv_head, "stage": stage, "centered": center,
                    "n_tokens": matrix.shape[0], "dim": matrix.shape[1],
                    **{f"rank{round(level * 100)}": rank_for_energy(energy, level) for level in ENERGY_LEVELS},
                    "effective_rank": effective_rank(sv),
                })  # fmt: skip
    return pd.concat(rows, ignore_index=True), pd.DataFrame(summary)


def run_spectrum(
    model: str | None,
    out,
    prompt: str | None = None,
    prompt_file=None,
    layers="all",
    device: str | None = "cpu",
    dtype=None,
    max_tokens: int | None = None,
    chat: bool = False,
    n_queries: int = 64,
    center: bool = False,
    *,
    encoding: str = "utf-8",
    trace=None,
    save_trace: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """The `kvdiag spectrum` pipeline: load, capture, spectra, low-rank damage, tables, manifest
    (figures: `kvdiag.plots.plot_run(out)`, as the command does).

    model: a model spec (None: the default model, or the trace's with `trace`); prompt / prompt_file
    (decoded with `encoding`): the text, else the built-in sample sized to the model's context;
    trace: a directory saved with --save-trace to analyse instead of capturing (no model is loaded);
    save_trace: also write the capture to `out`/trace; overwrite: replace a run already in `out`
    (`kvdiag.runs.claim_run_dir`). Inputs are validated before any heavy work; results are staged
    and moved into `out` only when everything succeeded; the analysed text is kept as prompt.txt.
    Returns {"out", "tables", "n_tokens", "layers", "seconds"}.
    """
    import time

    from kvdiag.analysis.lowrank import lowrank_damage
    from kvdiag.capture import capture_prompt, resolve_layers
    from kvdiag.capture.trace import load_saved_trace
    from kvdiag.capture.trace import trace_dir as trace_dir_of
    from kvdiag.models import DEFAULT_MODEL, load_model, resolve_device
    from kvdiag.models.adapter import config_shapes
    from kvdiag.models.prompts import builtin_prompt, read_prompt, tokenize_prompt
    from kvdiag.runs import atomic_write_bytes, staged_run_dir, write_manifest, write_table

    start = time.perf_counter()
    device = resolve_device(device)
    if trace is not None:
        given = [name for name, value in (("--text", prompt), ("--prompt-file", prompt_file),
                 ("--max-tokens", max_tokens), ("--chat", chat or None)) if value is not None]  # fmt: skip
        if given:
            raise KvdiagError(
                f"--trace analyses a saved capture; {', '.join(given)} cannot change it: drop them"
            )
        text = None
    else:
        text = read_prompt(prompt_file, prompt, encoding)
    if n_queries < 1:
        raise KvdiagError(f"--queries {n_queries} must be ≥ 1")
    with staged_run_dir(out, "spectrum", overwrite=overwrite) as stage:
        if trace is not None:
            trace_dir = trace
            trace, model, chosen = load_saved_trace(trace_dir, model, layers, device)
            source = f"trace {trace_dir}"
        else:
            model = model or DEFAULT_MODEL
            net, tokenizer = load_model(model, device=device, dtype=dtype)
            chosen = resolve_layers(layers, config_shapes(net.config)["layers"])
            source = str(prompt_file) if prompt_file else ("--text" if prompt else "built-in sample")
            text = builtin_prompt(tokenizer, net, chat) if text is None else text
            input_ids = tokenize_prompt(tokenizer, text, model=net, chat=chat, max_tokens=max_tokens)
            trace = capture_prompt(net, tokenizer, text, input_ids=input_ids, layers=chosen)
            atomic_write_bytes(stage / "prompt.txt", text.encode("utf-8"))
            if save_trace:
                trace.save(stage / "trace")
        spectrum, summary = key_spectrum(trace, layers=chosen, center=center, progress=progress)
        damage = lowrank_damage(trace, layers=chosen, n_queries=n_queries, progress=progress)
        tables = {"spectrum": spectrum, "spectrum_summary": summary, "lowrank_damage": damage}
        for name, table in tables.items():
            write_table(table, stage / f"{name}.parquet")
        config = {
            "model": model, "layers": chosen, "device": device, "dtype": trace.meta["dtype"],
            "n_tokens": trace.n_tokens, "max_tokens": max_tokens, "chat": chat, "queries": n_queries,
            "centered": center, "prompt_sha256": trace.meta.get("prompt_sha256"), "prompt_source": source,
        }  # fmt: skip
        extra = {"shapes": trace.meta["shapes"], "trace_saved": save_trace}
        if source.startswith("trace "):
            extra["trace"] = str(trace_dir_of(trace_dir).expanduser().absolute())
        write_manifest(stage, "spectrum", config, extra)
    out = Path(out).expanduser()
    return {
        "out": out,
        "tables": [out / f"{name}.parquet" for name in tables],
        "n_tokens": trace.n_tokens,
        "layers": chosen,
        "seconds": time.perf_counter() - start,
    }
