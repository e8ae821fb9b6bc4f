"""Resuming and growing an eval run directory across invocations.

A run directory holds cells (sample, method label, budget); a later `run_eval` into the same `out`
may *add* cells whose meaning fits the existing ones, and is refused only on a real conflict:

- allowed: more samples (`n` 3 after 2: the samples are seeded, sample i is the same prompt for every
  n; checked below), fewer samples (nothing new runs), another method or method label, another budget;
- refused: a different model, task, task knobs (except `data_dir`, a path that may differ between
  machines: the prompts' SHA-256 are compared instead), seed, target_tokens, max_new_tokens, chat,
  device, dtype or fidelity; a method label whose knobs changed (a new default in the code) or whose
  files changed (`Method.provenance`: a headwise calibration rewritten in place); a sample id whose
  prompt changed (a changed task generator or data file).

The manifest then describes the union: `config` with n the largest so far and methods / budgets the
union in first-seen order, `methods` and `samples` merged by label and id, and `invocations` one
entry per run (time, n, methods, budgets). The errors name the field and both values.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from kvdiag.errors import KvdiagError
from kvdiag.eval.store import PREDICTIONS

FIXED_KEYS = ("model", "task", "task_knobs", "seed", "target_tokens", "max_new_tokens", "chat", "device",
              "dtype", "fidelity")  # fmt: skip
MACHINE_LOCAL_KNOBS = ("data_dir",)


def prompt_digest(input_ids) -> str:
    """SHA-256 of a prompt's token ids ([1, L] tensor or a list), to tell whether a sample changed."""
    ids = input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else list(input_ids)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _conflict(out: Path, field: str, old, new) -> KvdiagError:
    return KvdiagError(
        f"cannot add to {out}: {field} is {old!r} there and {new!r} now; existing cells would change "
        f"meaning (use the same value, a new --out, or --overwrite to start afresh)"
    )


def previous_manifest(out: Path, config: dict) -> dict | None:
    """The manifest of an eval run in `out` whose fixed fields match `config` (None when `out` holds
    no run yet); a real conflict raises, naming the field and both values."""
    path = out / "manifest.json"
    if not path.exists():
        if (out / PREDICTIONS).exists():
            raise KvdiagError(
                f"{out} has {PREDICTIONS} but no manifest.json; use a new --out, or --overwrite to start afresh"
            )
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("command") != "eval":
        raise KvdiagError(f"{out} holds a {manifest.get('command')!r} run, not an eval run; use a new --out")
    old = manifest.get("config", {})
    for key in FIXED_KEYS:
        before, now = old.get(key), config.get(key)
        if key == "task_knobs" and isinstance(before, dict) and isinstance(now, dict):
            for knob in sorted(set(before) | set(now)):
                if knob not in MACHINE_LOCAL_KNOBS and before.get(knob) != now.get(knob):
                    raise _conflict(out, f"task knob {knob}", before.get(knob), now.get(knob))
        elif before != now:
            raise _conflict(out, key, before, now)
    return manifest


def _union(first: list, second: list) -> list:
    """first, then the items of second not in it (compared by repr), in order."""
    merged, seen = list(first), {repr(x) for x in first}
    for item in second:
        if repr(item) not in seen:
            seen.add(repr(item))
            merged.append(item)
    return merged


def _digests(provenance: dict | None) -> dict:
    """{file role: SHA-256} of a method's `provenance` (paths differ between machines; content counts)."""
    return {
        role: entry.get("sha256") for role, entry in (provenance or {}).items() if isinstance(entry, dict)
    }


def merge_manifest(
    out: Path, previous: dict | None, config: dict, methods: list[dict], samples: list[dict]
) -> dict:
    """(config, methods, samples, invocations) of the run after this invocation: the union of what
    `previous` holds and what is asked now. methods: [{"label", "knobs", "budgets", ...}]; samples:
    [{"id", "prompt_tokens", "prompt_sha256", ...}]. Raises on a method whose knobs changed or a
    sample whose prompt changed."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    asked = {"time": now, "n": config["n"], "methods": config["methods"], "budgets": config["budgets"]}
    if previous is None:
        return {"config": config, "methods": methods, "samples": samples, "invocations": [asked]}
    old_config = previous["config"]
    merged_methods = {m["label"]: dict(m) for m in previous.get("methods", [])}
    for method in methods:
        before = merged_methods.get(method["label"])
        if before is None:
            merged_methods[method["label"]] = dict(method)
            continue
        if before.get("knobs") != method.get("knobs"):
            raise _conflict(
                out, f"the knobs of method {method['label']}", before.get("knobs"), method.get("knobs")
            )
        if _digests(before.get("provenance")) != _digests(method.get("provenance")):
            raise _conflict(out, f"the SHA-256 of the files read by method {method['label']}",
                            _digests(before.get("provenance")), _digests(method.get("provenance")))  # fmt: skip
        before["budgets"] = _union(before.get("budgets", []), method["budgets"])
        before["own_budgets"] = bool(before.get("own_budgets")) and bool(method.get("own_budgets"))
    merged_samples = {s["id"]: s for s in previous.get("samples", [])}
    for sample in samples:
        before = merged_samples.get(sample["id"])
        if before is None:
            merged_samples[sample["id"]] = sample
            continue
        for key in ("prompt_tokens", "prompt_sha256"):
            if key in before and before[key] != sample[key]:
                raise _conflict(out, f"sample {sample['id']}'s {key}", before[key], sample[key])
    merged_config = {
        **config,
        "n": max(int(old_config.get("n", 0)), config["n"]),
        "methods": _union(old_config.get("methods", []), config["methods"]),
        "budgets": _union(old_config.get("budgets", []), config["budgets"]),
    }
    history = previous.get("invocations") or [{"time": previous.get("created"), **{
        k: old_config.get(k) for k in ("n", "methods", "budgets")}}]  # fmt: skip
    return {
        "config": merged_config, "methods": list(merged_methods.values()),
        "samples": list(merged_samples.values()), "invocations": [*history, asked],
    }  # fmt: skip
