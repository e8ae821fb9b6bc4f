"""End-to-end decode of a whole model: full attention vs the offload runtime (tokens/s, GPU memory).

    kvdiag bench --out DIR --lengths 32768,131072 --batch 1,8      # the e2e rows come with the step rows

Model: random weights with Llama-3.1-8B's configuration (bf16, SDPA: speed depends on shapes, not on
trained weights); `--smoke`: a 2-layer tiny Llama on the CPU (kernels under the Triton interpreter).
Per prompt length L, one prompt of L random tokens is prefilled once, exactly, with its K/V kept in
host memory (`prefill_prompt(queries=False, store_device="cpu")`: no queries, 24.6 GB at 128K), and
decoded in B rows. Every row decodes the same prompt K/V but starts from its own first token, so the
rows' queries and selections differ; the offloaded rows share the prompt's host payload (one pinned
copy read through a stride-0 view, `kvdiag.offload.fast`), because the lent machine's host memory
(128 GiB) holds about twelve offloaded 128K prompts of this model, fewer than the batches measured.
Each row's GPU state is its own: full attention copies the K/V per row, the runtime stacks each row's
resident state.

Engines (`engine` column):
- `full`: transformers' decode with every K/V on the GPU (DynamicCache, SDPA), what a user has
  without kvdiag (`greedy_decode` without a method: the same loop as the runtime's);
- `yakv` / `shadowkv`: `greedy_decode(engine="runtime")` with the configurations of
  `kvdiag.bench.offload_step`: resident state on the GPU, payload in pinned host memory, the
  runtime's kernel path per layer. The HF model's Python runs every step (no whole-step CUDA graph).

Rows of bench.parquet:
- kind `e2e`: engine, L, B, step_ms (median of the decode steps after the first two), tokens_per_s
  (B / step), peak_gpu_GB (the most allocated during the decode, weights included), weights_GB,
  state_GB (peak minus weights: K/V or resident state, tails, transients), accounted_GB (full: B·L
  K/V bytes; runtime: the resident bytes the methods account for, `RuntimeState.gpu_resident_bytes`
  with one shared build per layer counted once per row);
- kind `e2e_floor`: full attention's floor at (L, B) as tokens/s: B / ((weights + B·K/V bytes) / HBM);
- kind `e2e_max_batch`: per engine, the largest B that decodes a few steps at the longest L without
  running out of GPU memory (doubling, then bisection; capped at `max_batch_cap`), with its tokens/s.
"""

from __future__ import annotations

import statistics
import time

import torch

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072 + 4096,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip
SMOKE_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096,
                   rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
ENGINES = ("full", "yakv", "shadowkv")


def random_model(smoke: bool, device: str):
    """Llama-3.1-8B's configuration with random bf16 weights (smoke: a tiny fp32 Llama)."""
    import transformers

    config = transformers.LlamaConfig(**(SMOKE_LLAMA if smoke else LLAMA_31_8B))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: 16 GB, never an fp32 copy of 32 GB
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.kvdiag_name = "random Llama-3.1-8B config" if not smoke else "random tiny Llama"
    return model


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def method_for(engine: str, length: int):
    """(Method, budget) of an offloaded engine: the step bench's configurations."""
    from kvdiag.bench.offload_step import BUDGETS, bench_method

    return bench_method(engine, length), BUDGETS[engine]


def decode_case(model, prefill, engine: str, batch: int, steps: int, device: str) -> dict:
    """Decode `steps` tokens in `batch` rows of one prefilled prompt; timings and memory."""
    from kvdiag.offload.decode import SharedPrefill, greedy_decode

    vocab = model.config.vocab_size
    rows = [SharedPrefill(prefill.trace, (prefill.last_token + 97 * b) % vocab) for b in range(batch)]
    kwargs = {}
    if engine != "full":
        method, budget = method_for(engine, prefill.n_tokens)
        kwargs = dict(
            method=method,
            budget=budget,
            engine="runtime",
            counting=False,
            kernels=True if device == "cpu" else None,
        )  # CPU: the kernels under the interpreter
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    seconds: list[float] = []
    result = greedy_decode(model, rows, steps, eos=[-1], step_seconds=seconds, **kwargs)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    timed = seconds[2:] if len(seconds) > 3 else seconds[1:] or seconds
    step = statistics.median(timed)
    if engine == "full":
        accounted = batch * kv_bytes(model, prefill.n_tokens)
    else:
        accounted = result.engine_state.gpu_resident_bytes()
    fast = 0 if engine == "full" else result.engine_state.fast_steps
    return {"engine": engine, "L": prefill.n_tokens + 1, "B": batch, "steps": result.steps, "kernel_layer_steps": fast,
            "step_ms": step * 1e3, "tokens_per_s": batch / step, "first_step_s": seconds[0],
            "peak_gpu_GB": peak / 1e9, "weights_GB": before / 1e9, "state_GB": (peak - before) / 1e9,
            "accounted_GB": accounted / 1e9}  # fmt: skip


def kv_bytes(model, tokens: int) -> int:
    """Bytes of one prompt's K/V in the model's cache (every layer, at the model's dtype)."""
    from kvdiag.eval.generation import exact_bytes_per_token

    return int(exact_bytes_per_token(model) * tokens * model.config.num_hidden_layers)


