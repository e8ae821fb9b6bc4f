"""The batched selection kernels (HIGGS-code, bf16-landmark and page-bound scoring; radix top-k)
against their plain-PyTorch references (`kvdiag.kernels.naive_select`), the references against
independent oracles (the HIGGS quantizer's own dequantization, torch.topk, hand-worked cases).

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1) on tiny shapes; with CUDA the same tests run compiled, plus the `gpu`-marked ones
at Llama-3.1-8B's shape. Every check draws fresh random inputs (the seed is in the failure message),
poisons outputs and workspaces with NaN before the launch, and uses rows of different lengths, none a
multiple of the tile.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from kvdiag.kernels import batched_scores, higgs_scores
from kvdiag.kernels.batched_scores import batched_landmark_scores
from kvdiag.kernels.higgs_scores import higgs_bytes_per_token, higgs_landmark_scores
from kvdiag.kernels.naive import naive_landmark_scores
from kvdiag.kernels.naive_select import (
    dequantize_higgs_landmarks,
    naive_batched_landmark_scores,
    naive_higgs_landmark_scores,
    naive_page_bound_scores,
    naive_topk_blocks,
    naive_topk_ids,
)
from kvdiag.kernels.page_scores import page_bound_scores
from kvdiag.kernels.topk import expand_block_ids, radix_passes, topk_blocks, topk_ids

from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import box_upper_bound_scores
from kvdiag.quant import get_quantizer
from kvdiag.quant.grids import load_grid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RULES = ("softmax_max", "mean_query")
# ‖kernel − reference‖ / ‖reference‖ allowed per query dtype. Kernel and reference both compute in
# fp32 from the same upcast inputs (the kernels' softmax dot in tf32x3, ≈ fp32), so only fp32
# summation order differs; bf16 queries get the same headroom as the existing landmark kernel tests.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
SHAPES = [(1, 16), (2, 64), (4, 128), (7, 64)]  # (G, d): every G of {1, 2, 4, 7}, every d of {16, 64, 128}
LAUNCH = dict(block_n=16, tiles_per_split=2)  # interpreter: small tiles, several tiles per split


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure), so every run checks new inputs."""
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def poison_workspaces(monkeypatch):
    monkeypatch.setattr(batched_scores, "POISON_WORKSPACE", True)
    monkeypatch.setattr(higgs_scores, "POISON_WORKSPACE", True)


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE)


def assert_scores_agree(out, ref, dtype, seed):
    """Same -inf padding, and the finite scores within the dtype's relative tolerance."""
    assert not out.isnan().any(), (
        f"{int(out.isnan().sum())} of {out.numel()} scores not written (seed {seed})"
    )
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out)), f"-inf padding differs (seed {seed})"
    assert (out[~finite] == float("-inf")).all()
    out, ref = out[finite], ref[finite]
    tol = TOLERANCE[dtype]
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= tol, f"relative error {rel:.2e} > {tol:.0e} (seed {seed})"
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=f"seed {seed}")


