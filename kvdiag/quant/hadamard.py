"""Fast Walsh–Hadamard transform in plain torch (CPU and CUDA, any leading dims).

The unnormalised Sylvester-ordered Hadamard matrix H_g (H_1 = [1], H_2g = [[H_g, H_g], [H_g, −H_g]],
the matrix `scipy.linalg.hadamard(g)` returns) satisfies H_g H_g = g·I, so the transform is its own
inverse up to 1/g. This is what `fast_hadamard_transform.hadamard_transform(x, scale)` computes in
the HIGGS code (Malinovskii et al., 2024); kvdiag uses log2(g) vectorised butterflies instead of
that CUDA extension.
"""

from __future__ import annotations

import torch

from kvdiag.errors import KvdiagError


def is_power_of_two(g: int) -> bool:
    return g >= 1 and (g & (g - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def walsh_hadamard(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale · H_g x along the last dim: x [..., g] → [..., g], g a power of two.

    Butterfly stage h pairs entries i and i + h inside blocks of 2h and maps (a, b) → (a + b, a − b).
    """
    g = x.shape[-1]
    if not is_power_of_two(g):
        raise KvdiagError(f"Walsh–Hadamard size must be a power of two, got {g}")
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < g:
        y = y.reshape(*lead, g // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(*lead, g)
    return y * scale if scale != 1.0 else y
