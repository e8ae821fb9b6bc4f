"""Plain-PyTorch references of the offload runtime's data-side kernels, and the input checks they share
with the Triton versions (`kvdiag.kernels.gather`, `kvdiag.kernels.decode_attention`).

Obviously correct and slow on purpose: the tests compare the kernels against these, and the benchmark
times them as the baseline. Conventions: B batch, H_q query heads, H_kv KV heads, G = H_q / H_kv
(query head h reads KV head h // G), d head dim, L_max the padded prompt length.

Gather (`naive_gather_rows`):
    src  [B, H_kv, L_max, d]  any dtype (rows are copied as bytes: fp8 e4m3, bf16, ...)
    ids  [B, H_kv, K]         int32 / int64, each in [-1, L_max); −1 = padding
    out  [B, H_kv, K, d]      src's dtype; out[b, h, j] = src[b, h, ids[b, h, j]], zeros where id = −1

Sparse decode attention (`naive_sparse_decode_attention`): one new query token per batch element,
q [B, H_q, d], attends per KV head over the concatenation of up to three sources, one softmax over all:
    (a) resident  res_k, res_v [B, H_kv, R_max, d], res_len [B]: token n valid iff n < res_len[b]
    (b) selected  ids [B, H_kv, K] (−1 = masked), sel_v [B, H_kv, K, d] and keys either
                  sel_k [B, H_kv, K, d] (bf16 / fp16 / fp32 / fp8 e4m3, dequantized exactly), or
                  rebuilt from a low-rank factor (ShadowKV): u [B, L_max, r], sv [B, H_kv, r, d],
                  key = RoPE(u[b, id] @ sv[b, h], id) with tables cos, sin [L_max, d] in the HF
                  layout: k·cos + rotate_half(k)·sin, rotate_half(x) = cat(−x[d/2:], x[:d/2])
    (c) tail      tail_k, tail_v [B, H_kv, T_max, d], tail_len [B]: the tokens generated so far
Logits are (q·k)·scale, optionally soft-capped (cap·tanh(x / cap)), masked, softmax-ed, times V.
A row with no valid key at all (an idle slot of a padded batch) gives zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvdiag.errors import KvdiagError

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn,)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_tensor(name: str, t, ndim: int, shape_doc: str, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise KvdiagError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KvdiagError(f"{name} must be {shape_doc} ({ndim} dims), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KvdiagError(f"{name} must have dtype {names}; got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], doc: str) -> None:
    if tuple(t.shape) != expected:
        raise KvdiagError(f"{name} must be {doc} = {list(expected)}, got {list(t.shape)}")


def check_ids_values(ids: torch.Tensor, limit: int | None, name: str = "ids") -> None:
    """Ids must lie in [-1, limit) (limit None: only ≥ -1). Checked only for CPU tensors: reading a
    GPU tensor's values would synchronise the stream (the kernels mask out-of-range ids instead)."""
    if ids.device.type != "cpu" or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or (limit is not None and hi >= limit):
        valid = "[-1, ∞)" if limit is None else f"[-1, {limit})"
        raise KvdiagError(f"{name} must lie in {valid} (−1 = padding), got values from {lo} to {hi}")


