"""Fidelity without generation: teacher-forced on a gold answer, how far is a method from exact?

For a prompt of L tokens and a gold answer a_0..a_{A-1}: the prompt is prefilled once, exactly, and
recorded; the answer is then fed in one call under each method (the simulator treats each answer
position as an independent decode step over the method's view of the prompt, with exact attention
to earlier answer tokens). Per answer token a_j, j ≥ 1 (a_0 is predicted by the exact prefill):
- kl:         KL(p_exact ‖ p_method) of the next-token distributions, in nats;
- top1_agree: whether both put the same token first;
- gold_logprob_exact / gold_logprob_method: log-probability of the gold token.
This is cheap (one prefill per sample, one answer-length pass per method) and sensitive, and it is
what a CPU can afford on long prompts.
"""

from __future__ import annotations

import copy

import pandas as pd
import torch

from kvdiag.capture import capture
from kvdiag.errors import KvdiagError
from kvdiag.methods.base import Method
from kvdiag.models import adapter
from kvdiag.offload.simulate import simulate


def _continue(model, cache, answer_inputs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [A-1, V] (float32) of the answer continuation from a copy of `cache`."""
    out = model(input_ids=answer_inputs, use_cache=True, **adapter.with_cache(model, copy.deepcopy(cache)))
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def teacher_forced_fidelity(
    model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, runs: list[tuple[Method, float | int]]
) -> pd.DataFrame:
    """One row per (method, budget, answer token j ≥ 1); `method` is the method's label (its spec
    with non-default knobs). prompt_ids [1, L], answer_ids [1, A ≥ 2]."""
    if answer_ids.shape[-1] < 2:
        raise KvdiagError("teacher forcing needs a gold answer of at least 2 tokens")
    device = next(model.parameters()).device
    prompt_ids, answer_ids = prompt_ids.to(device), answer_ids.to(device)
    answer_inputs, targets = answer_ids[:, :-1], answer_ids[0, 1:]
    with torch.inference_mode():
        with capture(model, "all") as rec:
            cache = adapter.model_forward_cache(model(input_ids=prompt_ids, use_cache=True))
        trace = rec.trace(with_versions=False)
        exact = _continue(model, cache, answer_inputs)
        rows = []
        for method, budget in runs:
            with simulate(model, method, budget, prompt_trace=trace) as sim:
                approx = _continue(model, cache, answer_inputs)
            kl = (exact.exp() * (exact - approx)).sum(-1).clamp_min(0)
            frame = pd.DataFrame({
                "method": method.label(), "budget": budget, "budget_tokens": sim.row_budget(0),
                "position": range(1, answer_ids.shape[1]), "kl": kl.cpu().numpy(),
                "top1_agree": (exact.argmax(-1) == approx.argmax(-1)).cpu().numpy(),
                "gold_logprob_exact": exact.gather(1, targets[:, None])[:, 0].cpu().numpy(),
                "gold_logprob_method": approx.gather(1, targets[:, None])[:, 0].cpu().numpy(),
            })  # fmt: skip
            rows.append(frame)
    return pd.concat(rows, ignore_index=True)
