"""Run directories: the one policy for --out, atomic writes, the manifest, tidy tables.

A *run directory* is a folder with a `manifest.json` whose "command" names its kind (spectrum,
recall, eval, reproduce). Every command that writes one asks `claim_run_dir` first, before any long
work starts:

- a missing or empty folder, or one without a manifest.json, takes a new run;
- a folder that holds a run of another kind is refused, naming that kind;
- a folder that holds a run of the same kind is resumed by the commands that resume (eval,
  reproduce: they then compare configurations) and refused by the others (spectrum, recall);
- `--overwrite` replaces whatever run is there, atomically: the new run is staged beside `out` and
  swapped in only when it has finished (`staged_run_dir`, `replacing_run_dir`); until then the old
  run stays untouched, and a failed or interrupted new run leaves it as it was.

Files are written to a temporary name and renamed, with the permissions the umask gives (as
`open()` would), never mkstemp's 0600.
"""

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

MANIFEST = "manifest.json"
RESUMABLE = ("eval", "reproduce")  # run kinds that resume into their own directory


# --- permissions and atomic writes ------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    The file gets mode 0666 & ~umask, as a plain `open(path, "w")` would give it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def read_table(path: str | Path):
    """A parquet table written by `write_table`; a missing or damaged file gets a one-line error."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise KvdiagError(f"{path} does not exist")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KvdiagError(
            f"{path} is not a readable parquet table ({reason}); re-run the command that wrote it"
        ) from None


# --- manifests and the --out policy -----------------------------------------------------------------


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of a run directory, with one-line errors for a missing folder, a folder that is
    not a run (no manifest.json) and a damaged manifest."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise KvdiagError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise KvdiagError(f"{run_dir} is a file, not a run directory")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise KvdiagError(f"{run_dir} has no {MANIFEST}; is it a kvdiag run directory?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise KvdiagError(f"{path} is damaged ({reason}); it is not a readable kvdiag manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("command"), str):
        raise KvdiagError(f"{path} is not a kvdiag manifest (it names no command)")
    return manifest


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


def holds_run(out: str | Path) -> bool:
    """Whether `out` is a directory with a manifest.json (readable or not)."""
    return (Path(out).expanduser() / MANIFEST).is_file()


def replaces_run(out: str | Path, overwrite: bool, distributed: bool = False) -> bool:
    """Whether a resumable command (eval, reproduce) must build a whole new run beside `out` and swap it
    in (`replacing_run_dir`): `overwrite` over an existing run. Refused under torchrun, where every
    rank would need the same staging directory."""
    if not (overwrite and holds_run(out)):
        return False
    if distributed:
        raise KvdiagError(
            f"--overwrite of {out} under torchrun: remove the run first, or overwrite it without torchrun"
        )
    return True


def _describe(manifest: dict) -> str:
    created = manifest.get("created")
    model = (manifest.get("config") or {}).get("model")
    details = ", ".join(
        x for x in (f"model {model}" if model else "", f"created {created}" if created else "") if x
    )
    return f"a {manifest['command']} run" + (f" ({details})" if details else "")


def claim_run_dir(out: str | Path, command: str | None, *, overwrite: bool = False) -> dict | None:
    """May `command` write its run into `out`? Checked before any long work; nothing is created.

    Returns the existing manifest when `out` holds a run of `command` that it resumes (eval,
    reproduce; the caller then compares configurations), else None (a new run, or `overwrite`).
    Raises a KvdiagError naming the run that is there otherwise (see the module docstring).
    command None (a caller that does not name its kind) refuses every existing run."""
    out = Path(out).expanduser()
    check_writable(out)  # also refuses a file
    if not holds_run(out):
        return None
    try:
        manifest = read_manifest(out)
    except KvdiagError as err:
        if overwrite:
            return None
        raise KvdiagError(
            f"--out {out}: {err}; choose a new --out, or pass --overwrite to replace it"
        ) from None
    if overwrite:
        return None
    if command is None or manifest["command"] != command:
        wanted = f", not a {command} run" if command else ""
        raise KvdiagError(
            f"--out {out} holds {_describe(manifest)}{wanted}; choose a new --out, or pass --overwrite to "
            f"replace it"
        )
    if command in RESUMABLE:
        return manifest
    raise KvdiagError(
        f"--out {out} already holds {_describe(manifest)}; choose a new --out, or pass --overwrite to "
        f"replace it"
    )


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


# --- staging: a run appears whole or not at all -----------------------------------------------------


def prepare_run_dir(out: str | Path) -> Path:
    """Create (or reuse) a run directory, checked writable first, before any long work starts."""
    out = Path(out).expanduser()
    check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KvdiagError(f"--out {out} is not a writable directory ({err.strerror})") from err
    return out


def _missing_dirs(out: Path) -> list[Path]:
    """`out` and its ancestors that do not exist yet, deepest first."""
    return [p for p in (out, *out.parents) if not p.exists()]


def _remove_if_empty(paths: list[Path]) -> None:
    for path in paths:  # deepest first
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(staging: Path, out: Path) -> None:
    """Put directory `staging` in the place of directory `out` and delete the old `out`. Atomic where
    the OS can exchange two names; else two renames, the old one restored if the second fails."""
    staging, out = Path(staging), Path(out)
    if not out.exists():
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging)  # holds the old run now
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def replacing_run_dir(out: str | Path):
    """Yield an empty staging directory beside `out` that receives a whole new run; when the block
    finishes it replaces `out` (`swap_in`), on any error it is deleted and `out` stays as it was."""
    out = Path(out).expanduser().absolute()
    created = _missing_dirs(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    os.chmod(staging, 0o777 & ~current_umask())  # it becomes `out`: not mkdtemp's 0700
    try:
        yield staging
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(created)


@contextlib.contextmanager
def staged_run_dir(out: str | Path, command: str | None = None, *, overwrite: bool = False):
    """The run directory of a one-shot command (spectrum, recall): `claim_run_dir`, then yield a
    staging directory; on success its files move into `out` (or, with `overwrite` over an existing
    run, the staged run replaces `out` whole), on any error nothing is left behind (and `out` is
    removed again if this call created it)."""
    claim_run_dir(out, command, overwrite=overwrite)
    out = Path(out).expanduser().absolute()
    if overwrite and holds_run(out):
        with replacing_run_dir(out) as staging:
            yield staging
        return
    created = _missing_dirs(out)
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
        _remove_if_empty(created)
