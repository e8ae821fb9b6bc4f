"""One decode step of one layer through the offload runtime, against its floor and the baselines.

    kvdiag bench --out DIR [--lengths 32768,131072] [--batch 1,8] [--methods yakv,shadowkv] [--smoke]

Shape: Llama-3.1-8B (32 query / 8 KV heads, d = 128; `--smoke`: 4 / 2 heads, d = 32, tiny lengths,
CPU under the Triton interpreter), bf16 queries, random keys and values (speed depends on shapes
only). Per method × prompt length L × batch B, one `Built` is made by the method itself
(`Method.build` on random K/V, then `offload_built`: resident on the GPU, payload pinned on the
host) and shared by the B rows. Rows of `bench.parquet`:

- `component` scoring / topk / gather / attention: each kernel of the runtime's kernel path
  (`kvdiag.offload.fast`) alone, timed as CUDA-graph replays;
- `step`: the whole kernel step (the four launches, `fast.step`) in one CUDA graph;
- `floor`: resident bytes the step must read / HBM + fetched bytes / host link, with both ceilings
  re-measured in the same run (`ceiling_*` rows: a 2 GiB device copy counting read + write, a 1 GiB
  pinned host→device copy);
- `sdpa_full`: full attention over all L tokens with every K/V on the GPU (bf16, SDPA with GQA) —
  what not offloading costs;
- `torch_path`: the plain-PyTorch step a researcher would write with the same Method objects (the
  method's PyTorch selection, host rows indexed on the CPU and copied, masked attention), eager.

Methods: `yakv` = YAKV's runtime variant (`rule=mean_query`, fp8 K/V, 2-bit HIGGS landmarks, budget
3.125 % of L); `shadowkv` = ShadowKV (rank 160, chunk 8, 48 outlier chunks, budget 1.5625 %).
Times: median and 20/80 % quantiles of graph replays (`kvdiag.bench.attend_kernels.time_graph`);
eager rows via `triton.testing.do_bench`. The end-to-end decode of a whole model, in the same run:
`kvdiag.bench.decode_e2e`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

BUDGETS = {"yakv": 0.03125, "shadowkv": 0.015625}
SPECS = {"yakv": "yakv:rule=mean_query", "shadowkv": "shadowkv"}


@dataclass
class Shape:
    n_q: int = 32
    n_kv: int = 8
    d: int = 128
    tail: int = 128  # tokens generated so far (on the GPU, attended exactly)


SMOKE = Shape(n_q=4, n_kv=2, d=32, tail=5)


def measure_ceilings(device: str, smoke: bool) -> dict:
    """HBM copy GB/s (read + write) and pinned host→device GB/s, measured now."""
    import torch

    if device != "cuda":
        return {"hbm_GBps": float("nan"), "host_link_GBps": float("nan")}
    n = (1 << 30) if not smoke else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(n // 2, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n // 2, dtype=torch.uint8, device=device)
    from triton.testing import do_bench

    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    link_ms = do_bench(lambda: dev.copy_(host, non_blocking=True), warmup=5, rep=30)
    return {"hbm_GBps": 2 * n / copy_ms / 1e6, "host_link_GBps": (n // 2) / link_ms / 1e6}


def random_layer(length: int, shape: Shape, device: str, seed: int = 0):
    """A LayerKV with random keys (a shared component per head, as real keys have) and values."""
    import torch

    from kvdiag.capture.rope import apply_rope
    from kvdiag.methods import LayerKV

    gen = torch.Generator(device=device).manual_seed(seed)
    d = shape.d
    k_pre = torch.randn(shape.n_kv, length, d, generator=gen, device=device)
    k_pre += 2 * torch.randn(shape.n_kv, 1, d, generator=gen, device=device)
    inv_freq = 1.0 / 500000 ** (torch.arange(0, d, 2, device=device).float() / d)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    k_post = apply_rope(k_pre, cos, sin)
    v = torch.randn(shape.n_kv, length, d, generator=gen, device=device)
    bf16 = torch.bfloat16
    return LayerKV(k_pre.to(bf16), k_post.to(bf16), v.to(bf16), cos, sin, d**-0.5, layer_idx=5)


def bench_method(name: str, length: int):
    """The Method a bench case runs at prompt length `length` (ShadowKV's outlier chunks scaled to
    the study's share of the prompt: 48 chunks of 128K)."""
    from kvdiag.methods import parse_method_spec

    if name == "shadowkv" and length < 131072:
        return parse_method_spec(f"shadowkv:outlier_chunks={max(1, round(48 * length / 131072))}")
    return parse_method_spec(SPECS[name])


def step_case(
    name: str, length: int, batch: int, shape: Shape, device: str, ceilings: dict, timer
) -> list[dict]:
    """Rows of one method × L × B case."""
    import torch

    from kvdiag.methods.base import fetch_rows
    from kvdiag.offload.fast import fast_path_for
    from kvdiag.offload.runtime import offload_built

    method = bench_method(name, length)
    built = offload_built(method.build(random_layer(length, shape, device)), device)
    builts = [built] * batch
    states = [method.start(built, BUDGETS[name]) for _ in builts]
    fast = fast_path_for(method, builts, states, device, interpreter=True)
    if fast is None:
        raise RuntimeError(f"no kernel path for {SPECS[name]} here (CUDA or TRITON_INTERPRET=1 needed)")
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, shape.n_q, shape.d, generator=gen, device=device).to(torch.bfloat16)
    tail_k = torch.randn(batch, shape.n_kv, shape.tail, shape.d, generator=gen, device=device).to(
        torch.bfloat16
    )
    tail_v = torch.randn_like(tail_k)
    scale = shape.d**-0.5
    base = {"method": name, "spec": method.label(), "L": length, "B": batch, "budget": BUDGETS[name],
            "budget_tokens": states[0].budget_tokens}  # fmt: skip
    rows = []

    def add(kind, stats, **extra):
        median, p20, p80 = stats
        rows.append({**base, "kind": kind, "median_us": median, "p20_us": p20, "p80_us": p80, **extra})

    # the components of the kernel path, each alone
    out = fast.select_ids(q)
    ids = torch.cat([out, fast.local_ids], -1) if name == "yakv" else out[1]
    fetched_bytes = _fetched_bytes(name, fast, ids)
    scanned_bytes = _scanned_bytes(name, fast, ids, batch, shape)
    add("component:select", timer(lambda: fast.select_ids(q)), bytes=scanned_bytes)
    from kvdiag.kernels.gather import gather_rows

    src = (fast.k_host, fast.v_host) if name == "yakv" else fast.v_host
    add("component:gather", timer(lambda: gather_rows(src, ids)), bytes=fetched_bytes)
    add(
        "step",
        timer(lambda: fast.kernel_step(q, tail_k, tail_v, scale, None)),
        bytes=scanned_bytes + fetched_bytes,
    )
    floor_us = 1e6 * (
        scanned_bytes / (ceilings["hbm_GBps"] * 1e9) + fetched_bytes / (ceilings["host_link_GBps"] * 1e9)
    )
    rows.append({**base, "kind": "floor", "median_us": floor_us, "p20_us": floor_us, "p80_us": floor_us,
                 "bytes": scanned_bytes + fetched_bytes})  # fmt: skip

    # full attention with every K/V on the GPU
    k_all = torch.randn(batch, shape.n_kv, length + shape.tail, shape.d, generator=gen, device=device).to(
        torch.bfloat16
    )
    v_all = torch.randn_like(k_all)
    q4 = q[:, :, None]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k_all, v_all, enable_gqa=True)  # noqa: E731
    add("sdpa_full", timer(sdpa), bytes=2 * k_all.numel() * 2)
    k_all = v_all = None  # free them before the PyTorch path

    # the plain-PyTorch step with the same Method objects
    from kvdiag.attention import masked_attention

    def torch_step():
        sel = method.select_batch(fast.batch, q.float()[:, None], states)
        for b in range(batch):
            chosen = sel.row(b)
            token_ids = chosen.ids[0].clamp_min(0)
            fetched = fetch_rows(built.offloaded, token_ids.cpu())
            fetched = {k: v.to(device) for k, v in fetched.items()}
            k, v = method.materialize(built, token_ids, fetched)
            masked_attention(q[b].float()[:, None], k, v, None, scale)

    add("torch_path", _eager(device)(torch_step))
    return rows


