"""Data-side kernels of the offload runtime: the host-row gather (`kvdiag.kernels.gather`) and the
split-K sparse decode attention (`kvdiag.kernels.decode_attention`), against their plain-PyTorch
references (`kvdiag.kernels.naive_attend`); the references against independent oracles (plain
indexing, torch's SDPA on dense K/V built here, transformers' Gemma-2 eager attention for the soft-cap,
`kvdiag.capture.rope.apply_rope`, `tensor.to(torch.float32)` of fp8).

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled, plus the `gpu`-marked ones at
Llama-3.1-8B shape. Every check draws fresh random inputs (the seed is in the failure message) and
poisons the outputs with NaN (0xFF bytes for the gather) before the launch.
"""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from kvdiag.kernels.decode_attention import (
    default_block_n,
    default_n_splits,
    default_num_warps,
    sparse_decode_attention,
)
from kvdiag.kernels.gather import cuda_view_of_pinned, gather_rows
from kvdiag.kernels.naive_attend import naive_gather_rows, naive_sparse_decode_attention, rebuild_lowrank_keys

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# ‖kernel − float64 reference‖ / ‖reference‖ allowed per query dtype. fp32: IEEE fp32 dots, round-off
# only. bf16 / fp16: dot operands (keys, softmax weights, values) are rounded to q's dtype (2^-9 /
# 2^-12 relative each), and rebuilt keys are rounded after the RoPE.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure), so every run checks new inputs."""
    return int.from_bytes(os.urandom(4), "little")


# --- gather -----------------------------------------------------------------------------------------


def random_rows(gen, shape, dtype):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return (4 * torch.randn(shape, generator=gen)).to(dtype)


def random_ids(gen, batch, n_kv, k, n_rows, pad_tail=3):
    """[B, H_kv, K] int32: ascending ids drawn without replacement per row, the last `pad_tail` −1."""
    ids = torch.stack([torch.randperm(n_rows, generator=gen)[:k].sort().values for _ in range(batch * n_kv)])
    ids = ids.reshape(batch, n_kv, k).int()
    ids[:, :, k - pad_tail :] = -1
    return ids


def indexing_oracle(src, ids):
    """Row by row with Python loops: the obviously right gather."""
    batch, n_kv, k = ids.shape
    out = torch.zeros(batch, n_kv, k, src.shape[-1] * src.element_size(), dtype=torch.uint8)
    raw = src.cpu().view(torch.uint8)
    for b in range(batch):
        for h in range(n_kv):
            for j in range(k):
                if ids[b, h, j] >= 0:
                    out[b, h, j] = raw[b, h, int(ids[b, h, j])]
    return out


def host_tensor(t):
    """The gather's source as the runtime keeps it: pinned host memory when there is a GPU."""
    return t.pin_memory() if torch.cuda.is_available() else t


@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("batch, d", [(1, 64), (3, 16)])
def test_gather_matches_indexing(dtype, batch, d, seed):
    gen = torch.Generator().manual_seed(seed)
    src = host_tensor(random_rows(gen, (batch, 2, 37, d), dtype))
    ids = random_ids(gen, batch, 2, 21, 37)
    expected = indexing_oracle(src, ids)
    out = torch.full((batch, 2, 21, d * src.element_size()), 0xFF, dtype=torch.uint8, device=DEVICE)
    out = out.view(dtype)
    result = gather_rows(src, ids.to(DEVICE), out, rows_per_program=16)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out.cpu().view(torch.uint8), expected), f"seed {seed}"
    assert torch.equal(naive_gather_rows(src, ids).view(torch.uint8), expected), f"seed {seed}"
    by_torch = gather_rows(src, ids.to(DEVICE), backend="torch")
    assert by_torch.device.type == DEVICE and torch.equal(by_torch.cpu().view(torch.uint8), expected)


