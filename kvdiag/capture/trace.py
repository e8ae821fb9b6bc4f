"""`Trace`: what `kvdiag.capture` recorded for one prompt, with canonical names, saved atomically.

Canonical tensor names (batch 1; H_q query heads, H_kv KV heads, L prompt tokens, d head dim):

    layers.{i}.q         [H_q, L, d]   queries after RoPE (after q_norm where the model has one)
    layers.{i}.k_pre     [H_kv, L, d]  keys before RoPE (after k_norm where the model has one)
    layers.{i}.k_post    [H_kv, L, d]  keys after RoPE, exactly as attention / the KV cache sees them
    layers.{i}.v         [H_kv, L, d]  values
    layers.{i}.attn_out  [H_q, L, d]   attention output (o_proj input), only with outputs=True
    positions            [L]           position ids of the prompt tokens
    rope.{j}.cos/.sin    [L, d]        the model's rotary tables; meta["rope_of_layer"][i] = j

On disk a trace is `trace.safetensors` plus `trace.json` (model, prompt hash, token count, layers,
dtype, versions, per-layer scale and sliding window, SHA-256 of the tensor file). Each file is written to a temporary name and
renamed; the JSON is written last, so a trace without its JSON was never completed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvdiag.errors import KvdiagError
from kvdiag.runs import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

TENSOR_FILE = "trace.safetensors"
META_FILE = "trace.json"
CHECKSUM = "tensors_sha256"  # key of trace.json: SHA-256 of trace.safetensors
FIELDS = ("q", "k_pre", "k_post", "v", "attn_out")


@dataclass
class LayerKV:
    """One attention layer of one prompt (batch 1), as `kvdiag.capture` records it.

    k_pre:   [H_kv, L, d] keys before RoPE (after k_norm where the architecture has one)
    k_post:  [H_kv, L, d] keys after RoPE (what exact attention uses)
    v:       [H_kv, L, d] values
    cos/sin: [L, d] the model's own rotary tables at the prompt positions:
             `kvdiag.capture.rope.apply_rope(k_pre, cos, sin)` reproduces k_post
    scaling: softmax scale of the model's attention (1/sqrt(d) for Llama/Qwen)
    q:       [H_q, L, d] post-RoPE prompt queries, or None (methods that calibrate on prompt
             queries, LRQK and InfiniGen, need it)
    """

    k_pre: torch.Tensor
    k_post: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scaling: float
    q: torch.Tensor | None = None
    layer_idx: int = 0

    @property
    def n_kv_heads(self) -> int:
        return self.k_post.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.k_post.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_post.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_post.dtype


@dataclass
class Trace:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- access
    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def has_queries(self) -> bool:
        """False for a trace captured with queries=False (its `layer_kv` has q=None)."""
        return bool(self.meta.get("with_queries", True))

    def get(self, layer: int, name: str) -> torch.Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.tensors:
            have = sorted({k.split(".")[1] for k in self.tensors if k.startswith("layers.")}, key=int)
            if str(layer) not in have:
                raise KvdiagError(f"layer {layer} was not captured; captured layers: {', '.join(have)}")
            raise KvdiagError(f"{key} was not captured (capture with outputs=True for attn_out)")
        return self.tensors[key]

    def q(self, layer: int) -> torch.Tensor:
        return self.get(layer, "q")

    def k_pre(self, layer: int) -> torch.Tensor:
        return self.get(layer, "k_pre")

    def k_post(self, layer: int) -> torch.Tensor:
        return self.get(layer, "k_post")

    def v(self, layer: int) -> torch.Tensor:
        return self.get(layer, "v")

    def rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [L, d] the model used at this layer."""
        j = self.meta["rope_of_layer"][str(layer)]
        return self.tensors[f"rope.{j}.cos"], self.tensors[f"rope.{j}.sin"]

    def layer_meta(self, layer: int) -> dict:
        """scaling, sliding_window, softcap, group of one layer."""
        return self.meta["layer_info"][str(layer)]

    def layer_kv(self, layer: int, dtype: torch.dtype | None = torch.float32, device=None):
        """The layer as a `LayerKV` (float32 by default, for analyses), the methods' input."""

        def conv(t):
            return t.to(device=device, dtype=dtype or t.dtype)

        cos, sin = self.rope(layer)
        return LayerKV(
            k_pre=conv(self.k_pre(layer)),
            k_post=conv(self.k_post(layer)),
            v=conv(self.v(layer)),
            cos=cos.to(device=device, dtype=torch.float32),
            sin=sin.to(device=device, dtype=torch.float32),
            scaling=self.layer_meta(layer)["scaling"],
            q=conv(self.q(layer)) if self.has_queries else None,
            layer_idx=layer,
        )

    def to(self, device) -> Trace:
        return Trace({k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))

    def __repr__(self) -> str:
        return (
            f"Trace(model={self.meta.get('model')!r}, tokens={self.n_tokens}, layers={self.layers}, "
            f"dtype={self.meta.get('dtype')})"
        )

    # ----------------------------------------------------------------- storage
    def save(self, directory: str | Path) -> Path:
        """Write `trace.safetensors` and `trace.json` into `directory` (atomically, JSON last); the JSON
        holds the SHA-256 of the tensor file, which `load` verifies."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = save({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()})
        atomic_write_bytes(directory / TENSOR_FILE, payload)
        atomic_write_json(directory / META_FILE, {**self.meta, CHECKSUM: hashlib.sha256(payload).hexdigest()})
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Trace:
        """Read a trace saved by `save`; a missing, truncated, damaged (checksum) or inconsistent one
        gets a clear error. `directory` may also be a run directory holding the trace in `trace/`."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        directory = trace_dir(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSOR_FILE
        if not meta_path.exists() or not tensor_path.exists():
            raise KvdiagError(f"{directory} holds no complete trace (need {META_FILE} and {TENSOR_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
            payload = tensor_path.read_bytes()
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise KvdiagError(f"corrupt trace in {directory}: {err}") from err
        if not isinstance(meta, dict):
            raise KvdiagError(f"corrupt trace in {directory}: {META_FILE} is not a JSON object")
        expected = meta.get(CHECKSUM)
        if expected is None:
            log.warning("%s was saved without a checksum; its tensors are not verified", directory)
        elif hashlib.sha256(payload).hexdigest() != expected:
            raise KvdiagError(
                f"corrupt trace in {directory}: {TENSOR_FILE} does not match the SHA-256 in {META_FILE} "
                f"(damaged or replaced); capture it again"
            )
        try:
            tensors = {k: v.to(device) for k, v in load(payload).items()}
        except SafetensorError as err:
            raise KvdiagError(f"corrupt trace in {directory}: {err}") from err
        missing = [
            f"layers.{i}.{name}" for i in meta.get("layers", []) for name in ("q", "k_pre", "k_post", "v")
            if f"layers.{i}.{name}" not in tensors and (name != "q" or meta.get("with_queries", True))
        ]  # fmt: skip
        if missing or "n_tokens" not in meta:
            raise KvdiagError(f"corrupt trace in {directory}: missing {', '.join(missing[:4]) or 'n_tokens'}")
        meta.pop(CHECKSUM, None)
        return cls(tensors, meta)


def trace_dir(path: str | Path) -> Path:
    """The folder of a saved trace: `path` itself, or `path`/trace for a run directory written with
    --save-trace."""
    path = Path(path)
    if not (path / META_FILE).exists() and (path / "trace" / META_FILE).exists():
        return path / "trace"
    return path


def load_saved_trace(path: str | Path, model: str | None, layers="all", device: str = "cpu"):
    """A trace saved with --save-trace, for a run that reuses it instead of capturing (--trace).

    model: the --model given (None: the trace's own); a different one is an error, as is a layer the
    trace did not capture; layers 'all' means every captured layer. Returns (trace, model name, the chosen captured layers)."""
    from kvdiag.capture.hooks import resolve_layers

    trace = Trace.load(path, device=device)
    captured_by = trace.meta.get("model") or "?"
    if model is not None and model != captured_by:
        raise KvdiagError(
            f"--trace {path} was captured from model {captured_by!r}, not {model!r}; drop --model or use its trace"
        )
    if layers is None or (isinstance(layers, str) and layers.strip() == "all"):
        return trace, captured_by, trace.layers  # every captured layer
    n_layers = (trace.meta.get("shapes") or {}).get("layers") or max(trace.layers) + 1
    chosen = resolve_layers(layers, n_layers)
    missing = [i for i in chosen if i not in trace.layers]
    if missing:
        raise KvdiagError(
            f"--trace {path} did not capture layer {missing[0]}; captured layers: {', '.join(map(str, trace.layers))}"
        )
    return trace, captured_by, chosen
