"""Landmark-scoring kernels (`kvdiag.kernels.landmark_scores`) against the plain-PyTorch reference
(`kvdiag.kernels.naive`), and the reference against `kvdiag.methods._scoring`.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled on the GPU, plus the `gpu`-marked ones.
Every check draws fresh random inputs (the seed is in the failure message) and poisons the output and
the kernel's workspace with NaN before the launch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from kvdiag.kernels import landmark_scores as kernel_module
from kvdiag.kernels.landmark_scores import landmark_scores, landmark_topk
from kvdiag.kernels.naive import RULES, naive_landmark_scores, naive_landmark_topk

from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import mean_query_scores, softmax_max_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ‖kernel − reference‖ / ‖reference‖ allowed per query dtype (both sides compute in fp32 from the same
# upcast inputs, so all of these are loose; they leave room for a future tensor-core variant).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
N_ODD = (1, 7, 130, 1000)  # none a multiple of the 64-landmark block but 1 (a single partial block)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure), so every run checks new inputs."""
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    monkeypatch.setattr(kernel_module, "POISON_WORKSPACE", True)


def make_inputs(seed, n_kv, group, n_landmarks, d, q_dtype, lm_dtype=torch.bfloat16, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv * group, d, generator=gen).to(q_dtype)  # [H_q, d]
    landmarks = (spread * torch.randn(n_kv, n_landmarks, d, generator=gen)).to(lm_dtype)  # [H_kv, N, d]
    return q.to(DEVICE), landmarks.to(DEVICE)


def run_poisoned(q, landmarks, rule, scale=None, **launch):
    out = torch.full((landmarks.shape[0], landmarks.shape[1]), float("nan"), device=q.device)
    result = landmark_scores(q, landmarks, rule, scale, out=out, **launch)
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} scores were not written"
    return out


def assert_agrees(out, ref, dtype, seed):
    tol = TOLERANCE[dtype]
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= tol, f"relative error {rel:.2e} > {tol:.0e} (seed {seed})"
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=f"seed {seed}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_landmarks", N_ODD)
def test_kernel_matches_reference_odd_shapes(rule, group, d, n_landmarks, seed):
    for q_dtype in (torch.float32, torch.bfloat16):
        q, landmarks = make_inputs(seed, 2, group, n_landmarks, d, q_dtype)
        out = run_poisoned(q, landmarks, rule)
        assert out.shape == (2, n_landmarks) and out.dtype == torch.float32
        assert_agrees(out, naive_landmark_scores(q, landmarks, rule), q_dtype, seed)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "q_dtype, lm_dtype",
    [(torch.float16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float16)],
)
def test_kernel_other_dtypes(rule, q_dtype, lm_dtype, seed):
    q, landmarks = make_inputs(seed, 3, 2, 333, 96, q_dtype, lm_dtype)  # d = 96: a masked head dim
    assert_agrees(run_poisoned(q, landmarks, rule), naive_landmark_scores(q, landmarks, rule), q_dtype, seed)


