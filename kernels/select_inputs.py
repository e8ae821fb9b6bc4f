"""Input checks and launch planning shared by the batched selection kernels (`higgs_scores`,
`batched_scores`, `page_scores`, `topk`) and their plain-PyTorch references (`naive_select`).

Conventions of every batched selection kernel:

    q        [B, H_q, d]   bf16 / fp16 / fp32, post-RoPE; query head h belongs to KV head h // G
    lengths  [B] int32     valid positions per batch row (prompts of different lengths); positions at
                           or beyond a row's length score -inf and are never selected

Importing this module imports neither triton nor the kernels; the checks raise `KvdiagError` naming
the bad value and what would be valid.
"""

from __future__ import annotations

import functools
import os

import torch
from kvdiag.kernels.naive import FLOAT_DTYPES

from kvdiag.errors import KvdiagError

PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot input precision of the tensor-core score paths
PROGRAMS_PER_SM = 4  # split-K style kernels aim at this many programs per multiprocessor
INTERPRETER_PROGRAMS = 16  # the same target under TRITON_INTERPRET=1 (one core, no SMs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_kernel_device(t: torch.Tensor, what: str) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if t.device.type != "cuda" and not interpreting():
        raise KvdiagError(
            f"the Triton {what} kernel needs CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing kvdiag.kernels, or use kvdiag.kernels.naive_select"
        )


def check_tensor(name: str, t, shape: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    """t must be a torch.Tensor with `ndim` dims and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise KvdiagError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KvdiagError(f"{name} must be {shape} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KvdiagError(f"{name} must have dtype {names}; got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise KvdiagError(f"{name} is on {device} but {first_name} is on {first}")
    return first


def check_group(n_q_heads: int, n_kv_heads: int) -> int:
    """G = H_q / H_kv; H_q must be a positive multiple of H_kv."""
    if n_kv_heads <= 0 or n_q_heads <= 0 or n_q_heads % n_kv_heads:
        raise KvdiagError(
            f"{n_q_heads} query heads do not split evenly over {n_kv_heads} KV heads "
            "(H_q must be a positive multiple of H_kv)"
        )
    return n_q_heads // n_kv_heads


def check_lengths(name: str, lengths, batch: int, max_len: int, device, *, validate: bool = True) -> None:
    """lengths: int32 [B] on `device`; with `validate`, every value in 0..max_len (a host sync)."""
    check_tensor(name, lengths, "[B] int32", 1, (torch.int32,))
    if lengths.shape[0] != batch:
        raise KvdiagError(f"{name} must have one entry per batch row ({batch}), got {lengths.shape[0]}")
    if lengths.device != device:
        raise KvdiagError(f"{name} is on {lengths.device} but the inputs are on {device}")
    if validate and batch:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > max_len:
            raise KvdiagError(
                f"{name} must lie in 0..{max_len} (the padded length), got values {low}..{high}"
            )


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """`out` if it is a [shape] tensor of `dtype` on `device`, a new empty one if None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise KvdiagError(f"out must be {dtype} {list(shape)} on {device}, got {got}")
    if out.device != device:
        raise KvdiagError(f"out must be on {device}, got {out.device}")
    return out


def check_block(name: str, value: int, low: int = 16, high: int = 1024) -> int:
    """Launch sizes are powers of two in low..high."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok or value & (value - 1):
        raise KvdiagError(f"{name} must be a power of two in {low}..{high}, got {value!r}")
    return value


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise KvdiagError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many programs a split kernel should launch to fill the device."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return programs_per_sm * _sm_count(index)


def plan_splits(
    n_tiles: int,
    parallel: int,
    device,
    tiles_per_split: int | None = None,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> tuple[int, int]:
    """(tiles_per_split, n_splits) so that `parallel` × n_splits programs about fill the device
    (`programs_per_sm` per multiprocessor).

    Each split is a contiguous run of tiles one program loops over; fewer splits means fewer partial
    statistics to merge later. `tiles_per_split` overrides the plan (tests use it to force loops).
    """
    if tiles_per_split is None:
        if isinstance(programs_per_sm, bool) or not isinstance(programs_per_sm, int) or programs_per_sm < 1:
            raise KvdiagError(f"programs_per_sm must be a positive integer, got {programs_per_sm!r}")
        wanted = max(1, -(-target_programs(device, programs_per_sm) // max(parallel, 1)))
        tiles_per_split = max(1, -(-n_tiles // wanted))
    elif isinstance(tiles_per_split, bool) or not isinstance(tiles_per_split, int) or tiles_per_split < 1:
        raise KvdiagError(f"tiles_per_split must be a positive integer, got {tiles_per_split!r}")
    return tiles_per_split, max(1, -(-n_tiles // tiles_per_split))