def check_gather_inputs(srcs: tuple[torch.Tensor, ...], ids: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate a gather; return (B, H_kv, L_max, d, K). All sources share shape and dtype."""
    if not 1 <= len(srcs) <= 2:
        raise KvdiagError(f"gather takes one source or a pair (K, V), got {len(srcs)}")
    for i, src in enumerate(srcs):
        _check_tensor(f"src[{i}]" if len(srcs) > 1 else "src", src, 4, "[B, H_kv, L_max, d]")
    first = srcs[0]
    for src in srcs[1:]:
        if src.shape != first.shape or src.dtype != first.dtype or src.device != first.device:
            raise KvdiagError(
                "the sources of one gather must share shape, dtype and device, got "
                + " and ".join(f"{s.dtype} {list(s.shape)} on {s.device}" for s in srcs)
            )
    if first.stride(-1) != 1 and first.shape[-1] > 1:
        raise KvdiagError(f"src rows must be contiguous (stride 1 along d), got strides {first.stride()}")
    _check_tensor("ids", ids, 3, "[B, H_kv, K]", INDEX_DTYPES)
    batch, n_kv_heads, n_rows, head_dim = first.shape
    if tuple(ids.shape[:2]) != (batch, n_kv_heads):
        raise KvdiagError(f"ids must be [B, H_kv, K] = [{batch}, {n_kv_heads}, K], got {list(ids.shape)}")
    check_ids_values(ids, n_rows)
    return batch, n_kv_heads, n_rows, head_dim, ids.shape[2]


def naive_gather_rows(src: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, K, d] rows of src [B, H_kv, L_max, d] at ids [B, H_kv, K], zeros where id = −1.

    Runs where src is (CPU or GPU); ids are moved there. Plain advanced indexing on a byte view, so
    every dtype (fp8 included) takes the same path.
    """
    batch, n_kv_heads, _, head_dim, _ = check_gather_inputs((src,), ids)
    ids = ids.to(src.device).long()
    raw = src.view(torch.uint8)  # [B, H_kv, L_max, d·itemsize]
    b = torch.arange(batch, device=src.device)[:, None, None]
    h = torch.arange(n_kv_heads, device=src.device)[None, :, None]
    rows = raw[b, h, ids.clamp_min(0)]  # [B, H_kv, K, d·itemsize] uint8
    rows[ids < 0] = 0
    return rows.view(src.dtype)


# --- sparse decode attention ------------------------------------------------------------------------


@dataclass
class AttendShapes:
    """What `check_attention_inputs` found: sizes, the selected keys' kind and filled-in lengths.

    key_mode: "none" (no selected source), "direct" (sel_k given) or "lowrank" (u, sv, cos, sin).
    res_len / tail_len: [B] lengths (a full-length tensor when the caller gave none).
    """

    batch: int
    n_q_heads: int
    n_kv_heads: int
    group: int
    head_dim: int
    n_resident: int  # R_max
    n_selected: int  # K
    n_tail: int  # T_max
    rank: int
    n_positions: int  # L_max of u / cos / sin (0 unless key_mode = "lowrank")
    key_mode: str
    res_len: torch.Tensor | None
    tail_len: torch.Tensor | None


def _check_lengths(name: str, lengths, batch: int, limit: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), limit, dtype=torch.int32, device=device)
    _check_tensor(name, lengths, 1, "[B]", INDEX_DTYPES)
    _check_shape(name, lengths, (batch,), "[B]")
    if lengths.device != device:
        raise KvdiagError(f"{name} is on {lengths.device} but q is on {device}")
    if lengths.device.type == "cpu" and batch and (int(lengths.min()) < 0 or int(lengths.max()) > limit):
        raise KvdiagError(f"{name} must lie in [0, {limit}], got {lengths.tolist()}")
    return lengths