def _fetched_bytes(name: str, fast, ids) -> int:
    n = int((ids >= 0).sum())
    return n * fast.d * (2 if name == "yakv" else 2)  # YAKV: fp8 K + fp8 V; ShadowKV: bf16 V


def _scanned_bytes(name: str, fast, ids, batch: int, shape: Shape) -> int:
    """Bytes the step must read from HBM: the resident landmarks (scoring), and what attention reads
    besides the fetched rows (ShadowKV: the exact resident rows, U rows of the chosen tokens, SV)."""
    tail = 2 * batch * shape.n_kv * shape.tail * shape.d * 2
    if name == "yakv":
        return fast.codes.numel() * fast.codes.element_size() + fast.scales.numel() * 4 + tail
    n_ids = int((ids >= 0).sum())
    rank = fast.u.shape[-1]
    landmarks = fast.landmarks.numel() * fast.landmarks.element_size()
    exact = fast.res_k.numel() * fast.res_k.element_size() * 2
    return (
        landmarks
        + exact
        + n_ids * rank * fast.u.element_size()
        + fast.sv.numel() * fast.sv.element_size()
        + tail
    )


def _graph_timer(device: str, smoke: bool):
    if device != "cuda":
        return _eager(device, smoke)
    from kvdiag.bench.attend_kernels import time_graph

    return lambda fn: time_graph([fn])


