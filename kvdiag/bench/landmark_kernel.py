"""Landmark-scoring kernel (`kvdiag.kernels.landmark_scores`) against its PyTorch reference, on a GPU.

    python -m kvdiag.bench.landmark_kernel --out FILE.json [--lengths 32768 131072]
    python -m kvdiag.bench.landmark_kernel --smoke --out FILE.json   # tiny sizes, CPU interpreter

Shape: Llama-3.1-8B (32 query / 8 KV heads, d = 128), one decode step of one layer, bf16 landmarks,
bf16 queries. Cases, for each prompt length L:
- "yakv":     N = L landmarks (one per token), rules "softmax_max" (simulator) and "mean_query"
              (runtime); top-k = 3.125 % of L tokens.
- "shadowkv": N = L/8 chunk landmarks, rule "softmax_max"; top-k = 1.5625 % of L tokens = L/512
              chunks (ShadowKV's 2048 of 128K).
Rows per case: the Triton kernel at each launch config of `CONFIGS` (the best one is flagged), the
plain-PyTorch reference (`kvdiag.kernels.naive`), torch.topk on the scores, kernel + top-k, and full
decode attention over the same L tokens (SDPA, bf16 K/V) for scale. Times: `triton.testing.do_bench`
medians (it flushes L2 before every call, so no input rotation is needed) with 20/80 % quantiles.

Bandwidth: "landmark bytes read / time" (H_kv·N·d·2), as the kernel must read them at least once; the
total bytes the kernel moves (its fp32 workspace too) are reported beside. Ceilings:
- HBM: 4101 GB/s, `gpu/ceilings.json`'s device-to-device copy (bytes read + written) on this H200 —
  the best sustained HBM rate measured there; a read-only stream (this kernel) can do somewhat
  better, so the copy and a read-only reduction (torch.amax over 2 GiB) are re-measured in the same
  run and reported too.
- Decode step (DESIGN.md): resident_bytes_scanned / HBM + fetched_bytes / host link (55 GB/s pinned),
  per layer; scanned = the landmarks; fetched = YAKV's top-k tokens' K + V at fp8 (2·d bytes per KV
  head and token), ShadowKV's top-k tokens' V at bf16 (2·d bytes; its keys are rebuilt on the GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

H_Q, H_KV, HEAD_DIM = 32, 8, 128
HBM_GBPS = 4101.0  # gpu/ceilings.json hbm_copy_GBps_read_plus_write (H200, 2026-11-28)
HOST_LINK_GBPS = 55.0  # gpu/ceilings.json host_to_device_pinned_GBps
YAKV_TOPK = 0.03125
SHADOWKV_TOPK_TOKENS = 2048 / 131072
CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]  # (block_n, num_warps)
SMOKE_CONFIGS = [(16, 4), (64, 4)]


def _timer(device: str):
    """(fn) -> (median, p20, p80) in µs: do_bench on CUDA, a perf_counter median elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        def time_cuda(fn):
            return tuple(1e3 * t for t in do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))

        return time_cuda

    def time_host(fn, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - start))
        times.sort()
        return times[len(times) // 2], times[0], times[-1]

    return time_host


def measure_ceilings(device: str) -> dict:
    """Device-to-device copy (read + write) and a read-only reduction over 2 GiB, in GB/s."""
    if device != "cuda":
        return {}
    import torch
    from triton.testing import do_bench

    src = torch.randn(2**30 // 2, device=device, dtype=torch.bfloat16).repeat(2)  # 2 GiB
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    read_ms = do_bench(lambda: src.amax(), warmup=25, rep=200, return_mode="median")
    return {
        "copy_GBps_read_plus_write": 2 * nbytes / copy_ms / 1e6,
        "read_only_amax_GBps": nbytes / read_ms / 1e6,
    }


def cases(lengths: list[int]) -> list[dict]:
    out = []
    for length in lengths:
        for rule in ("softmax_max", "mean_query"):
            out.append(
                dict(method="yakv", length=length, n_landmarks=length, rule=rule,
                     k=math.ceil(YAKV_TOPK * length), fetched_per_token=2 * HEAD_DIM)  # K + V fp8
            )  # fmt: skip
        out.append(
            dict(method="shadowkv", length=length, n_landmarks=length // 8, rule="softmax_max",
                 k=max(1, math.ceil(SHADOWKV_TOPK_TOKENS * length / 8)), fetched_per_token=2 * HEAD_DIM)  # V bf16
        )  # fmt: skip
    return out


def run_case(case: dict, device: str, configs, time_fn, hbm_gbps: float) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from kvdiag.kernels.landmark_scores import default_block_n, default_num_warps, landmark_scores
    from kvdiag.kernels.naive import naive_landmark_scores

    gen = torch.Generator(device=device).manual_seed(case["length"])
    n = case["n_landmarks"]
    q = torch.randn(H_Q, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)  # [H_q, d]
    landmarks = torch.randn(H_KV, n, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
    rule, k = case["rule"], case["k"]
    landmark_bytes = landmarks.numel() * landmarks.element_size()
    if rule == "softmax_max":  # landmarks + logits written and read + scores; block stats negligible
        kernel_bytes = landmark_bytes + 2 * H_Q * n * 4 + H_KV * n * 4
    else:
        kernel_bytes = landmark_bytes + H_KV * n * 4
    k_tokens = k if case["method"] == "yakv" else k * 8
    fetched = k_tokens * H_KV * case["fetched_per_token"]
    step_floor_us = 1e6 * (landmark_bytes / (hbm_gbps * 1e9) + fetched / (HOST_LINK_GBPS * 1e9))
    hbm_floor_us = 1e6 * landmark_bytes / (hbm_gbps * 1e9)
    ref = naive_landmark_scores(q, landmarks, rule)
    base = dict(case, head_dim=HEAD_DIM, q_heads=H_Q, kv_heads=H_KV, landmark_bytes=landmark_bytes,
                fetched_bytes=fetched, hbm_GBps=hbm_gbps, hbm_floor_us=hbm_floor_us,
                step_floor_us=step_floor_us)  # fmt: skip
    rows = []

    def add(impl, fn, moved_bytes, config=None, check=False):
        row = dict(base, impl=impl, config=config, bytes_moved=moved_bytes)
        try:
            if check:
                rel = ((fn() - ref).norm() / ref.norm()).item()
                row["rel_err_vs_reference"] = rel
            median, p20, p80 = time_fn(fn)
        except Exception as err:  # one failing variant must not lose the others' numbers
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            return row
        row.update(time_us=median, time_us_p20=p20, time_us_p80=p80,
                   landmark_GBps=landmark_bytes / median / 1e3, moved_GBps=moved_bytes / median / 1e3,
                   fraction_of_hbm_floor=hbm_floor_us / median, share_of_step_floor=median / step_floor_us)  # fmt: skip
        rows.append(row)
        return row

    reference = add("torch_reference", lambda: naive_landmark_scores(q, landmarks, rule), kernel_bytes)
    default = (default_block_n(HEAD_DIM), default_num_warps(rule))
    kernel_rows = []
    for block_n, warps in dict.fromkeys([default, *configs]):
        fn = lambda b=block_n, w=warps: landmark_scores(q, landmarks, rule, block_n=b, num_warps=w)  # noqa: E731
        row = add("triton", fn, kernel_bytes, config=f"block_n={block_n},warps={warps}", check=True)
        row["default_config"] = (block_n, warps) == default
        kernel_rows.append(row)
    timed = [r for r in kernel_rows if "time_us" in r]
    best = min(timed, key=lambda r: r["time_us"]) if timed else None
    for row in kernel_rows:
        row["best_config"] = row is best
    if best is not None:
        block_n, warps = (int(v.split("=")[1]) for v in best["config"].split(","))
        scores = landmark_scores(q, landmarks, rule, block_n=block_n, num_warps=warps)
        add("torch.topk", lambda: scores.topk(k, dim=-1), H_KV * n * 4)
        add("triton+topk", lambda: landmark_scores(q, landmarks, rule, block_n=block_n, num_warps=warps).topk(k, dim=-1),
            kernel_bytes, config=best["config"])  # fmt: skip
    if case["method"] == "yakv" and rule == "softmax_max":
        length = case["length"]
        q4 = q.reshape(1, H_Q, 1, HEAD_DIM)
        keys = torch.randn(1, H_KV, length, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
        values = torch.randn_like(keys)
        kv_bytes = 2 * keys.numel() * keys.element_size()
        add("full_attention_sdpa", lambda: F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True),
            kv_bytes)  # fmt: skip
    for row in rows:
        if reference.get("time_us") and row.get("time_us"):
            row["speedup_vs_reference"] = reference["time_us"] / row["time_us"]
    return rows


def print_table(rows: list[dict], ceilings: dict) -> None:
    print(f"\nHBM ceiling used: {HBM_GBPS:.0f} GB/s (ceilings.json copy, read+write); re-measured here: "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))  # fmt: skip
    head = (f"{'method':9} {'L':>7} {'N':>7} {'rule':12} {'impl':20} {'config':20} {'µs':>8} "
            f"{'lm GB/s':>8} {'of HBM':>7} {'of step':>8} {'× ref':>7} {'rel err':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(
                f"{r['method']:9} {r['length']:>7} {r['n_landmarks']:>7} {r['rule']:12} {r['impl']:20} ERROR {r['error']}"
            )
            continue
        config = (r["config"] or "") + (" *" if r.get("best_config") else "")
        err = r.get("rel_err_vs_reference")
        print(f"{r['method']:9} {r['length']:>7} {r['n_landmarks']:>7} {r['rule']:12} {r['impl']:20} {config:20} "
              f"{r['time_us']:8.1f} {r['landmark_GBps']:8.0f} {r['fraction_of_hbm_floor']:7.2f} "
              f"{r['share_of_step_floor']:8.2f} {r.get('speedup_vs_reference', float('nan')):7.1f} "
              f"{'' if err is None else f'{err:.1e}':>8}")  # fmt: skip
    print(
        "'of HBM' = (landmark bytes / HBM ceiling) / time; 'of step' = time / decode-step floor; * = best config"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the manifest and the tidy rows")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
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
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kvdiag.kernels.landmark_scores loads
    lengths = [1024] if args.smoke else args.lengths
    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    from kvdiag.runs import git_hash, versions

    ceilings = measure_ceilings(device)  # its 4 GiB of buffers are freed on return
    if device == "cuda":
        torch.cuda.empty_cache()
    time_fn = _timer(device)
    rows = []
    for case in cases(lengths):
        rows.extend(run_case(case, device, configs, time_fn, HBM_GBPS))
        if device == "cuda":
            torch.cuda.empty_cache()
    manifest = {"command": "python -m kvdiag.bench.landmark_kernel " + " ".join(argv or sys.argv[1:]),
                "versions": versions(), "git": git_hash(), "device": device,
                "hbm_ceiling_GBps": HBM_GBPS, "hbm_ceiling_source": "gpu/ceilings.json hbm_copy_GBps_read_plus_write",
                "host_link_GBps": HOST_LINK_GBPS, "remeasured": ceilings,
                "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)" if device == "cuda"
                else "perf_counter median of 3 (interpreter smoke run; not a measurement)"}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"manifest": manifest, "rows": rows}, indent=1))
    print_table(rows, ceilings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
