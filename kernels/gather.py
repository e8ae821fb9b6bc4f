"""Gather of the selected K/V rows from pinned host memory into GPU memory (zero-copy Triton kernel).

    src   [B, H_kv, L_max, d]  in pinned host memory; any dtype (fp8 e4m3 for YAKV's K and V, bf16 for
                               ShadowKV's values): rows are moved as raw bytes, d·itemsize per row
    ids   [B, H_kv, K]         int32 (int64 accepted) on the GPU, ascending, −1 = padding
    out   [B, H_kv, K, d]      src's dtype, on the GPU; rows of id −1 (and ids ≥ L_max) are zeros

Bytes: K·(d·itemsize) per (batch element, KV head) and source. YAKV at d = 128, fp8 K and V: 256 B per
selected token and KV head, 8 MiB per layer and step at L = 128K, k = 3.125 % (4096 tokens), H_kv = 8,
B = 1: 152 µs at the 55 GB/s pinned host→device link of the H200 (`gpu/ceilings.json`). A pair of
sources (`gather_rows((k_host, v_host), ids)`) shares the ids and one launch.

UVA (unified virtual addressing, every 64-bit Linux CUDA process): pinned host memory (from
`tensor.pin_memory()` or `torch.empty(..., pin_memory=True)`, i.e. cudaHostAlloc) is mapped into the
GPU's address space, at the same address. Triton's launcher turns each pointer argument into a device
pointer with `cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)`, which succeeds for pinned
host memory, so the kernel is handed the pinned CPU tensor itself and its loads travel over PCIe
(zero-copy); pageable memory fails there ("Pointer argument cannot be accessed from Triton (cpu
tensor?)"), which `gather_rows` turns into a KvdiagError before the launch. `cuda_view_of_pinned`
builds a CUDA tensor aliasing pinned memory (via `__cuda_array_interface__`) for torch ops that want
one. Limits: zero-copy reads bypass the copy engines, so throughput depends on enough reads in
flight (many rows per program, 16-byte loads: the kernel views rows as int32 words and hints
16-byte alignment) and on 128-byte-aligned row starts; memory must stay pinned and alive until the
kernel has finished; another GPU process cannot see it.

Kernel: grid (⌈K / rows_per_program⌉, B·H_kv); a program loads `rows_per_program` ids, then those
rows of every source as a [rows, words] tile (masked loads give the zero rows) and stores them.

Measured on the H200 (torch 2.11, Triton 3.6, `kvdiag.bench.attend_kernels`, CUDA-graph replays,
2026-12-01): YAKV's K + V pair at L = 32K / 128K, B = 1 / 8 (2.2 to 68 MB per call) moved 48–51 GB/s,
0.87–0.93 of the link (a contiguous pinned copy of the same bytes: 39–55 GB/s in the same run);
ShadowKV's bf16 values 45–51 GB/s. The launch config made no difference (16–256 rows, 4–8 warps:
within 2 %): the link is the limit. The alternatives: ids to the CPU + index_select + async copy
3.6–4.9 GB/s; torch's indexing kernel on the UVA view (`cuda_view_of_pinned`) 6–27 GB/s.

Backends: "triton" (the kernel; CUDA, or CPU tensors under TRITON_INTERPRET=1, where host = CPU),
"torch" (the alternative the benchmark compares: ids to the CPU — a synchronisation —,
`index_select` on the CPU into a pinned staging buffer, then an async `copy_` to the GPU, on `stream`
if given), "auto" (triton where it can run, else torch).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl
from kvdiag.kernels.naive_attend import check_gather_inputs

from kvdiag.errors import KvdiagError

__all__ = ["BACKENDS", "cuda_view_of_pinned", "default_num_warps", "default_rows_per_program", "gather_rows"]

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "torch")
LOAD_BYTES = 16  # widest vector load / store of one thread


@triton.jit
def _gather_rows_kernel(
    ids_ptr,  # [B, H_kv, K] int32 / int64
    src_a_ptr,  # [B, H_kv, L_max, WORDS] words (int32 or uint8 view), pinned host or GPU
    out_a_ptr,  # [B, H_kv, K, WORDS] words, GPU
    src_b_ptr,  # second source (PAIR only; otherwise an alias of the first)
    out_b_ptr,
    n_kv_heads,
    n_ids,
    n_rows,
    stride_ib, stride_ih, stride_ik,
    stride_ab, stride_ah, stride_al,
    stride_bb, stride_bh, stride_bl,
    stride_oab, stride_oah, stride_oak,
    stride_obb, stride_obh, stride_obk,
    WORDS: tl.constexpr,
    BLOCK_W: tl.constexpr,  # WORDS rounded up to a power of two
    ROWS: tl.constexpr,
    PAIR: tl.constexpr,
    ALIGN: tl.constexpr,  # every row start is a multiple of ALIGN words (16-byte loads when 16 B)
):  # fmt: skip
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)
    h = (bh % n_kv_heads).to(tl.int64)
    offs_k = block * ROWS + tl.arange(0, ROWS)
    in_range = offs_k < n_ids
    row = tl.load(ids_ptr + b * stride_ib + h * stride_ih + offs_k * stride_ik, mask=in_range, other=-1)
    row = row.to(tl.int64)
    valid = (row >= 0) & (row < n_rows)  # out-of-range ids are masked, never read
    offs_w = tl.arange(0, BLOCK_W)[None, :]
    load_mask = valid[:, None]
    store_mask = in_range[:, None]
    if BLOCK_W != WORDS:
        load_mask = load_mask & (offs_w < WORDS)
        store_mask = store_mask & (offs_w < WORDS)
    src_a = tl.multiple_of(b * stride_ab + h * stride_ah + row * stride_al, ALIGN)
    out_a = tl.multiple_of(b * stride_oab + h * stride_oah + offs_k * stride_oak, ALIGN)
    tile_a = tl.load(src_a_ptr + src_a[:, None] + offs_w, mask=load_mask, other=0)
    if PAIR:
        src_b = tl.multiple_of(b * stride_bb + h * stride_bh + row * stride_bl, ALIGN)
        out_b = tl.multiple_of(b * stride_obb + h * stride_obh + offs_k * stride_obk, ALIGN)
        tile_b = tl.load(src_b_ptr + src_b[:, None] + offs_w, mask=load_mask, other=0)
        tl.store(out_b_ptr + out_b[:, None] + offs_w, tile_b, mask=store_mask)
    tl.store(out_a_ptr + out_a[:, None] + offs_w, tile_a, mask=store_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_rows_per_program(row_bytes: int) -> int:
    """Rows per program: a tile of 8 KiB per source (64 rows of 128 B), at least 16 rows (the H200
    sweep found every tile from 16 to 256 rows within 2 % of the best)."""
    return max(16, min(256, 8192 // row_bytes))


def default_num_warps(row_bytes: int) -> int:
    return 4


def cuda_view_of_pinned(host: torch.Tensor, device: int | str | torch.device = "cuda") -> torch.Tensor:
    """A CUDA tensor aliasing pinned host memory `host` (same shape, strides, dtype; UVA zero-copy).

    Reads and writes through the view cross PCIe. The view keeps `host` alive. Raises KvdiagError if
    `host` is not a pinned CPU tensor. fp8 and other dtypes without an array-interface code are
    viewed through uint8 and viewed back.
    """
    if not isinstance(host, torch.Tensor) or host.device.type != "cpu" or not host.is_pinned():
        where = host.device if isinstance(host, torch.Tensor) else type(host).__name__
        raise KvdiagError(f"cuda_view_of_pinned needs a pinned CPU tensor (tensor.pin_memory()), got {where}")
    raw = host.view(torch.uint8) if host.dim() else host.reshape(1).view(torch.uint8)

    class _Interface:
        def __init__(self, t: torch.Tensor):
            self.keep_alive = host
            self.__cuda_array_interface__ = {
                "shape": tuple(t.shape),
                "strides": tuple(s * t.element_size() for s in t.stride()),
                "typestr": "|u1",
                "data": (t.data_ptr(), False),
                "version": 3,
            }

    with torch.cuda.device(device):
        view = torch.as_tensor(_Interface(raw), device=device)
    return view.view(host.dtype).reshape(host.shape)


def _word_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t viewed as int32 words — or uint8 where rows are not 4-byte multiples —, byte size of a word)."""
    row_bytes = t.shape[-1] * t.element_size()
    offset_bytes = t.storage_offset() * t.element_size()
    strides_ok = all(s * t.element_size() % 4 == 0 for s in t.stride()[:-1])
    if row_bytes % 4 == 0 and offset_bytes % 4 == 0 and strides_ok:
        return t.view(torch.uint8).view(torch.int32), 4
    return t.view(torch.uint8), 1