def quantized_keys(seed, batch, length, n_kv, d, spec="higgs:EDEN4-256:g128"):
    """Keys [B, H_kv, L, d] with a shared offset (as real keys have), quantized row-wise by the HIGGS
    quantizer itself: (codes [B, L, n_groups, g/v], scales [B, L, n_groups], grid, dequantized keys).

    The dequantized keys are the quantizer's codes decoded in fp32 (what the kernel computes in its
    registers); the quantizer's own decode rounds to fp16 twice as the study's code does, so it agrees
    with them to fp16 rounding, checked here."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n_kv, length, d, generator=gen) + torch.randn(1, n_kv, 1, d, generator=gen)
    keys = keys.to(DEVICE)
    quantizer = get_quantizer(spec)
    stored = quantizer.quantize(keys.transpose(1, 2).reshape(batch * length, n_kv * d))  # rows of H_kv·d
    codes = stored.codes.reshape(batch, length, *stored.codes.shape[1:])
    scales = stored.scales[0].reshape(batch, length, -1)
    grid = load_grid(quantizer.grid, DEVICE)
    dequantized = dequantize_higgs_landmarks(codes, scales, grid, n_kv, d)
    upstream = quantizer.dequantize(stored).reshape(batch, length, n_kv, d).transpose(1, 2)
    torch.testing.assert_close(upstream, dequantized, rtol=2e-3, atol=2e-3 * dequantized.abs().max().item())
    return codes, scales, grid, dequantized


# --- HIGGS codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, d", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_higgs_scores_match_reference_and_quantizer(rule, group, d, seed):
    """Three rows of different odd lengths: kernel = reference (dequantize, then score) = the study's
    rule on the quantizer's own dequantized keys."""
    n_kv, max_len = 2, 45
    n_scored = lengths(45, 1, 29)
    codes, scales, grid, dequantized = quantized_keys(seed, 3, max_len, n_kv, d)
    gen = torch.Generator().manual_seed(seed + 1)
    for q_dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(3, n_kv * group, d, generator=gen).to(q_dtype).to(DEVICE)
        ref = naive_higgs_landmark_scores(q, codes, scales, grid, n_scored, n_kv, rule)
        torch.testing.assert_close(ref, naive_batched_landmark_scores(q, dequantized, n_scored, rule))
        gather = "global" if q_dtype == torch.float32 else "smem"  # both lookup paths, half the time
        out = poisoned(3, n_kv, max_len)
        higgs_landmark_scores(q, codes, scales, grid, n_scored, n_kv, rule, out=out, gather=gather, **LAUNCH)
        assert_scores_agree(out, ref, q_dtype, seed)


