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
# # 05 · Per-head context intensity: how many tokens does each head need?
#
# Offloading methods give every layer and KV head the same token budget. Heads differ: some read a
# handful of tokens, some spread their attention over hundreds. This notebook measures, for every
# layer × KV head, the fewest context tokens that hold 50 / 90 / 99 % of the exact attention mass,
# on Text2JSON (context-intensive) and on a single needle (the low-intensity control), and turns
# the measured need into head-wise budgets.
#
# Definitions (`kvdiag.analysis.heads`): the queries are the gold answer's tokens under teacher
# forcing (the prompt is the context, of length L0; the answer plays the generated tail). For each
# query head, the context's attention weights are renormalised to sum to 1 and sorted; its need at
# τ is the shortest prefix that reaches τ. A KV head serves G query heads, so what it must hold is
# the **union** of their top sets ("union"); "head" is the mean of the query heads' own needs.
#
# CPU only, offline default model `smollm2-135m`. `KVDIAG_NB_TOKENS` sets the prompt length
# (CI: 512), `KVDIAG_NB_OUT` where the run directory goes.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from kvdiag.analysis.heads import allocate_budget, load_calibration, tokens_to_cover
from kvdiag.eval.heads import run_heads
from kvdiag.plots import style
from kvdiag.plots.heads import need_comparison, need_heatmap

MODEL = "smollm2-135m"
TOKENS = int(os.environ.get("KVDIAG_NB_TOKENS", "1500"))
OUT = Path(os.environ.get("KVDIAG_NB_OUT", "runs")) / "nb05_heads"
N = 1 if TOKENS <= 768 else 2

# %% [markdown]
# ## 1. The need of an attention pattern, by hand
# All mass on one token needs 1 token at every τ; uniform attention over L0 tokens needs ⌈τ·L0⌉;
# weights 0.5, 0.3, 0.1, 0.1 need 1 token for half the mass, 3 for 90 % and all 4 for 99 %.

# %%
taus = (0.5, 0.9, 0.99)
print("one token:", tokens_to_cover(torch.eye(8)[3], taus).tolist())
print("uniform over 37:", tokens_to_cover(torch.ones(37), taus).tolist(), "= ⌈τ·37⌉ = [19, 34, 37]")
print(
    "0.5 0.3 0.1 0.1:",
    tokens_to_cover(torch.tensor([0.1, 0.5, 0.1, 0.3], dtype=torch.float64), taus).tolist(),
)

# %% [markdown]
# ## 2. Text2JSON vs a needle on the default model
# `run_heads` is what `kvdiag heads` runs: N Text2JSON samples and N needle samples of the same
# length, each prefilled once with its gold answer appended, every layer captured. It writes
# `heads.parquet` (one row per task × sample × layer × KV head × τ × measure, with mean / std /
# min / median / max over the answer's tokens, in tokens and as a share of L0), the calibration
# `heads_calibration.json` and `manifest.json`.

# %%
result = run_heads(MODEL, OUT, task="text2json", n=N, target_tokens=TOKENS, progress=False)
table = result["summary"]
print(pd.DataFrame(result["inputs"])[["task", "sample", "n_context", "n_queries"]])
at_90 = table[table.tau == 0.9]
at_90.groupby(["task", "measure"])[["tokens_median", "fraction_median", "context_mass_mean"]].median()

# %% [markdown]
# The median over layers × KV heads of each head's median need, per τ: how much of the context a
# typical head reads on each task. `context_mass_mean` is the share of a query's attention that
# falls on the context at all (the rest goes to the answer tokens before it).

# %%
union = table[table.measure == "union"]
union.pivot_table(index="tau", columns="task", values="fraction_median", aggfunc="median").map(
    lambda x: f"{100 * x:.2f} %"
)

# %% [markdown]
# ## 3. Where the need sits: layer × KV head
# Log colours: a cell is the share of L0 that head needs for 90 % of its context attention (the
# median over the answer's tokens, mean over samples).

# %%
title = f"{MODEL}, L0 ≈ {table.n_context.mean():.0f}"
with style():
    need_heatmap(table, 0.9, title)
plt.show()

# %%
with style():
    need_comparison(table, 0.9, title)
plt.show()