def check_attention_inputs(
    q, *, scale, softcap, res_k, res_v, res_len, ids, sel_k, sel_v, u, sv, cos, sin, tail_k, tail_v, tail_len
) -> AttendShapes:
    """Validate one decode step's sources (see the module docstring); raise KvdiagError naming the bad
    value and what would be valid."""
    _check_tensor("q", q, 3, "[B, H_q, d]", FLOAT_DTYPES)
    batch, n_q_heads, head_dim = q.shape
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise KvdiagError(f"scale must be a finite number (the model's `scaling`), got {scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        raise KvdiagError(f"softcap must be None or a number > 0, got {softcap!r}")
    kv_doc = "[B, H_kv, {}, d]"
    n_kv_heads = None

    def check_kv(name, t, length_name, dtypes):
        nonlocal n_kv_heads
        _check_tensor(name, t, 4, kv_doc.format(length_name), dtypes)
        if t.device != q.device:
            raise KvdiagError(f"{name} is on {t.device} but q is on {q.device}")
        if n_kv_heads is None:
            n_kv_heads = t.shape[1]
        _check_shape(name, t, (batch, n_kv_heads, t.shape[2], head_dim), kv_doc.format(length_name))

    present = {"resident": res_k, "selected": ids, "tail": tail_k}
    if all(t is None for t in present.values()):
        raise KvdiagError("no key/value source given: pass res_k/res_v, ids/sel_v or tail_k/tail_v")
    n_res = n_sel = n_tail = rank = n_positions = 0
    if (res_k is None) != (res_v is None) or (res_k is None and res_len is not None):
        raise KvdiagError("the resident source needs res_k and res_v together (res_len optional)")
    if res_k is not None:
        check_kv("res_k", res_k, "R_max", FLOAT_DTYPES)
        check_kv("res_v", res_v, "R_max", FLOAT_DTYPES)
        n_res = res_k.shape[2]
        _check_shape("res_v", res_v, tuple(res_k.shape), "res_k's shape")
    if (tail_k is None) != (tail_v is None) or (tail_k is None and tail_len is not None):
        raise KvdiagError("the tail source needs tail_k and tail_v together (tail_len optional)")
    if tail_k is not None:
        check_kv("tail_k", tail_k, "T_max", FLOAT_DTYPES)
        check_kv("tail_v", tail_v, "T_max", FLOAT_DTYPES)
        n_tail = tail_k.shape[2]
        _check_shape("tail_v", tail_v, tuple(tail_k.shape), "tail_k's shape")

    lowrank = (u, sv, cos, sin)
    key_mode = "none"
    if ids is None:
        if sel_k is not None or sel_v is not None or any(t is not None for t in lowrank):
            raise KvdiagError("selected keys/values were given without ids [B, H_kv, K]")
    else:
        _check_tensor("ids", ids, 3, "[B, H_kv, K]", INDEX_DTYPES)
        if ids.device != q.device:
            raise KvdiagError(f"ids is on {ids.device} but q is on {q.device}")
        if sel_v is None:
            raise KvdiagError("ids were given without sel_v [B, H_kv, K, d] (the fetched values)")
        check_kv("sel_v", sel_v, "K", FLOAT_DTYPES + FP8_DTYPES)
        n_sel = sel_v.shape[2]
        _check_shape("ids", ids, (batch, n_kv_heads, n_sel), "[B, H_kv, K]")
        if (sel_k is None) == all(t is None for t in lowrank):
            raise KvdiagError("give the selected keys either as sel_k or as the factors u, sv, cos, sin")
        if sel_k is not None:
            key_mode = "direct"
            check_kv("sel_k", sel_k, "K", FLOAT_DTYPES + FP8_DTYPES)
            _check_shape("sel_k", sel_k, tuple(sel_v.shape), "sel_v's shape")
            check_ids_values(ids, None)
        else:
            key_mode = "lowrank"
            if any(t is None for t in lowrank):
                missing = [n for n, t in zip(("u", "sv", "cos", "sin"), lowrank) if t is None]
                raise KvdiagError(f"rebuilt keys need u, sv, cos and sin; missing {', '.join(missing)}")
            _check_tensor("u", u, 3, "[B, L_max, r]", FLOAT_DTYPES)
            n_positions, rank = u.shape[1], u.shape[2]
            _check_tensor("sv", sv, 4, "[B, H_kv, r, d]", FLOAT_DTYPES)
            _check_shape("u", u, (batch, n_positions, rank), "[B, L_max, r]")
            _check_shape("sv", sv, (batch, n_kv_heads, rank, head_dim), "[B, H_kv, r, d]")
            if sv.dtype != u.dtype:
                raise KvdiagError(f"u and sv must share a dtype, got {u.dtype} and {sv.dtype}")
            for name, t in (("cos", cos), ("sin", sin)):
                _check_tensor(name, t, 2, "[L_max, d]", FLOAT_DTYPES)
                _check_shape(name, t, (n_positions, head_dim), "[L_max, d] (L_max = u.shape[1])")
            if head_dim % 2:
                raise KvdiagError(f"RoPE needs an even head dim, got d={head_dim}")
            for name, t in (("u", u), ("sv", sv), ("cos", cos), ("sin", sin)):
                if t.device != q.device:
                    raise KvdiagError(f"{name} is on {t.device} but q is on {q.device}")
            check_ids_values(ids, n_positions)
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise KvdiagError(
            f"{n_q_heads} query heads do not split evenly over {n_kv_heads} KV heads "
            "(H_q must be a positive multiple of H_kv)"
        )
    return AttendShapes(
        batch=batch,
        n_q_heads=n_q_heads,
        n_kv_heads=n_kv_heads,
        group=n_q_heads // n_kv_heads,
        head_dim=head_dim,
        n_resident=n_res,
        n_selected=n_sel,
        n_tail=n_tail,
        rank=rank,
        n_positions=n_positions,
        key_mode=key_mode,
        res_len=_check_lengths("res_len", res_len, batch, n_res, q.device) if res_k is not None else None,
        tail_len=_check_lengths("tail_len", tail_len, batch, n_tail, q.device)
        if tail_k is not None
        else None,
    )


def rebuild_lowrank_keys(
    ids: torch.Tensor,
    u: torch.Tensor,
    sv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ShadowKV's selected keys [B, H_kv, K, d] in `dtype`: RoPE(u[b, id] @ sv[b, h]) at position id.

    ids [B, H_kv, K] (−1 rows come out as the key of position 0; callers mask them), u [B, L_max, r],
    sv [B, H_kv, r, d], cos / sin [L_max, d]. The rotation is written out here (not imported) so the
    tests can check it against `kvdiag.capture.rope.apply_rope`.
    """
    pos = ids.long().clamp_min(0)  # [B, H_kv, K]
    batch = torch.arange(u.shape[0], device=u.device)[:, None, None]
    rows = u[batch, pos].to(dtype)  # [B, H_kv, K, r]
    keys = torch.einsum("bhkr,bhrd->bhkd", rows, sv.to(dtype))  # pre-RoPE [B, H_kv, K, d]
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos[pos].to(dtype) + rotated * sin[pos].to(dtype)


def materialize_sources(
    shapes: AttendShapes,
    dtype: torch.dtype,
    *,
    res_k,
    res_v,
    ids,
    sel_k,
    sel_v,
    u,
    sv,
    cos,
    sin,
    tail_k,
    tail_v,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense keys, values [B, H_kv, N, d] in `dtype` and valid [B, H_kv, N] bool, N = R_max + K + T_max,
    the sources concatenated in the order resident, selected, tail."""
    batch, n_kv = shapes.batch, shapes.n_kv_heads
    keys, values, valid = [], [], []
    device = (res_k if res_k is not None else ids if ids is not None else tail_k).device

    def lengths_mask(lengths, n):
        return (torch.arange(n, device=device)[None, :] < lengths[:, None].long())[:, None, :].expand(
            batch, n_kv, n
        )

    if res_k is not None:
        keys.append(res_k.to(dtype))
        values.append(res_v.to(dtype))
        valid.append(lengths_mask(shapes.res_len, shapes.n_resident))
    if ids is not None:
        if sel_k is not None:
            keys.append(sel_k.to(dtype))
        else:
            keys.append(rebuild_lowrank_keys(ids, u, sv, cos, sin, dtype))
        values.append(sel_v.to(dtype))
        valid.append(ids >= 0)
    if tail_k is not None:
        keys.append(tail_k.to(dtype))
        values.append(tail_v.to(dtype))
        valid.append(lengths_mask(shapes.tail_len, shapes.n_tail))
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(valid, dim=2)


def naive_sparse_decode_attention(
    q: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    res_k: torch.Tensor | None = None,
    res_v: torch.Tensor | None = None,
    res_len: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    sel_k: torch.Tensor | None = None,
    sel_v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    sv: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    tail_k: torch.Tensor | None = None,
    tail_v: torch.Tensor | None = None,
    tail_len: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B, H_q, d] attention output in `compute_dtype` (fp32, or float64 for a tighter check).

    Materialises every key (direct, dequantized, or U·SV + RoPE), concatenates the sources and takes
    one masked softmax per query head. Arguments as in the module docstring; lengths default to full.
    """
    sources = dict(res_k=res_k, res_v=res_v, ids=ids, sel_k=sel_k, sel_v=sel_v, u=u, sv=sv, cos=cos, sin=sin,
                   tail_k=tail_k, tail_v=tail_v)  # fmt: skip
    shapes = check_attention_inputs(
        q, scale=scale, softcap=softcap, res_len=res_len, tail_len=tail_len, **sources
    )
    keys, values, valid = materialize_sources(shapes, compute_dtype, **sources)
    batch, n_kv, group, d = shapes.batch, shapes.n_kv_heads, shapes.group, shapes.head_dim
    qg = q.to(compute_dtype).reshape(batch, n_kv, group, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * scale  # [B, H_kv, G, N]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(valid.any(dim=-1)[:, :, None, None], probs, 0.0)  # rows with no key: zeros
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values)
    return out.reshape(batch, n_kv * group, d)
