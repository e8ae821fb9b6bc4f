"""Capture what attention sees in a stock Hugging Face model, and the Trace that holds it.

- `kvdiag.capture.hooks`: `capture_prompt`, the `capture` context manager, `Recorder` and the hooks;
- `kvdiag.capture.trace`: `Trace`, per layer q / k_pre / k_post / v with canonical names, saved as
  safetensors + JSON;
- `kvdiag.capture.rope`: the rotary embedding as the models apply it.
"""

from kvdiag.capture.hooks import Recorder, capture, capture_prompt, recording_hooks, resolve_layers
from kvdiag.capture.trace import LayerKV, Trace

__all__ = ["LayerKV", "Recorder", "Trace", "capture", "capture_prompt", "recording_hooks", "resolve_layers"]
