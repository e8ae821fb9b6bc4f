"""kvdiag.quant against independent references: scipy's Hadamard matrix, literature Gaussian quantizer
constants, hand-enumerated FP8 / FP4 tables, a numpy NVFP4 and a numpy HIGGS written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from kvdiag.errors import KvdiagError
from kvdiag.quant import get_quantizer, grid_info, grid_names, list_quantizers, load_grid, walsh_hadamard

# Scalar Lloyd–Max MSE of a unit Gaussian (Max 1960; Jayant & Noll table 4.3), by bits.
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
# Lloyd–Max reconstruction levels (positive half) of a unit Gaussian, 4 and 16 levels (Max 1960).
LLOYD_MAX_4 = [0.4528, 1.510]
LLOYD_MAX_16 = [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]
SHIPPED = ["EDEN1-4", "EDEN1-16", "EDEN2-16", "EDEN2-64", "EDEN2-256", "EDEN4-256", "EDEN8-256", "EDEN8-4096"]


def e4m3_table() -> np.ndarray:
    """Every finite E4M3 value: sign, 4 exponent bits (bias 7), 3 mantissa bits, S.1111.111 = NaN."""
    values = set()
    for exp in range(16):
        for man in range(8):
            if exp == 15 and man == 7:
                continue  # the only NaN encoding; no infinities
            mag = (man / 8) * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
            values.update((mag, -mag))
    return np.array(sorted(values))


E4M3 = e4m3_table()
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nearest_in(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest entry of a sorted table for every x (saturating at the ends)."""
    return table[np.abs(x[..., None] - table).argmin(-1)]


# ---------------------------------------------------------------- Walsh–Hadamard


@pytest.mark.parametrize("g", [2**k for k in range(1, 9)])
def test_walsh_hadamard_matches_scipy_and_inverts(g):
    x = torch.randn(3, 2, g, dtype=torch.float64)
    expected = x.numpy() @ scipy.linalg.hadamard(g).T  # H x per row
    np.testing.assert_allclose(walsh_hadamard(x).numpy(), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(walsh_hadamard(walsh_hadamard(x), scale=1 / g), x)


def test_walsh_hadamard_rejects_non_power_of_two():
    with pytest.raises(KvdiagError, match="power of two"):
        walsh_hadamard(torch.randn(4, 12))


# ---------------------------------------------------------------- EDEN grids


def test_all_required_grids_ship():
    assert set(SHIPPED) <= set(grid_names())
    info = grid_info()
    for name in SHIPPED:
        grid = load_grid(name)
        d, n = info[name]["d"], info[name]["n"]
        assert grid.shape == (n, d) and grid.dtype == torch.float32
        assert info[name]["bits_per_coord"] == pytest.approx(math.log2(n) / d)


def test_eden1_grids_are_lloyd_max():
    levels4 = np.sort(load_grid("EDEN1-4")[:, 0].numpy())
    np.testing.assert_allclose(levels4, [-1.510, -0.4528, 0.4528, 1.510], atol=1e-2)
    levels16 = np.sort(load_grid("EDEN1-16")[:, 0].numpy())
    expected16 = np.concatenate([-np.array(LLOYD_MAX_16[::-1]), LLOYD_MAX_16])
    np.testing.assert_allclose(levels16, expected16, atol=1e-2)


@pytest.mark.parametrize("name", SHIPPED)
def test_grid_json_mse_matches_fresh_measurement(name):
    grid = load_grid(name).double()
    d, n = grid.shape[1], grid.shape[0]
    gen = torch.Generator().manual_seed(12345)
    samples = 50_000 if n > 256 else 200_000
    x = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    err = torch.cat([torch.cdist(c, grid).amin(-1).square() for c in x.split(20_000)])
    fresh = err.mean().item() / d
    recorded = grid_info()[name]["mse_per_coord"]
    assert fresh == pytest.approx(recorded, rel=0.03)
    bits = math.log2(n) / d
    assert 2.0 ** (-2 * bits) < fresh  # Shannon's rate–distortion bound
    if bits == int(bits):
        assert fresh < LLOYD_MAX_MSE[int(bits)] * 1.01  # vector grids beat (or, d = 1, match) scalar


# ---------------------------------------------------------------- HIGGS


@pytest.mark.parametrize(
    ("grid", "bits"), [("EDEN4-256", 2), ("EDEN2-16", 2), ("EDEN2-256", 4), ("EDEN2-64", 3), ("EDEN8-256", 1)]
)
def test_higgs_gaussian_mse_between_shannon_and_lloyd_max(grid, bits):
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0))
    mse = (get_quantizer(f"higgs:{grid}").roundtrip(x) - x).square().mean().item()
    assert 2.0 ** (-2 * bits) < mse < LLOYD_MAX_MSE[bits]


def test_higgs_1p5_bit_grid_sits_between_rates():
    x = torch.randn(1024, 128, generator=torch.Generator().manual_seed(1))
    mse = (get_quantizer("higgs:EDEN8-4096").roundtrip(x) - x).square().mean().item()
    assert 2.0**-3 < mse < LLOYD_MAX_MSE[1]


