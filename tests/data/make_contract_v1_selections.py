"""Selections of every method of the pre-v2 contract (kvdiag at 873715a) on the tiny architectures.

Run on that commit: `git worktree add OLD 873715a && PYTHONPATH=OLD python tests/data/make_contract_v1_selections.py OUT.pt`
(kept for provenance; it uses the v1 API and does not run on later commits)."""

import sys

import torch

from kvdiag.analysis.recall import context_layer
from kvdiag.capture import capture_prompt
from kvdiag.methods import get_method, method_names
from kvdiag.models import load_model

out = {}
text = "The archivist in Lisbon catalogued 41 barometers, 7 sextants and a loom; " * 4
for arch in ("tiny-llama", "tiny-qwen3", "tiny-gemma3"):
    model, tok = load_model(arch)
    trace = capture_prompt(model, tok, text, layers="all")
    layer_idx = 3  # the global (full-attention) layer of tiny-gemma3, a plain layer elsewhere
    full = trace.layer_kv(layer_idx)
    n_ctx = trace.n_tokens - 8
    ctx = context_layer(full, n_ctx)
    q = full.q[:, n_ctx:].transpose(0, 1).contiguous()  # [8, H_q, d]
    for name in method_names():
        knobs = {"shadowkv": {"rank": 8, "outlier_chunks": 2, "local": 16}}.get(name, {})
        m = get_method(name, **knobs)
        sel = m.select(m.build(ctx), q, 0.25)
        out[f"{arch}/{name}"] = {"mask": sel.mask.clone(), "fetched": sel.fetched.clone()}
    out[f"{arch}/_meta"] = {"n_tokens": trace.n_tokens, "layer": layer_idx}
torch.save(out, sys.argv[1])
print(len(out), trace.n_tokens)
