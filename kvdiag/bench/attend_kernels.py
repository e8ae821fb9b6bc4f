"""Data-side kernels of the offload runtime on a GPU: host-row gather and sparse decode attention.

    python -m kvdiag.bench.attend_kernels --out DIR [--lengths 32768,131072] [--batch 1,8]
    python -m kvdiag.bench.attend_kernels --out DIR --smoke      # tiny sizes, CPU interpreter, seconds

Shape: Llama-3.1-8B (32 query / 8 KV heads, d = 128), one layer of one decode step, bf16 queries; for
each prompt length L and batch B:
- gather (`kvdiag.kernels.gather`), from pinned host memory, ceiling = the 55 GB/s host link:
  "yakv_kv_fp8": YAKV's K and V rows (fp8, 128 B each) in one launch, k = 3.125 % of L + the 64-token
  local window, at each launch config of GATHER_CONFIGS; "shadowkv_v_bf16": ShadowKV's values (bf16,
  256 B), k = 1.5625 % of L in chunks of 8; baselines "torch_index_copy" (ids to the CPU,
  index_select into pinned memory, async copy on a side stream) and "torch_index_uva" (torch's own
  indexing kernel on a CUDA view of the pinned memory); "pinned_copy" (a contiguous copy of the same
  bytes: the link itself, re-measured).
- attention (`kvdiag.kernels.decode_attention`), ceiling = HBM 4101 GB/s (`gpu/ceilings.json`), bytes =
  what the kernel must read once (q, K/V at their storage width, ids, u rows, RoPE rows, SV) plus the
  split-K workspace: "yakv" (fp8 K/V of the fetched rows + 128 generated tokens) and "shadowkv"
  (416 resident tokens, keys rebuilt from u [B, L, 160] and sv, bf16 RoPE tables as HF builds them,
  bf16 values, + 128 generated tokens), at each (block_n, num_warps, n_splits) config; baselines
  "naive_torch" (`kvdiag.kernels.naive_attend`, fp32) and "sdpa_full_bf16" (SDPA over all L + 128
  tokens: what not offloading costs).
- step: gather + attention with the best configs, against the floor fetched / 55 GB/s + read / HBM.
Times: `triton.testing.do_bench` medians with 20/80 % quantiles (it flushes L2 before every call). The
best config per (kernel, variant, L, B) is flagged (`best`), cached for the step rows, and written to
`attend_kernels_best.json`. Rows: `attend_kernels.jsonl` (rewritten atomically after every case),
`manifest.json`; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HBM_GBPS = 4101.0  # gpu/ceilings.json hbm_copy_GBps_read_plus_write (H200)
HOST_LINK_GBPS = 55.0  # gpu/ceilings.json host_to_device_pinned_GBps
GATHER_CONFIGS = [(16, 4), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]  # (rows, warps)
ATTEND_CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 8)]  # (block_n, num_warps)
SPLIT_FACTORS = (0.5, 1.0, 2.0)  # × default_n_splits


@dataclass
class Shape:
    n_q: int = 32
    n_kv: int = 8
    d: int = 128
    rank: int = 160  # ShadowKV rank at 1024 channels
    tail: int = 128  # generated tokens so far (incl. the current one)
    tail_max: int = 256
    local: int = 64  # YAKV's local window, fetched from the host too
    resident: int = 32 + 48 * 8  # ShadowKV: local 32 + 48 outlier chunks of 8
    chunk: int = 8

    def yakv_k(self, length: int) -> int:
        return math.ceil(0.03125 * length) + self.local

    def shadowkv_k(self, length: int) -> int:
        return max(self.chunk, length // 64 // self.chunk * self.chunk)  # 1.5625 %: 2048 of 128K


SMOKE_SHAPE = Shape(n_q=4, n_kv=2, d=32, rank=16, tail=5, tail_max=8, local=8, resident=24)


def make_eager_timer(device: str, smoke: bool):
    """(fn) -> (median, p20, p80) µs of a Python call: do_bench on CUDA (launch overhead included when
    the host is slower than the GPU), a perf_counter median elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: tuple(1e3 * t for t in do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))

    def time_host(fn, repeats=1 if smoke else 3):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - start))
        times.sort()
        return times[len(times) // 2], times[0], times[-1]

    return time_host


def time_graph(fns, replays: int = 25) -> tuple[float, float, float]:
    """(median, p20, p80) µs per call: one CUDA graph runs every fn of `fns` back to back (each on its
    own inputs, so L2 cannot serve a call from the previous one), replayed `replays` times."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(1e3 * start.elapsed_time(end) / len(fns) for start, end in events)
    pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def rotation(n_bytes: int, device: str) -> int:
    """Input sets per timed graph: enough distinct bytes (≥ 160 MB, 2.7× the H200's 60 MB L2) that a
    call finds nothing of its inputs in L2; 1 off the GPU."""
    return 1 if device != "cuda" else max(2, min(16, math.ceil(160e6 / max(n_bytes, 1))))


class Recorder:
    """Collects tidy rows, times variants, flags and caches the best config per group.

    `fns` are one callable per input set (see `rotation`). Rows timed `graph` report the CUDA-graph
    replay time per call as `median_us` (what the runtime, which replays graphs, pays) and the eager
    Python call as `eager_median_us` (launch overhead included); other rows are eager only.
    """

    def __init__(self, device: str, smoke: bool, out_dir: Path):
        self.device, self.out_dir, self.rows, self.best = device, out_dir, [], {}
        self.eager = make_eager_timer(device, smoke)

    def add(
        self,
        kernel,
        variant,
        case,
        fns,
        bytes_moved,
        ceiling_gbps,
        config=None,
        check=None,
        graph=True,
        **extra,
    ):
        row = dict(kernel=kernel, variant=variant, **case, config=config, bytes_moved=bytes_moved,
                   ceiling_GBps=ceiling_gbps, **extra)  # fmt: skip
        try:
            if check is not None:
                row["rel_err_vs_naive"] = check(fns[0]())
            eager = self.eager(fns[0])
            if graph and self.device == "cuda":
                median, p20, p80 = time_graph(fns)
                row.update(timing="cuda_graph", input_sets=len(fns), eager_median_us=eager[0])
            else:
                (median, p20, p80), row["timing"] = eager, "eager"
        except Exception as err:  # one failing variant must not lose the others' numbers
            row["error"] = f"{type(err).__name__}: {err}"[:400]
            self.rows.append(row)
            return row
        gbps = bytes_moved / median / 1e3
        row.update(
            median_us=median, p20_us=p20, p80_us=p80, GBps=gbps, fraction_of_ceiling=gbps / ceiling_gbps
        )
        self.rows.append(row)
        return row

    def flag_best(self, rows, key) -> dict | None:
        timed = [r for r in rows if "median_us" in r]
        best = min(timed, key=lambda r: r["median_us"]) if timed else None
        for r in rows:
            r["best"] = r is best
        if best is not None:
            self.best[key] = best["config"]
        return best

    def save(self) -> None:
        from kvdiag.runs import atomic_write_bytes

        text = "".join(json.dumps(row, default=str) + "\n" for row in self.rows)
        atomic_write_bytes(self.out_dir / "attend_kernels.jsonl", text.encode())
        best = {"|".join(map(str, k)): v for k, v in self.best.items()}
        atomic_write_bytes(self.out_dir / "attend_kernels_best.json", json.dumps(best, indent=1).encode())


def random_ids(torch, batch, n_kv, k, length, device, gen, chunk=1, local=0):
    """[B, H_kv, k] int32 ascending ids: random chunks of `chunk` tokens plus the last `local` tokens."""
    n_chunks = (length - local) // chunk
    picks = (k - local) // chunk
    scores = torch.rand(batch * n_kv, n_chunks, device=device, generator=gen)
    chosen = scores.topk(picks, dim=-1).indices.sort(dim=-1).values  # [B·H_kv, picks]
    tokens = (chosen[:, :, None] * chunk + torch.arange(chunk, device=device)).reshape(batch * n_kv, -1)
    tail = torch.arange(length - local, length, device=device).expand(batch * n_kv, local)
    return torch.cat([tokens, tail], dim=1).reshape(batch, n_kv, k).int()


def host_store(torch, shape, dtype, device, gen):
    """[B, H_kv, L, d] random rows in pinned host memory (filled on the GPU, copied per batch element)."""
    pin = device == "cuda"
    store = torch.empty(shape, dtype=dtype, pin_memory=pin)
    for b in range(shape[0]):
        store[b].copy_(torch.randn(shape[1:], device=device, generator=gen).to(dtype))
    return store


def bench_gather(rec, torch, case, shape, device, gen, configs):
    from kvdiag.kernels.gather import cuda_view_of_pinned, gather_rows
    from kvdiag.kernels.naive_attend import naive_gather_rows

    length, batch = case["L"], case["B"]
    fp8 = torch.float8_e4m3fn
    keys = host_store(torch, (batch, shape.n_kv, length, shape.d), fp8, device, gen)
    values = host_store(torch, (batch, shape.n_kv, length, shape.d), fp8, device, gen)
    k = shape.yakv_k(length)
    moved = 2 * batch * shape.n_kv * k * shape.d
    id_sets = [random_ids(torch, batch, shape.n_kv, k, length, device, gen, local=shape.local)
               for _ in range(rotation(moved, device))]  # fmt: skip
    outs = tuple(torch.empty(batch, shape.n_kv, k, shape.d, dtype=fp8, device=device) for _ in range(2))
    yakv = dict(case, K=k)

    def pair_fns(r, w):
        return [lambda ids=ids: gather_rows((keys, values), ids, outs, backend="triton", rows_per_program=r,
                                            num_warps=w) for ids in id_sets]  # fmt: skip

    rows = [rec.add("gather", "yakv_kv_fp8", yakv, pair_fns(r, w), moved, HOST_LINK_GBPS, config=f"rows={r},warps={w}")
            for r, w in configs]  # fmt: skip
    rec.flag_best(rows, ("gather", "yakv_kv_fp8", length, batch))
    ids = id_sets[0]
    if device == "cuda":
        side = torch.cuda.Stream()

        def index_copy():
            gather_rows((keys, values), ids, outs, backend="torch", stream=side)
            torch.cuda.current_stream().wait_stream(side)

        rec.add("gather", "torch_index_copy", yakv, [index_copy], moved, HOST_LINK_GBPS, graph=False)
        views = (cuda_view_of_pinned(keys), cuda_view_of_pinned(values))
        rec.add("gather", "torch_index_uva", yakv, [lambda: [naive_gather_rows(v, ids) for v in views]], moved,
                HOST_LINK_GBPS, graph=False)  # fmt: skip
        flat = keys.reshape(-1)[: moved // 2]
        staged = torch.empty(moved // 2, dtype=fp8, device=device)
        rec.add("gather", "pinned_copy", yakv, [lambda: staged.copy_(flat, non_blocking=True)], moved // 2,
                HOST_LINK_GBPS, graph=False)  # fmt: skip
    values_bf16 = host_store(torch, (batch, shape.n_kv, length, shape.d), torch.bfloat16, device, gen)
    k_v = shape.shadowkv_k(length)
    moved_v = batch * shape.n_kv * k_v * shape.d * 2
    v_sets = [random_ids(torch, batch, shape.n_kv, k_v, length, device, gen, chunk=shape.chunk)
              for _ in range(rotation(moved_v, device))]  # fmt: skip
    out_v = torch.empty(batch, shape.n_kv, k_v, shape.d, dtype=torch.bfloat16, device=device)

    def v_fns(r, w):
        return [lambda ids=ids: gather_rows(values_bf16, ids, out_v, backend="triton", rows_per_program=r, num_warps=w)
                for ids in v_sets]  # fmt: skip

    rows = [rec.add("gather", "shadowkv_v_bf16", dict(case, K=k_v), v_fns(r, w), moved_v, HOST_LINK_GBPS,
                    config=f"rows={r},warps={w}") for r, w in configs]  # fmt: skip
    rec.flag_best(rows, ("gather", "shadowkv_v_bf16", length, batch))
    return {"yakv": (keys, values), "shadowkv": values_bf16}


def attention_inputs(torch, method, case, shape, device, gen):
    """(kwargs of sparse_decode_attention, bytes the kernel must read, fetched host bytes, K)."""
    length, batch = case["L"], case["B"]
    bf16, b_h = torch.bfloat16, batch * shape.n_kv

    def randn(*s, dtype=bf16, spread=1.0):
        return (spread * torch.randn(*s, device=device, generator=gen)).to(dtype)

    kv = lambda n, dtype=bf16: randn(batch, shape.n_kv, n, shape.d, dtype=dtype)  # noqa: E731
    kw = dict(q=randn(batch, shape.n_q, shape.d), tail_k=kv(shape.tail_max), tail_v=kv(shape.tail_max),
              tail_len=torch.full((batch,), shape.tail, dtype=torch.int32, device=device))  # fmt: skip
    read = batch * shape.n_q * shape.d * 2 * 2 + b_h * shape.tail * shape.d * 4  # q, out, tail K/V
    if method == "yakv":
        k = shape.yakv_k(length)
        kw["ids"] = random_ids(torch, batch, shape.n_kv, k, length, device, gen, local=shape.local)
        kw.update(sel_k=kv(k, torch.float8_e4m3fn), sel_v=kv(k, torch.float8_e4m3fn))
        read += b_h * k * (2 * shape.d + 4)
    else:
        k = shape.shadowkv_k(length)
        kw["ids"] = random_ids(torch, batch, shape.n_kv, k, length, device, gen, chunk=shape.chunk)
        theta = torch.arange(length, device=device)[:, None] * torch.rand(
            shape.d // 2, device=device, generator=gen
        )
        emb = torch.cat([theta, theta], dim=1)
        kw.update(res_k=kv(shape.resident), res_v=kv(shape.resident), u=randn(batch, length, shape.rank),
                  sv=randn(batch, shape.n_kv, shape.rank, shape.d, spread=shape.rank**-0.5),
                  cos=emb.cos().to(bf16), sin=emb.sin().to(bf16), sel_v=kv(k))  # fmt: skip
        read += b_h * (shape.resident * shape.d * 4 + k * (4 + 2 * shape.rank + 4 * shape.d + 2 * shape.d))
        read += b_h * shape.rank * shape.d * 2
    fetched = b_h * k * 2 * shape.d  # YAKV: fp8 K + V; ShadowKV: bf16 V
    return kw, read, fetched, k


def bench_attention(rec, torch, case, shape, device, gen, configs, split_factors):
    import torch.nn.functional as F

    from kvdiag.kernels.decode_attention import (
        default_block_n,
        default_n_splits,
        default_num_warps,
        sparse_decode_attention,
    )
    from kvdiag.kernels.naive_attend import naive_sparse_decode_attention

    scale = shape.d**-0.5
    inputs = {}
    for method in ("yakv", "shadowkv"):
        kw, read, fetched, k = attention_inputs(torch, method, case, shape, device, gen)
        sets = [kw] + [attention_inputs(torch, method, case, shape, device, gen)[0]
                       for _ in range(rotation(read, device) - 1)]  # fmt: skip
        inputs[method] = (sets, read, fetched, k)
        sub = dict(case, K=k)
        ref = naive_sparse_decode_attention(**kw, scale=scale)
        check = lambda out, ref=ref: ((out.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        n_tokens = k + shape.tail_max + (shape.resident if method == "shadowkv" else 0)
        default_bn = default_block_n(shape.d)
        default = (
            default_bn,
            default_num_warps(default_bn),
            default_n_splits(case["B"], shape.n_kv, n_tokens, default_bn),
        )
        launches = [(bn, w, max(1, round(default_n_splits(case["B"], shape.n_kv, n_tokens, bn) * f)))
                    for bn, w in configs for f in split_factors]  # fmt: skip
        rows = []
        for block_n, warps, splits in dict.fromkeys([default, *launches]):
            workspace = case["B"] * shape.n_q * splits * (shape.d + 1) * 4 * 2 if splits > 1 else 0
            fns = [lambda kw=kw, bn=block_n, w=warps, s=splits: sparse_decode_attention(
                   **kw, scale=scale, n_splits=s, block_n=bn, num_warps=w) for kw in sets]  # fmt: skip
            config = f"block_n={block_n},warps={warps},splits={splits}"
            rows.append(rec.add("attention", method, sub, fns, read + workspace, HBM_GBPS, config=config,
                                check=check, default_config=(block_n, warps, splits) == default))  # fmt: skip
        rec.flag_best(rows, ("attention", method, case["L"], case["B"]))
        rec.add("attention", f"{method}_naive_torch", sub, [lambda kw=kw: naive_sparse_decode_attention(**kw, scale=scale)],
                read, HBM_GBPS, graph=False)  # fmt: skip
    full = case["L"] + shape.tail
    dense_bytes = 2 * case["B"] * shape.n_kv * full * shape.d * 2
    q4 = inputs["yakv"][0][0]["q"][:, :, None, :]
    fns = []
    for _ in range(rotation(dense_bytes, device)):
        keys = torch.randn(case["B"], shape.n_kv, full, shape.d, device=device, generator=gen).to(
            torch.bfloat16
        )
        values = torch.randn_like(keys)
        fns.append(
            lambda keys=keys, values=values: F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)
        )
    rec.add("attention", "sdpa_full_bf16", dict(case, K=full), fns, dense_bytes, HBM_GBPS)
    return inputs


def bench_step(rec, torch, case, shape, stores, inputs):
    """Gather + attention with the best configs (cached per shape) against the decode-step floor
    fetched / host link + read / HBM; `fraction_of_ceiling` here is floor / time."""
    from kvdiag.kernels.decode_attention import sparse_decode_attention
    from kvdiag.kernels.gather import gather_rows

    scale = shape.d**-0.5
    for method, variant in (("yakv", "yakv_kv_fp8"), ("shadowkv", "shadowkv_v_bf16")):
        g_config = rec.best.get(("gather", variant, case["L"], case["B"]))
        a_config = rec.best.get(("attention", method, case["L"], case["B"]))
        if g_config is None or a_config is None:
            continue
        rows, warps = (int(p.split("=")[1]) for p in g_config.split(","))
        block_n, a_warps, splits = (int(p.split("=")[1]) for p in a_config.split(","))
        sets, read, fetched, k = inputs[method]

        def step(
            kw,
            rows=rows,
            warps=warps,
            block_n=block_n,
            a_warps=a_warps,
            splits=splits,
            store=stores[method],
            pair=method == "yakv",
        ):
            outs = (kw["sel_k"], kw["sel_v"]) if pair else kw["sel_v"]
            gather_rows(store, kw["ids"], outs, backend="triton", rows_per_program=rows, num_warps=warps)
            return sparse_decode_attention(
                **kw, scale=scale, n_splits=splits, block_n=block_n, num_warps=a_warps
            )

        floor_us = 1e6 * (fetched / (HOST_LINK_GBPS * 1e9) + read / (HBM_GBPS * 1e9))
        row = rec.add("step", method, dict(case, K=k), [lambda kw=kw: step(kw) for kw in sets], fetched,
                      HOST_LINK_GBPS, config=f"gather[{g_config}] attention[{a_config}]", floor_us=floor_us)  # fmt: skip
        if "median_us" in row:
            row["fraction_of_ceiling"] = floor_us / row["median_us"]


def print_table(rows) -> None:
    """The short table: each group's best and default configs, the baselines and the steps (all rows:
    the jsonl)."""
    head = (f"{'kernel':9} {'variant':20} {'L':>6} {'B':>2} {'K':>6} {'config':30} {'median µs':>9} "
            f"{'eager µs':>8} {'GB/s':>7} {'of ceil':>7} {'rel err':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("config") and not (r.get("best") or r.get("default_config")) and r["kernel"] != "step":
            continue
        prefix = f"{r['kernel']:9} {r['variant']:20} {r['L']:>6} {r['B']:>2} {r['K']:>6} "
        if "error" in r:
            print(prefix + f"ERROR {r['error'][:120]}")
            continue
        config = (
            (r["config"] or "").replace("block_n=", "bn=").replace("warps=", "w=").replace("splits=", "s=")
        )
        config = config.replace("gather[", "g[").replace("attention[", "a[")
        config += " *" * bool(r.get("best")) + " d" * bool(r.get("default_config"))
        err, eager = r.get("rel_err_vs_naive"), r.get("eager_median_us")
        print(prefix + f"{config:30} {r['median_us']:9.1f} {'' if eager is None else f'{eager:.1f}':>8} "
              f"{r['GBps']:7.1f} {r['fraction_of_ceiling']:7.3f} {'' if err is None else f'{err:.0e}':>7}")  # fmt: skip
    print(
        "median µs: CUDA-graph replay per call (inputs rotated past L2) where an eager µs is shown, else the eager "
        "call; ceilings: gather = host link 55 GB/s, attention = HBM 4101 GB/s, step = its floor "
        "(fetched / link + read / HBM); GB/s of a step = fetched bytes / time; * best config, d default launch"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for attend_kernels.jsonl and the manifest")
    parser.add_argument("--lengths", default="32768,131072", help="comma-separated prompt lengths L")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes B")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; runs on CPU under TRITON_INTERPRET=1"
    )
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            print("no CUDA GPU: use --smoke for a CPU check of this script", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules load
    from kvdiag.runs import prepare_run_dir, write_manifest

    out_dir = prepare_run_dir(args.out)
    lengths = [256] if args.smoke else [int(x) for x in args.lengths.split(",")]
    batches = [2] if args.smoke else [int(x) for x in args.batch.split(",")]
    shape = SMOKE_SHAPE if args.smoke else Shape()
    gather_configs = [(16, 4)] if args.smoke else GATHER_CONFIGS
    attend_configs = [(16, 4)] if args.smoke else ATTEND_CONFIGS
    split_factors = (1.0,) if args.smoke else SPLIT_FACTORS
    write_manifest(out_dir, "python -m kvdiag.bench.attend_kernels " + " ".join(argv or sys.argv[1:]),
                   {"lengths": lengths, "batch": batches, "shape": vars(shape), "smoke": args.smoke},
                   {"device": device, "hbm_GBps": HBM_GBPS, "host_link_GBps": HOST_LINK_GBPS,
                    "timer": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms" if device == "cuda"
                    else "perf_counter (interpreter smoke run; not a measurement)"})  # fmt: skip
    rec = Recorder(device, args.smoke, out_dir)
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":  # ~1 s of matrix products: clocks up before the first measurement
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(800):
            a @ a
        torch.cuda.synchronize()
        del a
    for length in lengths:
        for batch in batches:
            case = {"L": length, "B": batch}
            stores = bench_gather(rec, torch, case, shape, device, gen, gather_configs)
            inputs = bench_attention(rec, torch, case, shape, device, gen, attend_configs, split_factors)
            bench_step(rec, torch, case, shape, stores, inputs)
            rec.save()
            del stores, inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    print_table(rec.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
