"""kvdiag: where KV-cache offloading and sparse-attention methods lose what long tasks need.

Heavy modules (torch, transformers) load on first use; `import kvdiag` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "kvdiag.models",
    "list_models": "kvdiag.models",
    "capture": "kvdiag.capture",
    "Trace": "kvdiag.capture.trace",
    "key_spectrum": "kvdiag.analysis.spectrum",
    "lowrank_damage": "kvdiag.analysis.lowrank",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvdiag' has no attribute {name!r}")