# %% [markdown]
# ## 4. What GQA costs: the group's union vs one query head
# A KV head must hold what any of its G query heads reads. Where they read different tokens the
# union is up to G times one head's need; where they agree it is no larger.

# %%
wide = table[table.tau == 0.9].pivot_table(
    index=["task", "layer", "kv_head"], columns="measure", values="tokens_median"
)
ratio = (wide["union"] / wide["head"]).groupby("task").describe()[["mean", "min", "50%", "max"]]
ratio

# %% [markdown]
# ## 5. From need to budgets
# `heads_calibration.json` keeps the Text2JSON need per layer × KV head (τ = 0.9, median union
# need, as a share of L0). `allocate_budget` splits a layer's token budget across its KV heads in
# proportion to it, summing exactly to the budget (largest-remainder rounding), with a floor per
# head: what the `headwise` wrapper method will do with the base method's budget. Here a budget of
# 3.125 % of the context per KV head (YAKV's), 3 KV heads per layer.

# %%
calibration = load_calibration(result["calibration"])
n_context = int(table.n_context.median())
per_head = int(np.ceil(0.03125 * n_context))
rows = []
for layer in sorted(calibration.need)[::5]:
    need = calibration.layer_need(layer)
    tokens = allocate_budget(need, per_head * len(need), min_per_head=4)
    rows.append({"layer": layer, "need (% of L0)": np.round(100 * need, 2).tolist(),
                 "uniform": [per_head] * len(need), "head-wise": tokens.tolist()})  # fmt: skip
pd.DataFrame(rows).set_index("layer")

# %% [markdown]
# The same total in every layer, moved towards the heads that spread their attention. Whether
# that recovers accuracy at equal fetched bytes is the `headwise` method's question (recall and
# eval against the base method), measured on prompts other than the calibration's.

# %% [markdown]
# ## 6. The `headwise` method: the same bytes, moved between heads
# `headwise:base=yakv,calib=RUN_DIR` keeps YAKV's landmarks, scoring and local window, and splits
# each layer's total top-k (3 KV heads × YAKV's per-head budget) across the heads in proportion to
# the calibrated need (at least one token per head). The build is YAKV's, so the GPU bytes are
# equal, and so are the selected tokens and the fetched bytes per layer and step. Here it runs on a
# Text2JSON sample the calibration has not seen (seed 1), with its gold answer teacher-forced: the
# answer's positions are the decode queries, every 5th layer.

# %%
from kvdiag.analysis.recall import recall_table
from kvdiag.capture import capture_prompt
from kvdiag.eval.heads import teacher_forced
from kvdiag.methods import get_method
from kvdiag.models import load_model
from kvdiag.tasks import get_task

net, tokenizer = load_model(MODEL)
sample = get_task("text2json").samples(1, seed=1, tokenizer=tokenizer, target_tokens=TOKENS)[0]
held_out = teacher_forced(tokenizer, "text2json", sample, chat=bool(tokenizer.chat_template))
trace = capture_prompt(net, tokenizer, None, input_ids=held_out.input_ids, layers=list(range(0, 30, 5)))
headwise = get_method("headwise", base="yakv", calib=str(result["calibration"]))
print(headwise.label())
print("calibration SHA-256:", headwise.provenance()["calibration"]["sha256"][:16], "...")
recall = recall_table(trace, ["yakv", headwise], [0.03125], query_positions=held_out.positions,
                      per_position=False, progress=False)  # fmt: skip
recall["method"] = recall.method.str.split(":").str[0]

# %% [markdown]
# Tokens each KV head attends (chosen + the 64-token local window) and the fetched bytes per layer
# and step (all KV heads): head-wise moves tokens, the layer's total stays.

# %%
per_head = recall.pivot_table(index="layer", columns=["method", "kv_head"], values="attended_tokens")
fetched = recall.groupby(["method", "layer"]).fetched_bytes.sum().unstack("method")
print(per_head.round(0))
fetched

# %% [markdown]
# What it changes: attention mass kept and output error, mean over KV heads and answer tokens. One
# sample and a few layers only; figures/headwise/README.md has the paired comparison over held-out samples
# (there, on this model, the proportional split loses to the even one at equal bytes).

# %%
recall.groupby(["method", "layer"])[["attention_mass", "err_total"]].mean().unstack("method").round(3)