def test_gather_pair_strided_and_odd_rows(seed):
    """K and V in one launch; the source a strided view ([B, L, H_kv, d] seen as [B, H_kv, L, d]);
    12-byte rows (bf16, d = 6: not a power of two of int32 words); K of 1 and of 0."""
    gen = torch.Generator().manual_seed(seed)
    keys = random_rows(gen, (3, 29, 2, 16), FP8).transpose(1, 2)  # [B, H_kv, L, d], strided
    values = random_rows(gen, (3, 2, 29, 16), FP8)
    ids = random_ids(gen, 3, 2, 9, 29, pad_tail=2)
    k_out, v_out = gather_rows((keys, values), ids.to(DEVICE), rows_per_program=4)
    assert torch.equal(k_out.cpu().view(torch.uint8), indexing_oracle(keys, ids)), f"seed {seed}"
    assert torch.equal(v_out.cpu().view(torch.uint8), indexing_oracle(values, ids)), f"seed {seed}"
    odd = host_tensor(random_rows(gen, (1, 1, 11, 6), torch.bfloat16))
    for k in (1, 0):
        ids_odd = torch.full((1, 1, k), 7, dtype=torch.int32)
        out = gather_rows(odd, ids_odd.to(DEVICE))
        assert torch.equal(out.cpu().view(torch.uint8), indexing_oracle(odd, ids_odd))


def test_gather_bad_inputs_raise_clear_errors():
    src = torch.zeros(2, 2, 10, 16, dtype=FP8)
    ids = torch.zeros(2, 2, 4, dtype=torch.int32)
    cases = [
        ((src[0], ids), "src must be"),
        ((src, ids.float()), "ids must have dtype"),
        ((src, ids[:1]), r"ids must be \[B, H_kv, K\]"),
        ((src, ids + 10), r"ids must lie in \[-1, 10\)"),
        ((src, ids - 2), "ids must lie in"),
        (((src, src.to(torch.bfloat16)), ids), "share shape, dtype"),
    ]
    for args, message in cases:
        with pytest.raises(KvdiagError, match=message):
            gather_rows(*args)
        if isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            with pytest.raises(KvdiagError, match=message):
                naive_gather_rows(*args)
    with pytest.raises(KvdiagError, match="unknown gather backend"):
        gather_rows(src, ids, backend="cuda")
    with pytest.raises(KvdiagError, match="out.0. must be"):
        gather_rows(src, ids.to(DEVICE), torch.empty(2, 2, 4, 8, dtype=FP8, device=DEVICE))


# --- sparse decode attention ------------------------------------------------------------------------