def _eager(device: str, smoke: bool = False):
    from kvdiag.bench.attend_kernels import make_eager_timer

    return make_eager_timer(device, smoke)


def run_bench(out, lengths=(32768, 131072), batches=(1, 8), methods=("yakv", "shadowkv"), smoke: bool = False,
              progress: bool = True, overwrite: bool = False, step: bool = True, e2e: bool = True,
              e2e_steps: int = 16, max_batch_cap: int = 64) -> dict:  # fmt: skip
    """The `kvdiag bench` pipeline: ceilings, every step case (step=True), then (e2e=True) the end-to-end decode
    of a whole random-weight model (`kvdiag.bench.decode_e2e`: full attention and each method at every
    length × batch, the largest batch at the longest length), bench.parquet, manifest (figures:
    `kvdiag.plots.bench.plot_bench_run(out)`). An `out` holding a run is refused unless `overwrite`."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from kvdiag.errors import KvdiagError
    from kvdiag.runs import staged_run_dir, write_manifest, write_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        raise KvdiagError("kvdiag bench measures a GPU and none is available; use --smoke for a CPU check")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KvdiagError("the CPU smoke run needs TRITON_INTERPRET=1 (kvdiag bench sets it when it starts)")
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        raise KvdiagError(f"bench methods {unknown} are not covered; choose from {', '.join(SPECS)}")
    if not (step or e2e):
        raise KvdiagError("kvdiag bench: nothing to run (neither the step cases nor the end-to-end decode)")
    shape = SMOKE if smoke else Shape()
    lengths = [256, 512] if smoke else list(lengths)
    batches = [1, 2] if smoke else list(batches)
    start = time.perf_counter()
    with staged_run_dir(out, "bench", overwrite=overwrite) as stage:
        ceilings = measure_ceilings(device, smoke)
        if device == "cpu":
            ceilings = {"hbm_GBps": 4101.0, "host_link_GBps": 55.0}  # the H200's, for the smoke rows
        timer = _graph_timer(device, smoke)
        rows = [{"kind": f"ceiling_{k}", "value": v} for k, v in ceilings.items()]
        print("ceilings", ceilings, flush=True)
        cases = [(m, L, B) for m in methods for L in lengths for B in batches] if step else []
        for name, length, batch in tqdm(cases, desc="bench", disable=not progress):
            case_rows = step_case(name, length, batch, shape, device, ceilings, timer)
            rows += case_rows
            print(
                "case",
                {r["kind"]: round(r["median_us"], 1) for r in case_rows},
                name,
                length,
                batch,
                flush=True,
            )
            if device == "cuda":
                torch.cuda.empty_cache()
        if e2e:
            from kvdiag.bench.decode_e2e import run_e2e

            rows += run_e2e(lengths[:1] if smoke else lengths, batches, engines=("full", *methods), smoke=smoke,
                            steps=3 if smoke else e2e_steps, hbm_GBps=ceilings["hbm_GBps"],
                            max_batch_cap=max_batch_cap, progress=progress)  # fmt: skip
        table = pd.DataFrame(rows)
        for column in ("L", "B", "budget_tokens"):
            if column in table:
                table[column] = table[column].astype("Int64")
        write_table(table, stage / "bench.parquet")
        config = {"lengths": lengths, "batches": batches, "methods": list(methods), "smoke": smoke,
                  "shape": shape.__dict__, "device": device, "step": step, "e2e": e2e, "e2e_steps": e2e_steps,
                  "max_batch_cap": max_batch_cap}  # fmt: skip
        write_manifest(
            stage, "bench", config, {"ceilings": ceilings, "seconds": round(time.perf_counter() - start, 1)}
        )
    return {"out": out, "table": table, "summary": summary(table)}


def summary(table) -> list[str]:
    """One line per case: step vs floor, vs full attention and vs the PyTorch path; then the
    end-to-end lines (`kvdiag.bench.decode_e2e.summary`)."""
    from kvdiag.bench import decode_e2e

    lines = []
    cases = table[table.kind == "step"]
    for row in cases.itertuples():
        same = table[(table.method == row.method) & (table.L == row.L) & (table.B == row.B)]
        get = lambda kind, same=same: float(same.loc[same.kind == kind, "median_us"].iloc[0])  # noqa: E731
        floor, sdpa, torch_path = get("floor"), get("sdpa_full"), get("torch_path")
        lines.append(
            f"{row.method:9s} L={int(row.L):>7d} B={int(row.B):<3d} step {row.median_us:9.1f} µs = {row.median_us / floor:5.2f}× floor "
            f"({floor:.1f}); full attention {sdpa:9.1f} µs; PyTorch path {torch_path:10.1f} µs"
        )
    return lines + decode_e2e.summary(table)
