"""Run directories: atomic writes, the manifest (config, versions, git hash, device), tidy tables."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvdiag.errors import KvdiagError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def write_table(df, path: Path) -> Path:
    """Write a tidy pandas table as parquet, atomically."""
    import io

    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def check_writable(out: str | Path) -> None:
    """`out` must be (or be creatable as) a writable directory; nothing is created here."""
    out = Path(out).expanduser()
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise KvdiagError(f"--out {out} is not a writable directory ({probe_dir} is a file)")
    try:
        probe = probe_dir / f".kvdiag-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise KvdiagError(f"--out {out} is not a writable directory ({err.strerror})") from err


def prepare_run_dir(out: str | Path) -> Path:
    """Create (or reuse) a run directory, checked writable first, before any long work starts."""
    out = Path(out).expanduser()
    check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KvdiagError(f"--out {out} is not a writable directory ({err.strerror})") from err
    return out


def git_hash() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Versions of everything that changes numbers, plus the GPU (for bug reports and manifests)."""
    import torch
    import transformers

    info = {
        "kvdiag": __import__("kvdiag").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_manifest(out: Path, command: str, config: dict, extra: dict | None = None) -> dict:
    manifest = {
        "command": command,
        "config": config,
        "versions": versions(),
        "git": git_hash(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_json(Path(out) / "manifest.json", manifest)
    return manifest


@contextlib.contextmanager
def staged_run_dir(out: str | Path):
    """Yield a staging directory inside `out`; on success its files move into `out`, on any error
    nothing is left behind (and `out` is removed again if this call created it)."""
    out = Path(out).expanduser().absolute()
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    out = prepare_run_dir(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield staging
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = out / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for path in created:  # remove what this call created, if it stayed empty
            if path.exists() and not any(path.iterdir()):
                path.rmdir()