def numpy_higgs(x: np.ndarray, grid: np.ndarray, g: int) -> np.ndarray:
    """HIGGS round trip written out with scipy's Hadamard matrix and brute-force nearest points."""
    n, d = x.shape[-1], grid.shape[1]
    m = -(-n // g)
    h = scipy.linalg.hadamard(g).astype(np.float64)
    groups = np.zeros((x.shape[0], m * g))
    groups[:, :n] = x
    groups = groups.reshape(x.shape[0], m, g)
    s = np.linalg.norm(groups, axis=-1, keepdims=True)
    y = groups @ h.T / np.where(s > 0, s, 1)
    sub = y.reshape(-1, d)
    idx = ((sub[:, None, :] - grid[None]) ** 2).sum(-1).argmin(-1)
    y_hat = grid[idx].reshape(y.shape)
    s32 = s.astype(np.float32).astype(np.float64)  # the norm is stored in fp32, as upstream
    scaled = (y_hat * s32).astype(np.float16).astype(np.float64)  # upstream casts to fp16 here
    out = (scaled @ h.T / g).astype(np.float16).astype(np.float64)  # and the transform's output too
    return out.reshape(x.shape[0], m * g)[:, :n]


@pytest.mark.parametrize(
    ("spec", "n", "g"),
    [
        ("higgs:EDEN4-256", 128, 128),
        ("higgs:EDEN4-256", 96, 128),  # short row: next power of two
        ("higgs:EDEN2-256:g64", 256, 64),
        ("higgs:EDEN8-256:row", 320, 512),
        ("higgs:EDEN2-16:g32", 80, 32),  # padded last group
    ],
)
def test_higgs_matches_numpy_reference(spec, n, g):
    x = torch.randn(64, n, generator=torch.Generator().manual_seed(2))
    grid = load_grid(spec.split(":")[1]).double().numpy()
    expected = numpy_higgs(x.double().numpy(), grid, g)
    # both sides round to fp16 twice (as upstream); their fp32 vs fp64 transforms may differ by one fp16 step
    np.testing.assert_allclose(get_quantizer(spec).roundtrip(x).numpy(), expected, rtol=1e-3, atol=1e-3)


def test_higgs_zero_row_and_scale_invariance():
    q = get_quantizer("higgs:EDEN4-256")
    x = torch.randn(4, 128)
    x[1] = 0
    out = q.roundtrip(x)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(q.roundtrip(x * 8), out * 8)  # powers of two survive the fp16 steps


# ---------------------------------------------------------------- float formats


def test_fp8_roundtrip_is_nearest_e4m3_value():
    x = torch.randn(64, 128, dtype=torch.float64) * torch.logspace(-4, 3, 128, dtype=torch.float64)
    out = get_quantizer("fp8_e4m3").roundtrip(x.float()).double().numpy()
    assert np.isin(out, E4M3).all()
    np.testing.assert_array_equal(out, nearest_in(E4M3, x.float().double().numpy()))
    assert E4M3.max() == 448 and np.abs(out).max() == 448  # saturates, no inf


def test_fp8_row_scale_lands_on_scaled_grid():
    x = torch.randn(8, 64) * 1e4
    q = get_quantizer("fp8_e4m3:row")
    qt = q.quantize(x)
    scale = qt.scales[0].double().numpy()
    out = q.dequantize(qt).double().numpy()
    assert np.isin(out / scale, E4M3).all()
    assert np.abs(out - x.numpy()).max() <= np.abs(x.numpy()).max() * 2**-4


def numpy_nvfp4(x: np.ndarray) -> np.ndarray:
    """NVFP4 round trip: blocks of 16, E4M3 block scales, one tensor scale, nearest E2M1 value."""
    rows, n = x.shape
    blocks = x.reshape(rows, n // 16, 16)
    block_scale = np.abs(blocks).max(-1) / 6
    tensor_scale = 448 / block_scale.max()
    scale = nearest_in(E4M3, block_scale * tensor_scale) / tensor_scale
    scaled = np.clip(blocks / scale[..., None], -6, 6)
    fp4 = np.sign(scaled) * nearest_in(E2M1, np.abs(scaled))
    return (fp4 * scale[..., None]).reshape(rows, n)


def test_nvfp4_matches_numpy_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 128, generator=gen) * torch.rand(32, 1, generator=gen) * 10
    out = get_quantizer("nvfp4").roundtrip(x).double().numpy()
    np.testing.assert_allclose(out, numpy_nvfp4(x.double().numpy()), rtol=1e-6, atol=1e-9)


def test_nvfp4_ties_round_to_even_and_padding():
    # block max 6 → scale 1 exactly; 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4
    row = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0]])
    out = get_quantizer("nvfp4").roundtrip(row)
    torch.testing.assert_close(out, torch.tensor([[6.0, 0, 1, 1, 2, 2, 4, 4, -1, -4]]))


