"""The offload runtime against the accuracy simulator (the reference): same Method objects, same
selection, so in fp32 the same tokens and logits; its kernel paths against the method's own
selection; the payload really off the GPU cache.

Kernel paths run on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1 when
there is no GPU) and compiled on a GPU (`gpu` tests)."""

from __future__ import annotations

import pytest
import torch

from kvdiag.methods import get_method, list_methods, parse_method_spec
from kvdiag.offload.decode import greedy_decode, prefill_prompt

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Hello world, this is a test prompt " * 3,
    "Numbers: " + " ".join(str(i) for i in range(60)),
]
SPECS = {"shadowkv": "shadowkv:rank=4,outlier_chunks=1,local=8", "yakv": "yakv:local=8"}


@pytest.fixture(scope="module")
def prefills(tiny):
    out = {}
    for arch in ("tiny-llama", "tiny-gemma3"):
        model, tok = tiny(arch)
        out[arch] = (model, [prefill_prompt(model, tok(t, return_tensors="pt").input_ids) for t in TEXTS])
    return out


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_runtime_decodes_what_the_simulator_does(arch, prefills):
    """Batch of 3 prompts of different lengths, every method: same tokens, logits to fp32 round-off,
    same fetched bytes (the PyTorch path; the kernel paths are tested below)."""
    model, pre = prefills[arch]
    for row in list_methods():
        method = parse_method_spec(SPECS.get(row["name"], row["name"]))
        sim = greedy_decode(model, pre, 5, [], method=method, budget=0.25, keep_logits=True)
        rt = greedy_decode(model, pre, 5, [], method=method, budget=0.25, keep_logits=True, engine="runtime",
                           kernels=False)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(sim.tokens, rt.tokens)), row["name"]
        torch.testing.assert_close(rt.logits, sim.logits, rtol=1e-5, atol=1e-5, msg=row["name"])
        for s, r in zip(sim.stats, rt.stats):
            assert s["fetched_bytes_per_step_layer"] == pytest.approx(r["fetched_bytes_per_step_layer"])
            assert s["resident_bytes_per_token_layer"] == pytest.approx(r["resident_bytes_per_token_layer"])


def test_oracle_at_full_budget_is_plain_greedy(tiny):
    model, tok = tiny("tiny-llama")
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    rt = greedy_decode(model, [prefill_prompt(model, ids)], 6, [], method=get_method("oracle"), budget=1.0,
                       engine="runtime")  # fmt: skip
    assert rt.tokens[0].tolist() == plain[0, ids.shape[1] :].tolist()


def test_the_prompt_leaves_the_gpu_cache_and_the_payload_lives_on_the_host(tiny):
    from kvdiag.models import adapter
    from kvdiag.offload.runtime import offload, offloaded_layers

    model, tok = tiny("tiny-gemma3")
    pre = [prefill_prompt(model, tok(t, return_tensors="pt").input_ids) for t in TEXTS[:2]]
    n_layers = len(pre[0].trace.layers)
    rows = [[(p.trace.k_post(i), p.trace.v(i)) for i in range(n_layers)] for p in pre]
    layers = offloaded_layers(model)
    cache = adapter.offload_cache(model, rows, layers)
    s0 = max(p.n_tokens for p in pre)
    for i in range(n_layers):
        keys, _ = adapter.cache_layer_kv(cache, i)
        assert cache.layers[i].get_seq_length() == s0
        if i in layers:  # full-attention layer under the method: no prompt token on the device
            assert keys.numel() == 0
        else:  # sliding-window layer: exact, the window of the prompt
            assert keys.shape[-2] > 0
    method = get_method("yakv", local=8)
    with offload(model, method, 0.25, [p.trace for p in pre]) as rt:
        layer = rt.layer(sorted(layers)[0], "cpu")
    for built in layer.builts:
        for x in built.offloaded.values():
            codes = x.codes if hasattr(x, "codes") else x
            assert codes.device.type == "cpu"
            assert codes.is_pinned() == torch.cuda.is_available()
    assert rt.gpu_resident_bytes() == sum(
        method.resident_bytes(b, s) for b, s in zip(layer.builts, layer.states)
    )