def _alignment(views: list[torch.Tensor], word_bytes: int) -> int:
    """Largest ALIGN (words) dividing every row start of every view, capped at one 16-byte load."""
    align = LOAD_BYTES // word_bytes
    for v in views:
        align = math.gcd(align, v.data_ptr() // word_bytes, *v.stride()[:-1])
    return max(align, 1)


def _target_device(srcs, ids, outs) -> torch.device:
    if outs is not None:
        return outs[0].device
    if _interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return ids.device if ids.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _check_out(outs, shape, dtype) -> None:
    for i, out in enumerate(outs):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype:
            got = f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise KvdiagError(f"out[{i}] must be a {dtype} tensor {list(shape)} = [B, H_kv, K, d], got {got}")
        if out.stride(-1) != 1 and shape[-1] > 1:
            raise KvdiagError(
                f"out[{i}] rows must be contiguous (stride 1 along d), got strides {out.stride()}"
            )
        if out.device != outs[0].device:
            raise KvdiagError(f"all outputs must be on one device, got {outs[0].device} and {out.device}")


def _gather_triton(srcs, ids, outs, rows_per_program, num_warps) -> None:
    device = outs[0].device
    for src in srcs:
        if src.device.type == "cpu" and device.type == "cuda" and not src.is_pinned():
            raise KvdiagError(
                "src is pageable CPU memory: the GPU reads host memory directly only when it is pinned "
                "(tensor.pin_memory() or torch.empty(..., pin_memory=True)); or use backend='torch'"
            )
        if src.device.type == "cuda" and src.device != device:
            raise KvdiagError(f"src is on {src.device} but the output is on {device}")
    if ids.device != device:
        raise KvdiagError(
            f"ids must be on the output's device {device} for the Triton gather, got {ids.device}"
        )
    batch, n_kv_heads, n_ids = ids.shape
    if batch * n_kv_heads * n_ids == 0 or srcs[0].shape[-1] == 0:
        return
    src_views, word_bytes = zip(*(_word_view(s) for s in srcs))
    out_views, out_word_bytes = zip(*(_word_view(o) for o in outs))
    word_bytes = min(*word_bytes, *out_word_bytes)
    if word_bytes == 1:
        src_views = [s.view(torch.uint8) for s in srcs]
        out_views = [o.view(torch.uint8) for o in outs]
    words = src_views[0].shape[-1]
    align = _alignment([*src_views, *out_views], word_bytes)
    row_bytes = words * word_bytes
    rows = default_rows_per_program(row_bytes) if rows_per_program is None else rows_per_program
    if rows < 1 or rows & (rows - 1):
        raise KvdiagError(f"rows_per_program must be a power of two ≥ 1, got {rows}")
    warps = default_num_warps(row_bytes) if num_warps is None else num_warps
    if warps not in (1, 2, 4, 8, 16):
        raise KvdiagError(f"num_warps must be 1, 2, 4, 8 or 16, got {warps!r}")
    pair = len(srcs) == 2
    src_b, out_b = (src_views[1], out_views[1]) if pair else (src_views[0], out_views[0])
    grid = (triton.cdiv(n_ids, rows), batch * n_kv_heads)
    _gather_rows_kernel[grid](
        ids, src_views[0], out_views[0], src_b, out_b, n_kv_heads, n_ids, srcs[0].shape[2],
        *ids.stride(), *src_views[0].stride()[:3], *src_b.stride()[:3],
        *out_views[0].stride()[:3], *out_b.stride()[:3],
        WORDS=words, BLOCK_W=triton.next_power_of_2(words), ROWS=rows, PAIR=pair, ALIGN=align, num_warps=warps,
    )  # fmt: skip


def _gather_torch(srcs, ids, outs, stream) -> None:
    """ids to the CPU, index_select into a (pinned, when the output is on the GPU) staging buffer,
    zero the padding rows, then copy_ (async from pinned memory, on `stream` if given)."""
    batch, n_kv_heads, n_rows, _ = srcs[0].shape
    ids_host = ids.to("cpu", torch.int64)  # synchronises when ids are on the GPU
    base = torch.arange(batch * n_kv_heads, dtype=torch.int64).reshape(batch, n_kv_heads, 1) * n_rows
    flat = (base + ids_host.clamp(0, max(n_rows - 1, 0))).reshape(-1)
    padding = ((ids_host < 0) | (ids_host >= n_rows)).reshape(-1)
    pin = outs[0].device.type == "cuda"
    for src, out in zip(srcs, outs):
        host = src if src.device.type == "cpu" else src.cpu()
        raw = host.view(torch.uint8).reshape(batch * n_kv_heads * n_rows, -1)  # a copy only if strided
        staging = torch.empty(flat.numel(), raw.shape[1], dtype=torch.uint8, pin_memory=pin)
        torch.index_select(raw, 0, flat, out=staging)
        staging[padding] = 0
        target = out.view(torch.uint8).view(-1, raw.shape[1])
        if pin and stream is not None:
            with torch.cuda.stream(stream):
                target.copy_(staging, non_blocking=True)
        else:
            target.copy_(staging, non_blocking=pin)


def gather_rows(
    src: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    rows_per_program: int | None = None,
    num_warps: int | None = None,
    stream: torch.cuda.Stream | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows `ids` [B, H_kv, K] of `src` [B, H_kv, L_max, d] (or of each of a pair) -> [B, H_kv, K, d].

    src: pinned CPU tensor(s) (or GPU tensors); a tuple (k_host, v_host) gathers both with one launch
    and returns a tuple. The output is on the GPU (on CPU under TRITON_INTERPRET=1 or without CUDA);
    `out` (same structure) is written in place. Rows of id −1 are zeros. ids values are checked only
    when they are a CPU tensor (no synchronisation); the kernel masks ids outside [0, L_max).
    `rows_per_program` (a power of two) / `num_warps` tune the Triton launch; `stream` is used by the
    torch backend's copy (the caller then orders its consumers after that stream).
    """
    pair = isinstance(src, (tuple, list))
    srcs = tuple(src) if pair else (src,)
    batch, n_kv_heads, _, head_dim, n_ids = check_gather_inputs(srcs, ids)
    if backend not in BACKENDS:
        raise KvdiagError(f"unknown gather backend {backend!r}; use one of {', '.join(BACKENDS)}")
    shape = (batch, n_kv_heads, n_ids, head_dim)
    if out is not None:
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(srcs):
            raise KvdiagError(f"out must match src: {len(srcs)} tensor(s), got {len(outs)}")
        _check_out(outs, shape, srcs[0].dtype)
    device = _target_device(srcs, ids, outs if out is not None else None)
    if out is None:
        outs = tuple(torch.empty(shape, dtype=srcs[0].dtype, device=device) for _ in srcs)
    triton_can_run = _interpreting() or (
        device.type == "cuda" and all(s.device.type == "cuda" or s.is_pinned() for s in srcs)
    )
    if backend == "triton" or (backend == "auto" and triton_can_run):
        if device.type != "cuda" and not _interpreting():
            raise KvdiagError(
                f"the Triton gather needs a CUDA output (got {device}); on CPU set TRITON_INTERPRET=1 "
                "before importing kvdiag.kernels, or use backend='torch'"
            )
        _gather_triton(srcs, ids, outs, rows_per_program, num_warps)
    else:
        if backend == "auto":
            logger.debug("gather_rows: src is not readable by the GPU kernel; using the torch backend")
        _gather_torch(srcs, ids, outs, stream)
    return outs if pair else outs[0]