def rope_tables(n_positions, d, base=10000.0):
    """HF-layout tables [L, d] (the halves repeat), as a Llama rotary embedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def make_step(seed, *, batch, n_kv, group, d, n_res, n_sel, n_tail, mode, rank=8, q_dtype=torch.float32):
    """One decode step's sources (dict of kwargs for both implementations), on DEVICE.

    mode: "direct" (bf16 sel_k and sel_v), "fp8" (fp8 sel_k and sel_v), "lowrank" (u, sv, cos, sin;
    bf16 factors, sel_v bf16) or "none" (no selected source). Lengths differ per batch element; the
    first batch element has an empty resident part when there is more than one.
    """
    gen = torch.Generator().manual_seed(seed)
    n_positions = max(2 * n_sel, 40)

    def randn(*shape, dtype=torch.bfloat16, spread=1.0):
        return (spread * torch.randn(*shape, generator=gen)).to(dtype)

    kw = {"q": randn(batch, n_kv * group, d, dtype=q_dtype)}
    if n_res is not None:
        kw.update(res_k=randn(batch, n_kv, n_res, d), res_v=randn(batch, n_kv, n_res, d))
        lengths = torch.randint(0, n_res + 1, (batch,), generator=gen)
        lengths[-1] = n_res
        if batch > 1:
            lengths[0] = 0
        kw["res_len"] = lengths.int()
    if n_tail is not None:
        kw.update(tail_k=randn(batch, n_kv, n_tail, d), tail_v=randn(batch, n_kv, n_tail, d))
        kw["tail_len"] = torch.randint(min(1, n_tail), n_tail + 1, (batch,), generator=gen).int()
    if mode != "none":
        kw["ids"] = random_ids(gen, batch, n_kv, n_sel, n_positions, pad_tail=min(3, n_sel))
        if mode == "direct":
            kw.update(sel_k=randn(batch, n_kv, n_sel, d), sel_v=randn(batch, n_kv, n_sel, d))
        elif mode == "fp8":
            kw.update(sel_k=randn(batch, n_kv, n_sel, d, dtype=FP8, spread=2.0))
            kw.update(sel_v=randn(batch, n_kv, n_sel, d, dtype=FP8, spread=2.0))
        else:
            cos, sin = rope_tables(n_positions, d)
            kw.update(
                u=randn(batch, n_positions, rank), sv=randn(batch, n_kv, rank, d, spread=1 / math.sqrt(rank))
            )
            kw.update(cos=cos, sin=sin, sel_v=randn(batch, n_kv, n_sel, d))
    return {k: v.to(DEVICE) for k, v in kw.items()}


def run_poisoned(step, scale, **launch):
    out = torch.full_like(step["q"], float("nan"))
    result = sparse_decode_attention(**step, scale=scale, out=out, **launch)
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs were not written"
    return out


def assert_agrees(out, ref, dtype, seed, what=""):
    tol = TOLERANCE[dtype]
    rel = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert rel <= tol, f"{what} relative error {rel:.2e} > {tol:.0e} (seed {seed})"


# (mode, group, d, rank, batch, n_res, n_sel, n_tail): K, R, T not multiples of the 16-token block
ATTEND_CASES = [
    ("direct", 1, 16, 0, 3, 21, 37, 9),
    ("direct", 4, 64, 0, 1, 5, 19, 3),
    ("fp8", 3, 16, 0, 3, 0, 23, 7),
    ("fp8", 4, 64, 0, 1, None, 33, 1),
    ("lowrank", 3, 16, 8, 3, 13, 29, 5),
    ("lowrank", 1, 64, 24, 1, 7, 17, 2),
    ("lowrank", 4, 16, 24, 3, None, 21, None),
    ("none", 3, 64, 0, 3, 18, 0, 11),
]


@pytest.mark.parametrize(
    "case", ATTEND_CASES, ids=[f"{c[0]}-G{c[1]}-d{c[2]}-r{c[3]}-B{c[4]}" for c in ATTEND_CASES]
)
def test_attention_matches_reference_odd_shapes(case, seed):
    mode, group, d, rank, batch, n_res, n_sel, n_tail = case
    scale = 1 / math.sqrt(d)
    for q_dtype, n_splits in ((torch.float32, 1), (torch.bfloat16, 3)):
        step = make_step(seed, batch=batch, n_kv=2, group=group, d=d, n_res=n_res, n_sel=n_sel, n_tail=n_tail,
                         mode=mode, rank=rank, q_dtype=q_dtype)  # fmt: skip
        out = run_poisoned(step, scale, n_splits=n_splits, block_n=16)
        assert out.shape == step["q"].shape and out.dtype == q_dtype
        ref = naive_sparse_decode_attention(**step, scale=scale, compute_dtype=torch.float64)
        assert_agrees(out, ref, q_dtype, seed, f"{q_dtype} S={n_splits}")


def test_attention_split_counts_and_blocks_agree(seed):
    """1 split, a few, and more splits than blocks (9 > 2 + 3 + 1; empty splits weigh nothing)."""
    step = make_step(seed, batch=3, n_kv=2, group=2, d=16, n_res=20, n_sel=45, n_tail=6, mode="fp8")
    ref = naive_sparse_decode_attention(**step, scale=0.3, compute_dtype=torch.float64)
    for n_splits, block_n in ((1, 32), (2, 16), (5, 16), (9, 16)):
        assert_agrees(
            run_poisoned(step, 0.3, n_splits=n_splits, block_n=block_n),
            ref,
            torch.float32,
            seed,
            f"S={n_splits}",
        )


def test_attention_softcap_and_peaked_logits(seed):
    """Soft-cap 5 on logits up to ~±60: the cap must bound them; against the float64 reference."""
    step = make_step(seed, batch=3, n_kv=1, group=4, d=16, n_res=9, n_sel=21, n_tail=4, mode="direct")
    step["q"] = step["q"] * 4
    for softcap in (None, 5.0):
        out = run_poisoned(step, 1.0, softcap=softcap, n_splits=2, block_n=16)
        ref = naive_sparse_decode_attention(**step, scale=1.0, softcap=softcap, compute_dtype=torch.float64)
        assert_agrees(out, ref, torch.float32, seed, f"softcap={softcap}")


def test_attention_rows_without_keys_are_zero(seed):
    """An idle batch slot (no resident, no id, no tail token) gives zeros, in kernel and reference."""
    step = make_step(seed, batch=2, n_kv=2, group=3, d=16, n_res=6, n_sel=5, n_tail=3, mode="direct")
    step["res_len"][0], step["tail_len"][0] = 0, 0
    step["ids"][0] = -1
    for impl in (run_poisoned, None):
        out = (
            impl(step, 0.25, n_splits=3, block_n=16)
            if impl
            else naive_sparse_decode_attention(**step, scale=0.25)
        )
        assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
        assert out[1].abs().sum() > 0


def test_fp8_values_dequantize_exactly():
    """Every finite e4m3 code as a value row read alone (one valid token per batch element, fp32 q):
    the output is the fp8 value, exactly tensor.to(torch.float32)."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]  # 254 codes; 0x7F / 0xFF are NaN
    rows = torch.cat([finite, finite[:2]]).reshape(16, 1, 1, 16).view(FP8)  # [B = 16, H_kv, 1, d]
    step = {
        "q": torch.randn(16, 1, 16),
        "ids": torch.tensor([[[3, -1]]], dtype=torch.int32).expand(16, 1, 2).contiguous(),
        "sel_k": torch.zeros(16, 1, 2, 16).to(FP8),
        "sel_v": torch.cat([rows, torch.full_like(rows.view(torch.uint8), 0x7F).view(FP8)], dim=2),
    }
    step = {k: v.to(DEVICE) for k, v in step.items()}
    out = run_poisoned(step, 1.0, n_splits=1, block_n=16)
    assert torch.equal(out.cpu()[:, 0], rows.reshape(16, 16).to(torch.float32))