@pytest.mark.parametrize(
    "spec, n_kv, d",
    [
        ("higgs:EDEN2-256:g16", 2, 64),  # v = 2, g < d: 4 groups per head
        ("higgs:EDEN4-256:g32", 1, 256),  # d = 256: 8 groups per head
        ("higgs:EDEN1-16:g256", 3, 64),  # v = 1, P = 16, g > d: heads share a group, padded channels
        ("higgs:EDEN8-256:g128", 3, 16),  # v = 8, a 48-channel row: the quantizer's group is 64
    ],
)
def test_higgs_scores_other_grids_and_groups(spec, n_kv, d, seed):
    codes, scales, grid, dequantized = quantized_keys(seed, 1, 23, n_kv, d, spec)
    n_scored = lengths(23)
    q = torch.randn(1, 2 * n_kv, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    for rule in RULES:
        ref = naive_batched_landmark_scores(q, dequantized, n_scored, rule)
        out = higgs_landmark_scores(q, codes, scales, grid, n_scored, n_kv, rule, **LAUNCH)
        assert_scores_agree(out, ref, torch.float32, seed)


def test_higgs_fp32_scales_and_strided_codes(seed):
    """fp32 scales and codes viewed out of a larger buffer (strides the runtime may use)."""
    codes, scales, grid, dequantized = quantized_keys(seed, 2, 37, 2, 64)
    wide = torch.zeros(2, 40, codes.shape[2], codes.shape[3] + 3, dtype=torch.uint8, device=DEVICE)
    wide[:, :37, :, : codes.shape[3]] = codes
    view = wide[:, :37, :, : codes.shape[3]]
    n_scored = lengths(37, 20)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    for rule in RULES:
        ref = naive_batched_landmark_scores(q, dequantized, n_scored, rule)
        out = higgs_landmark_scores(q, view, scales.float(), grid, n_scored, 2, rule, **LAUNCH)
        assert_scores_agree(out, ref, torch.float32, seed)


@pytest.mark.slow
def test_higgs_scores_on_real_keys(smollm2):
    """SmolLM2-135M's real post-RoPE keys and queries of one layer (3 KV heads, G = 3, d = 64),
    stored by the quantizer: kernel vs scoring the quantizer's dequantized keys."""
    from kvdiag.capture import capture_prompt

    model, tokenizer = smollm2
    trace = capture_prompt(model, tokenizer, "The quick brown fox jumps over the lazy dog. " * 8, layers=[5])
    k_post, q_all = trace.k_post(5).float(), trace.q(5).float()  # [H_kv, L, d], [H_q, L, d]
    n_kv, length, d = k_post.shape
    quantizer = get_quantizer("higgs:EDEN4-256:g128")
    stored = quantizer.quantize(k_post.transpose(0, 1).reshape(length, n_kv * d))
    codes = stored.codes[None].to(DEVICE)
    scales = stored.scales[0][None].to(DEVICE)
    grid = load_grid(quantizer.grid, DEVICE)
    dequantized = dequantize_higgs_landmarks(codes, scales, grid, n_kv, d)[0]  # fp32, as the kernel
    upstream = quantizer.dequantize(stored).reshape(length, n_kv, d).transpose(0, 1).to(DEVICE)
    torch.testing.assert_close(upstream, dequantized, rtol=2e-3, atol=2e-3 * dequantized.abs().max().item())
    q = q_all[:, -1][None].to(DEVICE)  # the last position's queries [1, H_q, d]
    n_scored = lengths(length - 16)  # the last 16 tokens play YAKV's local window
    for rule in RULES:
        ref = naive_landmark_scores(q[0], dequantized[:, : length - 16].to(DEVICE), rule)
        out = higgs_landmark_scores(q, codes, scales, grid, n_scored, n_kv, rule)
        assert_scores_agree(out[0, :, : length - 16], ref, torch.float32, "smollm2")
        assert (out[0, :, length - 16 :] == float("-inf")).all()


def test_higgs_bytes_per_token_matches_quantizer():
    quantizer = get_quantizer("higgs:EDEN4-256:g128")
    # codes (2 bits per channel, groups padded to 128) + one fp32 norm per group, as the study stores them
    assert higgs_bytes_per_token(8, 128, 128, 4, 4) == quantizer.bytes_per_row(8 * 128) == 256 + 8 * 4
    assert higgs_bytes_per_token(3, 64, 128, 4, 4) == quantizer.bytes_per_row(3 * 64) == 64 + 2 * 4


def test_dequantize_reference_hand_worked():
    """One group of g = 2 (H_2 = [[1, 1], [1, -1]]), a 2-point 1-dim grid: codes (1, 0) -> y = (3, -1),
    s = 2: x̂ = H_2 (2·y) / 2 = (3 - 1, 3 + 1) = (2, 4); one KV head of d = 2."""
    grid = torch.tensor([[-1.0], [3.0]])
    codes = torch.tensor([[[[1, 0]]]], dtype=torch.uint8)  # [B=1, L=1, groups=1, 2]
    scales = torch.tensor([[[2.0]]])
    expected = torch.tensor([[[[2.0, 4.0]]]])  # [B, H_kv, L, d]
    torch.testing.assert_close(dequantize_higgs_landmarks(codes, scales, grid, 1, 2), expected)


# --- bf16 landmarks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group, d", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_batched_scores_match_reference(rule, group, d, seed):
    gen = torch.Generator().manual_seed(seed)
    n_kv, max_len = 2, 53
    landmarks = torch.randn(3, n_kv, max_len, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    n_landmarks = lengths(53, 17, 1)
    for q_dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(3, n_kv * group, d, generator=gen).to(q_dtype).to(DEVICE)
        out = poisoned(3, n_kv, max_len)
        batched_landmark_scores(q, landmarks, n_landmarks, rule, out=out, **LAUNCH)
        assert_scores_agree(
            out, naive_batched_landmark_scores(q, landmarks, n_landmarks, rule), q_dtype, seed
        )


def test_batched_scores_single_row_contract(seed):
    """B-less inputs behave as `landmark_scores`: q [H_q, d], landmarks [H_kv, N, d] -> [H_kv, N]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(8, 64, generator=gen).to(DEVICE)
    landmarks = torch.randn(2, 41, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    for rule in RULES:
        out = batched_landmark_scores(q, landmarks, rule=rule, **LAUNCH)
        assert out.shape == (2, 41)
        assert_scores_agree(out, naive_landmark_scores(q, landmarks, rule), torch.float32, seed)


def test_batched_scores_peaked_softmax(seed):
    """Logits up to ~500 spread over splits: the split statistics must merge stably (float64 oracle)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 8, 64, generator=gen).to(DEVICE)
    landmarks = (8 * torch.randn(1, 2, 300, 64, generator=gen)).to(DEVICE)
    out = batched_landmark_scores(
        q, landmarks, lengths(300), "softmax_max", 1.0, block_n=16, tiles_per_split=1
    )
    ref = naive_landmark_scores(q[0], landmarks[0], "softmax_max", 1.0, compute_dtype=torch.float64)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


# --- page bounds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, d", SHAPES)
def test_page_bounds_match_reference(group, d, seed):
    gen = torch.Generator().manual_seed(seed)
    n_kv, max_pages = 2, 37
    centre = torch.randn(3, n_kv, max_pages, d, generator=gen)
    radius = torch.rand(3, n_kv, max_pages, d, generator=gen)
    box_max, box_min = (
        (centre + radius).to(torch.bfloat16).to(DEVICE),
        (centre - radius).to(torch.bfloat16).to(DEVICE),
    )
    n_pages = lengths(37, 5, 20)
    for q_dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(3, n_kv * group, d, generator=gen).to(q_dtype).to(DEVICE)
        for reduce, heads in (("none", n_kv * group), ("mean", n_kv)):
            out = poisoned(3, heads, max_pages)
            page_bound_scores(q, box_max, box_min, n_pages, reduce, out=out, block_n=16)
            ref = naive_page_bound_scores(q, box_max, box_min, n_pages, reduce)
            assert_scores_agree(out, ref, q_dtype, seed)


def test_page_bound_reference_matches_study_rule(seed):
    """naive_page_bound_scores on a full row = kvdiag.methods._scoring.box_upper_bound_scores."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 32, generator=gen)
    box_max = torch.randn(1, 2, 9, 32, generator=gen)
    box_min = box_max - torch.rand(1, 2, 9, 32, generator=gen)
    ref = box_upper_bound_scores(q, box_max[0], box_min[0])  # [1, H_q, P]
    torch.testing.assert_close(naive_page_bound_scores(q, box_max, box_min, torch.tensor([9])), ref)


def test_page_bound_hand_worked():
    """One page, d = 2, box [(-1, 0), (2, 3)]; q = (1, -2): max(1·2, 1·-1) + max(-2·3, -2·0) = 2 + 0."""
    box_max = torch.tensor([[[[2.0, 3.0]]]], device=DEVICE)
    box_min = torch.tensor([[[[-1.0, 0.0]]]], device=DEVICE)
    q = torch.tensor([[[1.0, -2.0]]], device=DEVICE)
    expected = torch.tensor([[[2.0]]], device=DEVICE)
    torch.testing.assert_close(naive_page_bound_scores(q, box_max, box_min, lengths(1)), expected)
    torch.testing.assert_close(page_bound_scores(q, box_max, box_min, lengths(1)), expected)


# --- top-k ------------------------------------------------------------------------------------------------


def torch_topk_sets(scores, k, valid):
    """Per row, the set of torch.topk's indices over the valid prefix (untied random data)."""
    return [
        [set(scores[b, h, : int(valid[b])].topk(int(k[b])).indices.tolist()) for h in range(scores.shape[1])]
        for b in range(scores.shape[0])
    ]


@pytest.mark.parametrize("radix_bits", [4, 8, 11])
def test_topk_matches_torch_topk(radix_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 2, 700, generator=gen).to(DEVICE)
    scores[1] = scores[1].softmax(-1)  # positive, clustered exponents (softmax_max-like)
    valid, k = lengths(700, 333, 9), lengths(22, 333, 0)
    out = torch.full((3, 2, 333), -7, dtype=torch.int32, device=DEVICE)
    topk_ids(scores, k, valid, out=out, radix_bits=radix_bits, block_n=64, tiles_per_chunk=2)
    sets = torch_topk_sets(scores.cpu(), k, valid)
    for b in range(3):
        kb = int(k[b])
        for h in range(2):
            row = out[b, h].tolist()
            assert set(row[:kb]) == sets[b][h], f"seed {seed}, row {b}, head {h}"
            assert row[:kb] == sorted(row[:kb]) and row[kb:] == [-1] * (333 - kb), f"seed {seed}"
    torch.testing.assert_close(out, naive_topk_ids(scores, k, valid), rtol=0, atol=0)


def test_topk_ties_toward_lower_index():
    """Hand-made ties: 10 ones and many zeros, k = 12 -> the 10 ones and the two lowest-index zeros;
    -0.0 ties with +0.0; -inf and NaN are never chosen, even when k asks for them."""
    scores = torch.zeros(1, 3, 50)
    scores[0, 0, 10:20] = 1.0
    scores[0, 0, 0] = -0.0
    scores[0, 1, ::3] = float("-inf")
    scores[0, 1, 5] = float("nan")
    scores[0, 2, :] = float("-inf")
    scores[0, 2, [7, 30]] = 2.0
    ids = topk_ids(scores.to(DEVICE), lengths(12), lengths(50), block_n=16, tiles_per_chunk=1).cpu()
    assert ids[0, 0].tolist() == [0, 1, *range(10, 20)]
    assert ids[0, 1].tolist() == [1, 2, 4, 7, 8, 10, 11, 13, 14, 16, 17, 19]
    assert ids[0, 2].tolist() == [7, 30] + [-1] * 10
    assert torch.equal(ids, naive_topk_ids(scores, torch.tensor([12]), torch.tensor([50])))


def test_topk_all_equal_and_partial_validity(seed):
    """Every score equal: the first k valid positions; positions past valid never chosen."""
    scores = torch.full((2, 2, 90), 0.25, device=DEVICE)
    ids = topk_ids(scores, lengths(5, 40), lengths(60, 40), block_n=16, tiles_per_chunk=1)
    assert ids[0, 0].tolist() == [0, 1, 2, 3, 4] + [-1] * 35
    assert ids[1, 1].tolist() == list(range(40))


def test_topk_blocks(seed):
    """Block scores -> ascending token ids, the partial last block cut at n_tokens, vs a token-mask oracle."""
    gen = torch.Generator().manual_seed(seed)
    block_scores = torch.randn(2, 3, 30, generator=gen).to(DEVICE)
    n_blocks, k_blocks, n_tokens = lengths(30, 9), lengths(4, 9), lengths(236, 70)
    ids = topk_blocks(block_scores, k_blocks, n_blocks, 8, n_tokens, block_n=16)
    assert torch.equal(
        ids.cpu(), naive_topk_blocks(block_scores.cpu(), k_blocks.cpu(), n_blocks.cpu(), 8, n_tokens.cpu())
    )
    assert ids[1, 0].tolist()[:70] == list(range(70)) and (ids[1, 0, 70:] == -1).all()


def test_expand_block_ids_hand_worked():
    block_ids = torch.tensor([[[0, 2, -1]]], dtype=torch.int32)
    assert expand_block_ids(block_ids, 4, torch.tensor([11], dtype=torch.int32)).tolist() == [
        [[0, 1, 2, 3, 8, 9, 10, -1, -1, -1, -1, -1]]
    ]


def test_radix_passes_cover_32_bits():
    assert radix_passes(8) == [(24, 8), (16, 8), (8, 8), (0, 8)]
    assert radix_passes(11) == [(21, 11), (10, 11), (0, 10)]


def test_topk_on_kernel_scores(seed):
    """The pipeline the runtime runs: HIGGS mean_query scores -> top-k per KV head."""
    codes, scales, grid, dequantized = quantized_keys(seed, 2, 61, 2, 64)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    n_scored, k = lengths(61, 30), lengths(7, 3)
    scores = higgs_landmark_scores(q, codes, scales, grid, n_scored, 2, "mean_query", **LAUNCH)
    ids = topk_ids(scores, k, n_scored, block_n=16)
    ref_scores = naive_batched_landmark_scores(q, dequantized, n_scored, "mean_query")
    for b in range(2):
        for h in range(2):
            kth = ref_scores[b, h, : int(n_scored[b])].topk(int(k[b])).values[-1]
            chosen = ref_scores[b, h, ids[b, h, : int(k[b])].long()]
            assert (chosen >= kth - 1e-5 * kth.abs().clamp_min(1)).all(), f"seed {seed}"


# --- bad input ----------------------------------------------------------------------------------------------


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


def test_bad_inputs_raise_clear_errors():
    codes, scales, grid, _ = quantized_keys(0, 1, 10, 2, 64)
    q = randn(1, 8, 64)
    n = lengths(10)
    cases = [
        (lambda: higgs_landmark_scores(q, codes, scales, grid, n, 3), "do not split evenly"),
        (lambda: higgs_landmark_scores(q, codes.int(), scales, grid, n, 2), "codes must have dtype uint8"),
        (lambda: higgs_landmark_scores(q, codes, scales[:, :5], grid, n, 2), "scales must be"),
        (lambda: higgs_landmark_scores(q, codes, scales, grid, lengths(11), 2), "n_scored must lie in 0..10"),
        (
            lambda: higgs_landmark_scores(q, codes, scales, grid, n.long(), 2),
            "n_scored must have dtype int32",
        ),
        (
            lambda: higgs_landmark_scores(q, codes, scales, grid, n, 2, "softmax_sum"),
            "unknown landmark scoring rule",
        ),
        (lambda: higgs_landmark_scores(q, codes, scales, grid, n, 2, "mean_query", 0.5), "raw dot product"),
        (lambda: higgs_landmark_scores(q, codes, scales, grid, n, 2, gather="shared"), "gather must be"),
        (
            lambda: higgs_landmark_scores(q, codes, scales, grid, n, 2, block_n=48),
            "block_n must be a power of two",
        ),
        (lambda: higgs_landmark_scores(q[:, :, :48], codes, scales, grid, n, 2), "power of two"),
        (lambda: higgs_landmark_scores(q, codes, scales, grid[:, :3], n, 2), "Hadamard group"),
        (
            lambda: higgs_landmark_scores(q, codes, scales, grid, n, 2, out=randn(1, 2, 9)),
            "out must be",
        ),
        (lambda: batched_landmark_scores(q, randn(1, 2, 10, 32), n), "head dims differ"),
        (lambda: batched_landmark_scores(q, randn(2, 2, 10, 64), n), "batch"),
        (lambda: batched_landmark_scores(q, randn(1, 2, 10, 64), n, precision="fp64"), "precision"),
        (
            lambda: page_bound_scores(q, randn(1, 2, 5, 64), randn(1, 2, 4, 64), lengths(4)),
            "differ",
        ),
        (
            lambda: page_bound_scores(q, randn(1, 2, 5, 64), randn(1, 2, 5, 64), lengths(5), "max"),
            "reduce",
        ),
        (lambda: topk_ids(randn(1, 2, 10).double(), n, n), "scores must have dtype float32"),
        (lambda: topk_ids(randn(1, 2, 10), lengths(11), n), r"k\[0\]=11 must lie in 0..valid\[0\]=10"),
        (lambda: topk_ids(randn(1, 2, 10), lengths(3), n, radix_bits=16), "radix_bits"),
        (lambda: topk_ids(randn(1, 2, 10), lengths(3), n, k_max=2), "k_max=2 is below"),
        (lambda: topk_blocks(randn(1, 2, 10), lengths(3), n, 0, n), "tokens per block"),
    ]
    for call, message in cases:
        with pytest.raises(KvdiagError, match=message):
            call()


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors are valid input on a machine without CUDA only")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KvdiagError, match="needs CUDA tensors"):
        topk_ids(torch.randn(1, 2, 10), lengths(3), lengths(10))


def test_benchmark_smoke_runs(tmp_path):
    """`python -m kvdiag.bench.select_kernels --smoke` writes its tidy rows (interpreter, seconds)."""
    import json

    from kvdiag.bench import select_kernels

    assert select_kernels.main(["--out", str(tmp_path), "--smoke"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "select_kernels.jsonl").read_text().splitlines()]
    kernels = {row["kernel"] for row in rows}
    assert {"higgs_scores", "batched_scores", "page_scores", "topk_ids"} <= kernels
    assert all("error" not in row for row in rows), [row["error"] for row in rows if "error" in row]


# --- on the GPU: Llama-3.1-8B shape (32 q / 8 kv heads, d = 128) ----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("length", [32768, 131072])
def test_gpu_llama_shape(length, seed):
    codes, scales, grid, dequantized = quantized_keys(seed, 2, length, 8, 128)
    n_scored = lengths(length, length // 3 + 1)
    gen = torch.Generator().manual_seed(seed)
    for q_dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 32, 128, generator=gen).to(q_dtype).to(DEVICE)
        for rule in RULES:
            ref = naive_batched_landmark_scores(q, dequantized, n_scored, rule)
            for gather in ("smem", "global"):
                out = higgs_landmark_scores(q, codes, scales, grid, n_scored, 8, rule, gather=gather)
                assert_scores_agree(out, ref, q_dtype, seed)
            landmarks = dequantized.to(torch.bfloat16)
            out = batched_landmark_scores(q, landmarks, n_scored, rule)
            assert_scores_agree(
                out, naive_batched_landmark_scores(q, landmarks, n_scored, rule), q_dtype, seed
            )
        pages = dequantized[:, :, : length // 16 * 16].reshape(2, 8, length // 16, 16, 128).to(torch.bfloat16)
        box_max, box_min = pages.amax(3), pages.amin(3)
        n_pages = lengths(length // 16, length // 48)
        for reduce in ("none", "mean"):
            out = page_bound_scores(q, box_max, box_min, n_pages, reduce)
            assert_scores_agree(
                out, naive_page_bound_scores(q, box_max, box_min, n_pages, reduce), q_dtype, seed
            )
    k = math.ceil(0.03125 * length)
    scores = higgs_landmark_scores(q, codes, scales, grid, n_scored, 8, "softmax_max")
    k_rows = lengths(k, k // 3)
    ids = topk_ids(scores, k_rows, n_scored)
    for b in range(2):
        kb = int(k_rows[b])
        expected = scores[b, :, : int(n_scored[b])].topk(kb).indices.sort().values.int()
        same = (ids[b, :, :kb] == expected).all(dim=-1)
        # a row may differ from torch.topk only where the k-th score is tied (ties -> lower index here)
        for h in (~same).nonzero().flatten().tolist():
            kth = scores[b, h].topk(kb).values[-1]
            differ = set(ids[b, h, :kb].tolist()) ^ set(expected[h].tolist())
            assert all(scores[b, h, i] == kth for i in differ), f"seed {seed}, row {b}, head {h}"
    torch.testing.assert_close(topk_ids(scores, k_rows, n_scored), naive_topk_ids(scores, k_rows, n_scored))
