"""The accuracy simulator against plain transformers generation and against itself step by step."""

from __future__ import annotations

import pytest
import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods import get_method
from kvdiag.models import adapter
from kvdiag.offload.simulate import simulate
from tests.conftest import TINY_MODELS

PROMPT = "The ledger lists 17 barometers in Lisbon, 4 sextants in Osaka and 9 looms in Bergen. " * 3


def _generate(model, ids, n=10):
    return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.parametrize("name", [*TINY_MODELS, "smollm2-135m"])
def test_oracle_at_full_budget_generates_exactly_like_greedy(tiny, smollm2, name):
    model, tokenizer = smollm2 if name == "smollm2-135m" else tiny(name)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = _generate(model, ids)
        with simulate(model, get_method("oracle"), 1.0) as sim:
            simulated = _generate(model, ids)
    assert torch.equal(simulated, reference)
    assert sim.stats()["decode_steps"] == 9  # the first new token comes from the exact prefill
    assert model.config._attn_implementation == "sdpa"  # restored


def test_streaming_at_a_small_budget_changes_the_output(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = _generate(model, ids, 16)
        with simulate(model, get_method("streaming", sinks=1), 4):
            simulated = _generate(model, ids, 16)
    assert not torch.equal(simulated, reference)


def _logits_exact_tail(model, prompt_ids, answer_ids, method, budget, one_call: bool):
    """Logits of the answer tokens under `method`: all answer tokens in one call, or one per call."""
    with torch.inference_mode(), simulate(model, method, budget):
        out = model(input_ids=prompt_ids, use_cache=True)
        cache = adapter.model_forward_cache(out)
        if one_call:
            return model(input_ids=answer_ids, use_cache=True, **adapter.with_cache(model, cache)).logits[0]
        rows = []
        for j in range(answer_ids.shape[1]):
            step = model(
                input_ids=answer_ids[:, j : j + 1], use_cache=True, **adapter.with_cache(model, cache)
            )
            rows.append(step.logits[0, 0])
            cache = adapter.model_forward_cache(step)
        return torch.stack(rows)


@pytest.mark.parametrize("method", ["yakv", "shadowkv", "quest", "streaming"])
def test_teacher_forced_call_equals_one_token_at_a_time_decode(smollm2, method):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT * 2, return_tensors="pt").input_ids
    prompt_ids, answer_ids = ids[:, :-8], ids[:, -8:]
    budget = 16
    together = _logits_exact_tail(model, prompt_ids, answer_ids, get_method(method), budget, True)
    stepwise = _logits_exact_tail(model, prompt_ids, answer_ids, get_method(method), budget, False)
    torch.testing.assert_close(together, stepwise, rtol=1e-4, atol=1e-4)


def test_exact_method_reproduces_the_models_logits(tiny):
    model, tokenizer = tiny("tiny-qwen3")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = model(input_ids=ids).logits[0, -5:]
    got = _logits_exact_tail(model, ids[:, :-5], ids[:, -5:], get_method("exact"), 1.0, True)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_sliding_window_layers_stay_exact(tiny):
    model, _ = tiny("tiny-gemma3")
    with simulate(model, get_method("oracle"), 1.0) as sim:
        pass
    assert sim.layers == {3}  # layers 0-2 are sliding-window layers


def test_bad_inputs(tiny):
    model, tokenizer = tiny("tiny-llama")
    with pytest.raises(KvdiagError, match="kvdiag Method"), simulate(model, "yakv", 0.1):
        pass
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with (
        pytest.raises(KvdiagError, match="outside"),
        torch.inference_mode(),
        simulate(model, get_method("yakv"), 0.0),
    ):
        _generate(model, ids, 2)


def test_teacher_forced_fidelity_is_zero_for_exact_and_positive_for_a_lossy_method(smollm2):
    from kvdiag.eval.fidelity import teacher_forced_fidelity

    model, tokenizer = smollm2
    ids = tokenizer(PROMPT * 2, return_tensors="pt").input_ids
    prompt_ids, answer_ids = ids[:, :-12], ids[:, -12:]
    table = teacher_forced_fidelity(
        model, prompt_ids, answer_ids, [(get_method("exact"), 1.0), (get_method("streaming", sinks=1), 4)]
    )
    exact, lossy = table[table.method == "exact"], table[table.method == "streaming:sinks=1"]
    assert len(exact) == 11 and exact.kl.max() < 1e-4 and exact.top1_agree.all()
    assert lossy.kl.mean() > 1e-2
    # the method's gold log-probs equal those of an independent one-token-at-a-time decode
    stepwise = _logits_exact_tail(
        model, prompt_ids, answer_ids[:, :-1], get_method("streaming", sinks=1), 4, False
    )
    reference = torch.log_softmax(stepwise.float(), -1).gather(1, answer_ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor(lossy.gold_logprob_method.values), reference, rtol=1e-4, atol=1e-4
    )
