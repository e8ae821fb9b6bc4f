# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The offload runtime: the payload in host memory, what a step reads, what it costs
#
# The accuracy simulator (`engine="simulator"`) answers *what* a method loses: attention sees the
# method's selection over a dense view of the prompt. The offload runtime (`engine="runtime"`)
# decodes the way a real system does: the method's **resident** state (landmarks, factors, page
# digests, the tokens it keeps exact) on the GPU, its **offloaded** payload (K/V rows in the
# method's storage format) in host memory, and the prompt's K/V *not* in the GPU cache. Each step
# scores, picks the top-k, fetches the chosen rows and attends.
#
# Both run the same `Method` objects, so in fp32 they must generate the same tokens; here we check
# it on a batch of prompts of different lengths, then look at what the runtime keeps where.

# %%
import pandas as pd
import torch

from kvdiag.methods import get_method
from kvdiag.models import load_model
from kvdiag.models.prompts import sample_text
from kvdiag.offload.decode import greedy_decode, prefill_prompt

MODEL = "smollm2-135m"
model, tokenizer = load_model(MODEL)
text = sample_text(n_records=40)
prompts = [text[:1500], text[:2200], text[:1800]]  # three prompts of different lengths
prefills = [prefill_prompt(model, tokenizer(p, return_tensors="pt").input_ids) for p in prompts]
print("prompt tokens (indexed):", [p.n_tokens for p in prefills])

# %% [markdown]
# YAKV's GPU-runtime variant (`rule="mean_query"`: the query averaged over its GQA group, fp8 K/V
# in host memory, 2-bit HIGGS landmarks on the GPU) and ShadowKV, at the study's budgets, through
# both engines. One prefill per prompt is shared by every decode.

# %%
runs = {
    "yakv runtime variant @3.125 %": (get_method("yakv", rule="mean_query"), 0.03125),
    "shadowkv @12.5 %": (get_method("shadowkv", outlier_chunks=2), 0.125),
}
rows = []
for name, (method, budget) in runs.items():
    sim = greedy_decode(model, prefills, 12, [], method=method, budget=budget, keep_logits=True)
    rt = greedy_decode(model, prefills, 12, [], method=method, budget=budget, keep_logits=True,
                       engine="runtime")  # fmt: skip
    for b in range(len(prefills)):
        rows.append({
            "method": name, "prompt": b, "same tokens": torch.equal(sim.tokens[b], rt.tokens[b]),
            "max |Δ logit|": float((sim.logits[b] - rt.logits[b]).abs().max()),
            "fetched bytes / step·layer": rt.stats[b]["fetched_bytes_per_step_layer"],
            "resident bytes / token·layer": rt.stats[b]["resident_bytes_per_token_layer"],
        })  # fmt: skip
pd.DataFrame(rows)

# %% [markdown]
# Same tokens, logits equal to float32 round-off: the runtime and the simulator make the same
# selection from the same resident state. What differs is where the bytes are. The runtime's
# state for one layer shows it: the resident tensors (and their bytes as stored), the host payload.

# %%
from kvdiag.offload.runtime import offload

method = get_method("yakv", rule="mean_query")
with offload(model, method, 0.03125, [p.trace for p in prefills]) as rt:
    layer = rt.layer(5, "cpu")
built = layer.builts[0]
print("resident:", {k: f"{v:,} B" for k, v in built.resident_breakdown().items()})
print("offloaded (host):", {k: f"{v.nbytes:,} B {v.spec}" for k, v in built.offloaded.items()})
exact = 2 * built.n_kv_heads * built.head_dim * 2 * built.n_tokens  # bf16 K and V of the prompt
print(f"GPU bytes per layer: {built.resident_bytes:,} vs {exact:,} for bf16 K+V "
      f"({built.resident_bytes / exact:.1%})")  # fmt: skip

# %% [markdown]
# On a GPU the runtime runs YAKV's runtime variant and ShadowKV as five Triton launches per layer
# and step (`kvdiag.offload.fast`); `kvdiag bench --out DIR` times that step against its floor
# (resident bytes / HBM + fetched bytes / the host link), full attention and the plain PyTorch
# path. The H200 numbers are in `kvdiag/bench/NOTES.md` and `figures/bench/`:

# %%
from pathlib import Path

import kvdiag

bench = (
    Path(kvdiag.__file__).resolve().parents[1] / "figures" / "bench" / "bench.parquet"
)  # in a source checkout
if bench.exists():
    table = pd.read_parquet(bench)
    steps = table[table.kind.isin(["step", "floor", "sdpa_full", "torch_path"])]
    display(steps.pivot_table(index=["method", "L", "B"], columns="kind", values="median_us").round(1))  # noqa: F821

# %% [markdown]
# Long prompts: a prefill that keeps no prompt queries and leaves the K/V in host memory
# (`queries=False, store_device="cpu"`) is what the runtime needs for every method that does not
# calibrate on prompt queries; the GPU then holds only what each method keeps resident. The
# decode is the same as from the full prefill. `kvdiag bench --parts e2e` decodes a whole
# random-weight model with Llama-3.1-8B's configuration this way (tokens/s, peak GPU memory,
# the largest batch at 128K, against full attention).

# %%
lean = [prefill_prompt(model, tokenizer(p, return_tensors="pt").input_ids, queries=False, store_device="cpu")
        for p in prompts]  # fmt: skip
yakv = get_method("yakv", local=8)
from_lean = greedy_decode(model, lean, 12, [], method=yakv, budget=0.25, engine="runtime")
from_full = greedy_decode(model, prefills, 12, [], method=yakv, budget=0.25, engine="runtime")
print(
    "same tokens from the lean prefill:",
    all(torch.equal(a, b) for a, b in zip(from_lean.tokens, from_full.tokens)),
)
