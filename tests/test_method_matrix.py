"""Every registered method on every tiny architecture: through recall and inside generate."""

from __future__ import annotations

import pytest
import torch

from kvdiag.analysis.recall import recall_table
from kvdiag.capture import capture_prompt
from kvdiag.methods import get_method, method_names
from kvdiag.offload.simulate import simulate
from tests.conftest import TINY_MODELS

PROMPT = "Record R-0006: Zofia Romano (beekeeper, Lisbon) - 94 barometers, filed 2014. " * 6


@pytest.mark.parametrize("name", TINY_MODELS)
def test_recall_runs_every_method_on_every_tiny_architecture(tiny, name):
    model, tokenizer = tiny(name)
    trace = capture_prompt(model, tokenizer, PROMPT)
    table = recall_table(trace, method_names(), [0.125], n_queries=8, progress=False)
    full_layers = [i for i in trace.layers if trace.layer_meta(i)["sliding_window"] is None]
    assert set(table.method_name) == set(method_names())
    assert set(table.layer) == set(full_layers)  # tiny-gemma3: only its global layer
    assert table[["attention_mass", "err_total"]].notna().all().all()
    assert ((table.attention_mass > 0) & (table.attention_mass <= 1 + 1e-5)).all()
    exact = table[table.method_name == "exact"]
    assert exact.attention_mass.min() > 1 - 1e-5 and exact.err_total.max() < 1e-5


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("method", method_names())
def test_every_method_generates_on_every_tiny_architecture(tiny, name, method):
    model, tokenizer = tiny(name)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode(), simulate(model, get_method(method), 0.125) as sim:
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    stats = sim.stats()
    assert stats["decode_steps"] == 2 and stats["budget_tokens"] == -(-ids.shape[1] // 8)
    assert stats["resident_bytes_per_token_layer"] > 0