# ---------------------------------------------------------------- integers


def test_int2_exact_on_its_own_levels():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    torch.testing.assert_close(get_quantizer("int2").roundtrip(x), x, rtol=0, atol=0)


def test_int_constant_row_exact():
    x = torch.full((2, 16), 1.5)
    torch.testing.assert_close(get_quantizer("int4").roundtrip(x), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "bits", "group"), [("int8", 8, 100), ("int4:g32", 4, 32), ("int2:g16", 2, 16)]
)
def test_int_error_at_most_half_a_step(spec, bits, group):
    x = torch.randn(16, 100, generator=torch.Generator().manual_seed(4)) * 3
    out = get_quantizer(spec).roundtrip(x)
    for start in range(0, 100, group):
        xs = x[:, start : start + group]
        half_step = (xs.amax(-1, keepdim=True) - xs.amin(-1, keepdim=True)) / (2**bits - 1) / 2
        fp16_slack = 2**-10 * xs.abs().amax(-1, keepdim=True)  # zero and step are stored as fp16
        assert ((out[:, start : start + group] - xs).abs() <= half_step + fp16_slack).all()


# ---------------------------------------------------------------- shapes, bytes, errors


@pytest.mark.parametrize("spec", sorted(list_quantizers()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype_preserved(spec, dtype):
    q = get_quantizer(spec)
    assert q.name == get_quantizer(q.name).name  # canonical names parse back to themselves
    gen = torch.Generator().manual_seed(5)
    for shape in [(2, 3, 5, 128), (7, 96), (64,)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        out = q.roundtrip(x)
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
        rel = ((out.float() - x.float()).square().sum() / x.float().square().sum()).item()
        assert rel < 0.7  # a sanity bound: int2 per 128-row of Gaussians is ~0.45, 0.5-bit grids ~0.6


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        ("higgs:EDEN4-256", 128, 128 * 2 / 8 + 4),
        ("higgs:EDEN2-256", 128, 128 * 4 / 8 + 4),
        ("higgs:EDEN4-256", 1024, 1024 * 2 / 8 + 8 * 4),
        ("higgs:EDEN4-256:row", 1024, 1024 * 2 / 8 + 4),
        ("higgs:EDEN8-4096", 128, 16 * 12 / 8 + 4),
        ("higgs:EDEN8-4096", 64, 8 * 12 / 8 + 4),
        ("higgs:EDEN4-256", 96, 128 * 2 / 8 + 4),  # padded to 128 coordinates
        ("int4", 128, 64 + 4),
        ("int4:g32", 128, 64 + 4 * 4),
        ("int2", 128, 32 + 4),
        ("fp8_e4m3", 128, 128),
        ("fp8_e4m3:row", 128, 130),
        ("nvfp4", 128, 64 + 8),
        ("bf16", 128, 256),
    ],
)
def test_bytes_per_row(spec, n, expected):
    assert get_quantizer(spec).bytes_per_row(n) == pytest.approx(expected)


def test_bits_per_value():
    assert get_quantizer("higgs:EDEN4-256").bits_per_value == 2
    assert get_quantizer("higgs:EDEN8-4096").bits_per_value == 1.5
    assert get_quantizer("int4:g32").bits_per_value == 4
    assert get_quantizer("nvfp4").bits_per_value == 4


@pytest.mark.parametrize(
    ("spec", "hint"), [("higs:EDEN4-256", "higgs:EDEN4-256"), ("nvfp5", "nvfp4"), ("fp8", "fp8_e4m3")]
)
def test_unknown_spec_did_you_mean(spec, hint):
    with pytest.raises(KvdiagError, match=f"did you mean.*'{hint}'"):
        get_quantizer(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("int0", "bit width"),
        ("int9", "bit width"),
        ("int16", "bit width"),
        ("int4:g0", "g<positive int>"),
        ("int4:gx", "g<positive int>"),
        ("higgs:EDEN4-256:g100", "power of two"),
        ("higgs:EDEN3-256", "unknown EDEN grid 'EDEN3-256'; did you mean"),
        ("higgs", "needs a grid"),
        ("bf16:row", "takes no options"),
        ("fp8_e4m3:g32", "only ':row'"),
    ],
)
def test_bad_params_raise_clear_errors(spec, match):
    with pytest.raises(KvdiagError, match=match):
        get_quantizer(spec)


def test_dequantize_checks_the_format():
    qt = get_quantizer("int4").quantize(torch.randn(2, 8))
    with pytest.raises(KvdiagError, match="made by 'int4'"):
        get_quantizer("int8").dequantize(qt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", sorted(list_quantizers()))
def test_cuda_matches_cpu(spec):
    q = get_quantizer(spec)
    x = torch.randn(512, 3, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    out = q.roundtrip(x.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    close = torch.isclose(out.cpu().float(), q.roundtrip(x).float(), rtol=1e-2, atol=1e-3)
    assert close.float().mean() > 0.999  # rare near-ties may pick the other grid point