def full_floor(model, length: int, batch: int, hbm_GBps: float) -> float:
    """Full attention's tokens/s floor: every weight and every row's K/V read once per step."""
    seconds = (weights_bytes(model) + batch * kv_bytes(model, length)) / (hbm_GBps * 1e9)
    return batch / seconds


def fits(model, prefill, engine: str, batch: int, steps: int, device: str) -> dict | None:
    """The decode case at `batch`, or None when it runs out of GPU memory."""
    try:
        return decode_case(model, prefill, engine, batch, steps, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def largest_batch(
    model, prefill, engine: str, device: str, cap: int, steps: int = 4
) -> tuple[int, dict | None]:
    """The largest B ≤ cap that decodes `steps` tokens without running out of GPU memory (doubling
    from 1, then bisection between the last B that fit and the first that did not), with its row."""
    good, good_row, bad = 0, None, cap + 1
    batch = 1
    while batch < bad:
        row = fits(model, prefill, engine, batch, steps, device)
        if row is None:
            bad = batch
            break
        good, good_row = batch, row
        if batch == cap:
            break
        batch = min(2 * batch, cap)
    while bad - good > 1 and good < cap:
        middle = (good + bad) // 2
        row = fits(model, prefill, engine, middle, steps, device)
        if row is None:
            bad = middle
        else:
            good, good_row = middle, row
    return good, good_row


def run_e2e(lengths, batches, engines=ENGINES, smoke: bool = False, steps: int = 16, hbm_GBps: float = 4101.0,
            max_batch_cap: int = 64, progress: bool = True) -> list[dict]:  # fmt: skip
    """Rows (dicts) of every engine × length × batch, the floors and the largest batches."""
    from tqdm.auto import tqdm

    from kvdiag.errors import KvdiagError
    from kvdiag.offload.decode import prefill_prompt

    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise KvdiagError(f"e2e engines {unknown} are unknown; choose from {', '.join(ENGINES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(smoke, device)
    rows: list[dict] = [{"kind": "e2e_weights", "value": weights_bytes(model) / 1e9}]
    gen = torch.Generator().manual_seed(0)
    cases = [(L, B, e) for L in lengths for B in batches for e in engines]
    searches = len(engines) if device == "cuda" else 0
    bar = tqdm(total=len(cases) + searches, desc="e2e decode", disable=not progress)
    for length in lengths:
        ids = torch.randint(100, model.config.vocab_size, (1, length), generator=gen)
        started = time.perf_counter()
        prefill = prefill_prompt(model, ids, queries=False, store_device="cpu")
        rows.append({"kind": "e2e_prefill", "L": length, "value": time.perf_counter() - started})
        for batch in batches:
            rows.append({"kind": "e2e_floor", "engine": "full", "L": length, "B": batch,
                         "tokens_per_s": full_floor(model, length, batch, hbm_GBps)})  # fmt: skip
            for engine in engines:
                bar.set_postfix_str(f"{engine} L={length} B={batch}")
                row = fits(model, prefill, engine, batch, steps, device)
                rows.append(
                    {"kind": "e2e", **(row or {"engine": engine, "L": length, "B": batch, "oom": True})}
                )
                bar.update()
        if length == max(lengths) and device == "cuda":  # no out-of-memory error to find on a CPU
            for engine in engines:
                bar.set_postfix_str(f"largest batch {engine} L={length}")
                best, row = largest_batch(model, prefill, engine, device, max_batch_cap)
                rows.append({"kind": "e2e_max_batch", "engine": engine, "L": length, "B": best,
                             "capped": best >= max_batch_cap,
                             "tokens_per_s": None if row is None else row["tokens_per_s"],
                             "peak_gpu_GB": None if row is None else row["peak_gpu_GB"]})  # fmt: skip
                bar.update()
        del prefill
    bar.close()
    return rows


def summary(table) -> list[str]:
    """One line per e2e case and per largest batch."""
    import pandas as pd

    lines = []
    e2e = table[table.kind == "e2e"]
    floors = table[table.kind == "e2e_floor"]
    for row in e2e.itertuples():
        if "oom" in e2e and row.oom is True:
            lines.append(f"e2e {row.engine:9s} L={int(row.L):>7d} B={int(row.B):<3d} out of GPU memory")
            continue
        floor = floors[(floors.L == row.L) & (floors.B == row.B)].tokens_per_s
        floor_text = f"; full-attention floor {float(floor.iloc[0]):8.1f} tok/s" if len(floor) else ""
        lines.append(
            f"e2e {row.engine:9s} L={int(row.L):>7d} B={int(row.B):<3d} {row.step_ms:8.1f} ms/step "
            f"{row.tokens_per_s:8.1f} tok/s, peak GPU {row.peak_gpu_GB:6.1f} GB{floor_text}"
        )
    for row in table[table.kind == "e2e_max_batch"].itertuples():
        speed = "" if pd.isna(row.tokens_per_s) else f" at {row.tokens_per_s:.1f} tok/s"
        lines.append(
            f"largest batch {row.engine:9s} L={int(row.L):>7d}: {int(row.B)}{' (cap)' if row.capped else ''}{speed}"
        )
    return lines
