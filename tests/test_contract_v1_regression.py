"""The token-id selections of contract v2 against the dense masks of contract v1.

`tests/data/contract_v1_selections.pt` holds every method's selection mask (and fetched mask) made by
kvdiag before the Method contract v2 (commit 873715a, `select` returning dense masks) on the tiny
architectures, 8 decode queries, budget 0.25 (made on that commit by `tests/data/make_contract_v1_selections.py`). v2 derives the mask from token ids; it must be the same mask, except where a
default changed on purpose:
- yakv: the default HIGGS grid is now the study's published grid (and HIGGS dequantizes through fp16
  as upstream); with kvdiag's own CLVQ grid (`@clvq`, v1's default) the selection must match.
- fetched of arkvale and lrqk: v2 models their GPU page cache / working set (hits are not fetched);
  v1 counted every chosen token. The cold fetch (cache off) must match v1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvdiag.analysis.recall import context_layer
from kvdiag.capture import capture_prompt
from kvdiag.methods import get_method, method_names

FIXTURE = Path(__file__).parent / "data" / "contract_v1_selections.pt"
TEXT = "The archivist in Lisbon catalogued 41 barometers, 7 sextants and a loom; " * 4
V1_KNOBS = {
    "shadowkv": {"rank": 8, "outlier_chunks": 2, "local": 16},
    "yakv": {"landmark_quant": "higgs:EDEN4-256@clvq"},
}


@pytest.fixture(scope="module")
def v1():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_ids_derived_masks_equal_contract_v1(arch, v1, tiny):
    model, tok = tiny(arch)
    trace = capture_prompt(model, tok, TEXT, layers="all")
    meta = v1[f"{arch}/_meta"]
    assert trace.n_tokens == meta["n_tokens"]
    full = trace.layer_kv(meta["layer"])
    n_ctx = trace.n_tokens - 8
    ctx = context_layer(full, n_ctx)
    q = full.q[:, n_ctx:].transpose(0, 1).contiguous()
    names = [n for n in method_names() if f"{arch}/{n}" in v1]
    assert len(names) >= 9
    for name in names:
        method = get_method(name, **V1_KNOBS.get(name, {}))
        built = method.build(ctx)
        state = method.start(built, 0.25)
        state.cache_tokens = 0  # v1 had no GPU cache model
        sel = method.select(built, q, state)
        old = v1[f"{arch}/{name}"]
        assert torch.equal(sel.mask, old["mask"]), (arch, name)
        assert torch.equal(sel.fetched, old["fetched"]), (arch, name)
