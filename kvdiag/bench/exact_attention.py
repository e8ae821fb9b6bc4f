"""Time and peak memory of the exact attention helpers (`kvdiag.attention`) at long context, on CPU.

    python -m kvdiag.bench.exact_attention [--lengths 8192 32768] [--out FILE.json]

Shape: Llama-3.1-8B (32 query / 8 KV heads, d = 128), float32 random q [H_q, L, d], k, v [H_kv, L, d];
queries are the last `--queries` positions. For each L, `attention_output` and `topk_tokens`
(k = 1.5625 % of L, ShadowKV's 2048 of 128K) each run in a fresh subprocess, so one case's
allocations cannot hide another's peak. Peak memory is the rise of the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) over its RSS with the inputs
allocated; it is printed beside what materialising all heads' L×L scores would need (H_q·L·L·4 bytes)
and the chunked working set the helpers promise (H_q·c·L·4 bytes, c = min(chunk, queries) rows).
Throughput is reported as GFLOP/s (2·H_q·n·L·d per matmul: QKᵀ, and PV for the output) beside a
stated ceiling, the float32 GEMM rate this machine reaches with torch (`matmul_gflops`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

OPS = ("attention_output", "topk_tokens")
TOPK_FRACTION = 2048 / 131072  # 1.5625 %, as kvdiag.analysis.lowrank


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _inputs(h_q: int, h_kv: int, length: int, d: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(h_q, length, d, generator=gen)  # [H_q, L, d]
    k = torch.randn(h_kv, length, d, generator=gen)  # [H_kv, L, d]
    v = torch.randn(h_kv, length, d, generator=gen)  # [H_kv, L, d]
    return q, k, v


def worker(args) -> dict:
    """One (length, op) case in this process: inputs, peak memory of one call, then timed repeats."""
    import gc

    import torch

    from kvdiag.attention import attention_output, topk_tokens

    length, n = args.length, min(args.queries, args.length)
    q, k, v = _inputs(args.heads, args.kv_heads, length, args.head_dim)
    positions = torch.arange(length - n, length)
    scaling = args.head_dim**-0.5
    top_k = max(1, math.ceil(TOPK_FRACTION * length))
    if args.op == "attention_output":

        def call():
            return attention_output(q, k, v, positions, scaling, chunk_size=args.chunk)
    else:

        def call():
            return topk_tokens(q, k, positions, top_k, scaling, chunk_size=args.chunk)

    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    reset_worked = _reset_peak_rss()
    if not reset_worked:
        baseline = max(baseline, _peak_rss_bytes(False))
    result = call()
    peak = _peak_rss_bytes(reset_worked)
    del result

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    matmuls = 2 if args.op == "attention_output" else 1
    flops = matmuls * 2 * args.heads * n * length * args.head_dim
    rows_per_chunk = min(args.chunk, n)
    return {
        "length": length,
        "op": args.op,
        "q_heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "n_queries": n,
        "top_k": top_k if args.op == "topk_tokens" else None,
        "chunk_size": args.chunk,
        "rows_per_chunk": rows_per_chunk,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "time_ms_median": 1e3 * median,
        "time_ms_min": 1e3 * times[0],
        "time_ms_max": 1e3 * times[-1],
        "gflops": flops / median / 1e9,
        "inputs_bytes": sum(t.numel() * t.element_size() for t in (q, k, v)),
        "baseline_rss_bytes": baseline,
        "peak_extra_bytes": max(0, peak - baseline),
        "peak_method": "VmHWM after clear_refs" if reset_worked else "ru_maxrss (no reset)",
        "full_scores_bytes": args.heads * length * length * 4,
        "chunked_scores_bytes": args.heads * rows_per_chunk * length * 4,
    }


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 GEMM rate torch reaches here: the ceiling the attention matmuls are measured against."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'L':>6} {'op':17} {'ms':>8} {'GFLOP/s':>8} {'ceiling':>8} {'peak MiB':>9} "
        f"{'chunked MiB':>11} {'all L×L MiB':>12} {'peak/chunked':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['length']:>6} {r['op']:17} {r['time_ms_median']:>8.1f} {r['gflops']:>8.1f} "
            f"{r['matmul_gflops']:>8.1f} {_mib(r['peak_extra_bytes']):>9} {_mib(r['chunked_scores_bytes']):>11} "
            f"{_mib(r['full_scores_bytes']):>12} {r['peak_extra_bytes'] / r['chunked_scores_bytes']:>12.2f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvdiag.bench.exact_attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="prompt lengths L")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--heads", type=int, default=32, help="query heads H_q (Llama-3.1-8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads H_kv (Llama-3.1-8B: 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=64, help="the last N positions are the queries")
    parser.add_argument("--chunk", type=int, default=256, help="chunk_size passed to the helpers")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the measured one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from kvdiag.runs import versions

    ceiling = matmul_gflops()
    env = versions()
    rows = []
    for length in args.lengths:
        for op in OPS:
            cmd = [sys.executable, "-m", "kvdiag.bench.exact_attention", "--worker", "--length", str(length),
                   "--op", op, "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                   "--head-dim", str(args.head_dim), "--queries", str(args.queries), "--chunk", str(args.chunk),
                   "--repeats", str(args.repeats)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(matmul_gflops=ceiling, torch=env["torch"], platform=env["platform"])
            rows.append(row)
    print_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