def test_default_launch():
    # B·H_kv = 8 programs: 2·132 // 8 = 33 splits, capped by the blocks: 1500 tokens / 64 → 24
    assert default_n_splits(1, 8, 1500, 64, n_sms=132) == 24
    assert default_n_splits(1, 8, 100_000, 64, n_sms=132) == 33
    assert default_n_splits(8, 8, 100_000, 64, n_sms=132) == 4  # 256 programs: one wave of 2 per SM
    assert default_n_splits(64, 8, 100_000, 64, n_sms=132) == 1
    assert default_n_splits(1, 1, 10**7, 16, n_sms=132) == 64  # the cap
    assert default_n_splits(1, 8, 10, 64, n_sms=132) == 1
    assert [default_block_n(d) for d in (16, 128, 256)] == [64, 64, 32]
    assert [default_num_warps(n) for n in (32, 64, 128)] == [4, 4, 8]


def test_attention_bad_inputs_raise_clear_errors():
    step = make_step(0, batch=2, n_kv=2, group=2, d=16, n_res=4, n_sel=5, n_tail=3, mode="direct")
    bad = [
        (dict(q=step["q"][0]), "q must be"),
        (dict(q=step["q"][:, :3]), "do not split evenly"),
        (dict(res_v=None), "res_k and res_v together"),
        (dict(sel_v=None), "without sel_v"),
        (dict(ids=None), "without ids"),
        (dict(u=step["sel_k"]), "either as sel_k or as the factors"),
        (dict(tail_k=step["tail_k"][:, :, :, :8]), "tail_k must be"),
        (dict(ids=step["ids"].float()), "ids must have dtype"),
        (dict(sel_k=step["sel_k"].int()), "sel_k must have dtype"),
        (
            dict(res_len=torch.tensor([9, 1], dtype=torch.int32, device=DEVICE)),
            r"res_len must lie in \[0, 4\]",
        ),
    ]
    for change, message in bad:
        if DEVICE == "cuda" and "res_len" in change:
            continue  # lengths on the GPU are not read back (no synchronisation)
        args = {**step, **change}
        for fn in (sparse_decode_attention, naive_sparse_decode_attention):
            with pytest.raises(KvdiagError, match=message):
                fn(**args, scale=0.25)
    for scale, message in ((float("nan"), "scale must be"), ("0.1", "scale must be")):
        with pytest.raises(KvdiagError, match=message):
            sparse_decode_attention(**step, scale=scale)
    with pytest.raises(KvdiagError, match="softcap must be"):
        sparse_decode_attention(**step, scale=0.1, softcap=-1.0)
    with pytest.raises(KvdiagError, match="no key/value source"):
        sparse_decode_attention(step["q"], scale=0.1)
    with pytest.raises(KvdiagError, match="n_splits must be"):
        sparse_decode_attention(**step, scale=0.1, n_splits=0)
    with pytest.raises(KvdiagError, match="power of two in 16..256"):
        odd = make_step(0, batch=1, n_kv=1, group=1, d=24, n_res=None, n_sel=3, n_tail=2, mode="direct")
        sparse_decode_attention(**odd, scale=0.1)