# --- kernel paths -----------------------------------------------------------------------------------


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


def random_builts(method, lengths, n_kv=2, group=2, d=64, seed=0):
    from tests.test_methods_core import random_layer

    builts = [method.build(random_layer(n_kv, d, n, seed=seed + i)) for i, n in enumerate(lengths)]
    return builts, [method.start(b, 0.125) for b in builts]


@pytest.mark.parametrize(
    "spec", ["yakv:rule=mean_query,local=16", "shadowkv:rank=16,outlier_chunks=2,local=16"]
)
def test_kernel_paths_select_what_the_method_selects(spec):
    """Kernel scoring + radix top-k against the method's own selection, batch of prompts of different
    lengths: Jaccard ≥ 0.99 per row, step and KV head (fp32 kernels vs the PyTorch rule)."""
    from kvdiag.offload.fast import fast_path_for

    method = parse_method_spec(spec)
    builts, states = random_builts(method, [300, 217, 261])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = fast_path_for(method, builts, states, device, interpreter=True)
    assert fast is not None
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        q = torch.randn(3, 4, 64, generator=gen)
        reference = method.select_batch(method.stack(builts), q[:, None], states)
        kernel = fast.select_ids(q.to(device))
        kernel = kernel[1] if isinstance(kernel, tuple) else kernel
        for b in range(3):
            for h in range(2):
                assert jaccard(kernel[b, h].cpu(), reference.ids[b, 0, h]) >= 0.99, (spec, b, h)


def test_yakv_kernel_step_attends_like_the_runtime_reference(prefills):
    """The whole kernel step (HIGGS scoring, top-k, gather, split-K attention over fp8 rows + tail)
    against the PyTorch path of the runtime, through greedy decoding: same tokens."""
    model, pre = prefills["tiny-llama"]
    method = get_method("yakv", rule="mean_query", local=8)
    ref = greedy_decode(model, pre, 3, [], method=method, budget=0.25, engine="runtime", kernels=False)
    rt = greedy_decode(model, pre, 3, [], method=method, budget=0.25, engine="runtime", kernels=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.tokens, rt.tokens))
    assert rt.stats[0]["fetched_bytes_per_step_layer"] == pytest.approx(
        ref.stats[0]["fetched_bytes_per_step_layer"]
    )


@pytest.mark.parametrize(
    "spec", ["yakv", "yakv:rule=mean_query", "shadowkv:rank=16,outlier_chunks=2,local=16", "oracle",
             "quest:dense_layers=0", "arkvale:page_size=16,group_size=1,n_win_pages=2"],
)  # fmt: skip
def test_triton_backend_selects_what_the_torch_rule_selects(spec):
    """`select(..., backend="triton")` routes the scoring to the kernels: the same tokens as the
    PyTorch rule (Jaccard ≥ 0.99; the kernels compute in fp32)."""
    method = parse_method_spec(spec)
    builts, states = random_builts(method, [300, 217])
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 4, 64, generator=gen)  # 2 rows, 2 decode steps each
    batch = method.stack(builts)
    torch_sel = method.select_batch(batch, q, [method.start(b, 0.125) for b in builts], backend="torch")
    triton_sel = method.select_batch(batch, q, [method.start(b, 0.125) for b in builts], backend="triton")
    scores = [jaccard(triton_sel.ids[b, n, h], torch_sel.ids[b, n, h])
              for b in range(2) for n in range(2) for h in range(torch_sel.ids.shape[2])]  # fmt: skip
    assert min(scores) >= 0.99, (spec, min(scores))


def test_triton_backend_is_refused_where_no_kernel_covers_the_rule():
    from kvdiag.errors import KvdiagError

    method = get_method("arkvale", page_size=16)  # one selection group of all KV heads: no kernel
    builts, states = random_builts(method, [200])
    with pytest.raises(KvdiagError, match="no Triton kernel"):
        method.select(builts[0], torch.randn(1, 4, 64), states[0], backend="triton")