@pytest.mark.parametrize("block_n", [16, 128])
def test_peaked_softmax_across_blocks(block_n, seed):
    """Large logits (spread 8, scale 1: |q·l| up to ~500): the block maxima differ widely, so the
    merge must be stable. Compared with a float64 reference: an fp32 logit of ~500 carries ~3e-5 of
    absolute rounding, which the softmax turns into ~3e-5 relative error in a probability, for the fp32
    reference as much as for the kernel, hence 1e-4 here."""
    q, landmarks = make_inputs(seed, 2, 4, 1000, 64, torch.float32, spread=8.0)
    out = run_poisoned(q, landmarks, "softmax_max", 1.0, block_n=block_n)
    ref = naive_landmark_scores(q, landmarks, "softmax_max", 1.0, compute_dtype=torch.float64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_strided_landmarks(seed):
    """Landmarks laid out as rows of all heads ([N, H_kv, d], the quantizer's row layout), viewed
    as [H_kv, N, d] without a copy."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(130, 2, 128, generator=gen).to(torch.bfloat16).to(DEVICE)  # [N, H_kv, d]
    q = torch.randn(8, 128, generator=gen).to(DEVICE)
    landmarks = rows.transpose(0, 1)
    for rule in RULES:
        assert_agrees(
            run_poisoned(q, landmarks, rule), naive_landmark_scores(q, landmarks, rule), torch.float32, seed
        )


def test_no_landmarks():
    q, landmarks = make_inputs(0, 2, 4, 0, 64, torch.float32)
    for rule in RULES:
        assert landmark_scores(q, landmarks, rule).shape == (2, 0)
    values, indices = landmark_topk(q, landmarks, 5)
    assert values.shape == indices.shape == (2, 0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n_landmarks, k", [(7, 3), (1000, 31), (130, 500)])
def test_topk_matches_reference_where_untied(rule, n_landmarks, k, seed):
    q, landmarks = make_inputs(seed, 2, 4, n_landmarks, 128, torch.float32)
    values, indices = landmark_topk(q, landmarks, k, rule)
    ref = naive_landmark_scores(q, landmarks, rule)
    ref_values, ref_indices = naive_landmark_topk(q, landmarks, k, rule)
    k = min(k, n_landmarks)
    assert indices.shape == ref_indices.shape == (2, k)
    tol = 1e-5 * ref.abs().amax(dim=-1, keepdim=True)
    kth = ref_values[:, -1:]  # the k-th best reference score per KV head
    # Every chosen landmark is at least as good as the k-th (up to tolerance) ...
    assert (ref.gather(1, indices) >= kth - tol).all(), f"seed {seed}"
    # ... and where the k-th and (k+1)-th reference scores are not tied, the sets are identical.
    if k < n_landmarks:
        next_best = ref.topk(k + 1, dim=-1).values[:, -1:]
        untied = (kth - next_best > tol).squeeze(-1)
    else:
        untied = torch.ones(2, dtype=torch.bool, device=ref.device)
    for head in untied.nonzero().flatten().tolist():
        assert set(indices[head].tolist()) == set(ref_indices[head].tolist()), f"seed {seed}, head {head}"
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("group", [1, 3, 4])
def test_reference_matches_study_scoring(group, seed):
    """naive.py and kvdiag.methods._scoring (what the simulator uses) compute the same rules."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2 * group, 64, generator=gen).to(torch.bfloat16)
    landmarks = torch.randn(2, 130, 64, generator=gen).to(torch.bfloat16)
    scale = 1 / math.sqrt(64)
    torch.testing.assert_close(
        naive_landmark_scores(q, landmarks, "softmax_max"), softmax_max_scores(q[None], landmarks, scale)[0]
    )
    torch.testing.assert_close(
        naive_landmark_scores(q, landmarks, "mean_query"), mean_query_scores(q[None], landmarks)[0]
    )


def test_reference_hand_worked_case():
    """Two landmarks, one KV head, G = 2: scores worked out by hand."""
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # two query heads
    landmarks = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # [1, 2, 2]
    # head 0 logits (scale 1): [ln 3, 0] -> softmax [3/4, 1/4]; head 1: [0, 0] -> [1/2, 1/2]
    expected = torch.tensor([[0.75, 0.5]])
    torch.testing.assert_close(naive_landmark_scores(q, landmarks, "softmax_max", 1.0), expected)
    # mean query [0.5, 1] · landmarks = [ln 3 / 2, 0]
    expected_mean = torch.tensor([[math.log(3.0) / 2, 0.0]])
    torch.testing.assert_close(naive_landmark_scores(q, landmarks, "mean_query"), expected_mean)
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return
    torch.testing.assert_close(
        landmark_scores(q.to(DEVICE), landmarks.to(DEVICE), "softmax_max", 1.0).cpu(), expected
    )


BAD_INPUTS = [
    ("q 3-D", lambda q, lm: (q[None], lm, "softmax_max", None), "q must be"),
    ("landmarks 2-D", lambda q, lm: (q, lm[0], "softmax_max", None), "landmarks must be"),
    ("head dims differ", lambda q, lm: (q[:, :32], lm, "softmax_max", None), "head dims differ"),
    ("uneven group", lambda q, lm: (q[:7], lm, "softmax_max", None), "do not split evenly"),
    ("integer q", lambda q, lm: (q.to(torch.int32), lm, "softmax_max", None), "bf16, fp16 or fp32"),
    ("unknown rule", lambda q, lm: (q, lm, "softmax_sum", None), "unknown landmark scoring rule"),
    ("scale with mean", lambda q, lm: (q, lm, "mean_query", 0.1), "raw dot product"),
    ("nan scale", lambda q, lm: (q, lm, "softmax_max", float("nan")), "finite"),
    ("not a tensor", lambda q, lm: (q.tolist(), lm, "softmax_max", None), "torch.Tensor"),
]


@pytest.mark.parametrize("case, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(case, build, message):
    q, landmarks = make_inputs(0, 2, 4, 10, 64, torch.float32)
    args = build(q, landmarks)
    for fn in (landmark_scores, naive_landmark_scores):
        with pytest.raises(KvdiagError, match=message):
            fn(*args)


def test_bad_out_k_and_block_raise_clear_errors():
    q, landmarks = make_inputs(0, 2, 4, 10, 64, torch.float32)
    with pytest.raises(KvdiagError, match="out must be fp32"):
        landmark_scores(q, landmarks, out=torch.empty(2, 9, device=DEVICE))
    with pytest.raises(KvdiagError, match="block_n"):
        landmark_scores(q, landmarks, block_n=48)
    for k in (-1, 2.5, True):
        with pytest.raises(KvdiagError, match="integer k"):
            landmark_topk(q, landmarks, k)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors are valid input on a machine without CUDA only")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, landmarks = make_inputs(0, 2, 4, 10, 64, torch.float32)
    with pytest.raises(KvdiagError, match="need CUDA tensors"):
        landmark_scores(q, landmarks)


def test_package_import_is_light():
    code = (
        "import sys, kvdiag.kernels; print('triton' in sys.modules, hasattr(kvdiag.kernels, '__version__'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# --- on the GPU: realistic sizes (Llama-3.1-8B: 32 q / 8 kv heads, d = 128) -----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n_landmarks", [4096, 32768, 131072])
@pytest.mark.parametrize("rule", RULES)
def test_gpu_llama_shape(rule, n_landmarks, seed):
    for q_dtype in (torch.float32, torch.bfloat16):
        q, landmarks = make_inputs(seed, 8, 4, n_landmarks, 128, q_dtype)
        out = run_poisoned(q, landmarks, rule)
        assert_agrees(out, naive_landmark_scores(q, landmarks, rule), q_dtype, seed)
    k = math.ceil(0.03125 * n_landmarks)
    _, indices = landmark_topk(q, landmarks, k, rule)
    ref = naive_landmark_scores(q, landmarks, rule)
    kth = ref.topk(k, dim=-1).values[:, -1:]
    assert (ref.gather(1, indices) >= kth - 1e-5 * ref.abs().amax(dim=-1, keepdim=True)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("block_n, num_warps", [(32, 4), (64, 4), (128, 8), (256, 8)])
def test_gpu_launch_configs(block_n, num_warps, seed):
    q, landmarks = make_inputs(seed, 8, 4, 20000, 128, torch.bfloat16)
    for rule in RULES:
        out = run_poisoned(q, landmarks, rule, block_n=block_n, num_warps=num_warps)
        assert_agrees(out, naive_landmark_scores(q, landmarks, rule), torch.float32, seed)