# --- the references against independent oracles -----------------------------------------------------


def dense_oracle_inputs(step):
    """Dense keys, values [B, H_kv, N, d] fp64 and a boolean mask [B, H_kv, N], built here with Python
    loops from the step's sources: RoPE by kvdiag.capture.rope.apply_rope (float32 inside), fp8 by
    .to(float32)."""
    q = step["q"].cpu()
    batch = q.shape[0]
    cpu = {k: v.cpu() for k, v in step.items()}
    per_batch = []
    for b in range(batch):
        keys, values, mask = [], [], []
        if "res_k" in cpu:
            n = cpu["res_k"].shape[2]
            keys.append(cpu["res_k"][b].double())
            values.append(cpu["res_v"][b].double())
            mask.append((torch.arange(n) < cpu["res_len"][b]).expand(cpu["res_k"].shape[1], n))
        if "ids" in cpu:
            ids = cpu["ids"][b]  # [H_kv, K]
            if "sel_k" in cpu:
                keys.append(cpu["sel_k"][b].to(torch.float32).double())
            else:
                pos = ids.long().clamp_min(0)
                pre = torch.stack(
                    [cpu["u"][b].float()[pos[h]] @ cpu["sv"][b, h].float() for h in range(ids.shape[0])]
                )
                post = torch.stack(
                    [apply_rope(pre[h], cpu["cos"][pos[h]], cpu["sin"][pos[h]]) for h in range(ids.shape[0])]
                )
                keys.append(post.double())
            values.append(cpu["sel_v"][b].to(torch.float32).double())
            mask.append(ids >= 0)
        if "tail_k" in cpu:
            n = cpu["tail_k"].shape[2]
            keys.append(cpu["tail_k"][b].double())
            values.append(cpu["tail_v"][b].double())
            mask.append((torch.arange(n) < cpu["tail_len"][b]).expand(cpu["tail_k"].shape[1], n))
        per_batch.append((torch.cat(keys, 1), torch.cat(values, 1), torch.cat(mask, 1)))
    stack = [torch.stack(parts) for parts in zip(*per_batch)]
    return q.double(), *stack


