"""`kvdiag bench`'s end-to-end decode and what it stands on: the lean prefill (no queries, K/V in host
memory, last logits only) decodes what the full prefill decodes; rows that share one prompt's build
(and its host payload, a stride-0 view) decode what rows with their own copies decode; the largest-
batch search finds a known capacity; the CPU smoke run writes its rows and figure.

Oracles: greedy decoding from the ordinary prefill (itself checked against transformers' generate in
test_runtime.py) and hand-set capacities."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods import get_method
from kvdiag.offload.decode import greedy_decode, prefill_prompt

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Numbers: " + " ".join(str(i) for i in range(50)),
]


@pytest.fixture(scope="module")
def llama(tiny):
    model, tok = tiny("tiny-llama")
    return model, [tok(t, return_tensors="pt").input_ids for t in TEXTS]


def test_lean_prefill_decodes_what_the_full_prefill_decodes(llama):
    model, prompts = llama
    full = [prefill_prompt(model, ids) for ids in prompts]
    lean = [prefill_prompt(model, ids, queries=False, store_device="cpu") for ids in prompts]
    assert not lean[0].trace.has_queries and lean[0].trace.layer_kv(0).q is None
    for i in lean[0].trace.layers:  # the keys and values themselves are the full prefill's
        assert torch.equal(lean[0].trace.k_pre(i), full[0].trace.k_pre(i))
        assert torch.equal(lean[0].trace.v(i), full[0].trace.v(i))
    for kwargs in ({}, {"method": get_method("yakv", local=8), "budget": 0.25, "engine": "runtime"}):
        a = greedy_decode(model, full, 5, [], **kwargs)
        b = greedy_decode(model, lean, 5, [], **kwargs)
        assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)), kwargs
    with pytest.raises(KvdiagError, match="queries"):  # LRQK calibrates on prompt queries: a clear error
        greedy_decode(model, lean, 2, [], method=get_method("lrqk"), budget=0.25, engine="runtime")


def test_a_trace_without_queries_saves_and_loads(llama, tmp_path):
    from kvdiag.capture.trace import Trace

    model, prompts = llama
    trace = prefill_prompt(model, prompts[0], queries=False).trace
    loaded = Trace.load(trace.save(tmp_path / "t"))
    assert not loaded.has_queries and torch.equal(loaded.k_post(1), trace.k_post(1))


@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch-path", "kernel-path"])
def test_rows_sharing_one_prompt_decode_what_rows_with_their_own_copies_decode(llama, kernels):
    """One prompt in two rows with different first tokens: one shared build (and, on the kernel path,
    one host payload read through a stride-0 view) against two independent copies of the trace."""
    from kvdiag.offload.decode import SharedPrefill

    model, prompts = llama
    one = prefill_prompt(model, prompts[0])
    shared = [SharedPrefill(one.trace, one.last_token), SharedPrefill(one.trace, 7)]
    own = [
        SharedPrefill(copy.deepcopy(one.trace), one.last_token),
        SharedPrefill(copy.deepcopy(one.trace), 7),
    ]
    method = get_method("yakv", rule="mean_query", local=8)
    a = greedy_decode(model, shared, 4, [], method=method, budget=0.25, engine="runtime", kernels=kernels)
    b = greedy_decode(model, own, 4, [], method=method, budget=0.25, engine="runtime", kernels=kernels)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not torch.equal(a.tokens[0], a.tokens[1])  # the rows really decode differently
    layer = next(iter(a.engine_state.per_layer.values()))
    assert layer.builts[0] is layer.builts[1]  # built once for both rows
    if kernels:
        assert a.engine_state.fast_steps > 0 and layer.fast.k_host.stride(0) == 0


@pytest.mark.parametrize(
    "capacity,cap,expected", [(7, 64, 7), (100, 64, 64), (0, 64, 0), (1, 1, 1), (12, 16, 12)]
)
def test_largest_batch_search_finds_a_known_capacity(monkeypatch, capacity, cap, expected):
    from kvdiag.bench import decode_e2e

    tried = []

    def fits(model, prefill, engine, batch, steps, device):
        tried.append(batch)
        return {"B": batch} if batch <= capacity else None

    monkeypatch.setattr(decode_e2e, "fits", fits)
    best, row = decode_e2e.largest_batch(None, None, "full", "cuda", cap)
    assert best == expected and (row is None if expected == 0 else row["B"] == expected)
    assert max(tried) <= cap and len(tried) == len(set(tried))  # no batch tried twice


def test_bench_smoke_end_to_end_writes_its_rows_and_figure(tmp_path):
    from kvdiag.bench.offload_step import run_bench
    from kvdiag.plots.bench import plot_bench_run

    out = tmp_path / "bench"
    result = run_bench(out, smoke=True, step=False, progress=False)
    table = pd.read_parquet(out / "bench.parquet")
    e2e = table[table.kind == "e2e"]
    assert sorted(set(e2e.engine)) == ["full", "shadowkv", "yakv"] and sorted(set(e2e.B)) == [1, 2]
    assert (e2e.tokens_per_s > 0).all() and (e2e.steps == 3).all()
    runtime = e2e[e2e.engine != "full"]
    assert (runtime.kernel_layer_steps > 0).all()  # the kernel path served the method layers
    # full attention's accounted bytes: B rows × 2 (K, V) × layers × KV heads × head_dim × L−1 tokens × fp32
    full = e2e[(e2e.engine == "full") & (e2e.B == 2)].iloc[0]
    assert full.accounted_GB * 1e9 == pytest.approx(2 * 2 * 2 * 2 * 16 * (full.L - 1) * 4)
    assert any(line.startswith("e2e yakv") for line in result["summary"])
    assert [p.name for p in plot_bench_run(out)] == ["e2e_decode.png", "e2e_decode.pdf"]
    with pytest.raises(KvdiagError, match="nothing to run"):
        run_bench(tmp_path / "none", smoke=True, step=False, e2e=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_e2e_on_a_gpu_runs_the_compiled_kernels_and_finds_the_largest_batch():
    """The end-to-end decode on CUDA (tiny model, compiled kernels): every engine decodes, the methods
    through the kernel path, peak memory above the weights, the batch search capped where all fits."""
    from kvdiag.bench.decode_e2e import run_e2e

    table = pd.DataFrame(run_e2e([1024], [1, 3], smoke=True, steps=4, max_batch_cap=4, progress=False))
    e2e = table[table.kind == "e2e"]
    assert len(e2e) == 6 and (e2e.tokens_per_s > 0).all() and (e2e.peak_gpu_GB >= e2e.weights_GB).all()
    assert (e2e[e2e.engine != "full"].kernel_layer_steps > 0).all()
    largest = table[table.kind == "e2e_max_batch"]
    assert (
        sorted(largest.engine) == ["full", "shadowkv", "yakv"]
        and (largest.B == 4).all()
        and largest.capped.all()
    )