@pytest.mark.parametrize("mode", ["direct", "fp8", "lowrank"])
def test_reference_matches_sdpa_on_dense_kv(mode, seed):
    step = make_step(seed, batch=3, n_kv=2, group=3, d=16, n_res=7, n_sel=11, n_tail=4, mode=mode, rank=8)
    q, keys, values, mask = dense_oracle_inputs(step)
    oracle = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=mask[:, :, None, :].repeat_interleave(3, dim=1), scale=0.3,
        enable_gqa=True,
    )[:, :, 0]  # fmt: skip
    ref = naive_sparse_decode_attention(**step, scale=0.3, compute_dtype=torch.float64)
    tol = 1e-5 if mode == "lowrank" else 1e-10  # apply_rope computes in float32
    torch.testing.assert_close(ref.cpu(), oracle, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_reference_softcap_matches_transformers_gemma2(seed):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    step = make_step(seed, batch=2, n_kv=2, group=2, d=16, n_res=5, n_sel=9, n_tail=3, mode="direct")
    step["q"] = step["q"] * 5
    q, keys, values, mask = dense_oracle_inputs(step)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    additive = additive.repeat_interleave(2, dim=1)[:, :, None, :]  # [B, H_q, 1, N]
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    oracle, _ = eager_attention_forward(
        module, q[:, :, None, :], keys, values, additive, scaling=1.0, softcap=3.0
    )
    ref = naive_sparse_decode_attention(**step, scale=1.0, softcap=3.0, compute_dtype=torch.float64)
    # the eager path takes its softmax in float32
    torch.testing.assert_close(ref.cpu(), oracle[:, 0], rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


def test_rebuilt_keys_match_apply_rope(seed):
    gen = torch.Generator().manual_seed(seed)
    u, sv = torch.randn(2, 30, 24, generator=gen), torch.randn(2, 3, 24, 64, generator=gen)
    cos, sin = rope_tables(30, 64)
    ids = random_ids(gen, 2, 3, 10, 30)
    keys = rebuild_lowrank_keys(ids, u, sv, cos, sin, torch.float64)
    for b in range(2):
        for h in range(3):
            pos = ids[b, h].long().clamp_min(0)
            expected = apply_rope((u[b, pos] @ sv[b, h]).double(), cos[pos].double(), sin[pos].double())
            torch.testing.assert_close(keys[b, h], expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


# --- benchmark smoke run ------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE == "cuda", reason="the smoke run is the CPU check; the GPU runs the full bench")
def test_bench_smoke_runs(tmp_path, capsys):
    import json

    from kvdiag.bench.attend_kernels import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "attend_kernels.jsonl").read_text().splitlines()]
    kernels = {row["kernel"] for row in rows}
    assert {"gather", "attention"} <= kernels
    assert all("error" not in row for row in rows), [row["error"] for row in rows if "error" in row]
    assert "median µs" in capsys.readouterr().out


# --- on the GPU: Llama-3.1-8B shape (32 query / 8 KV heads, d = 128), pinned host source --------------


@pytest.mark.gpu
def test_gpu_gather_from_pinned_host_llama_shape(seed):
    gen = torch.Generator().manual_seed(seed)
    keys = random_rows(gen, (1, 8, 131072, 128), FP8).pin_memory()
    values = random_rows(gen, (1, 8, 131072, 128), FP8).pin_memory()
    ids = random_ids(gen, 1, 8, 4096, 131072, pad_tail=5).cuda()
    k_out, v_out = gather_rows((keys, values), ids)
    torch.cuda.synchronize()
    assert k_out.is_cuda
    ids_cpu = ids.cpu()
    for src, got in ((keys, k_out), (values, v_out)):
        assert torch.equal(got.cpu().view(torch.uint8), naive_gather_rows(src, ids_cpu).view(torch.uint8))
    view = cuda_view_of_pinned(values)
    assert view.is_cuda and torch.equal(
        view[0, 3, 777].cpu().view(torch.uint8), values[0, 3, 777].view(torch.uint8)
    )
    with pytest.raises(KvdiagError, match="pageable CPU memory"):
        gather_rows(torch.zeros(1, 8, 100, 128, dtype=FP8), ids.clamp(max=99), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "lowrank"])
def test_gpu_attention_llama_shape(mode, seed):
    rank = 160 if mode == "lowrank" else 0
    n_res = 416 if mode == "lowrank" else None  # ShadowKV: local 32 + 48 outlier chunks
    for q_dtype in (torch.bfloat16, torch.float32):
        step = make_step(seed, batch=2, n_kv=8, group=4, d=128, n_res=n_res, n_sel=4096, n_tail=130, mode=mode,
                         rank=rank, q_dtype=q_dtype)  # fmt: skip
        for launch in ({}, {"n_splits": 1}, {"n_splits": 7, "block_n": 32, "num_warps": 8}):
            out = run_poisoned(step, 1 / math.sqrt(128), **launch)
            ref = naive_sparse_decode_attention(**step, scale=1 / math.sqrt(128), compute_dtype=torch.float64)
            assert_agrees(out, ref, q_dtype, seed, f"{mode} {q_dtype} {launch}")
